"""Estimators of a subject's full-benchmark accuracy from its answers to a few anchor items.

Notation: N items in the bank, anchors A (n items) with weights w (Σ w = 1), answers y_i for
i ∈ A, item parameters (a_i, b_i), P_i(θ) = σ(a_i·θ − b_i).

``mean``
    Weighted mean of the anchor answers: Σ_{i∈A} w_i y_i.
``cmean`` (calibrated mean)
    The weighted anchor mean x = Σ_{i∈A} w_i y_i mapped to the full accuracy by the straight
    line that fits the calibration subjects: Ẑ = α + β x, (α, β) by least squares of A_m on x_m
    over the bank's calibration subjects m (A_m their full accuracy, x_m their weighted mean on
    the same anchors); β = 1 (a difference estimator) when the x_m do not vary; clipped to
    [0, 1]. It corrects what the anchors over- or under-represent, using no IRT model at all --
    with the ``strata`` anchors the robust choice when the calibration population is a dozen
    unrelated models (docs/irt_real.md). Needs the calibration responses (a bank saved without
    them uses the model's probabilities at the calibration abilities instead).
``pirt`` (p-IRT; Polo et al., "tinyBenchmarks", ICML 2024, Sec. 3.2)
    θ̂ = MAP ability from the anchor answers (:func:`irt.model.fit_ability`), then
    Ẑ = (1/N) [Σ_{i∈A} y_i + Σ_{i∉A} P_i(θ̂)] = λ ȳ_A + (1 − λ) mean_{i∉A} P_i(θ̂), λ = n/N.
``gpirt`` (gp-IRT; same paper)
    Ẑ = λ_gp Σ_{i∈A} w_i y_i + (1 − λ_gp) Ẑ_pIRT with λ_gp = b² / (b² + s²): the mixing
    weight that minimises the error of a convex combination of a nearly unbiased estimator of
    variance s² (the weighted anchor mean) and one of bias b and small variance (IRT).
    tinyBenchmarks uses s² ≈ v/(c n) (v = per-subject variance of item correctness, c = 1 for
    random anchors, 4 for clustered); here b² and s² are both measured on the calibration
    subjects (see :func:`gp_lambda` for why).
``mpirt`` (mp-IRT; Mencattini et al., "MERGE³", ICML 2025)
    The merged model's ability is a combination of the K endpoint models' abilities,
    θ = Σ_j λ_j θ_j = λᵀ Θ_E, with λ fitted on the anchor answers:
    λ̂ = argmax_λ Σ_{i∈A} log Bernoulli(y_i; σ(a_i·Θ_Eᵀλ − b_i)) − |λ − 1/K|² / (2 τ²),
    then the p-IRT formula with θ̂ = λ̂ᵀ Θ_E.
    Regularisation of λ (MERGE³ runs unconstrained BFGS from λ = 1/K): a Gaussian prior centred
    on the uniform average 1/K with sd τ (``lambda_prior_sd``, default 0.5), or by default its
    empirical-Bayes version fitted on the calibration population (:func:`lambda_prior`). Why: (i) with ~20
    anchors an all-right or all-wrong answer vector makes the unpenalised likelihood increase
    without bound along some λ direction, so λ (and the estimate, pushed to 0 or 1) runs off;
    (ii) when K > d, or endpoints have near-collinear abilities, λ is not identified and
    unconstrained BFGS returns an arbitrary, often huge, λ; (iii) merges are not confined to the
    simplex (task arithmetic amplifies: Sakana's evolved weights summed to ~2; a broken merge
    lies below every endpoint), so a simplex constraint would be wrong. A mild ridge around the
    uniform average keeps λ finite and unique while letting ~20 answers move it well outside the
    simplex. The problem is a K-dimensional ridge logistic regression, solved by damped Newton
    in well under a millisecond.
``gmpirt`` (gmp-IRT; MERGE³)
    Ẑ = λ_gp Σ_{i∈A} w_i y_i + (1 − λ_gp) Ẑ_mpIRT. MERGE³'s code uses λ_gp = 0.5; here the
    default is the gp-IRT rule above (pass ``gp_lambda=0.5`` for MERGE³'s choice).

Degenerate case: when the anchors are all N items (uniform weights) and all are answered, every
estimator returns the observed accuracy exactly (the unseen sums are empty, λ = n/N = 1).
Missing anchor answers (NaN) are skipped by the fits and replaced by P_i(θ̂) in the p-IRT sum.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from irt.errors import IRTError
from irt.model import _sigmoid, map_logistic

__all__ = ["ESTIMATORS", "estimate_accuracy", "estimate_accuracy_batch", "gp_lambda"]

ESTIMATORS = ("mean", "cmean", "pirt", "gpirt", "mpirt", "gmpirt")


@runtime_checkable
class AnchorDesign(Protocol):
    """What the estimators read from a set of anchors (:class:`irt.anchors.Anchors` is one):
    positions in the bank, their weights, the gp-IRT mixing weight (None = compute it) and
    whether the anchors were drawn at random."""

    idx: np.ndarray
    weights: np.ndarray
    gp_lambda: float | None

    @property
    def random(self) -> bool: ...


def _prior_prec(bank) -> float:
    return 1.0 / float(bank.meta.get("fit", {}).get("prior_theta", 1.0)) ** 2


def ability_prior(bank, kind: str = "population"):
    """(mean, precision) of the ability prior used to fit a new subject from few answers.

    ``"standard"``: the calibration prior N(0, σ_θ² I). ``"population"`` (default): the
    empirical distribution of the calibration subjects' abilities, N(mean θ̂, cov θ̂ + 0.01 I)
    — an empirical-Bayes prior: in evomerge the calibration population is drawn from the same
    search space as the candidates, so it is the right prior for them and sharpens estimates
    from ~20 answers. Falls back to "standard" with fewer than 2 d calibration subjects.
    """
    if kind not in ("population", "standard"):
        raise IRTError(f"ability prior must be 'population' or 'standard', got {kind!r}")
    d = bank.dim
    if kind == "standard" or len(bank.theta) < 2 * d:
        return np.zeros(d), _prior_prec(bank)
    key = ("abprior",)
    if key not in bank._cache:
        mu = bank.theta.mean(0)
        C = np.cov(bank.theta, rowvar=False).reshape(d, d) + 0.01 * np.eye(d)
        bank._cache[key] = (mu, np.linalg.inv(C))
    return bank._cache[key]


def _check_anchor_inputs(bank, idx, w, Y):
    idx = np.asarray(idx)
    if idx.ndim != 1 or idx.size == 0:
        raise IRTError(f"anchors: need a non-empty 1-D list of item positions, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise IRTError("anchors: anchor_idx must be integer positions in the bank (use bank.index(ids))")
    if idx.min() < 0 or idx.max() >= bank.n_items:
        raise IRTError(f"anchors: positions must be in [0, {bank.n_items}); got {idx.min()}..{idx.max()}")
    if len(np.unique(idx)) != idx.size:
        raise IRTError("anchors: the same item appears twice among the anchors")
    if w is None:
        w = np.full(idx.size, 1.0 / idx.size)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != idx.shape:
        raise IRTError(f"anchors: {w.size} weights for {idx.size} anchors")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise IRTError("anchors: weights must be finite, non-negative and not all zero")
    try:
        Y = np.asarray(Y, dtype=np.float64)
    except (TypeError, ValueError):
        raise IRTError("answers: must be numbers 0/1 (NaN = not answered)") from None
    if Y.shape[-1:] != idx.shape or Y.ndim not in (1, 2):
        raise IRTError(f"answers: expected {idx.size} answers (one per anchor) per subject, got shape {Y.shape}")
    bad = ~(np.isnan(Y) | (Y == 0) | (Y == 1))
    if bad.any():
        raise IRTError(f"answers: must be 0, 1 or NaN (not answered); found {Y[bad][0]!r}")
    return idx.astype(np.int64), w / w.sum(), Y


def lambda_prior(bank, endpoint_theta, kind: str = "population", sd: float = 0.5):
    """(mean, precision) of the mp-IRT prior on λ for endpoints ``endpoint_theta`` (K × d).

    ``"fixed"``: N(1/K, sd² I). ``"population"`` (default; falls back to "fixed" when the bank has
    no calibration responses or fewer than 2K subjects): fit λ_m for every calibration subject on
    all its answers (under the fixed prior) and use N(mean λ_m, cov λ_m + 0.01 I) — the
    empirical-Bayes prior of the candidates' population, which in evomerge is sampled from the
    same search space. Cached on the bank per endpoint set.
    """
    if kind not in ("population", "fixed"):
        raise IRTError(f"lambda prior must be 'population' or 'fixed', got {kind!r}")
    E = np.asarray(endpoint_theta, dtype=np.float64)
    K = E.shape[0]
    fixed = (np.full(K, 1.0 / K), 1.0 / sd**2)
    R = bank.responses
    if kind == "fixed" or R is None or len(R) < 2 * K:
        return fixed
    key = ("lamprior", E.tobytes(), float(sd))
    if key not in bank._cache:
        L = map_logistic(bank.a @ E.T, -bank.b, R, fixed[0], fixed[1])
        C = np.cov(L, rowvar=False).reshape(K, K) + 0.01 * np.eye(K)
        bank._cache[key] = (L.mean(0), np.linalg.inv(C))
    return bank._cache[key]


def gp_lambda(bank, anchor_idx, weights=None, random: bool = False) -> float:
    """gp-IRT mixing weight λ = b² / (b² + s²) for these anchors (weight on the anchor mean).

    tinyBenchmarks (Polo et al. 2024) set b = validation error of the IRT-only prediction and
    approximate the variance of the weighted anchor mean by v/(c n), v = mean per-subject
    variance of item correctness, c = 1 for random anchors and 4 for clustered ones. That c is a
    guess that fails when the anchors are far from a stratified sample (measured here: the
    weighted mean of 20 clustered anchors had 3–4× the error v/(4n) predicts, which pushed λ
    to ~0.5 and made gp-IRT worse than p-IRT). So both terms are *measured* on the bank's
    calibration subjects: b² = mean_m (mean_i P_i(θ̂_m) − acc_m)² with θ̂_m fitted on the
    anchor answers only, and s² = mean_m (Σ_{i∈A} w_i y_mi − acc_m)². Without calibration
    responses the tinyBenchmarks formula is used with b = 0.03 (a typical value) — pass λ
    explicitly instead. Both are in-sample (items were fitted on those subjects; 'correctness'
    anchors were chosen on them), hence slightly optimistic. Returns 1.0 when the anchors are
    all the items. Cached on the bank per (anchors, weights).
    """
    idx = np.asarray(anchor_idx, dtype=np.int64)
    n, N = idx.size, bank.n_items
    if n >= N:
        return 1.0
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    key = ("gp", tuple(idx.tolist()), w.tobytes(), bool(random))
    if key in bank._cache:
        return bank._cache[key]
    R = bank.responses
    if R is None:
        lam = 0.03**2 / (0.03**2 + 0.2 / ((1.0 if random else 4.0) * n))
        bank._cache[key] = lam
        return lam
    ok = (~np.isnan(R[:, idx])).any(1)
    R = R[ok]
    mu, prec = ability_prior(bank, "population")
    theta = map_logistic(bank.a[idx], -bank.b[idx], R[:, idx], mu, prec)
    P = _sigmoid(theta @ bank.a.T - bank.b)
    obs = ~np.isnan(R)
    acc = np.nanmean(R, axis=1)
    pred = np.where(obs, P, 0).sum(1) / obs.sum(1)
    RA = R[:, idx]
    oa = ~np.isnan(RA)
    wmean = np.where(oa, RA, 0) @ w / np.maximum(oa @ w, 1e-300)
    b2 = float(np.mean((pred - acc) ** 2))
    s2 = float(np.mean((wmean - acc) ** 2))
    lam = 1.0 if b2 + s2 == 0 else b2 / (b2 + s2)
    bank._cache[key] = lam
    return lam


def _weighted_mean(R, w):
    obs = ~np.isnan(R)
    out = np.where(obs, R, 0.0) @ w / np.maximum(obs @ w, 1e-300)
    return np.where(obs.any(1), out, np.nan)


def calibrated_mean(bank, idx, w, wmean) -> np.ndarray:
    """The ``cmean`` estimate for each weighted anchor mean in ``wmean`` (module docstring)."""
    R = bank.responses if bank.responses is not None else bank.predict_proba(bank.theta)
    x = _weighted_mean(R[:, idx], w)
    with np.errstate(all="ignore"):
        full = np.nanmean(R, axis=1)
    ok = np.isfinite(x) & np.isfinite(full)
    x, full = x[ok], full[ok]
    if len(x) == 0:
        return wmean
    slope = 1.0
    if len(x) >= 3 and x.std() > 1e-12:
        slope = float(np.cov(x, full, bias=True)[0, 1] / x.var())
    icpt = full.mean() - slope * x.mean()
    est = np.where(np.isnan(wmean), full.mean(), icpt + slope * wmean)  # no answers: the population's mean
    return np.clip(est, 0.0, 1.0)


def _pirt_from_theta(bank, idx, Y, theta):
    """(1/N)[Σ_{observed anchors} y_i + Σ_{other items} P_i(θ̂)] for each row."""
    P = _sigmoid(theta @ bank.a.T - bank.b)  # S × N
    obs = ~np.isnan(Y)
    total = P.sum(1) - np.where(obs, P[:, idx], 0.0).sum(1) + np.where(obs, Y, 0.0).sum(1)
    return total / bank.n_items


def estimate_accuracy_batch(
    name: str,
    bank,
    anchor_idx,
    anchor_weights,
    anchor_answers,
    *,
    endpoint_theta=None,
    gp_lambda: float | None = None,
    random_anchors: bool = False,
    lambda_prior_sd: float = 0.5,
    ability_prior_kind: str = "population",
    lambda_prior_kind: str = "population",
) -> np.ndarray:
    """Vectorised :func:`estimate_accuracy`: ``anchor_answers`` is S × n, returns S estimates."""
    if name not in ESTIMATORS:
        raise IRTError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    idx, w, Y = _check_anchor_inputs(bank, anchor_idx, anchor_weights, anchor_answers)
    Y2 = Y[None, :] if Y.ndim == 1 else Y
    wmean = _weighted_mean(Y2, w)
    if name == "mean":
        return wmean
    if name == "cmean":
        return calibrated_mean(bank, idx, w, wmean)
    if name in ("pirt", "gpirt"):
        mu, prec = ability_prior(bank, ability_prior_kind)
        theta = map_logistic(bank.a[idx], -bank.b[idx], Y2, mu, prec)
    else:
        if endpoint_theta is None:
            raise IRTError(f"estimator {name!r} needs endpoint_theta (K × d abilities of the endpoint models; "
                           "e.g. bank.subject_theta(names) or bank.fit_ability(full_answers, item_ids))")
        E = np.asarray(endpoint_theta, dtype=np.float64)
        if E.ndim == 1:
            E = E[None, :]
        if E.ndim != 2 or E.shape[1] != bank.dim or E.shape[0] == 0 or not np.isfinite(E).all():
            raise IRTError(f"endpoint_theta: expected a finite K × {bank.dim} array, got shape {E.shape}")
        if not lambda_prior_sd > 0:
            raise IRTError(f"lambda_prior_sd must be > 0, got {lambda_prior_sd!r}")
        X = bank.a[idx] @ E.T  # n × K
        mu, prec = lambda_prior(bank, E, lambda_prior_kind, lambda_prior_sd)
        lam = map_logistic(X, -bank.b[idx], Y2, mu, prec)
        theta = lam @ E
    est = _pirt_from_theta(bank, idx, Y2, theta)
    if name in ("gpirt", "gmpirt"):
        lam_gp = gp_lambda_value(bank, idx, gp_lambda, random_anchors, w)
        est = np.where(np.isnan(wmean), est, lam_gp * wmean + (1 - lam_gp) * est)  # no answers: IRT part only
    return est


def gp_lambda_value(bank, idx, given, random_anchors, w=None):
    if given is not None:
        if not 0.0 <= float(given) <= 1.0:
            raise IRTError(f"gp_lambda must be in [0, 1], got {given!r}")
        return float(given)
    return gp_lambda(bank, idx, weights=w, random=random_anchors)


def estimate_accuracy(
    name: str,
    bank,
    anchor_idx,
    anchor_weights=None,
    anchor_answers=None,
    *,
    endpoint_theta=None,
    gp_lambda: float | None = None,
    random_anchors: bool | None = None,
    lambda_prior_sd: float = 0.5,
    ability_prior_kind: str = "population",
    lambda_prior_kind: str = "population",
) -> float:
    """Estimated full accuracy of one subject from its answers to the anchors.

    ``name``: one of ``mean | cmean | pirt | gpirt | mpirt | gmpirt`` (formulas in the module docstring).
    ``anchor_idx``: positions in ``bank`` (or an :class:`irt.anchors.Anchors`, which then also
    supplies weights, ``gp_lambda`` and whether it is random); ``anchor_weights``: n weights
    (None = uniform); ``anchor_answers``: n answers 0/1 (NaN = not answered).
    ``endpoint_theta``: K × d endpoint abilities (mpirt / gmpirt). ``gp_lambda``: override the
    gp mixing weight (default: :func:`gp_lambda` for these anchors, cached on the bank).
    ``lambda_prior_sd``: τ of the mp-IRT prior on λ.
    """
    if isinstance(anchor_idx, AnchorDesign):
        anc = anchor_idx
        anchor_idx = anc.idx
        if anchor_weights is None:
            anchor_weights = anc.weights
        if gp_lambda is None:
            gp_lambda = anc.gp_lambda
        if random_anchors is None:
            random_anchors = anc.random
    if anchor_answers is None:
        raise IRTError("estimate_accuracy: anchor_answers missing")
    ans = np.asarray(anchor_answers)
    if ans.ndim != 1:
        raise IRTError(f"answers: expected one answer per anchor (1-D), got shape {ans.shape}; "
                       "use estimate_accuracy_batch for several subjects")
    return float(estimate_accuracy_batch(
        name, bank, anchor_idx, anchor_weights, ans, endpoint_theta=endpoint_theta, gp_lambda=gp_lambda,
        random_anchors=bool(random_anchors), lambda_prior_sd=lambda_prior_sd,
        ability_prior_kind=ability_prior_kind, lambda_prior_kind=lambda_prior_kind)[0])
