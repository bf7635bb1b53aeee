"""irt.validate: the expected error of few-item estimates, cross-fitted on calibration subjects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.cli import main
from irt import IRTError, ItemBank
from irt.io import write_responses
from irt.validate import cross_validate_estimates, heldout_estimates


def _sim(M, N=300, d=2, seed=0):
    """M subjects × N items from a d-dimensional 2PL (the same items for every seed)."""
    items = np.random.default_rng(100)
    a = np.abs(items.normal(1.0, 0.4, (N, d)))
    b = items.normal(0.0, 1.2, N)
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, (M, d))
    P = 1 / (1 + np.exp(-(theta @ a.T - b)))
    return (rng.random(P.shape) < P).astype(float)


def test_all_items_answered_gives_exact_estimates():
    Y = _sim(30, N=40)
    c = cross_validate_estimates(Y, n=40, estimator="gpirt", anchor_method="irt", folds=3, dim=1)
    assert c.mae < 1e-12 and c.n == 40 and c.n_subjects == 30 and c.folds == 3
    assert len(c.errors) == len(c.subjects) == 30 and json.loads(json.dumps(c.to_dict()))["mae"] == c.mae


@pytest.mark.parametrize("rounds", [1, 4])
def test_cross_fitted_error_predicts_the_error_on_new_subjects(rounds):
    calib, fresh = _sim(60, seed=1), _sim(200, seed=2)
    c = cross_validate_estimates(calib, n=20, estimator="pirt", anchor_method="info", rounds=rounds, folds=4, dim=2)
    bank = ItemBank.fit(calib, dim=2, seed=0)
    z = heldout_estimates(bank, fresh, 20, estimator="pirt", anchor_method="info", rounds=rounds)
    actual = float(np.abs(z - fresh.mean(1)).mean())
    assert 0.75 * actual < c.mae < 1.5 * actual, (c.mae, actual)
    assert c.plain_mean_mae > c.mae and abs(c.bias) < c.mae


def test_endpoints_stay_in_training_and_feed_mpirt():
    Y = _sim(24, N=120)
    names = [f"s{m}" for m in range(24)]
    c = cross_validate_estimates(Y, [f"q{i}" for i in range(120)], names, n=10, estimator="mpirt",
                                 endpoints=["s0", "s1", "s2"], folds=3, dim=2)
    assert c.n_subjects == 21 and not {"s0", "s1", "s2"} & set(c.subjects) and 0 < c.mae < 0.2


@pytest.mark.parametrize("kw,pattern", [
    ({"folds": 1}, "folds must be >= 2"),
    ({"estimator": "mpirt"}, "needs endpoints"),
    ({"estimator": "nope"}, "unknown estimator"),
    ({"anchor_method": "nope"}, "unknown anchor method"),
    ({"rounds": 3, "estimator": "gpirt"}, "adaptive test .* needs estimator pirt or mpirt"),
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"endpoints": ["x"]}, r"endpoints \['x'\] are not among the subjects"),
])
def test_bad_settings_are_refused(kw, pattern):
    with pytest.raises(IRTError, match=pattern):
        cross_validate_estimates(_sim(10, N=30), **{"n": 5, **kw})


def test_too_few_subjects():
    with pytest.raises(IRTError, match="at least 2 subjects besides the endpoints"):
        cross_validate_estimates(_sim(3, N=30), [f"q{i}" for i in range(30)], ["a", "b", "c"], n=5,
                                 endpoints=["a", "b"])


def test_cli_check(tmp_path, capsys):
    Y = _sim(40, N=100)
    write_responses(tmp_path / "r.csv", Y, [f"q{i}" for i in range(100)], [f"m{k}" for k in range(40)])

    def run(*args):
        try:
            main(["irt", "check", str(tmp_path / "r.csv"), *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr()

    code, out = run("-n", 10, "-r", 2, "--dim", 2, "--json")
    assert code == 0, out.err
    res = json.loads(out.out)
    assert res["n"] == 10 and res["rounds"] == 2 and res["n_subjects"] == 40 and 0 < res["mae"] < 0.15
    code, out = run("-n", 10, "--dim", 2)
    assert code == 0 and "mean absolute error" in out.out and "info anchors" in out.out
    assert "calibration subjects" not in out.out  # 40 subjects: no note about too few
    code, out = run("-e", "mpirt")
    assert code == 2 and "--endpoints" in out.err and "Traceback" not in out.err
