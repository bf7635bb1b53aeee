"""irt: fitting, banks, anchors, estimators, response files (issue 3)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from irt import (ESTIMATORS, Anchors, IRTError, ItemBank, MIRT2PL, estimate_accuracy, estimate_accuracy_batch,
                 fit_ability, procrustes_align, select_anchors, select_dim)
from irt.io import read_responses, write_responses
from irt.model import map_logistic


def simulate(M=200, I=250, d=2, seed=0):
    rng = np.random.default_rng(seed)
    th = rng.standard_normal((M, d))
    a = np.abs(rng.normal(1.0, 0.5, (I, d)))
    b = rng.normal(0, 1.2, I)
    P = 1 / (1 + np.exp(-(th @ a.T - b)))
    Y = (rng.random((M, I)) < P).astype(float)
    return Y, th, a, b, P


@pytest.fixture(scope="module")
def sim():
    return simulate()


@pytest.fixture(scope="module")
def bank(sim):
    Y = sim[0]
    groups = ["alg" if i % 3 else "geo" for i in range(Y.shape[1])]
    return ItemBank.fit(Y, [f"q{i}" for i in range(Y.shape[1])], [f"m{k}" for k in range(Y.shape[0])],
                        dim=2, subgroups=groups, task="toy")


# ------------------------------------------------------------------ fitting
def test_parameter_recovery(sim):
    Y, th, a, b, P = sim
    m = MIRT2PL(dim=2).fit(Y)
    r_b = np.corrcoef(m.b_, b)[0, 1]
    R = procrustes_align(m.a_, a)
    r_a = np.corrcoef((m.a_ @ R).ravel(), a.ravel())[0, 1]
    Rt = procrustes_align(m.theta_, th)
    r_t = np.corrcoef((m.theta_ @ Rt).ravel(), th.ravel())[0, 1]
    p_mae = np.abs(m.predict_proba(m.theta_) - P).mean()
    print(f"recovery 200×250 d=2: corr b {r_b:.3f}, a {r_a:.3f}, theta {r_t:.3f}, MAE(P) {p_mae:.4f}")
    assert r_b > 0.97 and r_a > 0.85 and r_t > 0.9 and p_mae < 0.06


def test_canonical_orientation(sim):
    m = MIRT2PL(dim=2).fit(sim[0])
    assert np.allclose(m.theta_.mean(0), 0, atol=1e-9)
    C = np.cov(m.theta_, rowvar=False)
    assert abs(C[0, 1]) < 1e-8 and C[0, 0] >= C[1, 1]
    assert (m.a_.sum(0) > 0).all()


def test_missing_data(sim):
    Y, th, a, b, P = sim
    rng = np.random.default_rng(1)
    Ym = Y.copy()
    Ym[rng.random(Y.shape) < 0.3] = np.nan
    m = MIRT2PL(dim=2).fit(Ym)
    assert np.corrcoef(m.b_, b)[0, 1] > 0.95
    assert np.abs(m.predict_proba(m.theta_) - P).mean() < 0.07


def test_extreme_subjects_and_items(sim):
    Y = sim[0][:80, :100].copy()
    Y[0] = 1.0  # all-correct subject
    Y[1] = 0.0  # all-wrong subject
    Y[:, 0] = 1.0  # everyone right
    Y[:, 1] = 0.0  # everyone wrong
    Y[2] = np.nan
    Y[2, 5] = 1.0  # subject with one answer
    m = MIRT2PL(dim=2).fit(Y)
    for arr in (m.a_, m.b_, m.theta_):
        assert np.isfinite(arr).all() and np.abs(arr).max() < 20
    P = m.predict_proba(m.theta_)
    assert P[0].mean() > 0.8 and P[1].mean() < 0.2
    assert P[:, 0].min() > 0.8 and P[:, 1].max() < 0.2


def test_fit_ability_all_right_is_finite(bank):
    th = fit_ability(bank.a, bank.b, np.ones(bank.n_items))
    th0 = fit_ability(bank.a, bank.b, np.zeros(bank.n_items))
    assert np.isfinite(th).all() and np.isfinite(th0).all()
    assert bank.predict_proba(th).mean() > bank.predict_proba(th0).mean()


def test_map_logistic_matches_scipy():
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    X, off = rng.normal(size=(30, 3)), rng.normal(size=30)
    y = (rng.random(30) < 0.5).astype(float)
    y[4] = np.nan
    w = map_logistic(X, off, y, prior_mean=0.3, prior_prec=0.5)

    def f(v):
        z = X @ v + off
        ok = ~np.isnan(y)
        return (np.logaddexp(0, z[ok]) - y[ok] * z[ok]).sum() + 0.25 * ((v - 0.3) ** 2).sum()

    ref = minimize(f, np.zeros(3), method="BFGS", options={"gtol": 1e-9}).x
    assert np.allclose(w, ref, atol=1e-5)


def test_select_dim_prefers_true_low_dim():
    Y = simulate(M=120, I=150, d=1, seed=4)[0]
    d, table = select_dim(Y, dims=(1, 3), seed=0)
    assert d == 1 and len(table) == 2 and {"val_logloss", "val_acc_mae"} <= set(table[0])


# ------------------------------------------------------------------ bank
def test_bank_round_trip(tmp_path, bank):
    bank.responses[3, 7] = np.nan
    p = bank.save(tmp_path / "bank.safetensors")
    b2 = ItemBank.load(p)
    assert b2.item_ids == bank.item_ids and b2.subject_names == bank.subject_names
    assert b2.subgroups == bank.subgroups and b2.meta == json.loads(json.dumps(bank.meta))
    for k in ("a", "b", "theta"):
        assert np.array_equal(getattr(b2, k), getattr(bank, k))
    assert np.array_equal(np.isnan(b2.responses), np.isnan(bank.responses))
    assert np.array_equal(np.nan_to_num(b2.responses), np.nan_to_num(bank.responses))
    assert b2.meta["task"] == "toy" and b2.dim == 2


def test_bank_load_errors(tmp_path, bank):
    from safetensors.numpy import save_file

    with pytest.raises(IRTError, match="no such file"):
        ItemBank.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IRTError, match="not a readable safetensors"):
        ItemBank.load(tmp_path / "junk.safetensors")
    save_file({"x": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IRTError, match="not an item bank"):
        ItemBank.load(tmp_path / "other.safetensors")
    md = {"format": "irt-itembank", "format_version": "1", "item_ids": json.dumps(["a", "b"]),
          "subject_names": json.dumps(["s"]), "subgroups": "null", "meta": "{}"}
    save_file({"a": np.zeros((3, 2)), "b": np.zeros(3), "theta": np.zeros((1, 2))},
              str(tmp_path / "bad.safetensors"), metadata=md)
    with pytest.raises(IRTError, match="2 names for 3"):
        ItemBank.load(tmp_path / "bad.safetensors")


def test_unknown_item_ids(bank):
    with pytest.raises(IRTError, match=r"not in the item bank of task 'toy'.*zzz"):
        bank.index(["q1", "zzz"])
    with pytest.raises(IRTError, match="not among the bank's calibration subjects"):
        bank.subject_theta(["nobody"])


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("Y,msg", [
    (np.array([[0, 1], [0.5, 1]]), "0, 1 or missing"),
    (np.array([[0, 1], [2, 1]]), "0, 1 or missing"),
    (np.array([[0, np.inf]]), "0, 1 or missing"),
    (np.array([0, 1, 1]), "2-D"),
    (np.zeros((0, 4)), "empty"),
    (np.full((2, 2), np.nan), "no observed answer"),
    ([["a", "b"]], "numeric"),
])
def test_bad_response_matrix(Y, msg):
    with pytest.raises(IRTError, match=msg):
        MIRT2PL(dim=1).fit(Y)


def test_bad_fit_arguments(sim):
    Y = sim[0][:20, :30]
    with pytest.raises(IRTError, match="dim must be"):
        MIRT2PL(dim=0).fit(Y)
    with pytest.raises(IRTError, match="names for 30"):
        ItemBank.fit(Y, item_ids=["x"] * 3, dim=1)
    with pytest.raises(IRTError, match="duplicate"):
        ItemBank.fit(Y, item_ids=["x"] * 30, dim=1)


def test_bad_estimator_inputs(bank):
    anc = select_anchors(bank, 5, "random", seed=0)
    ans = np.ones(5)
    with pytest.raises(IRTError, match="unknown estimator"):
        estimate_accuracy("median", bank, anc.idx, anc.weights, ans)
    with pytest.raises(IRTError, match="expected 5 answers"):
        estimate_accuracy("pirt", bank, anc.idx, anc.weights, np.ones(4))
    with pytest.raises(IRTError, match="0, 1 or NaN"):
        estimate_accuracy("pirt", bank, anc.idx, anc.weights, np.full(5, 0.3))
    with pytest.raises(IRTError, match="needs endpoint_theta"):
        estimate_accuracy("mpirt", bank, anc.idx, anc.weights, ans)
    with pytest.raises(IRTError, match="K × 2"):
        estimate_accuracy("mpirt", bank, anc.idx, anc.weights, ans, endpoint_theta=np.zeros((2, 3)))
    with pytest.raises(IRTError, match="twice"):
        estimate_accuracy("mean", bank, np.array([1, 1]), None, np.ones(2))
    with pytest.raises(IRTError, match="positions must be"):
        estimate_accuracy("mean", bank, np.array([10**6]), None, np.ones(1))
    with pytest.raises(IRTError, match="unknown method"):
        select_anchors(bank, 5, "kmedoids")
    with pytest.raises(IRTError, match="positive integer"):
        select_anchors(bank, 0)


# ------------------------------------------------------------------ anchors
@pytest.mark.parametrize("method", ["random", "correctness", "irt", "info", "strata"])
def test_anchor_methods(bank, method):
    anc = select_anchors(bank, 12, method, seed=1)
    assert len(anc) == 12 == len(set(anc.idx.tolist()))
    assert np.isclose(anc.weights.sum(), 1) and (anc.weights > 0).all()
    assert anc.item_ids == [bank.item_ids[i] for i in anc.idx]
    assert 0 <= anc.gp_lambda <= 1
    assert select_anchors(bank, 12, method, seed=1).idx.tolist() == anc.idx.tolist()  # deterministic


def test_correctness_anchors_with_few_distinct_items_warn_nothing():
    # 10 subjects, 60 items but only 9 distinct answer columns (near-duplicates a few ulps apart):
    # k-means finds fewer distinct clusters than the 12 anchors asked for; the anchors are topped up
    # with other items and sklearn's ConvergenceWarning does not reach the user
    rng = np.random.default_rng(0)
    cols = (rng.random((10, 9)) < 0.5).astype(float)
    cols[0] = 1.0 - cols[1]  # no constant column
    Y = cols[:, rng.integers(0, 9, 60)]
    bank = ItemBank.fit(Y, dim=1, seed=0)
    bank.responses[:, 1::2] += 1e-14  # answers are what the k-means embeds; make duplicates not exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anc = select_anchors(bank, 12, "correctness", seed=0)
    assert len(anc) == 12 == len(set(anc.idx.tolist()))
    assert np.isclose(anc.weights.sum(), 1) and (anc.weights > 0).all()


def test_stratified_anchors(bank):
    anc = select_anchors(bank, 9, "irt", seed=0, stratify=True)
    groups = [bank.subgroups[i] for i in anc.idx]
    assert groups.count("alg") == 6 and groups.count("geo") == 3
    share_geo = sum(w for w, g in zip(anc.weights, groups) if g == "geo")
    assert np.isclose(share_geo, bank.subgroups.count("geo") / bank.n_items)


def test_anchors_file_round_trip(tmp_path, bank):
    anc = select_anchors(bank, 7, "info")
    anc.save(tmp_path / "a.json")
    back = Anchors.load(tmp_path / "a.json", bank)
    assert back.idx.tolist() == anc.idx.tolist() and np.allclose(back.weights, anc.weights)


# ------------------------------------------------------------------ estimators
@pytest.mark.parametrize("method", ["random", "irt", "info", "correctness", "strata"])
def test_estimators_exact_with_all_items(bank, sim, method):
    Y = sim[0]
    anc = select_anchors(bank, bank.n_items, method)
    assert len(anc) == bank.n_items
    E = bank.theta[:3]
    for m in (0, 5, 17):
        ans = Y[m, anc.idx]
        for est in ESTIMATORS:
            z = estimate_accuracy(est, bank, anc, anchor_answers=ans, endpoint_theta=E)
            assert abs(z - Y[m].mean()) < 1e-12, est


def test_estimators_reasonable_and_batch_consistent(bank, sim):
    Y = simulate(seed=9)[0][:40]  # new subjects from the same population
    anc = select_anchors(bank, 40, "irt")
    E = bank.fit_ability(Y[:3])
    truth = Y.mean(1)
    for est in ESTIMATORS:
        z = estimate_accuracy_batch(est, bank, anc.idx, anc.weights, Y[:, anc.idx], endpoint_theta=E,
                                    gp_lambda=anc.gp_lambda)
        assert np.abs(z - truth).mean() < 0.09, est
        one = estimate_accuracy(est, bank, anc, anchor_answers=Y[7, anc.idx], endpoint_theta=E)
        assert np.isclose(one, z[7])


def test_missing_anchor_answers(bank):
    anc = select_anchors(bank, 10, "random")
    ans = np.array([1, 0, np.nan, 1, 1, np.nan, 0, 1, 1, 0], dtype=float)
    for est in ESTIMATORS:
        z = estimate_accuracy(est, bank, anc, anchor_answers=ans, endpoint_theta=bank.theta[:2])
        assert 0 <= z <= 1


def test_mpirt_lambda_regularised_on_all_correct(bank):
    anc = select_anchors(bank, 20, "irt")
    E = bank.theta[:3]
    z1 = estimate_accuracy("mpirt", bank, anc, anchor_answers=np.ones(20), endpoint_theta=E)
    z0 = estimate_accuracy("mpirt", bank, anc, anchor_answers=np.zeros(20), endpoint_theta=E)
    assert 0 < z0 < z1 < 1 and np.isfinite([z0, z1]).all()


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".npz"])
def test_response_file_round_trip(tmp_path, ext):
    Y = np.array([[1, 0, np.nan], [0, 1, 1]])
    p = write_responses(tmp_path / f"r{ext}", Y, ["i1", "i2", "i3"], ["s1", "s2"])
    Y2, items, names = read_responses(p)
    assert items == ["i1", "i2", "i3"] and names == ["s1", "s2"]
    assert np.array_equal(np.isnan(Y2), np.isnan(Y)) and np.array_equal(np.nan_to_num(Y2), np.nan_to_num(Y))


def test_response_file_errors(tmp_path):
    (tmp_path / "a.csv").write_text("subject,q1,q2\ns1,1,0.5\n")
    with pytest.raises(IRTError, match=r"a.csv, line 2, item 'q2'.*0.5"):
        read_responses(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("subject,q1,q2\ns1,1\n")
    with pytest.raises(IRTError, match="line 2: 2 cells"):
        read_responses(tmp_path / "b.csv")
    (tmp_path / "c.jsonl").write_text('{"subject": "s", "answers": {"q": 1}}\n{oops\n')
    with pytest.raises(IRTError, match="line 2: not JSON"):
        read_responses(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(IRTError, match="unknown response-file format"):
        read_responses(tmp_path / "d.txt")
    np.savez(tmp_path / "e.npz", responses=np.zeros((2, 2)), item_ids=np.array([{"x": 1}, 2], dtype=object))
    with pytest.raises(IRTError, match="without pickle"):
        read_responses(tmp_path / "e.npz")
    (tmp_path / "f.csv").write_text("")
    with pytest.raises(IRTError, match="empty"):
        read_responses(tmp_path / "f.csv")


def test_irt_does_not_import_evomerge():
    code = "import irt, irt.io, sys; assert not [m for m in sys.modules if m.startswith('evomerge')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pymc_fitter_recovers():
    """The optional Bayesian fitter (ADVI) recovers known parameters about as well as the MAP fit
    and its posterior sd of b covers the truth (measured: corr(b) 0.970, ±2 sd coverage 0.92)."""
    pytest.importorskip("pymc")
    from irt.bayes import fit_pymc

    Y, th, a, b, P = simulate(M=80, I=60, d=1, seed=2)
    res = fit_pymc(Y, dim=1, method="advi", seed=0)  # default 20,000 ADVI steps
    m = MIRT2PL(dim=1).fit(Y)
    assert np.corrcoef(res.b_, b)[0, 1] > 0.9
    assert np.abs(res.predict_proba(res.theta_) - P).mean() < 1.2 * np.abs(m.predict_proba(m.theta_) - P).mean()
    assert res.b_sd_.shape == b.shape and (res.b_sd_ > 0).all()
    assert np.mean(np.abs(res.b_ - b) < 2 * res.b_sd_) > 0.8


def test_pymc_fitter_nuts():
    pytest.importorskip("pymc")
    from irt.bayes import fit_pymc

    Y, th, a, b, P = simulate(M=40, I=30, d=1, seed=4)
    res = fit_pymc(Y, dim=1, method="nuts", draws=200, seed=0)
    assert res.method == "nuts" and np.corrcoef(res.b_, b)[0, 1] > 0.85
    assert np.mean(np.abs(res.b_ - b) < 2 * res.b_sd_) > 0.8
    with pytest.raises(IRTError, match="'advi' or 'nuts'"):
        fit_pymc(Y, dim=1, method="vi")


def test_no_answers_at_all_gives_irt_prior_estimate(bank):
    anc = select_anchors(bank, 5, "irt")
    for est in ("pirt", "gpirt", "mpirt", "gmpirt"):
        z = estimate_accuracy(est, bank, anc, anchor_answers=np.full(5, np.nan), endpoint_theta=bank.theta[:2])
        assert 0 < z < 1
