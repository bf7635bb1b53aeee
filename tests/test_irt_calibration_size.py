"""benchmarks/irt_calibration_size.py (issue 18): the error-versus-calibration-size tables that say
how many calibration subjects a 20-item estimate needs."""

import importlib.util
from pathlib import Path

import numpy as np

from irt.io import write_responses

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("irt_calibration_size", ROOT / "benchmarks" / "irt_calibration_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _matrix(M=30, N=300, seed=0):
    """A 2-D 2PL population with spread-out difficulties (as in the strata tests)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1.0, (M, 2))
    a = np.abs(rng.normal(1.5, 0.5, (N, 2))) * rng.choice([1.0, 0.3], (N, 2))
    b = rng.normal(0, 2.0, N)
    return (rng.random((M, N)) < 1 / (1 + np.exp(-(theta @ a.T - b)))).astype(float)


def test_simulated_error_falls_with_calibration_size():
    mod = _script()
    res, d = mod.sim_curve(_matrix(), [10, 120], 20, heldout=80, splits=2, choose=False, seed=0)
    assert d in (1, 2, 3, 5)
    small, large = res[10], res[120]
    adaptive = "pirt/adaptive4(info)"
    # a bank from 120 subjects estimates 20-item accuracies better than one from 10, and both beat
    # the plain mean of 20 random items
    assert large[adaptive] < small[adaptive]
    assert large[adaptive] < 0.6 * large["plain"]
    assert 0.03 < large["plain"] < 0.15


def test_real_curve_holds_out_the_rest(capsys, tmp_path):
    Y = _matrix(M=16, N=120, seed=3)
    Y[:, 0] = 1.0  # an item every subject answers right: dropped for the bank, counted in the accuracy
    path = write_responses(tmp_path / "m.csv", Y, [f"q{i}" for i in range(Y.shape[1])],
                           [f"m{i}" for i in range(Y.shape[0])])
    mod = _script()
    mod.main(["--matrix", f"toy={path}", "--sizes", "8,20", "--sim-sizes", "", "--splits", "1", "--no-choose"])
    out = capsys.readouterr().out
    assert "toy: 16 subjects × 120 items" in out
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 1  # size 20 > 16 − 2 subjects: skipped, not an error
    errs = [float(x) for x in rows[0].split("|")[2:7]]
    assert all(0.0 <= e < 0.3 for e in errs)
