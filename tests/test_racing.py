"""Overnight runs: racing (contenders asked more items), the final selection, convergence."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import parse_config
from evomerge.search.convergence import ConvergenceMonitor
from evomerge.search.optimizers import CMAESOptimizer
from evomerge.search.racing import merged_records
from evomerge.search.rundir import read_jsonl
from evomerge.search.selection import diverse_top, genome_distance

REPO = Path(__file__).resolve().parents[1]
TASKS = ("lang", "cipher", "upper")


def race_config(run_dir, **over) -> dict:
    """A small adaptive run with racing: 6 items per task in 2 rounds, 2 racing stages (12, 24
    items), finalists sharpened to 48."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["run_dir"] = str(run_dir)
    cfg["calibration"]["samples"] = 4
    cfg["fitness"].update(estimator="pirt", anchors=6, rounds=2, racing={"stages": 2, "margin": 0.05})
    cfg["optimizer"].update(generations=3, population=4)
    cfg["final"].update(top_k=2, write_model=False, baselines=False)
    for task in cfg["tasks"]:
        task["search_limit"] = 120
    for key, value in over.items():
        section, _, field = key.partition(".")
        cfg[section][field] = value
    return cfg


@pytest.fixture(scope="module")
def race_run(zoo, tmp_path_factory):
    from evomerge.search.loop import run_search

    tmp = tmp_path_factory.mktemp("race")
    lines: list[str] = []
    rd = run_search(parse_config(race_config(tmp / "run")), log=lines.append)
    return rd, lines


def test_contenders_are_asked_more_items_and_each_stage_is_logged(race_run):
    import irt

    rd, lines = race_run
    evals = read_jsonl(rd.evaluations)
    racing = read_jsonl(rd.racing)
    race = [x for x in racing if x["phase"] == "race"]
    assert race, "no candidate was raced"
    by_index = {e["index"]: e for e in evals}
    banks = {t: irt.ItemBank.load(rd.bank_path(t)) for t in TASKS}
    for x in race:
        e = by_index[x["index"]]
        for t in TASKS:
            asked = x["asked"][t]
            assert len(asked) == 6 * 2 ** x["stage"] == len(x["answers"][t])   # doubled per stage
            assert len(set(asked)) == len(asked)
            assert asked[:6] == e["asked"][t] and x["answers"][t][:6] == e["answers"][t]  # extends stage 0
            ans = np.array([int(c) for c in x["answers"][t]], dtype=float)
            est = irt.estimate_accuracy("pirt", banks[t], np.array(asked), None, ans)  # bank order = task order
            assert est == pytest.approx(x["estimates"][t], abs=1e-12)
        assert x["fitness"] == pytest.approx(np.mean([x["estimates"][t] for t in TASKS]))
        assert x["items"] == 3 * 6 * 2 ** x["stage"]
    # successive halving: a stage-2 line only for a candidate raced at stage 1, in the same generation
    stage1 = {x["index"] for x in race if x["stage"] == 1}
    assert {x["index"] for x in race if x["stage"] == 2} <= stage1
    # the contenders were within the margin of the best so far; the others stayed cheap
    merged = merged_records(evals, racing, phases=("race",))
    best_before = -np.inf
    for g in sorted({e["generation"] for e in evals}):
        gen = [e for e in evals if e["generation"] == g]
        cut = max(best_before, max(e["fitness"] for e in gen)) - 0.05
        within = sorted((e for e in gen if e["fitness"] >= cut), key=lambda e: (-e["fitness"], e["index"]))
        # the best of them, at most half the generation, go on to stage 1
        assert {e["index"] for e in within[:max(1, -(-len(gen) // 2))]} == {e["index"] for e in gen} & stage1
        best_before = max(best_before, max(m["fitness"] for m in merged if m["generation"] == g))
    assert any("raced" in ln for ln in lines)


def test_finalists_are_sharpened_distinct_and_carry_their_expected_error(race_run):
    rd, lines = race_run
    final = [x for x in read_jsonl(rd.racing) if x["phase"] == "final"]
    assert final and all(x["stage"] == 3 and x["items"] == 3 * 48 for x in final)
    held = [h for h in read_jsonl(rd.heldout) if h["index"] is not None]
    assert len(held) == 2
    evals = {e["index"]: e for e in read_jsonl(rd.evaluations)}
    assert genome_distance(evals[held[0]["index"]]["genome"], evals[held[1]["index"]]["genome"]) >= 0.05 or \
        len(evals) < 3
    for h in held:
        assert h["items"] == 3 * 48 and 0 < h["estimate_error"] < 0.2
    best = json.loads((rd.best / "recipe.json").read_text())
    assert best["estimate_error"] is not None and best["items"] == 3 * 48
    assert any("±" in ln for ln in lines)


def test_diverse_top_skips_near_copies():
    recs = [{"index": i, "genome": g, "fitness": f} for i, (g, f) in enumerate(
        [([0.50, 0.50], 0.90), ([0.51, 0.50], 0.90), ([0.50, 0.52], 0.89), ([0.9, 0.1], 0.85), ([0.2, 0.2], 0.5)])]
    assert [r["index"] for r in diverse_top(recs, 2, 0.05)] == [0, 3]      # not the near-copy 1
    assert [r["index"] for r in diverse_top(recs, 2, 0.0)] == [0, 1]       # off: plain ranking
    assert [r["index"] for r in diverse_top(recs, 4, 0.3)] == [0, 1, 3, 4]  # 3 distinct, then the best of the rest


def _launch(args):
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_mid_racing_is_exact(race_run, tmp_path):
    """SIGKILL while contenders are being raced; the resumed run re-asks only what is not logged
    and ends with the same log as the uninterrupted run."""
    ref, _ = race_run
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(race_config(tmp_path / "run")))
    run = tmp_path / "run"
    p = _launch(["search", str(cfg)])
    t0 = time.time()
    while not (run / "racing.jsonl").exists() or len(read_jsonl(run / "racing.jsonl")) < 2:
        assert p.poll() is None, p.stdout.read()
        assert time.time() - t0 < 300, "no racing line"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = read_jsonl(run / "racing.jsonl")
    assert len(kept) < len(read_jsonl(ref.racing))
    p = _launch(["search", "--resume", str(run)])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    racing = read_jsonl(run / "racing.jsonl")
    assert racing[:len(kept)] == kept
    strip = lambda xs: [{k: v for k, v in x.items() if k != "timings"} for x in xs]  # noqa: E731
    assert strip(racing) == strip(read_jsonl(ref.racing))               # nothing lost, nothing twice
    assert strip(read_jsonl(run / "evaluations.jsonl")) == strip(read_jsonl(ref.evaluations))
    a, b = (json.loads((r / "best" / "recipe.json").read_text()) for r in (run, ref.root))
    assert a["genome"] == b["genome"] and a["heldout"] == b["heldout"]


# ----------------------------------------------------------------------------- convergence


def test_cmaes_converges_on_a_quadratic_and_restarts_deterministically():
    opt = CMAESOptimizer(3, seed=1, population=6)
    target = np.array([0.3, 0.6, 0.45])
    monitor = ConvergenceMonitor(patience=1000)  # only the optimizer's own test
    reason, told = None, []
    for gen in range(400):
        gs = opt.ask_generation()
        fs = [-float(np.sum((g - target) ** 2)) for g in gs]
        told.append((gs, fs))
        opt.tell_generation(gs, fs)
        reason = monitor.update(max(fs), opt)
        if reason:
            break
    assert reason and gen < 399, "never converged"
    assert np.allclose(opt._es.mean, target, atol=1e-2)
    first = opt.ask_generation()
    assert opt.restart().startswith("restart 1") and opt.population == 12
    after = opt.ask_generation()
    assert len(after) == 12 and np.mean([genome_distance(g, target) for g in after]) > 0.05  # a new region
    # replaying the same told values reproduces the run, the restart included
    again = CMAESOptimizer(3, seed=1, population=6)
    for gs, fs in told:
        assert all(np.array_equal(a, b) for a, b in zip(again.ask_generation(), gs))
        again.tell_generation(gs, fs)
    assert all(np.array_equal(a, b) for a, b in zip(again.ask_generation(), first))
    again.restart()
    assert all(np.array_equal(a, b) for a, b in zip(again.ask_generation(), after))


def test_a_flat_best_counts_as_converged_after_patience_generations():
    m = ConvergenceMonitor(patience=3, tol=1e-3)
    seen = [m.update(f, object()) for f in (0.5, 0.6, 0.6005, 0.6, 0.59)]   # +0.0005: not better
    assert seen[:4] == [None] * 4 and "for 3 generations" in seen[4]
    m = ConvergenceMonitor(patience=3, tol=1e-3)
    seen = [m.update(f, object()) for f in (0.5, 0.6, 0.6, 0.6, 0.6)]
    assert seen[:4] == [None] * 4 and "3 generations" in seen[4]
    m.reset()
    assert m.update(0.1, object()) is None                              # a restart starts afresh


@pytest.mark.parametrize("action", ["stop", "restart"])
def test_a_converged_run_stops_or_restarts_as_configured(zoo, tmp_path, action):
    from evomerge.search.loop import run_search

    over = {"optimizer.patience": 1, "optimizer.on_converge": action, "optimizer.generations": 4,
            "fitness.racing": {"stages": 0, "margin": "auto"}}
    lines: list[str] = []
    rd = run_search(parse_config(race_config(tmp_path / "run", **over)), log=lines.append)
    evals = read_jsonl(rd.evaluations)
    per_gen = [sum(1 for e in evals if e["generation"] == g) for g in range(4)]
    said = [ln for ln in lines if "converged after generation" in ln]
    assert said, lines
    g = int(said[0].split("generation ")[1].split(" ")[0])
    if action == "stop":
        assert "stopping" in said[0] and len(said) == 1
        assert per_gen[g:] == [0] * (4 - g) and per_gen[:g] == [4] * g
        assert json.loads(rd.state_file.read_text())["convergence"][0]["generation"] == g
    else:
        assert "restart 1" in said[0] and per_gen[g] == 8                # IPOP: twice the population
    # a resume replays to the same point and evaluates nothing more
    n = len(evals)
    run_search(parse_config(race_config(tmp_path / "run", **over)), resume=rd.root, log=lambda m: None)
    assert len(read_jsonl(rd.evaluations)) == n
