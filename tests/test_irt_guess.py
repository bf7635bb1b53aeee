"""The fixed lower asymptote (guess c): P = c + (1 − c) σ(a·θ − b) (issue 18)."""

import numpy as np
import pytest

from irt import IRTError, ItemBank, MIRT2PL, estimate_accuracy_batch, fit_ability, next_items
from irt.model import map_logistic


def _sim3pl(M=500, N=300, c=0.25, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1, (M, 1))
    a = rng.uniform(1.0, 2.5, (N, 1))
    b = rng.normal(0, 1, N)
    P = c + (1 - c) / (1 + np.exp(-(theta @ a.T - b)))
    return (rng.random((M, N)) < P).astype(float), theta, a, b, P


def test_3pl_recovers_known_parameters():
    # 500 subjects × 300 items of a 1-D 3PL with c = 0.25 (four-way multiple choice), fitted with
    # the known c: difficulties within 0.35 on average, discriminations correlate > 0.8, abilities
    # > 0.95, and the fitted probabilities within 0.03 of the true ones on average. The 2PL fitted
    # to the same answers is clearly worse on every count that the asymptote drives.
    Y, theta, a, b, P = _sim3pl()
    m3 = MIRT2PL(dim=1, guess=0.25).fit(Y)
    m2 = MIRT2PL(dim=1).fit(Y)
    s = np.sign(np.corrcoef(m3.theta_[:, 0], theta[:, 0])[0, 1])  # θ's sign is not identified
    assert s > 0  # canonical orientation: higher θ = more right answers
    assert np.mean(np.abs(m3.b_ - b)) < 0.35
    assert np.corrcoef(m3.a_[:, 0], a[:, 0])[0, 1] > 0.8
    assert np.corrcoef(m3.theta_[:, 0], theta[:, 0])[0, 1] > 0.95
    err3 = np.abs(m3.predict_proba(m3.theta_) - P).mean()
    err2 = np.abs(m2.predict_proba(m2.theta_) - P).mean()
    assert err3 < 0.03 and err3 < err2
    assert m3.predict_proba(np.array([-20.0])).min() == pytest.approx(0.25, abs=1e-6)  # the floor
    # a weak subject's floor: the 3PL's P never falls below c, the 2PL's does
    weak = theta[:, 0] < -1.0
    assert (m3.predict_proba(m3.theta_)[weak] >= 0.25).all()
    assert m2.predict_proba(m2.theta_)[weak].min() < 0.2


def test_3pl_ability_and_estimates_use_the_floor():
    Y, theta, a, b, P = _sim3pl(M=300, N=200, seed=1)
    bank = ItemBank.fit(Y, dim=1, guess=0.25)
    assert bank.guess == 0.25 and bank.meta["fit"]["guess"] == 0.25
    assert bank.predict_proba(np.array([-30.0])).min() >= 0.25
    # abilities from all answers under the bank's own c match the calibrated ones
    th = bank.fit_ability(Y[:20])
    assert np.corrcoef(th[:, 0], bank.theta[:20, 0])[0, 1] > 0.95
    # 40-item p-IRT estimates of the calibration subjects (measured: 0.041 against 0.049 for the
    # plain mean of the same items; the 2PL bank: 0.043), unbiased within 0.01
    rng = np.random.default_rng(0)
    idx = rng.choice(200, 40, replace=False)
    est = estimate_accuracy_batch("pirt", bank, idx, None, Y[:, idx])
    truth = Y.mean(1)
    assert np.abs(est - truth).mean() < np.abs(Y[:, idx].mean(1) - truth).mean()
    assert abs((est - truth).mean()) < 0.01
    # the adaptive design runs with the floor (distinct items, none asked twice)
    nxt = next_items(bank, idx[:5], Y[0, idx[:5]], 5)
    assert len(set(nxt.tolist()) | set(idx[:5].tolist())) == 10
    # saved and loaded: the floor goes with the bank
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = bank.save(Path(d) / "b.safetensors")
        assert ItemBank.load(p).guess == 0.25


def test_map_logistic_with_guess_is_the_map():
    # the Fisher-scoring MAP with c > 0 is a stationary point of the penalised log-likelihood
    rng = np.random.default_rng(2)
    X = rng.normal(1.5, 0.3, (60, 1))
    off = rng.normal(0, 1, 60)
    y = (rng.random(60) < 0.25 + 0.75 / (1 + np.exp(-(X[:, 0] * 0.7 + off)))).astype(float)
    w = map_logistic(X, off, y, 0.0, 1.0, guess=0.25)
    z = X @ w + off
    s = 1 / (1 + np.exp(-z))
    Pc = 0.25 + 0.75 * s
    grad = ((1 - y) * s - y * 0.75 * s * (1 - s) / Pc) @ X + w
    assert np.abs(grad).max() < 1e-6
    with pytest.raises(IRTError, match="guess"):
        map_logistic(X, off, y, guess=1.0)
    with pytest.raises(IRTError, match="guess"):
        MIRT2PL(dim=1, guess=-0.1).fit(np.eye(4))


def test_zero_guess_is_the_2pl():
    Y, *_ = _sim3pl(M=60, N=50, c=0.0, seed=3)
    b0 = ItemBank.fit(Y, dim=1)
    b1 = ItemBank.fit(Y, dim=1, guess=0.0)
    assert np.array_equal(b0.a, b1.a) and np.array_equal(b0.theta, b1.theta)
    assert "guess" not in b0.meta["fit"] and b0.guess == 0.0
    assert np.array_equal(fit_ability(b0.a, b0.b, Y[:3]), fit_ability(b0.a, b0.b, Y[:3], guess=0.0))
