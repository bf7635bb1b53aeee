"""`fitness.estimator: auto` in the search: the few-item procedure per task chosen on the
calibration models, recorded in the bank, used by the loop, shown in the report, and reused --
never chosen again -- by a resumed run (issue 18)."""

import numpy as np
import pytest

from evomerge.config import parse_config
from evomerge.report import write_report
from evomerge.search.loop import run_search
from evomerge.search.rundir import read_jsonl
from test_search import short_heldout_tasks, small_config


def _over(tmp_path, generations):
    return {"fitness": {"estimator": "auto", "anchors": 10, "rounds": 1, "anchor_method": "info",
                        "aggregate": "mean"},
            "optimizer": {"name": "cmaes", "population": 4, "generations": generations, "sigma0": 0.1667},
            "calibration": {"samples": 8, "dim": None, "banks": None},
            "tasks": short_heldout_tasks(tmp_path / "tasks")}


def test_auto_procedure_chosen_recorded_used_and_reused_on_resume(zoo, tmp_path, monkeypatch):
    import irt
    from evomerge.search.fitness import procedure_of

    lines = []
    rd = run_search(parse_config(small_config(tmp_path / "run", **_over(tmp_path, 2))), log=lines.append)
    evals = read_jsonl(rd.evaluations)
    assert len(evals) == 8
    procs = {}
    for task in ("lang", "cipher", "upper"):
        bank = irt.ItemBank.load(rd.bank_path(task))
        p = bank.meta["procedure"]
        assert p["chosen"] and p["n"] == 10 and p["n_subjects"] == 8 and p["folds"] == 4
        assert p["mae"] <= p["default_mae"] and p["default"] == "mpirt/info"
        proc = procedure_of(parse_config(small_config(tmp_path / "run", **_over(tmp_path, 2))), bank)
        procs[task] = proc
        if proc.dim is not None:
            assert bank.dim == proc.dim
        check = bank.meta["estimate_check"]  # the chosen procedure's cross-fitted error
        assert check["estimator"] == proc.estimator and check["mae"] == pytest.approx(p["mae"])
        anchors = irt.Anchors.load(rd.banks / f"{task}.anchors.json", bank)
        assert len(anchors) == (10 if proc.rounds == 1 else irt.adaptive.round_sizes(10, proc.rounds)[0])
        # every candidate's estimate is the recorded procedure's on its answers
        for e in evals[:2]:
            ans = np.array([int(c) for c in e["answers"][task]], dtype=float)
            asked = e["asked"][task] if proc.rounds > 1 else [int(i) for i in bank.index(anchors.item_ids)]
            assert ("asked" in e and task in e["asked"]) == (proc.rounds > 1)
            E = bank.subject_theta(["base", "zoo:lang", "zoo:cipher", "zoo:upper"]) \
                if proc.estimator in ("mpirt", "gmpirt") else None
            if proc.rounds > 1:
                est = irt.estimate_accuracy(proc.estimator, bank, np.array(asked), None, ans, endpoint_theta=E)
            else:
                est = irt.estimate_accuracy(proc.estimator, bank, anchors, anchor_answers=ans, endpoint_theta=E)
            assert est == pytest.approx(e["estimates"][task], abs=1e-12)
    assert any("procedure chosen:" in ln or "procedure: the default" in ln for ln in lines)
    report = write_report(rd).read_text()  # as `evomerge search` does after the run
    assert "Few-item procedure per task" in report
    for t, proc in procs.items():
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- {t}: procedure"))
        assert (f"procedure chosen: {proc.name} (" in line) != (f"the default {proc.name} kept" in line)

    # stopped after one generation and resumed: the recorded choice is read back, never made again
    part = run_search(parse_config(small_config(tmp_path / "part", **_over(tmp_path, 1))), log=lambda m: None)

    def refuse(*a, **k):
        raise AssertionError("a resumed run chose the procedure again")

    monkeypatch.setattr(irt, "choose_procedure", refuse)
    resumed = run_search(parse_config(small_config(tmp_path / "part", **_over(tmp_path, 2))),
                         resume=part.root, log=lambda m: None)
    keys = ("genome", "answers", "estimates", "fitness")
    assert [{k: e[k] for k in keys} | {"asked": e.get("asked")} for e in read_jsonl(resumed.evaluations)] == \
        [{k: e[k] for k in keys} | {"asked": e.get("asked")} for e in evals]
    race = lambda xs: [{k: v for k, v in x.items() if k != "timings"} for x in xs if x["phase"] == "race"]  # noqa: E731
    assert race(read_jsonl(resumed.racing)) == race(read_jsonl(rd.racing))


def test_auto_config_allows_rounds_and_racing(tmp_path):
    cfg = parse_config(small_config(tmp_path / "run", fitness={"estimator": "auto", "anchors": 20, "rounds": 4,
                                                               "racing": {"stages": 2}}))
    from evomerge.search.banks import auto_options
    from evomerge.search.racing import racing_stages

    assert racing_stages(cfg) == 2
    opts, default = auto_options(cfg, 200)
    assert default.name == "mpirt/adaptive4(info)" and opts[0] == default
    assert {p.estimator for p in opts} >= {"mean", "pirt", "gpirt", "mpirt", "gmpirt"}
    opts3, _ = auto_options(cfg, 3)                     # a task of 3 items: no 4-round test
    assert all(p.rounds <= 3 for p in opts3)


def test_the_plan_of_an_auto_run_says_the_procedure_is_chosen_later(zoo, tmp_path):
    from evomerge.search.plan import check_run

    lines = check_run(parse_config(small_config(tmp_path / "run", **{"fitness.estimator": "auto"})),
                      log=lambda m: None, trial_items=0)
    search = next(ln for ln in lines if ln.startswith("search: "))
    assert "chosen after calibration: estimator auto" in search and "asked in" not in search
    assert not (tmp_path / "run").exists()
