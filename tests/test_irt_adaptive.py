"""irt.adaptive: adaptive anchors (computerized adaptive testing) and `evomerge irt next`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.cli import main
from irt import IRTError, ItemBank, estimate_accuracy, next_items, run_adaptive, select_anchors
from irt.adaptive import round_sizes
from irt.estimators import ability_prior
from irt.io import write_responses
from irt.model import map_logistic


def population(M, I=300, d=2, seed=0):
    """Subjects θ ~ N(0, I) on fixed items (the same items for every seed)."""
    items = np.random.default_rng(100)
    a = np.abs(items.normal(1.2, 0.5, (I, d)))
    b = items.normal(0, 1.5, I)
    rng = np.random.default_rng(seed)
    th = rng.standard_normal((M, d))
    Y = (rng.random((M, I)) < 1 / (1 + np.exp(-(th @ a.T - b)))).astype(float)
    return Y


@pytest.fixture(scope="module")
def bank():
    Y = population(150, seed=0)
    return ItemBank.fit(Y, [f"q{i}" for i in range(Y.shape[1])], [f"m{k}" for k in range(len(Y))], dim=2)


def test_round_sizes():
    assert round_sizes(20, 4) == [5, 5, 5, 5]
    assert round_sizes(7, 3) == [3, 2, 2]
    assert round_sizes(3, 5) == [1, 1, 1]
    for bad in ((0, 2), (5, 0), (2.5, 1), (True, 1)):
        with pytest.raises(IRTError, match="positive integer"):
            round_sizes(*bad)


def _variance_after(bank, asked, theta, prior_prec, j):
    """The criterion of the module docstring computed directly (no Sherman–Morrison)."""
    a, N = bank.a, bank.n_items
    P = 1 / (1 + np.exp(-(a @ theta - bank.b)))
    w = P * (1 - P)
    A = list(asked) + [j]
    U = np.setdiff1d(np.arange(N), A)
    F = prior_prec + sum(w[i] * np.outer(a[i], a[i]) for i in A)
    g = w[U] @ a[U] / N
    return g @ np.linalg.solve(F, g) + w[U].sum() / N**2


def test_next_items_minimises_the_stated_criterion(bank):
    """Greedy choice = argmin of the linearised error variance, recomputed from scratch."""
    Y = population(1, seed=7)[0]
    asked = np.array([3, 50, 120, 200])
    mu, prec = ability_prior(bank, "population")
    theta = map_logistic(bank.a[asked], -bank.b[asked], Y[asked], mu, prec)
    chosen = next_items(bank, asked, Y[asked], k=3)
    sofar = list(asked)
    for j in chosen:
        V = np.array([_variance_after(bank, sofar, theta, prec, i) if i not in sofar else np.inf
                      for i in range(bank.n_items)])
        assert j == int(np.argmin(V))
        sofar.append(int(j))
    assert len(set(chosen)) == 3 and not set(chosen) & set(asked)


def test_next_items_respects_candidates_and_is_deterministic(bank):
    Y = population(1, seed=3)[0]
    cand = np.arange(0, 300, 7)
    a1 = next_items(bank, [0, 1], Y[[0, 1]], k=4, candidates=cand)
    a2 = next_items(bank, [0, 1], Y[[0, 1]], k=4, candidates=cand)
    assert np.array_equal(a1, a2) and set(a1) <= set(cand) - {0}
    # more items than there are left: all of them, once
    assert sorted(next_items(bank, [], [], k=10, candidates=[5, 6, 7])) == [5, 6, 7]
    with pytest.raises(IRTError, match="2 asked items but 1 answers"):
        next_items(bank, [0, 1], [1.0], k=1)


def test_adaptive_beats_fixed_anchors_with_the_same_number_of_items(bank):
    """The point of the module: on new subjects of the same population, 12 items asked in 4
    rounds estimate full accuracy better than the best fixed design of 12 items."""
    T = population(150, seed=1)
    truth = T.mean(1)
    fixed = select_anchors(bank, n=12, method="info")
    z_fixed = np.array([estimate_accuracy("pirt", bank, fixed, anchor_answers=y[fixed.idx]) for y in T])
    first = select_anchors(bank, n=3, method="info", compute_gp_lambda=False).idx
    res = [run_adaptive(bank, lambda pos, y=y: y[pos], n=12, rounds=4, first=first) for y in T]
    z_adapt = np.array([r.estimate for r in res])
    mae_fixed, mae_adapt = np.abs(z_fixed - truth).mean(), np.abs(z_adapt - truth).mean()
    print(f"MAE 12 items: fixed info {mae_fixed:.4f}, adaptive 4 rounds {mae_adapt:.4f}")
    assert mae_adapt < 0.9 * mae_fixed
    r = res[0]
    assert r.rounds == [3, 3, 3, 3] and len(set(r.asked.tolist())) == 12
    assert np.array_equal(r.asked[:3], first) and np.array_equal(r.answers, T[0][r.asked])
    # different subjects get different items after round 1
    assert len({tuple(x.asked[3:].tolist()) for x in res}) > 10


def test_adaptive_exact_when_every_item_is_asked(bank):
    y = population(1, seed=5)[0]
    r = run_adaptive(bank, lambda pos: y[pos], n=10_000, rounds=3)
    assert sorted(r.asked.tolist()) == list(range(bank.n_items))
    assert r.estimate == pytest.approx(y.mean(), abs=1e-12)


def test_adaptive_mpirt_and_unanswered_items(bank):
    y = population(1, seed=6)[0]
    E = bank.subject_theta(["m0", "m1", "m2"])
    r = run_adaptive(bank, lambda pos: np.where(pos % 2 == 0, y[pos], np.nan), n=8, rounds=2,
                     estimator="mpirt", endpoint_theta=E)
    assert 0.0 <= r.estimate <= 1.0 and np.isnan(r.answers).any()


def test_adaptive_bad_inputs(bank):
    y = population(1, seed=2)[0]
    with pytest.raises(IRTError, match="estimator must be one of pirt, mpirt"):
        run_adaptive(bank, lambda pos: y[pos], n=8, rounds=2, estimator="gpirt")
    with pytest.raises(IRTError, match="asked 4 items, got 3 answers"):
        run_adaptive(bank, lambda pos: y[pos][:-1], n=8, rounds=2)
    with pytest.raises(IRTError, match="answers must be 0, 1 or NaN"):
        run_adaptive(bank, lambda pos: y[pos] * 2, n=8, rounds=2)
    with pytest.raises(IRTError, match="round 1 needs 4 items"):
        run_adaptive(bank, lambda pos: y[pos], n=8, rounds=2, first=[1, 2])
    with pytest.raises(IRTError, match="pass the first round's items"):
        run_adaptive(bank, lambda pos: y[pos], n=8, rounds=2, candidates=[1, 2, 3, 4, 5])


def test_cli_next(bank, tmp_path, capsys):
    bank.save(tmp_path / "bank.safetensors")
    Y = population(2, seed=9)
    A = np.full_like(Y, np.nan)
    first = select_anchors(bank, n=4, method="info").idx
    A[:, first] = Y[:, first]
    write_responses(tmp_path / "so_far.csv", A, bank.item_ids, ["s0", "s1"])
    main(["irt", "next", str(tmp_path / "bank.safetensors"), str(tmp_path / "so_far.csv"), "-k", "3", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["subject"] for r in rows] == ["s0", "s1"] and all(r["asked"] == 4 for r in rows)
    for r, y in zip(rows, Y):
        expect = next_items(bank, first, y[first], 3)
        assert r["next"] == [bank.item_ids[i] for i in expect]
    write_responses(tmp_path / "bad.csv", Y[:, :5], [f"zz{i}" for i in range(5)], ["s0", "s1"])
    with pytest.raises(SystemExit) as exc:
        main(["irt", "next", str(tmp_path / "bank.safetensors"), str(tmp_path / "bad.csv")])
    assert exc.value.code == 2 and "not in the item bank" in capsys.readouterr().err
