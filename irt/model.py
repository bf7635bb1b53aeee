"""Multidimensional two-parameter logistic IRT model (MIRT-2PL), fitted by joint MAP.

Model (Reckase 2009; as used by tinyBenchmarks, Polo et al. ICML 2024, and MERGE³,
Mencattini et al. ICML 2025)::

    P(Y_mi = 1) = σ(a_i · θ_m − b_i)

with subject abilities θ_m ∈ R^d, item discriminations a_i ∈ R^d and difficulties b_i ∈ R.

Fitting: joint maximum a posteriori over (θ, a, b) with independent Gaussian priors
θ ~ N(0, σ_θ² I), a ~ N(0, σ_a² I), b ~ N(0, σ_b²), analytic gradients and scipy's L-BFGS-B.
The negative log posterior, with M the 0/1 mask of observed cells, is::

    L = Σ_{m,i} M_mi [softplus(z_mi) − y_mi z_mi] + |θ|²/2σ_θ² + |a|²/2σ_a² + |b|²/2σ_b²
    z = θ aᵀ − 1 bᵀ,   R = M ⊙ (σ(z) − y)
    ∂L/∂θ = R a + θ/σ_θ²,   ∂L/∂a = Rᵀ θ + a/σ_a²,   ∂L/∂b = −Rᵀ 1 + b/σ_b²

The priors handle the classic pitfalls: an all-correct / all-wrong subject (ability would run
off to ±∞ under maximum likelihood) and an item everyone gets right / wrong (b would diverge)
stay finite; the θ prior also fixes the scale that (a, θ) leave free. Rotation (and sign)
invariance, a θ → θ R, a → a R for any orthogonal R leaves every prediction unchanged, is fixed
after the fit by a canonical orientation: θ centred (b absorbs the shift), rotated to its
principal axes (largest variance first), each axis signed so that the items' mean
discrimination on it is positive (higher θ = more items right). Comparisons of a / θ across
fits still need :func:`procrustes_align`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from irt.errors import IRTError

__all__ = [
    "MIRT2PL",
    "check_responses",
    "fit_ability",
    "map_logistic",
    "procrustes_align",
    "select_dim",
]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def check_responses(Y, name: str = "responses", item_ids=None, subject_names=None) -> np.ndarray:
    """Validate a subjects × items response matrix and return it as float64 with NaN = missing.

    Accepted entries: 0, 1, True, False, NaN (missing). Raises :class:`IRTError` naming the first
    offending cell for anything else (other numbers, ±inf, strings), for arrays that are not 2-D,
    and for matrices with no subject, no item or no observed answer.
    """
    try:
        arr = np.asarray(Y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise IRTError(f"{name}: must be a numeric subjects × items matrix of 0/1 (NaN = missing): {exc}") from None
    if arr.ndim != 2:
        raise IRTError(f"{name}: must be a 2-D subjects × items matrix, got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise IRTError(f"{name}: empty matrix (shape {arr.shape}); need at least one subject and one item")
    bad = ~(np.isnan(arr) | (arr == 0.0) | (arr == 1.0))
    if bad.any():
        m, i = np.argwhere(bad)[0]
        who = subject_names[m] if subject_names is not None else f"#{m}"
        what = item_ids[i] if item_ids is not None else f"#{i}"
        raise IRTError(
            f"{name}: answers must be 0, 1 or missing (NaN); found {arr[m, i]!r} for subject {who}, item {what} "
            f"({int(bad.sum())} bad cells in all)"
        )
    if np.isnan(arr).all():
        raise IRTError(f"{name}: no observed answer (every cell is missing)")
    return arr


def procrustes_align(X: np.ndarray, X_ref: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising |X R − X_ref|_F (Schönemann 1966): R = U Vᵀ from svd(Xᵀ X_ref).

    Use it to compare abilities or discriminations of two fits: ``X @ procrustes_align(X, X_ref)``.
    """
    U, _, Vt = np.linalg.svd(np.asarray(X).T @ np.asarray(X_ref))
    return U @ Vt


# --------------------------------------------------------------------------------------------
# MAP logistic regression with a Gaussian prior, batched over subjects (abilities, mp-IRT λ).
# --------------------------------------------------------------------------------------------

def map_logistic(
    X: np.ndarray,
    offset: np.ndarray,
    Y: np.ndarray,
    prior_mean: np.ndarray | float = 0.0,
    prior_prec: float | np.ndarray = 1.0,
    max_iter: int = 50,
    tol: float = 1e-8,
) -> np.ndarray:
    """MAP of w for each row y of Y under y_i ~ Bernoulli(σ(X_i · w + offset_i)), w ~ N(μ, Λ⁻¹).

    ``prior_prec`` Λ: a scalar (Λ = prior_prec · I) or a p × p precision matrix.

    ``X``: n × p features, ``offset``: n, ``Y``: S × n (or n) answers with NaN = missing.
    Damped Newton (the objective is strictly convex for prior_prec > 0), vectorised over the S
    rows, with step halving when the objective does not decrease. Returns S × p (or p).
    Used for a subject's ability (X = a, offset = −b, μ = 0) and for mp-IRT's λ
    (X = a Θ_Eᵀ, μ = 1/K).
    """
    X = np.asarray(X, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    single = Y.ndim == 1
    Y2 = Y[None, :] if single else Y
    S, n = Y2.shape
    p = X.shape[1]
    mu = np.broadcast_to(np.asarray(prior_mean, dtype=np.float64), (p,))
    mask = ~np.isnan(Y2)
    y = np.where(mask, Y2, 0.0)
    mf = mask.astype(np.float64)

    L = np.asarray(prior_prec, dtype=np.float64)
    L = np.eye(p) * float(L) if L.ndim == 0 else L
    if L.shape != (p, p):
        raise IRTError(f"prior precision must be a scalar or {p} × {p}, got shape {L.shape}")

    def objective(W, rows):
        Z = W @ X.T + offset
        D = W - mu
        return (mf[rows] * (_softplus(Z) - y[rows] * Z)).sum(1) + 0.5 * np.einsum("sj,jk,sk->s", D, L, D)

    W = np.tile(mu, (S, 1))
    f = objective(W, np.arange(S))
    eye = L
    active = np.ones(S, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Wa = W[idx]
        Z = Wa @ X.T + offset
        P = _sigmoid(Z)
        R = mf[idx] * (P - y[idx])
        g = R @ X + (Wa - mu) @ L
        Wt = mf[idx] * P * (1.0 - P)
        H = np.einsum("sn,nj,nk->sjk", Wt, X, X) + eye
        step = np.linalg.solve(H, g[..., None])[..., 0]
        t = np.ones(idx.size)
        f_old = f[idx]
        Wn = Wa - step
        fn = objective(Wn, idx)
        for _h in range(30):
            worse = fn > f_old + 1e-12
            if not worse.any():
                break
            t[worse] *= 0.5
            Wn[worse] = Wa[worse] - t[worse, None] * step[worse]
            fn[worse] = objective(Wn[worse], idx[worse])
        W[idx] = Wn
        f[idx] = np.minimum(fn, f_old)
        conv = np.abs(t[:, None] * step).max(1) < tol
        conv |= f_old - fn < 1e-12 * np.maximum(1.0, np.abs(f_old))
        active[idx[conv]] = False
    return W[0] if single else W


def fit_ability(a, b, responses, items=None, prior_sd: float = 1.0) -> np.ndarray:
    """Ability θ of one or several subjects from their answers, given item parameters.

    MAP under the calibration prior θ ~ N(0, prior_sd² I)::

        θ̂ = argmax_θ Σ_i [y_i log σ(a_i·θ − b_i) + (1 − y_i) log(1 − σ(a_i·θ − b_i))] − |θ|²/2σ²

    tinyBenchmarks / MERGE³ use maximum likelihood (BFGS from 0, logits clipped at ±30); the prior
    is used here instead because it is the one the bank was calibrated with and it keeps an
    all-right or all-wrong answer vector at a finite ability.

    ``a``: items × d, ``b``: items; ``responses``: answers (n or S × n, 0/1, NaN = missing) to
    the items ``items`` (integer indices into a/b; None = all items in order).
    Returns θ (d,) or (S, d).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    r = np.asarray(responses, dtype=np.float64)
    if items is not None:
        items = np.asarray(items, dtype=np.int64)
        a, b = a[items], b[items]
    if r.shape[-1] != a.shape[0]:
        raise IRTError(f"fit_ability: {r.shape[-1]} answers for {a.shape[0]} items")
    check_responses(r.reshape(-1, r.shape[-1]) if r.size else r.reshape(0, 0), name="answers")
    return map_logistic(a, -b, r, 0.0, 1.0 / prior_sd**2)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@dataclass
class MIRT2PL:
    """Multidimensional 2PL fitted by joint MAP (see the module docstring for the formulas).

    Parameters: ``dim`` d; prior standard deviations ``prior_theta`` (fixes the scale),
    ``prior_a``, ``prior_b`` (weak); L-BFGS ``max_iter`` / ``tol``; ``seed`` (only used to break
    ties in the initialisation; the fit is deterministic given the data).

    After :meth:`fit`: ``a_`` (items × d), ``b_`` (items), ``theta_`` (subjects × d),
    ``n_iter_``, ``fit_seconds_``, ``loss_`` (mean negative log-likelihood per observed cell).
    """

    dim: int = 2
    prior_theta: float = 1.0
    prior_a: float = 2.0
    prior_b: float = 3.0
    max_iter: int = 3000
    tol: float = 1e-7
    seed: int = 0
    a_: np.ndarray | None = field(default=None, repr=False)
    b_: np.ndarray | None = field(default=None, repr=False)
    theta_: np.ndarray | None = field(default=None, repr=False)
    n_iter_: int = field(default=0, repr=False)
    fit_seconds_: float = field(default=0.0, repr=False)
    loss_: float = field(default=float("nan"), repr=False)

    def fit(self, Y) -> "MIRT2PL":
        """Fit on Y (subjects × items, 0/1, NaN = missing). BLAS is held to one thread during the
        fit: the products have an inner dimension of d, which threads do not speed up, and on a
        busy machine spinning BLAS threads made the fit 5× slower (1.8 s → 11 s for 300 × 1000)."""
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            return self._fit(Y)
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit(Y)

    def _fit(self, Y) -> "MIRT2PL":
        from scipy.optimize import minimize

        if int(self.dim) != self.dim or self.dim < 1:
            raise IRTError(f"dim must be a positive integer, got {self.dim!r}")
        d = int(self.dim)
        Y = check_responses(Y)
        t0 = time.perf_counter()
        M, I = Y.shape
        mask = ~np.isnan(Y)
        full = bool(mask.all())
        mf = mask.astype(np.float64)
        y = np.where(mask, Y, 0.0)
        n_obs = mask.sum()

        theta0, a0, b0 = self._init(y, mf, d)
        st, sa, sb = 1 / self.prior_theta**2, 1 / self.prior_a**2, 1 / self.prior_b**2
        nt, na = M * d, I * d

        def fun(x):
            th = x[:nt].reshape(M, d)
            a = x[nt:nt + na].reshape(I, d)
            b = x[nt + na:]
            Z = th @ a.T - b
            e = np.exp(-np.abs(Z))  # one exp for both the softplus and the sigmoid
            sp = np.maximum(Z, 0.0) + np.log1p(e)
            inv = 1.0 / (1.0 + e)
            P = np.where(Z >= 0, inv, e * inv)
            if full:
                loss = (sp - y * Z).sum()
                R = P - y
            else:
                loss = (mf * (sp - y * Z)).sum()
                R = mf * (P - y)
            loss += 0.5 * (st * (th * th).sum() + sa * (a * a).sum() + sb * (b * b).sum())
            g = np.empty_like(x)
            g[:nt] = (R @ a + st * th).ravel()
            g[nt:nt + na] = (R.T @ th + sa * a).ravel()
            g[nt + na:] = -R.sum(0) + sb * b
            return loss, g

        x0 = np.concatenate([theta0.ravel(), a0.ravel(), b0])
        res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "ftol": self.tol * 1e-3, "gtol": 1e-5, "maxcor": 20})
        x = res.x
        theta = x[:nt].reshape(M, d)
        a = x[nt:nt + na].reshape(I, d)
        b = x[nt + na:].copy()
        theta, a, b = canonical_orientation(theta, a, b)
        self.theta_, self.a_, self.b_ = theta, a, b
        Z = theta @ a.T - b
        self.loss_ = float((mf * (_softplus(Z) - y * Z)).sum() / n_obs)
        self.n_iter_ = int(res.nit)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _init(self, y, mf, d):
        """Deterministic SVD start: θ from the leading left singular vectors of the centred,
        mean-imputed response matrix, a from the right ones (×4: probability → logit slope near
        p = 0.5), b = −logit(item mean)."""
        M, I = y.shape
        cnt = mf.sum(0)
        pm = np.where(cnt > 0, (y * mf).sum(0) / np.maximum(cnt, 1), 0.5)
        X = np.where(mf > 0, y, pm) - pm
        k = min(d, M, I)
        U, S, Vt = np.linalg.svd(X, full_matrices=False)
        theta = np.zeros((M, d))
        a = np.zeros((I, d))
        theta[:, :k] = U[:, :k] * np.sqrt(M)
        a[:, :k] = Vt[:k].T * S[:k] / np.sqrt(M) * 4.0
        if k < d:  # more dimensions than the data has: small deterministic noise
            rng = np.random.default_rng(self.seed)
            theta[:, k:] = 0.01 * rng.standard_normal((M, d - k))
            a[:, k:] = 0.01 * rng.standard_normal((I, d - k))
        pc = np.clip(pm, 0.02, 0.98)
        b = -np.log(pc / (1 - pc))
        return theta, a, b

    def predict_proba(self, theta) -> np.ndarray:
        """P(correct) for abilities ``theta`` (d or S × d) on every item: (items,) or (S, items)."""
        if self.a_ is None:
            raise IRTError("MIRT2PL: call fit() first")
        return _sigmoid(np.asarray(theta, dtype=np.float64) @ self.a_.T - self.b_)


def canonical_orientation(theta, a, b):
    """Fix the rotation / sign / location freedom of a fit (predictions unchanged).

    θ ← θ − μ (b ← b − a·μ), then θ ← θ V, a ← a V with V the principal axes of θ (largest
    variance first), then each axis k flipped when Σ_i a_ik < 0.
    """
    mu = theta.mean(0)
    theta = theta - mu
    b = b - a @ mu
    C = theta.T @ theta / max(len(theta), 1)
    w, V = np.linalg.eigh(C)
    V = V[:, np.argsort(w)[::-1]]
    theta, a = theta @ V, a @ V
    s = np.where(a.sum(0) < 0, -1.0, 1.0)
    return theta * s, a * s, b


def select_dim(
    Y,
    dims=(1, 2, 3, 5),
    holdout_frac: float = 0.2,
    margin: float = 0.002,
    seed: int = 0,
    **model_kw,
) -> tuple[int, list[dict]]:
    """Choose d by validation, as tinyBenchmarks does (smallest d within a margin of the best).

    A random ``holdout_frac`` of the subjects has a random half of its observed answers hidden;
    the model is fitted on everything else for each d in ``dims`` and scored on the hidden
    cells by mean log-loss (per cell, nats) and by the mean absolute error of the hidden-half
    accuracy of each held-out subject. The chosen d is the smallest whose log-loss is within
    ``margin`` of the best. (Log-loss, not the accuracy error, drives the choice: with few
    held-out subjects the accuracy error is dominated by noise.) Returns (d, table).
    """
    Y = check_responses(Y)
    rng = np.random.default_rng(seed)
    M, I = Y.shape
    n_hold = max(1, int(round(holdout_frac * M)))
    if M < 5:
        raise IRTError(f"choosing the dimension needs at least 5 subjects, got {M}; pass dim explicitly")
    hold = rng.choice(M, n_hold, replace=False)
    Ytr = Y.copy()
    hidden = np.zeros_like(Y, dtype=bool)
    for m in hold:
        obs = np.flatnonzero(~np.isnan(Y[m]))
        h = rng.choice(obs, len(obs) // 2, replace=False)
        hidden[m, h] = True
    Ytr[hidden] = np.nan
    table = []
    for d in dims:
        mdl = MIRT2PL(dim=int(d), seed=seed, **model_kw).fit(Ytr)
        P = np.clip(mdl.predict_proba(mdl.theta_), 1e-9, 1 - 1e-9)
        yh = Y[hidden]
        ll = float(-(yh * np.log(P[hidden]) + (1 - yh) * np.log(1 - P[hidden])).mean())
        errs = []
        for m in hold:
            h = hidden[m]
            if h.any():
                errs.append(abs(P[m, h].mean() - Y[m, h].mean()))
        table.append({"dim": int(d), "val_logloss": ll, "val_acc_mae": float(np.mean(errs)),
                      "fit_seconds": mdl.fit_seconds_})
    best = min(r["val_logloss"] for r in table)
    chosen = min(r["dim"] for r in table if r["val_logloss"] <= best + margin)
    return chosen, table
