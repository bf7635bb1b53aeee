"""The search: calibrate -> item banks -> generations of ask/evaluate/tell -> held-out -> best.

Resume is by replay. The optimizer's state is a function of its seed and of the (genome,
fitness) pairs it was told, so a resumed run rebuilds it by asking and telling again, taking
each fitness from the evaluation log instead of evaluating; it checks that every replayed ask
equals the logged genome (a mismatch means the code or config changed under the run, and it
stops with a clear message rather than mixing two runs). Evaluations are appended to the log
(fsync) before the optimizer is told, so a kill at any instant loses at most the candidate
being evaluated at that moment, which is then evaluated again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from evomerge.config import SAFE_ON_RESUME, RunConfig, diff_configs, parse_config
from evomerge.errors import EvomergeError
from evomerge.search.fitness import (bits, endpoint_refs, evaluate_candidate, first_round_size, scalar_fitness,
                                     unbits)
from evomerge.search.rundir import RunDir, append_jsonl, atomic_write_json, atomic_write_text, read_jsonl


# ----------------------------------------------------------------------------- run setup


def target_run_dir(cfg: RunConfig, run_dir: str | None = None) -> RunDir:
    """Where a new run goes; refuses a folder that already holds something, or one that cannot
    be created (a parent is a file, no write permission, read-only file system)."""
    from evomerge.fsutil import check_output_target

    given = run_dir is not None
    if run_dir is None:
        run_dir = cfg.run_dir or f"populations/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    what = "--run-dir" if given else ("run_dir" if cfg.run_dir else "run directory")
    rd = RunDir(run_dir)
    if rd.root.exists() and not rd.root.is_dir():
        raise EvomergeError(f"{what} {rd.root} is a file, not a folder; choose another run directory")
    try:
        busy = rd.root.is_dir() and any(rd.root.iterdir())
    except OSError as exc:
        raise EvomergeError(f"{what} {rd.root}: cannot read it ({exc.strerror or exc})") from None
    if busy:
        raise EvomergeError(f"{rd.root}: run directory exists and is not empty; resume it with "
                            f"`evomerge search --resume {rd.root}` or choose another run_dir")
    check_output_target(rd.root, what, folder=True)
    return rd


def new_run_dir(cfg: RunConfig, run_dir: str | None = None) -> RunDir:
    """Create the run directory and freeze the config in it (on an OS error, whatever it
    created is removed again)."""
    from evomerge.fsutil import make_dirs, output_error, remove_dirs

    rd = target_run_dir(cfg, run_dir)
    created: list[Path] = []
    try:
        created = make_dirs(rd.root)
        frozen = cfg.to_dict()
        frozen["run_dir"] = str(rd.root)
        atomic_write_text(rd.config, yaml.safe_dump(frozen, sort_keys=False))
        rd.set_state(stage="calibrating")
    except (OSError, EvomergeError) as exc:
        for f in (rd.state_file, rd.config):
            try:
                f.unlink()
            except OSError:
                pass
        remove_dirs(created)
        if isinstance(exc, OSError):
            raise output_error(rd.root, exc, "run directory") from None
        raise
    return rd


def open_run_dir(run_dir: str | Path, new_cfg: RunConfig | None = None) -> tuple[RunDir, RunConfig]:
    """Open a run for resume; refuse a changed config unless only safe fields changed."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"{rd.root}: not a run directory (no config.yaml); start a run with "
                            "`evomerge search CONFIG`")
    from evomerge.config import yaml_error_message

    try:
        frozen = yaml.safe_load(rd.config.read_text())
    except yaml.YAMLError as exc:
        raise EvomergeError(yaml_error_message(rd.config, exc) + " — the run's frozen config is damaged; "
                            "restore it, or start a new run") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{rd.config}: cannot read the run's frozen config ({exc})") from None
    cfg = parse_config(frozen, str(rd.config))
    if new_cfg is not None:
        new = new_cfg.to_dict()
        new["run_dir"] = frozen.get("run_dir")
        changed = diff_configs(cfg.to_dict(), new)
        unsafe = [c for c in changed if not any(c == s or c.startswith(s + ".") for s in SAFE_ON_RESUME)]
        if unsafe:
            raise EvomergeError(
                f"{rd.root}: the config differs from the run's frozen config in "
                f"{', '.join(unsafe)}; resuming would mix two different searches. Resume "
                f"without a config, or start a new run (safe to change: "
                f"{', '.join(SAFE_ON_RESUME)})")
        if changed:
            cfg = new_cfg.model_copy(update={"run_dir": frozen.get("run_dir")})
            atomic_write_text(rd.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rd.repair()
    return rd, cfg


# ----------------------------------------------------------------------------- context


@dataclass
class TaskPair:
    name: str
    search: object   # evomerge.tasks.Task
    heldout: object  # evomerge.tasks.Task


@dataclass
class SearchContext:
    """Everything resident during a run: models, the evaluator (which merges candidates into
    itself), tasks, banks."""

    cfg: RunConfig
    rd: RunDir
    base_path: Path
    endpoint_paths: dict[str, Path]
    tasks: dict[str, TaskPair]
    space: object
    evaluator: object  # evomerge.backends.evaluator.Evaluator
    banks: dict = field(default_factory=dict)
    anchors: dict = field(default_factory=dict)   # task -> irt.Anchors (positions in the bank)
    anchor_positions: dict = field(default_factory=dict)  # task -> positions in the task's items
    log: callable = print

    def apply_genome(self, genome) -> dict:
        """Make the evaluator's model the candidate of ``genome``; returns its recipe (a
        mergekit-style dict, or a dataflow path's JSON form)."""
        if getattr(self.space, "kind", "parameter") == "dataflow":
            self.evaluator.load_model(self.space.build(genome))
            return self.space.decode(genome)
        recipe = self.space.decode(genome)
        self.apply_recipe(recipe)
        return recipe

    def apply_recipe(self, recipe: dict) -> None:
        self.evaluator.apply_recipe(_resolve_recipe(recipe, self.base_path, self.endpoint_paths))

    def apply_endpoint(self, ref: str) -> None:
        """Load one endpoint (or the base) into the live model: linear with weight 1, which
        returns that model's tensors exactly."""
        self.evaluator.apply_recipe(self.endpoint_recipe(ref))

    def endpoint_recipe(self, ref: str) -> dict:
        path = self.base_path if ref == "base" else self.endpoint_paths[ref]
        recipe = {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}],
                  "dtype": self.cfg.evaluator.dtype}
        if self.cfg.models.tokenizer_source == "base":
            # rows mapped onto the base's vocabulary, as for the candidates (linear ignores base_model)
            recipe.update(base_model=str(self.base_path), tokenizer_source="base")
        return recipe

    def check_recipes_fit(self) -> None:
        """Before anything runs: the endpoints and a candidate merge into the live model (names,
        shapes, vocabularies), or one error that says what to set."""
        from evomerge.merge.vocab import VocabSizeMismatch

        if getattr(self.space, "kind", "parameter") == "dataflow":
            return
        # the candidate first: with every model in one recipe a vocabulary mismatch is named as such
        recipes = [_resolve_recipe(self.space.decode(self.space.initial_genome()), self.base_path,
                                   self.endpoint_paths)]
        recipes += [self.endpoint_recipe(r) for r in endpoint_refs(self.cfg)]
        try:
            for r in recipes:
                self.evaluator.check_recipe(r)
        except VocabSizeMismatch as exc:
            raise EvomergeError(f"models: the vocabularies differ in size ({exc.detail}); set "
                                "`models.tokenizer_source: base` to map embedding rows by token onto the base's "
                                "vocabulary (every candidate keeps the base's tokenizer)") from None

    def bank_to_task(self, task: str) -> np.ndarray:
        """For each item of ``task``'s bank, its position among the task's search items (−1: none)."""
        pos = {it.id: i for i, it in enumerate(self.tasks[task].search.items)}
        return np.asarray([pos.get(i, -1) for i in self.banks[task].item_ids], dtype=np.int64)

    def answer(self, task: str, split: str, indices=None) -> np.ndarray:
        pair = self.tasks[task]
        t = pair.search if split == "search" else pair.heldout
        items = t.items if indices is None else [t.items[i] for i in indices]
        return np.asarray(self.evaluator.answer(t, items), dtype=np.int8)


def _resolve_recipe(recipe: dict, base_path: Path, endpoint_paths: dict[str, Path]) -> dict:
    """Replace model references in a decoded recipe by their resolved folders."""
    out = dict(recipe)
    out["base_model"] = str(base_path)
    out["models"] = [{**m, "model": str(endpoint_paths.get(m["model"], m["model"]))}
                     for m in recipe["models"]]
    return out


_ZOOS: dict = {}


def _zoo():
    """The embedded zoo (built on first use, cached on disk; looked up once per process)."""
    from evomerge.zoo import build_zoo, default_root

    root = str(default_root())
    if root not in _ZOOS:
        _ZOOS[root] = build_zoo(verbose=True)
    return _ZOOS[root]


def resolve_model(ref: str) -> Path:
    """A model reference -> a local checkpoint folder (zoo:NAME, a folder, or a hub id)."""
    if ref.startswith("zoo:"):
        return Path(_zoo().model(ref[4:]))
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists() or ref.startswith((".", "/", "~")):
        raise EvomergeError(f"models: {ref!r} is not a model folder (expected config.json and "
                            "safetensors inside)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                           "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown id, gated...
        raise EvomergeError(f"models: {ref!r} is neither a local folder nor a downloadable hub "
                            f"model ({type(exc).__name__}: {exc})") from None


def load_tasks(cfg: RunConfig) -> dict[str, TaskPair]:
    """Load every task's search and held-out items."""
    from evomerge.tasks import load_task_dir
    from evomerge.tasks.sources import load_dataset_task

    out = {}
    for tc in cfg.tasks:
        name = tc.task_name
        if tc.source is not None:
            search, heldout = load_dataset_task(name, tc.source)
        else:
            if tc.zoo is not None:
                zoo = _zoo()
                if tc.zoo not in zoo.task_names:
                    raise EvomergeError(f"tasks: zoo task {tc.zoo!r} unknown; the zoo has "
                                        + ", ".join(zoo.task_names))
                folder = zoo.task_dir(tc.zoo)
            else:
                folder = Path(tc.path)
            search = load_task_dir(folder, split="search")
            heldout = load_task_dir(folder, split="heldout")
            search.name = heldout.name = name
        for t in (search, heldout):
            if tc.template is not None:
                t.template = tc.template
            if tc.extract is not None:
                t.extract = tc.extract
            mnt = cfg.evaluator.max_new_tokens or tc.max_new_tokens
            if mnt is not None:
                t.max_new_tokens = mnt
            if tc.metric is not None:
                t.metric = tc.metric
        if tc.search_limit:
            search.items = search.items[: tc.search_limit]
        out[name] = TaskPair(name, search, heldout)
    return out


def check_devices(ev) -> None:
    """Refuse, before anything is loaded, an evaluator device this machine does not have; the
    error names the config field."""
    import torch

    for field_name in ("device", "merge_device", "merge_compute"):
        value = getattr(ev, field_name)
        if value is None:
            continue
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            raise EvomergeError(f"evaluator.{field_name}: {value!r} is not a device name; use cpu, "
                                "cuda or cuda:N") from None
        if dev.type == "cpu":
            continue
        if dev.type != "cuda":
            raise EvomergeError(f"evaluator.{field_name}: {value!r}: only cpu and cuda devices are supported")
        n = torch.cuda.device_count()
        if n == 0:
            raise EvomergeError(f"evaluator.{field_name}: {value!r}, but torch {torch.__version__} sees no "
                                "CUDA GPU on this machine; set it to cpu here, or run on a machine with a GPU")
        if dev.index is not None and dev.index >= n:
            raise EvomergeError(f"evaluator.{field_name}: {value!r}, but this machine has {n} CUDA "
                                f"GPU(s): cuda:0..cuda:{n - 1}")


def build_context(cfg: RunConfig, rd: RunDir, log=print) -> SearchContext:
    from evomerge.backends.evaluator import MergeSources, make_evaluator
    from evomerge.genome import ParameterSpace

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would drown the progress lines
    check_devices(cfg.evaluator)
    base = resolve_model(cfg.models.base)
    endpoints = {ref: resolve_model(ref) for ref in cfg.models.endpoints}
    tasks = load_tasks(cfg)
    for line in check_tasks_fit_fitness(cfg, tasks):
        log(line)
    ss = cfg.search_space
    if ss.kind == "dataflow":
        ref = {"base": base, **endpoints}
        space = dataflow_space(cfg, ref[ss.dataflow.model_a], ref[ss.dataflow.model_b])
    else:
        space = ParameterSpace(ss.method, cfg.models.base, cfg.models.endpoints, ss.genes,
                               ss.fixed, dtype=cfg.evaluator.dtype, seed=cfg.seed,
                               tokenizer_source=cfg.models.tokenizer_source)
    if ss.kind != "parameter" and cfg.evaluator.backend == "vllm":
        raise EvomergeError(
            f"search_space.kind: {ss.kind} with evaluator.backend: vllm: every data-flow candidate has its "
            "own layer count, so vLLM would start a new engine per candidate (~25 s each on the CPU); run "
            "the data-flow stage with backend: hf (also on CUDA), or search kind: parameter with vllm")
    ev = cfg.evaluator
    sources = MergeSources(tuple(str(p) for p in (base, *endpoints.values())),
                           device=ev.merge_device or ev.device, compute_device=ev.merge_compute,
                           resident=ev.resident, method=ss.method if ss.kind != "dataflow" else None)
    evaluator = make_evaluator(ev, base, sources)
    ctx = SearchContext(cfg, rd, base, endpoints, tasks, space, evaluator, log=log)
    try:
        ctx.check_recipes_fit()
    except BaseException:
        evaluator.close()
        raise
    return ctx


def dataflow_space(cfg: RunConfig, model_a: Path, model_b: Path):
    from evomerge.search.spaces import DataflowGenomeSpace

    return DataflowGenomeSpace(cfg.search_space.dataflow, model_a, model_b,
                               device=cfg.evaluator.device, dtype=cfg.evaluator.dtype)


# ----------------------------------------------------------------------------- calibration


def calibration_population(ctx: SearchContext) -> list[tuple[str, list | None]]:
    """The base, the endpoints, then ``calibration.samples`` genomes drawn uniformly from the
    search space (seeded by the run seed): the subjects the item banks are fitted on."""
    cfg = ctx.cfg
    pop: list[tuple[str, list | None]] = [("base", None)]
    pop += [(ref, None) for ref in cfg.models.endpoints]
    rng = np.random.default_rng([cfg.seed, 7919])
    for k in range(cfg.calibration.samples):
        pop.append((f"sample-{k:03d}", rng.uniform(0.0, 1.0, ctx.space.dim).tolist()))
    return pop


def run_calibration(ctx: SearchContext) -> None:
    """Answer every search item with every calibration model (resumable, one log line each)."""
    rd = ctx.rd
    done = {r["name"] for r in read_jsonl(rd.calibration)}
    pop = calibration_population(ctx)
    todo = [(n, g) for n, g in pop if n not in done]
    if todo:
        ctx.log(f"calibration: {len(pop)} models x {sum(len(p.search.items) for p in ctx.tasks.values())}"
                f" items ({len(pop) - len(todo)} already done)")
    for name, genome in todo:
        t0 = time.perf_counter()
        if genome is None:
            ctx.apply_endpoint(name)
        else:
            ctx.apply_genome(np.asarray(genome))
        answers = {t: bits(ctx.answer(t, "search")) for t in ctx.tasks}
        append_jsonl(rd.calibration, {"name": name, "genome": genome, "answers": answers,
                                      "seconds": round(time.perf_counter() - t0, 3)})
        acc = {t: round(float(unbits(a).mean()), 3) for t, a in answers.items()}
        ctx.log(f"  calibrated {name}: {acc}")


def fit_banks(ctx: SearchContext) -> None:
    """Fit (or reuse) one item bank per task and choose its anchors; both saved in the run.

    Whatever was computed, the loop then uses what is on disk, so an uninterrupted and a
    resumed run see bit-identical banks and anchors.
    """
    import irt

    cfg, rd = ctx.cfg, ctx.rd
    records = read_jsonl(rd.calibration)
    names = [r["name"] for r in records]
    rd.banks.mkdir(parents=True, exist_ok=True)
    for task, pair in ctx.tasks.items():
        path = rd.bank_path(task)
        anchors_path = rd.banks / f"{task}.anchors.json"
        item_ids = [it.id for it in pair.search.items]
        try:
            if not path.exists():
                given = (Path(cfg.calibration.banks) / f"{task}.bank.safetensors"
                         if cfg.calibration.banks else None)
                if given is not None:
                    bank = load_given_bank(cfg, task, item_ids)
                else:
                    Y = np.stack([unbits(r["answers"][task]) for r in records]).astype(float)
                    t0 = time.perf_counter()
                    bank = irt.ItemBank.fit(Y, item_ids=item_ids, subject_names=names,
                                            dim=cfg.calibration.dim, seed=cfg.seed, task=task)
                    ctx.log(f"  item bank {task}: d={bank.dim}, fitted in "
                            f"{time.perf_counter() - t0:.1f}s on {len(names)} models")
                    try:
                        check = estimate_check(cfg, Y, item_ids, names, bank.dim)
                    except irt.IRTError as exc:  # a diagnostic: never the reason a run stops
                        check = None
                        ctx.log(f"    expected error of the estimate: not computed ({exc})")
                    if check is not None:
                        bank.meta["estimate_check"] = check.to_dict()
                        ctx.log(f"    {describe_check(check)}")
                bank.save(path)
            bank = irt.ItemBank.load(path)
            if not anchors_path.exists():
                # anchors are chosen among this task's items only (a given bank may hold more)
                # an adaptive test (rounds > 1) stores its first round here: the rest is per candidate
                n_fixed = first_round_size(cfg, len(item_ids))
                sel = irt.select_anchors(bank, n_fixed, method=cfg.fitness.anchor_method, seed=cfg.seed)
                tmp = anchors_path.with_name(anchors_path.name + ".tmp")
                sel.save(tmp)
                tmp.replace(anchors_path)
            ctx.banks[task] = bank
            ctx.anchors[task] = irt.Anchors.load(anchors_path, bank)
        except irt.IRTError as exc:
            raise EvomergeError(f"task {task!r}: {exc}") from None
        pos = {iid: i for i, iid in enumerate(item_ids)}
        ctx.anchor_positions[task] = np.asarray([pos[i] for i in ctx.anchors[task].item_ids], dtype=int)


def estimate_check(cfg: RunConfig, Y: np.ndarray, item_ids: list[str], names: list[str], dim: int):
    """The expected error of this run's fitness estimates on one task: the fitness procedure
    cross-fitted on the calibration models (:func:`irt.validate.cross_validate_estimates`);
    None with fewer than 2 sampled calibration models."""
    from irt.validate import cross_validate_estimates

    if len(names) - len(endpoint_refs(cfg)) < 2:
        return None
    fit = cfg.fitness
    return cross_validate_estimates(Y, item_ids, names, n=fit.anchors, estimator=fit.estimator,
                                    anchor_method=fit.anchor_method, rounds=fit.rounds,
                                    endpoints=endpoint_refs(cfg), folds=4, dim=dim, seed=cfg.seed)


def describe_check(c) -> str:
    """One log line for an :class:`irt.validate.EstimateCheck`."""
    return (f"expected error of the {c.n}-item estimate: {c.mae:.3f} (bias {c.bias:+.3f}; "
            f"{c.folds}-fold cross-fit on {c.n_subjects} sampled calibration models, whose "
            f"accuracies spread with sd {c.accuracy_sd:.3f}; plain mean of {c.n} random items: "
            f"{c.plain_mean_mae:.3f})")


# ----------------------------------------------------------------------------- the loop


def run_generations(ctx: SearchContext, generations: int | None = None,
                    population: int | None = None) -> list[dict]:
    """Ask/evaluate/race/tell for ``optimizer.generations`` (fewer where the search converged
    and ``on_converge: stop``), replaying logged evaluations and racing stages first. Returns
    every candidate's record with its racing stages applied."""
    from evomerge.search.convergence import ConvergenceMonitor
    from evomerge.search.optimizers import make_optimizer
    from evomerge.search.racing import RACE, line_key, plan_racing, race_generation, start

    cfg, rd = ctx.cfg, ctx.rd
    n_obj = len(ctx.tasks) if cfg.fitness.aggregate == "per_task" else 1
    opt_cfg = cfg.optimizer.model_copy(update={
        "generations": generations or cfg.optimizer.generations,
        "population": population or cfg.optimizer.population})
    opt = make_optimizer(opt_cfg, ctx.space.dim, seed=cfg.seed,
                         x0=ctx.space.initial_genome(), n_objectives=n_obj)
    logged = {r["index"]: r for r in read_jsonl(rd.evaluations)}
    raced = {line_key(x): x for x in read_jsonl(rd.racing) if x.get("phase", RACE) == RACE}
    plan = plan_racing(ctx) if cfg.fitness.estimator != "full" else None
    monitor = ConvergenceMonitor(cfg.optimizer.patience)
    events: list[dict] = []
    records: list[dict] = []
    index, evaluated_now, t_start = 0, 0, time.perf_counter()
    n_gen = opt_cfg.generations
    ctx.log(f"search: {opt.name}, {ctx.space.dim} genes, population {opt.population}, "
            f"{n_gen} generations ({len(logged)} evaluations in the log)"
            + (f"; contenders within {plan.margin:.3f} of the best asked up to "
               f"{2 ** plan.stages}x the items" if plan and plan.stages else ""))
    for gen in range(n_gen):
        genomes = opt.ask_generation()
        gen_recs = []
        for member, g in enumerate(genomes):
            rec = logged.get(index)
            if rec is not None:
                if rec["genome"] != [float(v) for v in g]:
                    raise EvomergeError(
                        f"{rd.evaluations}: evaluation {index} was logged with another genome "
                        "than the optimizer proposes on replay; the run was made by a different "
                        "version or config. Start a new run (the log is left untouched).")
            else:
                rec = evaluate_candidate(ctx, g, gen, member, index)
                append_jsonl(rd.evaluations, rec)
                evaluated_now += 1
            gen_recs.append(start(rec))
            index += 1
        if plan and plan.stages:
            incumbent = max((scalar_fitness(r) for r in records), default=None)
            gen_recs = race_generation(ctx, plan, gen_recs, incumbent, raced,
                                       lambda line: append_jsonl(rd.racing, line))
        opt.tell_generation(genomes, [r["fitness"] for r in gen_recs])
        records += gen_recs
        gen_fit = [scalar_fitness(r) for r in gen_recs]
        best = max(scalar_fitness(r) for r in records)
        elapsed = time.perf_counter() - t_start
        rate = evaluated_now / elapsed * 60 if evaluated_now else 0.0
        left = (n_gen - gen - 1) * opt.population / (rate / 60) if rate else 0.0
        raced_now = sum(1 for r in gen_recs if r["stage"] > 0)
        ctx.log(f"gen {gen + 1:3d}/{n_gen}  best {best:.4f}  mean {np.mean(gen_fit):.4f}"
                + (f"  raced {raced_now}" if plan and plan.stages else "")
                + f"  {rate:6.1f} cand/min  left {_fmt_time(left)}")
        rd.set_state(stage="searching", generation=gen + 1)
        reason = monitor.update(max(gen_fit), opt)
        if reason and gen + 1 < n_gen and _on_converge(ctx, opt, monitor, gen, reason, events):
            break
    return records


def _on_converge(ctx: SearchContext, opt, monitor, gen: int, reason: str, events: list[dict]) -> bool:
    """Act on convergence after generation ``gen`` as ``optimizer.on_converge`` says (recorded in
    ``events`` and state.json); True: stop the generations here."""
    action = ctx.cfg.optimizer.on_converge
    if action == "restart" and not hasattr(opt, "restart"):
        action = "continue"  # random search and Optuna's samplers have no restart
    if action == "continue" and getattr(monitor, "announced", False):
        return False  # said once
    event = {"generation": gen + 1, "reason": reason, "action": action}
    if action == "restart":
        event["action"] = opt.restart()
        monitor.reset()
    elif action == "continue":
        monitor.announced = True
        event["action"] = f"continuing ({ctx.cfg.optimizer.on_converge} not possible for {opt.name})" \
            if ctx.cfg.optimizer.on_converge == "restart" else "continuing (on_converge: continue)"
    else:
        event["action"] = "stopping the generations here (on_converge: stop)"
    ctx.log(f"  converged after generation {gen + 1} ({reason}); {event['action']}")
    events.append(event)
    ctx.rd.set_state(convergence=events)
    return action == "stop"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- end of run


def pareto_front(records: list[dict]) -> list[dict]:
    """Non-dominated candidates (multi-objective runs)."""
    pts = [(r, np.asarray(r["fitness"], dtype=float)) for r in records]
    front = []
    for r, f in pts:
        if not any(np.all(g >= f) and np.any(g > f) for _, g in pts):
            front.append(r)
    return front


def run_heldout(ctx: SearchContext, records: list[dict], reference: list[dict] | None = None
                ) -> list[dict]:
    """True held-out accuracy of the endpoints and of the top candidates (resumable).

    ``reference``: rows already measured (the PS stage's, for the dataflow stage); the
    endpoints are then not evaluated again."""
    from evomerge.search.baselines import baseline_recipes

    rd, cfg = ctx.rd, ctx.cfg
    done = {r["name"]: r for r in read_jsonl(rd.heldout)}
    jobs: list[tuple[str, str, object]] = []  # (name, kind, what)
    if reference is None:
        jobs += [(ref, "endpoint", ref) for ref in endpoint_refs(cfg)]
        if cfg.final.baselines and getattr(ctx.space, "kind", "parameter") != "dataflow":
            jobs += [(name, "baseline", recipe) for name, recipe in baseline_recipes(
                ctx.base_path, list(ctx.endpoint_paths.values()), cfg.evaluator.dtype, cfg.models.tokenizer_source)]
    from evomerge.search.selection import choose_finalists

    jobs += [(f"candidate-{r['index']}", "candidate", r) for r in choose_finalists(ctx, records)]
    out = [dict(r, index=None, estimated=None) for r in (reference or [])]
    for name, kind, what in jobs:
        if name not in done:
            if kind == "endpoint":
                ctx.apply_endpoint(what)
            elif kind == "baseline":
                ctx.evaluator.apply_recipe(what)
            else:
                ctx.apply_genome(np.asarray(what["genome"]))
            acc = {t: float(ctx.answer(t, "heldout").mean()) for t in ctx.tasks}
            line = {"name": name, "index": what["index"] if kind == "candidate" else None,
                    "accuracy": acc, "average": float(np.mean(list(acc.values()))),
                    "estimated": what["estimates"] if kind == "candidate" else None}
            if kind == "candidate":
                line.update(fitness=what["fitness"], estimate_error=what["estimate_error"], items=what["items"])
            if kind == "baseline":
                line["recipe"] = what
            append_jsonl(rd.heldout, line)
            done[name] = line
        out.append(done[name])
    return out


def write_best(ctx: SearchContext, records: list[dict], heldout: list[dict]) -> dict:
    """Pick the best re-evaluated candidate by held-out average; write recipe and model."""
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.recipe import MergeRecipe

    rd = ctx.rd
    cands = [h for h in heldout if h["index"] is not None]
    best_h = max(cands, key=lambda h: (h["average"], -h["index"]))
    rec = next(r for r in records if r["index"] == best_h["index"])
    summary = {"index": rec["index"], "generation": rec["generation"], "genome": rec["genome"],
               "fitness": best_h.get("fitness", rec["fitness"]),
               "estimates": best_h.get("estimated") or rec["estimates"],
               "estimate_error": best_h.get("estimate_error"), "items": best_h.get("items", rec["items"]),
               "heldout": best_h["accuracy"], "heldout_average": best_h["average"],
               "recipe": rec["recipe"]}
    if getattr(ctx.space, "kind", "parameter") == "dataflow":
        return _write_best_dataflow(ctx, rec, summary)
    resolved = _resolve_recipe(rec["recipe"], ctx.base_path, ctx.endpoint_paths)
    summary["recipe_resolved"] = resolved
    summary["genes"] = {s.label(): v for s, v in ctx.space.values(rec["genome"]).items()}
    model_dir = _record_best(rd, summary)
    from evomerge.merge.mergekit_io import to_mergekit_yaml

    # strict=False: what mergekit cannot express is written as a comment, not an error
    atomic_write_text(rd.best / "recipe.mergekit.yaml",
                      to_mergekit_yaml(MergeRecipe.from_dict(resolved), strict=False))
    if ctx.cfg.final.write_model and not model_dir.exists():
        merge_to_disk(MergeRecipe.from_dict(resolved), model_dir)
    return summary


def _record_best(rd: RunDir, summary: dict) -> Path:
    """Write best/recipe.json; drop a best/model of another candidate (a longer, resumed run
    found a better one). Returns where the model goes."""
    rd.best.mkdir(parents=True, exist_ok=True)
    model_dir, old = rd.best / "model", rd.best / "recipe.json"
    if model_dir.exists() and (not old.exists()
                               or json.loads(old.read_text())["index"] != summary["index"]):
        shutil.rmtree(model_dir)
    atomic_write_json(old, summary)
    return model_dir


def _write_best_dataflow(ctx: SearchContext, rec: dict, summary: dict) -> dict:
    """Best dataflow path: its JSON, a mergekit passthrough YAML when every scale is 1, and
    the folded checkpoint."""
    from evomerge.dataflow import DataflowPath, write_dataflow_checkpoint

    rd, space = ctx.rd, ctx.space
    path = DataflowPath.from_dict(rec["recipe"])
    summary["model_a"], summary["model_b"] = str(space.model_a), str(space.model_b)
    model_dir = _record_best(rd, summary)
    mk = rd.best / "recipe.mergekit.yaml"
    if all(st.scale == 1.0 for st in path.steps):
        slices, run = [], None
        for st in path.steps:
            src = str(space.model_a if st.model == "A" else space.model_b)
            if run and run[0] == src and run[2] == st.layer:
                run[2] += 1
            else:
                run = [src, st.layer, st.layer + 1]
                slices.append(run)
        atomic_write_text(mk, yaml.safe_dump({
            "merge_method": "passthrough", "dtype": ctx.cfg.evaluator.dtype,
            "slices": [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in slices]},
            sort_keys=False))
    else:
        atomic_write_text(mk, "# This dataflow recipe scales layer inputs, which mergekit cannot\n"
                          "# express; use best/model (scales folded into o_proj/down_proj) or\n"
                          "# best/recipe.json.\n")
    if ctx.cfg.final.write_model and not model_dir.exists():
        write_dataflow_checkpoint(path, space.model_a, space.model_b, model_dir)
    return summary


def summary_table(ctx: SearchContext, heldout: list[dict]) -> str:
    """The held-out table (endpoints, default merges, best candidates) and the best candidate's
    gain over the best default merge."""
    from evomerge.search.baselines import describe_gain, gain_over_baselines

    tasks = list(ctx.tasks)
    w = max([16] + [len(h["name"]) + 1 for h in heldout])
    head = (f"{'model':<{w}}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'average':>10}"
            + f"{'estimated (items)':>26}")
    lines = ["held-out accuracy (true, all held-out items); estimated: the search's fitness ± its "
             "expected error", head, "-" * len(head)]
    for h in heldout:
        lines.append(f"{h['name']:<{w}}" + "".join(f"{h['accuracy'][t]:>11.3f}" for t in tasks)
                     + f"{h['average']:>10.3f}" + f"{_estimate_text(h):>26}")
    gain = gain_over_baselines(heldout)
    if gain is not None:
        lines += ["", describe_gain(gain)]
    return "\n".join(lines)


def _estimate_text(h: dict) -> str:
    """'0.912 ± 0.011 (240)' for a re-evaluated candidate; '' for the others."""
    if h.get("fitness") is None:
        return ""
    f = h["fitness"]
    f = float(np.mean(f)) if isinstance(f, list) else float(f)
    err = h.get("estimate_error")
    return f"{f:.3f}" + (f" ± {err:.3f}" if err is not None else "") + f" ({h.get('items', '?')})"


# ----------------------------------------------------------------------------- entry point


def check_run(cfg: RunConfig, *, run_dir: str | None = None, log=print) -> list[str]:
    """Everything a new run checks before it starts (config, models and their vocabularies,
    tasks, devices, the run directory), then the plan — what the run will answer — as lines
    (also logged). Writes nothing."""
    target = target_run_dir(cfg, run_dir)
    _check_given_banks(cfg)
    ctx = build_context(cfg, None, log=lambda *_: None)
    try:
        return _plan_lines(cfg, ctx, target, log)
    finally:
        ctx.evaluator.close()


def _plan_lines(cfg: RunConfig, ctx: SearchContext, target: RunDir, log) -> list[str]:
    from evomerge.search.optimizers import default_population

    fit, ss, ev = cfg.fitness, cfg.search_space, cfg.evaluator
    n_search = {t: len(p.search.items) for t, p in ctx.tasks.items()}
    n_held = {t: len(p.heldout.items) for t, p in ctx.tasks.items()}
    K = len(cfg.models.endpoints)
    pop = cfg.optimizer.population or default_population(ctx.space.dim)
    cands = pop * cfg.optimizer.generations
    per_cand = sum(n_search.values()) if fit.estimator == "full" else sum(min(fit.anchors, n) for n in n_search.values())
    calibrate = fit.estimator != "full" and cfg.calibration.banks is None
    n_calib = 1 + K + cfg.calibration.samples
    params = ctx.evaluator.num_parameters
    lines = [
        f"config OK; the run would write to {target.root}",
        f"models: base {ctx.base_path} ({params / 1e6:.1f}M parameters) + {K} endpoints"
        + (", rows mapped onto the base's vocabulary" if cfg.models.tokenizer_source else ""),
        "tasks: " + ", ".join(f"{t} ({n_search[t]} search / {n_held[t]} held-out items)" for t in ctx.tasks),
        f"devices: evaluation {ev.device} ({ev.backend}), sources on {ev.merge_device or ev.device}, merging on "
        f"{ev.merge_compute or ev.merge_device or ev.device}",
        (f"calibration: {n_calib} models × {sum(n_search.values())} items = {n_calib * sum(n_search.values()):,} answers"
         if calibrate else "calibration: none" + (" (banks from calibration.banks)" if fit.estimator != "full" else "")),
        f"search: {ss.kind} / {ss.method if ss.kind != 'dataflow' else 'layer dataflow'}, {ctx.space.dim} genes, "
        f"{cfg.optimizer.name}, population {pop} × {cfg.optimizer.generations} generations = {cands} candidates × "
        f"{per_cand} items = {cands * per_cand:,} answers"
        + (f" (asked in {fit.rounds} rounds)" if fit.rounds > 1 and fit.estimator != "full" else ""),
    ]
    lines.append(_contest_plan(cfg))
    if ss.kind == "ps+dfs":
        lines.append(f"then a data-flow stage: {ss.dataflow.generations} generations on top of the PS best")
    lines += check_tasks_fit_fitness(cfg, ctx.tasks)
    n_base = 5 if cfg.final.baselines and ss.kind != "dataflow" else 0  # evomerge.search.baselines
    n_models = 1 + K + n_base + cfg.final.top_k
    lines.append(f"held-out: ({1 + K} endpoints + {n_base} default merges + top {cfg.final.top_k} candidates) × "
                 f"{sum(n_held.values())} items = {n_models * sum(n_held.values()):,} answers")
    for line in lines:
        log(line)
    return lines


def _contest_plan(cfg: RunConfig) -> str:
    """One plan line: racing, the finalists' sharpening and the action on convergence."""
    from evomerge.search.racing import racing_stages
    from evomerge.search.selection import final_stage

    stages = racing_stages(cfg)
    margin = cfg.fitness.racing.margin
    race = (f"racing: contenders (within {'an automatic margin' if margin == 'auto' else margin} of the best) asked "
            f"up to {2 ** stages}x the items in {stages} stages" if stages else "racing: off")
    fin = final_stage(cfg)
    race += f"; the {3 * cfg.final.top_k} best re-scored on {2 ** fin}x the items" if fin else ""
    return (race + f"; on convergence (patience {cfg.optimizer.patience}): {cfg.optimizer.on_converge}")


def run_search(cfg: RunConfig | None = None, *, resume: str | Path | None = None,
               run_dir: str | None = None, log=print) -> RunDir:
    """Run (or resume) a search to the end; returns its run directory."""
    if resume is not None:
        rd, cfg = open_run_dir(resume, cfg)
        log(f"resuming {rd.root} (stage: {rd.state().get('stage')})")
        ctx = build_context(cfg, rd, log=log)
    else:
        assert cfg is not None
        # everything that can fail on bad input fails before the run directory exists
        target = target_run_dir(cfg, run_dir)
        _check_given_banks(cfg)
        ctx = build_context(cfg, None, log=log)
    try:
        if resume is None:
            rd = ctx.rd = new_run_dir(cfg, str(target.root))
            log(f"run directory: {rd.root}")
        return _run_stages(ctx, cfg, rd, log)
    finally:
        ctx.evaluator.close()


def _run_stages(ctx: SearchContext, cfg: RunConfig, rd: RunDir, log) -> RunDir:
    if cfg.fitness.estimator != "full":
        rd.set_state(stage="calibrating")
        if cfg.calibration.banks is None:  # given banks replace the calibration
            run_calibration(ctx)
        fit_banks(ctx)
    rd.set_state(stage="searching")
    records = run_generations(ctx)
    rd.set_state(stage="finishing")
    heldout = run_heldout(ctx, records)
    two_stage = cfg.search_space.kind == "ps+dfs"
    if two_stage and not cfg.final.write_model:
        ctx.cfg = cfg.model_copy(update={"final": cfg.final.model_copy(update={"write_model": True})})
    best = write_best(ctx, records, heldout)
    stages = [(ctx, records, heldout, best, rd)]
    if two_stage:
        stages.append(run_dataflow_stage(ctx, heldout, best))
    from evomerge.report import write_report

    rd.set_state(stage="done")
    write_report(rd)
    for sctx, srecords, sheld, sbest, srd in stages:
        title = "data-flow stage (A = PS best)" if sctx is not ctx else (
            "parameter-space stage" if two_stage else "")
        log("")
        if title:
            log(f"== {title}")
        log(summary_table(sctx, sheld))
        items = sum(r["items"] for r in srecords)
        log(f"\nbest: candidate {sbest['index']} (generation {sbest['generation'] + 1}), held-out "
            f"average {sbest['heldout_average']:.3f}; {len(srecords)} candidates, {items} items "
            "answered")
        log(f"recipe: {srd.best / 'recipe.json'}  model: {srd.best / 'model'}")
    log(f"report: {rd.report}")
    return rd


def check_tasks_fit_fitness(cfg: RunConfig, tasks: dict) -> list[str]:
    """What needs the tasks' items, checked before a run directory exists: an adaptive test with
    more rounds than a task has items is refused; banks from ``calibration.banks`` must load and
    hold the task's items. Returns one warning line per task with fewer search items than
    ``fitness.anchors`` (its anchors are capped: every item is asked)."""
    fit = cfg.fitness
    if fit.estimator == "full":
        return []
    notes = []
    for name, pair in tasks.items():
        n = len(pair.search.items)
        if fit.rounds > min(fit.anchors, n):
            raise EvomergeError(f"fitness.rounds: {fit.rounds} rounds, but task {name!r} has {n} search items; "
                                f"each round asks at least one item: use at most {n} rounds, or more items")
        if fit.anchors > n:
            notes.append(f"warning: fitness.anchors: {fit.anchors}, but task {name!r} has {n} search items; "
                         f"its anchors are capped at {n} (every item is asked)")
    if cfg.calibration.banks is not None:
        for name, pair in tasks.items():
            load_given_bank(cfg, name, [it.id for it in pair.search.items])
    return notes


def load_given_bank(cfg: RunConfig, task: str, item_ids: list[str]):
    """The bank ``calibration.banks`` gives for ``task``, checked against the task's search items
    and (for mp-IRT) the endpoints; errors name the field and the file."""
    import irt

    given = Path(cfg.calibration.banks) / f"{task}.bank.safetensors"
    if not given.exists():
        raise EvomergeError(f"calibration.banks: {given} not found; the folder must hold one bank per task "
                            "(<task>.bank.safetensors)")
    try:
        bank = irt.ItemBank.load(given)
    except irt.IRTError as exc:
        raise EvomergeError(f"calibration.banks: {exc}") from None
    missing = set(item_ids) - set(bank.item_ids)
    extra = set(bank.item_ids) - set(item_ids)
    if missing or extra:
        raise EvomergeError(
            f"calibration.banks: {given}: the bank's items differ from task {task!r}'s search items "
            f"({len(missing)} missing, e.g. {sorted(missing)[:3]}; {len(extra)} extra, e.g. "
            f"{sorted(extra)[:3]}); use banks fitted on the same items, or remove calibration.banks")
    missing_endpoints = set(endpoint_refs(cfg)) - set(bank.subject_names)
    if cfg.fitness.estimator in ("mpirt", "gmpirt") and missing_endpoints:
        raise EvomergeError(f"calibration.banks: {given}: mp-IRT needs the endpoints among the bank's "
                            f"subjects; missing {sorted(missing_endpoints)}")
    return bank


def _check_given_banks(cfg: RunConfig) -> None:
    if cfg.calibration.banks is None or cfg.fitness.estimator == "full":
        return
    for tc in cfg.tasks:
        f = Path(cfg.calibration.banks) / f"{tc.task_name}.bank.safetensors"
        if not f.exists():
            raise EvomergeError(f"calibration.banks: {f} not found; the folder must hold one "
                                "bank per task (<task>.bank.safetensors)")


def run_dataflow_stage(ctx: SearchContext, ps_heldout: list[dict], ps_best: dict):
    """PS+DFS: a data-flow search whose model A is the parameter-space stage's best model."""
    import dataclasses

    cfg, rd = ctx.cfg, ctx.rd
    df = cfg.search_space.dataflow
    stage_rd = RunDir(rd.root / "dfs")
    stage_rd.root.mkdir(exist_ok=True)
    used = stage_rd.state().get("model_a_index")
    if used is not None and used != ps_best["index"] and read_jsonl(stage_rd.evaluations):
        raise EvomergeError(
            f"{stage_rd.root}: the data-flow stage was searched with PS candidate {used} as "
            f"model A, but the PS best is now candidate {ps_best['index']} (the PS stage ran "
            f"longer); its log would mix two models A. Move {stage_rd.root} away to search the "
            "data-flow stage again on the new PS best, or resume without the change")
    stage_rd.set_state(model_a_index=ps_best["index"])
    refs = {"base": ctx.base_path, **ctx.endpoint_paths}
    ctx.log(f"\ndata-flow stage: A = PS best ({rd.best / 'model'}), B = {df.model_b}")
    space = dataflow_space(cfg, rd.best / "model", refs[df.model_b])
    sctx = dataclasses.replace(ctx, rd=stage_rd, space=space)
    records = run_generations(sctx, generations=df.generations, population=df.population)
    reference = [h for h in ps_heldout if h["index"] is None]
    reference.append({"name": "ps-best", "accuracy": ps_best["heldout"],
                      "average": ps_best["heldout_average"]})
    heldout = run_heldout(sctx, records, reference=reference)
    best = write_best(sctx, records, heldout)
    rd.set_state(stage="finishing")
    return sctx, records, heldout, best, stage_rd
