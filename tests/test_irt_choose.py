"""irt.choose_procedure: the cross-fitted choice among few-item procedures (issue 18)."""

import json

import numpy as np
import pytest

from irt import IRTError, Procedure, choose_procedure
from irt.choose import DEFAULT_OPTIONS


def _sim(M=40, N=150, seed=0, sharp=2.0, theta_sd=1.5):
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, theta_sd, (M, 1))
    a = np.abs(rng.normal(sharp, 0.3, (N, 1)))
    b = rng.normal(0, 1.5, N)
    P = 1 / (1 + np.exp(-(theta @ a.T - b)))
    return (rng.random((M, N)) < P).astype(float)


def test_auto_picks_the_known_best():
    # a clean 1-D 2PL population of sharp items, 60 training subjects per fold: the adaptive
    # p-IRT test on 10 items beats the plain mean of 10 random items by far (measured: 0.044 vs
    # 0.080 at 120 × 200), so it must be chosen over a "mean" default
    Y = _sim(M=80, N=120, sharp=4.0, theta_sd=1.0)
    ch = choose_procedure(Y, n=10, options=[("mean", "random", 1), ("pirt", "info", 4, 1)],
                          default=("mean", "random", 1))
    assert ch.procedure == Procedure("pirt", "info", 4, 1)
    assert ch.mae < 0.8 * ch.default_mae
    assert [r["mae"] for r in ch.table] == sorted(r["mae"] for r in ch.table)
    assert ch.default == "mean/random" and ch.default_mae > ch.mae
    json.dumps(ch.to_dict())


def test_default_kept_unless_beaten_by_margin():
    Y = _sim(M=24, N=80, seed=1)
    ch = choose_procedure(Y, n=10, options=[("pirt", "info", 1, 1), ("gpirt", "info", 1, 1)],
                          default=("pirt", "info", 1, 1), margin=1.0)
    assert ch.procedure == Procedure("pirt", "info", 1, 1)
    assert ch.mae == ch.default_mae


def test_options_and_errors():
    Y = _sim(M=12, N=40, seed=2)
    assert Procedure.__hash__  # candidates are hashable (deduplicated)
    with pytest.raises(IRTError, match="needs endpoints"):
        choose_procedure(Y, n=5, options=[("mpirt", "info", 1)])
    with pytest.raises(IRTError, match="adaptive"):
        choose_procedure(Y, n=5, options=[("gpirt", "info", 3)])
    with pytest.raises(IRTError, match="unknown estimator"):
        choose_procedure(Y, n=5, options=["nope/info/1"])
    ch = choose_procedure(Y, n=5, options=["pirt/random/1/1", "pirt/info/2/1"], default="pirt/info/1/1")
    assert {r["name"] for r in ch.table} == {"pirt/random/d=1", "pirt/adaptive2(info)/d=1", "pirt/info/d=1"}
    assert len(DEFAULT_OPTIONS) == len(set(DEFAULT_OPTIONS))


def test_endpoints_add_mpirt_candidates():
    Y = _sim(M=20, N=60, seed=3)
    names = [f"s{i}" for i in range(20)]
    ch = choose_procedure(Y, None, names, n=8, endpoints=["s0", "s1"],
                          options=[("mpirt", "info", 1, 1), ("pirt", "info", 1, 1)])
    assert ch.default == "mpirt/info"
    assert ch.n_subjects == 18


def test_cli_check_auto(tmp_path, capsys):
    from evomerge.cli import main
    from irt.io import write_responses

    Y = _sim(M=16, N=50, seed=4)
    p = tmp_path / "r.csv"
    write_responses(p, Y, [f"q{i}" for i in range(50)], [f"s{i}" for i in range(16)])
    rc = main(["irt", "check", str(p), "-n", "8", "--auto", "--json"])
    assert rc in (0, None)
    d = json.loads(capsys.readouterr().out)
    assert d["default"] == "pirt/info" and len(d["table"]) >= 10
    assert d["mae"] <= d["default_mae"]
    assert d["name"] in {r["name"] for r in d["table"]}
    rc = main(["irt", "check", str(p), "-n", "8", "--auto", "--se", "100", "--json"])  # never clearly beaten
    assert rc in (0, None)
    assert json.loads(capsys.readouterr().out)["name"] == "pirt/info"
    rc = main(["irt", "check", str(p), "-n", "8", "--auto"])
    out = capsys.readouterr().out
    assert rc in (0, None) and "chosen: " in out
    assert "note: 16 calibration subjects. Below ~40" in out  # the bank is the limit here


def test_choice_carries_the_chosen_procedures_check():
    # the chosen procedure's per-subject errors equal a cross_validate_estimates of it on the
    # same folds (same seed, same fixed dimension)
    from irt import cross_validate_estimates

    Y = _sim(M=24, N=60, seed=5)
    ch = choose_procedure(Y, n=8, options=[("pirt", "info", 1, 1), ("pirt", "random", 1, 1)],
                          default=("pirt", "info", 1, 1))
    c = ch.estimate_check()
    ref = cross_validate_estimates(Y, n=8, estimator=ch.estimator, anchor_method=ch.anchor_method, dim=1)
    assert c.mae == pytest.approx(ref.mae, abs=1e-12) and c.bias == pytest.approx(ref.bias, abs=1e-12)
    assert c.subjects == ref.subjects and c.errors == pytest.approx(ref.errors, abs=1e-12)
    assert c.accuracy_sd == pytest.approx(ref.accuracy_sd, abs=1e-12)
    assert c.n == 8 and c.folds == 4 and c.n_subjects == 24
    json.dumps(ch.to_dict())


def test_one_standard_error_rule():
    from irt.choose import pick_procedure

    rng = np.random.default_rng(0)
    base = 0.1 + rng.uniform(0.0, 0.02, 12)              # absolute errors of 12 subjects
    noisy_better = base - 0.004 + np.tile([0.03, -0.03], 6)  # better on average by 0.004, SE ≈ 0.009
    clear_better = base - 0.04 + rng.normal(0, 0.002, 12)  # better on every subject
    err = np.stack([base, noisy_better])
    assert np.abs(err[1]).mean() < np.abs(err[0]).mean()
    assert pick_procedure(err, 0) == 1                     # smallest error wins
    assert pick_procedure(err, 0, se=1.0) == 0             # ... but not clearly: the default stays
    assert pick_procedure(np.stack([base, clear_better]), 0, se=1.0) == 1
    # a bad default, a plain mean within noise of the best: the preferred plain mean is chosen
    err = np.stack([base + 0.2, noisy_better, base])
    assert pick_procedure(err, 0, se=1.0, prefer=[2]) == 2
    assert pick_procedure(err, 0, se=1.0) == int(np.argmin(np.abs(err).mean(1)))
