"""Optional Bayesian MIRT-2PL fitter with pymc (``pip install evomerge[pymc]``).

Hierarchical priors in the spirit of py-irt's ``multidim_2pl`` (the fitter behind
tinyBenchmarks): θ_m ~ N(0, I); b_i ~ N(μ_b, σ_b²) with μ_b ~ N(0, 1), σ_b ~ HalfNormal(2);
a_i ~ N(0, σ_a² I) with σ_a ~ HalfNormal(2) (one scale per dimension); the likelihood is
Bernoulli(σ(a_i·θ_m − b_i)) on the observed cells only. Inference: ADVI (mean field, fast) or
NUTS (slow; small banks only). Returns posterior means in the same canonical orientation as
:class:`irt.model.MIRT2PL` plus posterior standard deviations (uncertainty) of b and θ.

pymc is imported only when :func:`fit_pymc` is called; :mod:`irt` works without it. The first
call compiles pytensor code (tens of seconds to minutes on a slow CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from irt.errors import IRTError
from irt.model import _sigmoid, canonical_orientation, check_responses

__all__ = ["BayesFit", "fit_pymc"]


@dataclass
class BayesFit:
    """Posterior summary: means ``a_``, ``b_``, ``theta_`` (canonical orientation), standard
    deviations ``b_sd_`` and ``theta_sd_`` (θ's sd is per coordinate of the raw, unrotated
    posterior), ``method``, ``fit_seconds_``."""

    a_: np.ndarray
    b_: np.ndarray
    theta_: np.ndarray
    b_sd_: np.ndarray
    theta_sd_: np.ndarray
    method: str
    fit_seconds_: float

    def predict_proba(self, theta) -> np.ndarray:
        return _sigmoid(np.asarray(theta, dtype=np.float64) @ self.a_.T - self.b_)


def fit_pymc(Y, dim: int = 2, method: str = "advi", n_iter: int = 20000, draws: int = 500, seed: int = 0) -> BayesFit:
    """Fit the hierarchical MIRT-2PL with pymc. ``method``: ``"advi"`` (``n_iter`` steps, then
    ``draws`` samples of the approximation) or ``"nuts"`` (``draws`` draws after as many tuning
    steps). Posterior means of a and θ are taken from a single chain/approximation, so the
    rotation is consistent within it."""
    try:
        import pymc as pm
    except ImportError:
        raise IRTError("the Bayesian fitter needs pymc: pip install 'evomerge[pymc]' (or pip install pymc)") from None
    if method not in ("advi", "nuts"):
        raise IRTError(f"fit_pymc: method must be 'advi' or 'nuts', got {method!r}")
    Y = check_responses(Y)
    t0 = time.perf_counter()
    M, I = Y.shape
    mm, ii = np.nonzero(~np.isnan(Y))
    yy = Y[mm, ii].astype(np.int64)
    with pm.Model():
        mu_b = pm.Normal("mu_b", 0.0, 1.0)
        sd_b = pm.HalfNormal("sd_b", 2.0)
        sd_a = pm.HalfNormal("sd_a", 2.0, shape=dim)
        theta = pm.Normal("theta", 0.0, 1.0, shape=(M, dim))
        a = pm.Normal("a", 0.0, sd_a, shape=(I, dim))
        b = pm.Normal("b", mu_b, sd_b, shape=I)
        logit = (theta[mm] * a[ii]).sum(axis=1) - b[ii]
        pm.Bernoulli("y", logit_p=logit, observed=yy)
        if method == "advi":
            approx = pm.fit(n=n_iter, method="advi", random_seed=seed, progressbar=False)
            idata = approx.sample(draws, random_seed=seed)
        else:
            idata = pm.sample(draws=draws, tune=draws, chains=1, random_seed=seed, progressbar=False,
                              compute_convergence_checks=False)
    post = idata.posterior
    th = post["theta"].values.reshape(-1, M, dim)
    av = post["a"].values.reshape(-1, I, dim)
    bv = post["b"].values.reshape(-1, I)
    theta_m, a_m, b_m = canonical_orientation(th.mean(0), av.mean(0), bv.mean(0))
    return BayesFit(a_=a_m, b_=b_m, theta_=theta_m, b_sd_=bv.std(0), theta_sd_=th.std(0), method=method,
                    fit_seconds_=time.perf_counter() - t0)
