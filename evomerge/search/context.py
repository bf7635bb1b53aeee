"""The run's resident context: models, the evaluator (which merges candidates into itself),
the tasks, the banks and anchors. Built once per process: by the driver, and by each worker of a
pool (:mod:`evomerge.search.executor`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.models import resolve_model
from evomerge.search.executor import LocalExecutor
from evomerge.search.fitness import endpoint_refs
from evomerge.search.inputs import (TaskPair, check_devices, check_task_splits, check_tasks_fit_fitness, dataflow_space,
                                    load_tasks)
from evomerge.search.rundir import RunDir


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
    executor: object = None  # evomerge.search.executor.Executor; None: this process (LocalExecutor)
    alignment: dict | None = None  # models.align: what was aligned where (the run's alignment.json)

    def run_jobs(self, jobs, on_result=None) -> list[dict]:
        """Answer ``jobs`` (:mod:`evomerge.search.executor`) on the run's executor; each result
        reaches ``on_result`` as it arrives, and all come back in job order."""
        if self.executor is None:
            self.executor = LocalExecutor()
        return self.executor.map(self, list(jobs), on_result)

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


def build_context(cfg: RunConfig, rd: RunDir, log=print) -> SearchContext:
    from evomerge.backends.evaluator import MergeSources, make_evaluator
    from evomerge.genome import ParameterSpace

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would drown the progress lines
    check_devices(cfg.evaluator)
    base = resolve_model(cfg.models.base, what="models.base")
    endpoints = {ref: resolve_model(ref, what=f"models.endpoints[{i}]") for i, ref in enumerate(cfg.models.endpoints)}
    alignment = None
    if cfg.models.align is not None:
        base, endpoints, alignment = aligned_inputs(cfg, base, endpoints, rd, log)
    tasks = load_tasks(cfg)
    for line in check_tasks_fit_fitness(cfg, tasks) + check_task_splits(tasks):
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
    ctx = SearchContext(cfg, rd, base, endpoints, tasks, space, evaluator, log=log, alignment=alignment)
    try:
        ctx.check_recipes_fit()
    except BaseException:
        evaluator.close()
        raise
    return ctx


def aligned_inputs(cfg: RunConfig, base: Path, endpoints: dict[str, Path], rd: RunDir | None, log
                   ) -> tuple[Path, dict[str, Path], dict]:
    """``models.align``: the base and endpoints aligned into the reference's coordinates (computed
    once into the content-addressed cache, reused after). A resumed run must find the alignment
    its ``alignment.json`` records (same inputs and settings); the caller records a new run's."""
    import json

    from evomerge.align.recipe_step import align_models, aligned_folder

    spec = cfg.models.align
    refs = ["base", *endpoints]
    reference = refs.index(spec.reference or "base")
    paths = [base, *endpoints.values()]
    recorded = rd.root / "alignment.json" if rd is not None else None
    if recorded is not None and recorded.is_file():
        before = json.loads(recorded.read_text())["folder"]
        now = aligned_folder(paths, spec.method, reference, spec.tasks, spec.seed, "models.align")
        if before != str(now):
            raise EvomergeError(f"models.align: this run's models were aligned into {before}, but the models "
                                f"as they are now align into {now} (a model's files changed); the logged "
                                "evaluations belong to the old models: restore them or start a new run")
    folder, aligned = align_models(paths, spec.method, reference, spec.tasks, spec.seed, "models.align", log=log)
    record = {"folder": str(folder), "reference": refs[reference],
              "models": {ref: str(p) for ref, p in zip(refs, aligned)}}
    if recorded is not None and not recorded.is_file():
        record_alignment(rd, record)  # a run stopped before it recorded its alignment
    return aligned[0], dict(zip(endpoints, aligned[1:])), record


def record_alignment(rd: RunDir, alignment: dict | None) -> None:
    """Write ``alignment.json`` (the aligned folders, and the step's own record) into the run
    directory once, when ``models.align`` is set (``alignment``: :attr:`SearchContext.alignment`)."""
    import json

    from evomerge.search.rundir import atomic_write_json

    path = rd.root / "alignment.json"
    if alignment is None or path.is_file():
        return
    step = json.loads((Path(alignment["folder"]) / "alignment.json").read_text())
    atomic_write_json(path, {**alignment, "alignment": step})
