"""Bad-input corpus, part 2: merge recipes, run configs, task folders and `evomerge irt` inputs.

Every case runs the CLI in process (tests/_bad_input.py) and checks the error contract: one clear
message naming the file / field, exit 2, nothing half-written (no --out folder, no run directory).
Classes (issue 12): 3 strings and booleans passed as numbers; 5 configs that `--check` passed and
then failed or ran wrong; 6 nonsense accepted without a word; 7 docs and code disagreeing.

Decisions (class 6): fitness.anchors above a task's search items is capped with a one-line
warning (`--check` and the run say it), as is `irt anchors -n` / `irt check -n` above the items; more adaptive rounds
than a task's items is refused; `irt fit` refuses a matrix with no variance at all and one subject,
and keeps items that every subject answers alike with a one-line warning (a run's bank must hold
every item of its task); `irt next -k 0` is a usage error; the same endpoint twice or the base
among the endpoints is refused by config validation (models.endpoints.N).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests._bad_input import Case, check_case

# ----------------------------------------------------------------------------- helpers


def _zoo() -> Path:
    return Path(os.environ["EVOMERGE_ZOO"])


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _no(rel: str):
    """``after``: ``tmp/rel`` was not created."""
    def after(tmp: Path) -> None:
        assert not (tmp / rel).exists(), f"{rel} was created"
    return after


# --- recipes

def _recipe(method: str = "task_arithmetic", params=None, top=None, extra: str = "") -> callable:
    """A recipe on the zoo's base and lang expert with ``params`` for the expert (YAML text
    pieces, so that YAML's own booleans and strings reach the loader as a user wrote them)."""
    def setup(tmp: Path) -> None:
        z = _zoo() / "models"
        p = params if params is not None else "{weight: 1.0}"
        lines = [f"merge_method: {method}", f"base_model: {z / 'base'}", "models:",
                 f"  - model: {z / 'lang_expert'}", f"    parameters: {p}"]
        if top is not None:
            lines.append(f"parameters: {top}")
        _write(tmp / "recipe.yaml", "\n".join(lines) + "\n" + extra)
    return setup


def _merge(setup, words, **kw) -> dict:
    return dict(args=["merge", "{tmp}/recipe.yaml", "--out", "{tmp}/out"], setup=setup, words=words,
                after=_no("out"), **kw)


# --- configs

BASE = {
    "name": "bad",
    "seed": 0,
    "models": {"base": "zoo:base", "endpoints": ["zoo:lang"]},
    "search_space": {"kind": "parameter", "method": "task_arithmetic",
                     "genes": [{"name": "weight", "bounds": [0.0, 1.2]}]},
    "tasks": [{"zoo": "lang", "search_limit": 40}],
    "evaluator": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 64},
    "calibration": {"samples": 2},
    "fitness": {"estimator": "mpirt", "anchors": 4, "anchor_method": "info", "rounds": 1},
    "optimizer": {"name": "cmaes", "generations": 1},
    "final": {"top_k": 1, "write_model": False},
}


def _cfg(mutate=None, raw: str | None = None, task: dict | None = None, sub: tuple[str, str] | None = None):
    """Write ``{tmp}/cfg.yaml`` (BASE changed by ``mutate(data, tmp)``, or ``raw`` YAML text) with
    run_dir ``{tmp}/run``; ``task``: a task folder ``{tmp}/task`` to write (see :func:`_task`)."""
    def setup(tmp: Path) -> None:
        if task is not None:
            _task(tmp / "task", **task)
        if raw is not None:
            _write(tmp / "cfg.yaml", raw.replace("{tmp}", str(tmp)))
            return
        data = copy.deepcopy(BASE)
        data["run_dir"] = str(tmp / "run")
        if mutate is not None:
            mutate(data, tmp)
        text = yaml.safe_dump(data, sort_keys=False)
        if sub is not None:  # YAML spellings a dict cannot carry (yes / on: booleans to YAML)
            text = text.replace(sub[0], sub[1])
        _write(tmp / "cfg.yaml", text)
    return setup


def _set(dotted: str, value):
    """A mutate function setting one dotted field (integers index lists)."""
    def mutate(data, tmp):
        parts = dotted.split(".")
        d = data
        for p in parts[:-1]:
            d = d[int(p)] if isinstance(d, list) else d.setdefault(p, {})
        last = parts[-1]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return mutate


def _task(folder: Path, n: int = 3, meta: str | None = None, search: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f'{{"id": "t{i}", "prompt": "say {i}=", "answer": "x"}}\n' for i in range(n))
    if search:
        _write(folder / "search.jsonl", rows)
    _write(folder / "heldout.jsonl", rows)
    if meta is not None:
        _write(folder / "task.json", meta)


def _with_task(data, tmp):
    data["tasks"] = [{"path": str(tmp / "task"), "name": "mytask"}]


def _check(setup, words, exit: int = 2, **kw) -> dict:
    return dict(args=["search", "{tmp}/cfg.yaml", "--check"], setup=setup, words=words, exit=exit,
                after=_no("run"), **kw)


def _run(setup, words, extra=(), **kw) -> dict:
    """`evomerge search` (a real run): must fail before the run directory exists."""
    return dict(args=["search", "{tmp}/cfg.yaml", *extra], setup=setup, words=words, after=_no("run"), **kw)


# --- irt

ITEMS = [f"q{i}" for i in range(10)]


def _sim(M: int, I: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    th = rng.standard_normal(M)
    b = np.linspace(-1.5, 1.5, I)
    return (rng.random((M, I)) < 1 / (1 + np.exp(-(th[:, None] - b)))).astype(float)


def _matrix(Y, name: str = "resp.csv"):
    def setup(tmp: Path) -> None:
        from irt.io import write_responses

        Y_ = np.asarray(Y, dtype=float)
        write_responses(tmp / name, Y_, ITEMS[: Y_.shape[1]], [f"m{k}" for k in range(Y_.shape[0])])
    return setup


def _varied(M: int = 12) -> np.ndarray:
    Y = _sim(M)
    Y[0, :], Y[1, :] = 1.0, 0.0  # every item has variance
    return Y


def _bank(tmp: Path) -> None:
    """A small bank (12 subjects × 10 items, d = 1) and answers to estimate with."""
    from irt import ItemBank
    from irt.io import write_responses

    Y = _varied()
    ItemBank.fit(Y, ITEMS, [f"m{k}" for k in range(len(Y))], dim=1).save(tmp / "bank.safetensors")
    A = _sim(2, seed=3)
    A[:, 5:] = np.nan
    write_responses(tmp / "answers.csv", A, ITEMS, ["s0", "s1"])


def _irt(args, setup=None, words=(), exit: int = 2, after=None) -> dict:
    return dict(args=["irt", *args], setup=setup, words=words, exit=exit, after=after)


def _written(rel: str):
    def after(tmp: Path) -> None:
        assert (tmp / rel).is_file(), f"{rel} not written"
    return after


# ----------------------------------------------------------------------------- cases

_ones = np.ones((6, 10))
_one_subject = _sim(1)
_const_items = _varied()
_const_items[:, 3] = 1.0  # one item everybody gets right
_nan_const = np.full((5, 10), np.nan)
_nan_const[:, :4] = 0.0

CASES = [
    # ---- class 3: strings and booleans as numbers, in merge recipes
    Case("recipe-weight-string", **_merge(_recipe(params='{weight: "heavy"}'),
                                          ["models[0].parameters.weight", "lang_expert", "expected a number", "heavy"])),
    Case("recipe-weight-yaml-bool", **_merge(_recipe(params="{weight: yes}"),
                                             ["models[0].parameters.weight", "expected a number", "True"])),
    Case("recipe-weight-bool-in-gradient", **_merge(_recipe(params="{weight: [0.5, true]}"), ["weight"])),
    Case("recipe-weight-string-in-filter", **_merge(
        _recipe(params='{weight: [{filter: mlp, value: "x"}, {value: 1.0}]}'), ["weight", "expected a number"])),
    Case("recipe-weight-nan", **_merge(_recipe(params="{weight: .nan}"), ["weight", "finite"])),
    Case("recipe-lambda-string", **_merge(_recipe(top='{lambda: "big"}'),
                                          ["parameters.lambda", "expected a number"])),
    Case("recipe-normalize-number", **_merge(_recipe(top="{normalize: 1}"), ["parameters.normalize", "true or false"])),
    # ---- class 5 (recipes): values outside a method's valid range, named with file and model
    Case("recipe-ties-density-negative", **_merge(_recipe("ties", "{weight: 1.0, density: -0.5}"),
                                                  ["recipe.yaml", "models[0].parameters.density", "lang_expert", "(0, 1]"])),
    Case("recipe-dare-density-zero", **_merge(_recipe("dare_ties", "{weight: 1.0, density: 0}"), ["density", "(0, 1]"])),
    Case("recipe-density-in-filter-list", **_merge(
        _recipe("ties", "{weight: 1.0, density: [{filter: mlp, value: 1.5}, {value: 0.5}]}"), ["density", "1.5"])),
    Case("recipe-density-gradient", **_merge(_recipe("ties", "{weight: 1.0, density: [0.2, 2.0]}"), ["density", "2.0"])),
    Case("recipe-della-epsilon-negative", **_merge(_recipe("della", "{weight: 1.0, epsilon: -0.1}"), ["epsilon", "[0, 1]"])),
    Case("recipe-slerp-t-above-1", **_merge(_recipe("slerp", "{}", top="{t: 1.5}"), ["parameters.t", "[0, 1]"])),
    Case("recipe-sce-topk", **_merge(_recipe("sce", "{}", top="{select_topk: 2}"), ["select_topk"])),
    Case("recipe-yaml-syntax", **_merge(_recipe(extra="dtype: [float32\n"), ["recipe.yaml", "line", "column"])),
    # ---- class 3: configs (strict numbers and booleans), search --check
    Case("cfg-bounds-string", **_check(_cfg(_set("search_space.genes.0.bounds", ["0", 1])),
                                       ["cfg.yaml", "search_space.genes.0.bounds.0", "expected a number"])),
    Case("cfg-bounds-bool", **_check(_cfg(_set("search_space.genes.0.bounds", [False, True])),
                                     ["search_space.genes.0.bounds", "expected a number"])),
    Case("cfg-anchors-yes", **_check(_cfg(_set("fitness.anchors", "__YES__"), sub=("__YES__", "yes")),
                                     ["fitness.anchors", "expected an integer", "True"])),
    Case("cfg-bounds-yaml-bool", **_check(_cfg(_set("search_space.genes.0.bounds", [0, "__ON__"]), sub=("__ON__", "on")),
                                          ["search_space.genes.0.bounds.1", "expected a number", "True"])),
    Case("cfg-sigma0-string", **_check(_cfg(_set("optimizer.sigma0", "0.2")), ["optimizer.sigma0", "expected a number"])),
    Case("cfg-write-model-string", **_check(_cfg(_set("final.write_model", "yes")), ["final.write_model", "true or false"])),
    Case("cfg-batch-size-bool", **_check(_cfg(_set("evaluator.batch_size", True)), ["evaluator.batch_size", "integer"])),
    Case("cfg-gpu-util-bool", **_check(_cfg(_set("evaluator.gpu_memory_utilization", True)),
                                       ["gpu_memory_utilization", "expected a number"])),
    Case("cfg-layer-groups-float", **_check(_cfg(_set("search_space.genes.0.layer_groups", 2.5)),
                                            ["search_space.genes.0.layer_groups", "integer"])),
    Case("cfg-samples-string", **_check(_cfg(_set("calibration.samples", "40")), ["calibration.samples", "integer"])),
    Case("cfg-search-limit-bool", **_check(_cfg(_set("tasks.0.search_limit", True)), ["tasks.0.search_limit", "integer"])),
    Case("cfg-fixed-lambda-string", **_check(_cfg(_set("search_space.fixed", {"lambda": "x"})),
                                             ["search_space.fixed.lambda", "expected a number"])),
    Case("cfg-fixed-normalize-string", **_check(_cfg(_set("search_space.fixed", {"normalize": "no"})),
                                                ["search_space.fixed.normalize", "true or false"])),
    # ---- class 5: configs that --check used to pass
    Case("cfg-density-bounds-negative", **_check(_cfg(lambda d, t: d["search_space"].update(
        method="ties", genes=[{"name": "weight"}, {"name": "density", "bounds": [-0.5, 1.0]}])),
        ["search_space.genes.1.bounds", "density", "(0, 1]"])),
    Case("cfg-slerp-t-bounds", **_check(_cfg(lambda d, t: d["search_space"].update(
        method="slerp", genes=[{"name": "t", "bounds": [0.0, 2.0]}])), ["search_space.genes.0.bounds", "[0, 1]"])),
    Case("cfg-fixed-density-out-of-range", **_check(_cfg(lambda d, t: d["search_space"].update(
        method="ties", fixed={"density": 1.5})), ["search_space.fixed.density", "(0, 1]"])),
    Case("cfg-gene-boolean-param", **_check(_cfg(_set("search_space.genes", [{"name": "normalize"}])),
                                            ["search_space.genes.0.bounds", "cannot be searched"])),
    Case("cfg-gene-unknown-param", **_check(_cfg(_set("search_space.genes", [{"name": "densty"}])),
                                            ["search_space.genes.0.name", "densty"])),
    Case("cfg-gene-and-fixed", **_check(_cfg(_set("search_space.fixed", {"weight": 1.0})),
                                        ["search_space.genes.0.name", "fixed"])),
    Case("cfg-unknown-method", **_check(_cfg(_set("search_space.method", "tie")), ["search_space.method", "tie"])),
    Case("cfg-template-without-prompt", **_check(_cfg(_set("tasks.0.template", "Answer: ")),
                                                 ["tasks.0.template", "{prompt}"])),
    Case("cfg-seed-negative", **_check(_cfg(_set("seed", -5)), ["cfg.yaml", "seed", "0"])),
    Case("cfg-seed-cli-negative", args=["search", "{tmp}/cfg.yaml", "--check", "--seed", "-5"], setup=_cfg(),
         words=["--seed"], after=_no("run")),
    Case("cfg-bounds-infinite", **_check(_cfg(_set("search_space.genes.0.bounds", [0.0, float("inf")])),
                                         ["search_space.genes.0.bounds", "finite"])),
    # ---- class 6: nonsense in configs
    Case("cfg-endpoint-twice", **_check(_cfg(_set("models.endpoints", ["zoo:lang", "zoo:cipher", "zoo:lang"])),
                                        ["models.endpoints.2", "twice"])),
    Case("cfg-base-as-endpoint", **_check(_cfg(_set("models.endpoints", ["zoo:base", "zoo:lang"])),
                                          ["models.endpoints.0", "base"])),
    Case("cfg-rounds-above-anchors", **_check(_cfg(lambda d, t: d["fitness"].update(anchors=3, rounds=4)),
                                              ["fitness.rounds"])),
    Case("cfg-rounds-above-task-items", **_check(_cfg(lambda d, t: (_with_task(d, t), d["fitness"].update(
        anchors=4, rounds=4)), task={"n": 3}), ["fitness.rounds", "mytask", "3 search items"])),
    # ---- smaller: error layout, YAML errors
    Case("cfg-yaml-syntax", **_check(_cfg(raw="name: x\nmodels: {base: zoo:base\n"), ["cfg.yaml", "line", "column"])),
    Case("cfg-two-errors-two-lines", **_check(_cfg(lambda d, t: (d.update(seed=-1), d["fitness"].update(anchors=0))),
                                              ["cfg.yaml: seed", "cfg.yaml: fitness.anchors"])),
    # ---- models: one resolver (evomerge.models) for search, merge and eval; errors name the field
    Case("cfg-base-folder-missing", **_check(_cfg(lambda d, t: d["models"].update(base=str(t / "nowhere"))),
                                             ["models.base", "nowhere", "folder not found"])),
    Case("cfg-endpoint-is-a-file", **_check(_cfg(lambda d, t: (_write(t / "afile", "x"), d["models"].update(
        endpoints=[str(t / "afile")]))), ["models.endpoints[0]", "afile", "is a file, not a model folder"])),
    Case("cfg-endpoint-unknown-zoo-model", **_check(_cfg(_set("models.endpoints", ["zoo:lang", "zoo:nope"])),
                                                    ["models.endpoints[1]", "zoo:nope", "not in the zoo", "zoo:lang"])),
    Case("run-base-folder-missing", **_run(_cfg(lambda d, t: d["models"].update(base="./gone")),
                                           ["models.base", "./gone", "folder not found"])),
    # ---- class 7: task folders
    Case("task-folder-missing", **_check(_cfg(lambda d, t: d.update(tasks=[{"path": str(t / "nowhere"), "name": "x"}])),
                                         ["task folder not found", "nowhere"])),
    Case("task-folder-is-file", **_check(_cfg(lambda d, t: (_write(t / "afile", "x"), d.update(
        tasks=[{"path": str(t / "afile"), "name": "x"}]))), ["task folder not found", "afile"])),
    Case("task-json-invalid", **_check(_cfg(_with_task, task={"meta": "{bad"}), ["task.json", "line"])),
    Case("task-json-template-without-prompt", **_check(_cfg(_with_task, task={"meta": '{"template": "Q: "}'}),
                                                       ["task.json", "template", "{prompt}"])),
    Case("task-search-jsonl-missing", **_check(_cfg(_with_task, task={"search": False}), ["search.jsonl", "not found"])),
    Case("task-given-bank-other-items", **_check(_cfg(lambda d, t: (_with_task(d, t), _bank(t / "banks"), (
        t / "banks" / "bank.safetensors").rename(t / "banks" / "mytask.bank.safetensors"), d["calibration"].update(
        banks=str(t / "banks"))), task={"n": 5}), ["calibration.banks", "differ"])),
    # ---- `evomerge search` (a real run): bad configs fail before the run directory exists
    Case("run-density-bounds", **_run(_cfg(lambda d, t: d["search_space"].update(
        method="ties", genes=[{"name": "density", "bounds": [-0.5, 1.0]}])), ["search_space.genes.0.bounds"])),
    Case("run-seed-cli-negative", **_run(_cfg(), ["--seed"], extra=["--seed", "-5"])),
    Case("run-template-without-prompt", **_run(_cfg(_set("tasks.0.template", "same for all")), ["{prompt}"])),
    Case("run-endpoint-twice", **_run(_cfg(_set("models.endpoints", ["zoo:lang", "zoo:lang"])), ["twice"])),
    Case("run-rounds-above-task-items", **_run(_cfg(lambda d, t: (_with_task(d, t), d["fitness"].update(
        anchors=4, rounds=4)), task={"n": 2}), ["fitness.rounds"])),
    Case("run-task-folder-missing", **_run(_cfg(lambda d, t: d.update(tasks=[{"path": str(t / "gone"), "name": "x"}])),
                                           ["task folder not found"])),
    # ---- irt: matrices, banks, options (class 6)
    Case("irt-fit-all-correct", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors"], _matrix(_ones),
                                       ["resp.csv", "every observed answer is 1"], after=_no("b.safetensors"))),
    Case("irt-fit-all-wrong", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors"], _matrix(0 * _ones),
                                     ["every observed answer is 0"], after=_no("b.safetensors"))),
    Case("irt-fit-constant-with-missing", **_irt(["fit", "{tmp}/resp.csv", "-o", "{tmp}/b.safetensors"],
                                                 _matrix(_nan_const), ["no variance"], after=_no("b.safetensors"))),
    Case("irt-fit-one-subject", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors"],
                                       _matrix(_one_subject), ["resp.csv", "at least 2 subjects"], after=_no("b.safetensors"))),
    Case("irt-fit-constant-item-warns", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors", "--dim", "1"],
                                               _matrix(_const_items), ["warning", "1 of 10 items", "q3"], exit=0,
                                               after=_written("b.safetensors"))),
    Case("irt-fit-dims-zero", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors", "--dims", "0,1"],
                                     _matrix(_varied()), ["--dims"], after=_no("b.safetensors"))),
    Case("irt-fit-dim-zero", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors", "--dim", "0"],
                                    _matrix(_varied()), ["--dim"], after=_no("b.safetensors"))),
    Case("irt-fit-bad-cell", **_irt(["fit", "{tmp}/resp.csv", "--out", "{tmp}/b.safetensors"],
                                    lambda t: _write(t / "resp.csv", "subject,q0,q1\nm0,1,2\nm1,0,1\n"),
                                    ["resp.csv", "line 2", "not 0, 1 or missing"],
                                    after=_no("b.safetensors"))),
    Case("irt-next-k-zero", **_irt(["next", "{tmp}/bank.safetensors", "{tmp}/answers.csv", "-k", "0"], _bank, ["-k"])),
    Case("irt-next-k-negative", **_irt(["next", "{tmp}/bank.safetensors", "{tmp}/answers.csv", "-k", "-2"], _bank,
                                       ["-k"])),
    Case("irt-anchors-n-zero", **_irt(["anchors", "{tmp}/bank.safetensors", "-n", "0"], _bank, ["-n"])),
    Case("irt-anchors-n-above-items", **_irt(["anchors", "{tmp}/bank.safetensors", "-n", "50", "-o", "{tmp}/a.json"],
                                             _bank, ["warning", "capped at 10"], exit=0, after=_written("a.json"))),
    Case("irt-estimate-gp-lambda", **_irt(["estimate", "{tmp}/bank.safetensors", "{tmp}/answers.csv", "--gp-lambda", "2"],
                                          _bank, ["--gp-lambda"])),
    Case("irt-estimate-not-a-bank", **_irt(["estimate", "{tmp}/resp.csv", "{tmp}/resp.csv"], _matrix(_varied()),
                                           ["resp.csv", "safetensors"])),
    Case("irt-check-rounds-above-n", **_irt(["check", "{tmp}/resp.csv", "-n", "3", "--rounds", "5"],
                                            _matrix(_varied()), ["rounds", "5 rounds for 3 items"])),
    Case("irt-check-n-zero", **_irt(["check", "{tmp}/resp.csv", "-n", "0"], _matrix(_varied()), ["-n"])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch, zoo):
    out = check_case(case, tmp_path / "case", capsys, monkeypatch, zoo.root)
    assert "<unicode string>" not in out
    if case.exit == 2 and "error:" in out:
        # the first line names the file or the field: never a bare "invalid config"
        first = out[out.index("error:"):].splitlines()[0]
        assert "invalid config" not in first, out


def test_config_errors_one_line_each(tmp_path, capsys, monkeypatch, zoo):
    """Each config error is one line naming file and field (the field on the first line)."""
    case = Case("two", **_check(_cfg(lambda d, t: (d.update(seed=-1), d["fitness"].update(anchors=0))), []))
    out = check_case(case, tmp_path, capsys, monkeypatch, zoo.root)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 2, out
    assert lines[0].startswith("error: ") and "cfg.yaml: seed: " in lines[0], out
    assert "cfg.yaml: fitness.anchors: " in lines[1], out


def test_task_json_optional_and_anchors_capped(tmp_path, capsys, monkeypatch, zoo):
    """A task folder without task.json works (README: optional; name = the folder's name), and
    more anchors than items is said in one line, not silently capped."""
    case = Case("ok", **_check(_cfg(lambda d, t: (_with_task(d, t), d["fitness"].update(anchors=8, rounds=2),
                                                  d["search_space"]["genes"][0].update(bounds=[-1.0, 1.0])),
                                    task={"n": 5}),
                               ["config OK", "warning: fitness.anchors: 8", "capped at 5"], exit=0))
    check_case(case, tmp_path, capsys, monkeypatch, zoo.root)
    from evomerge.tasks import load_task_dir

    assert load_task_dir(tmp_path / "task").name == "task"
