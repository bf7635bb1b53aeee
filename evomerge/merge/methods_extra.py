"""The rest of the merge-method catalogue (issue 6).

Every method is a pure function of float32 tensors with the signature of
:mod:`evomerge.merge.registry`, registered with its parameters declared (so that every numeric
parameter can be a search gene). Building blocks shared with the core family (sign election,
generalized task arithmetic, slerp) come from :mod:`evomerge.merge.methods`.

============================  ==========================================================
method                        one line
============================  ==========================================================
``breadcrumbs``               drop the largest γ fraction and the smallest entries of each
                              task vector (keep ``density``), then task arithmetic
``breadcrumbs_ties``          the same sparsification, then TIES sign election
``della``                     DELLA MAGPRUNE (rank-dependent keep probability in
                              ``density ± ε``, rescale 1/p), then TIES sign election
``della_linear``              MAGPRUNE, then task arithmetic
``model_stock``               ``θ0 + t·mean(τ_i)``, ``t = N·cos / (1 + (N−1)·cos)``
``nuslerp``                   slerp of two models (or of their task vectors, with a
                              ``base_model``), per row or flattened, ``t = w1 / (w0 + w1)``
``multislerp``                weighted "barycentric" slerp of N models (or of their task
                              vectors, with a ``base_model``; mergekit's one-step rule)
``karcher``                   weighted Riemannian (Karcher) mean of the directions on the
                              unit sphere, scaled by the weighted mean norm
``sce``                       SCE: select high-variance positions, weight models by
                              ``mean(τ²)``, erase minority signs
``nearswap``                  ``θ0 + clamp(t / |τ|, 0, 1)·τ``: take the other model only where
                              it is already near the base
``tsv``                       Task Singular Vectors merge: per-task rank r/T SVD,
                              orthogonalised stacked U and V, recombined
``iso_c``                     isotropic spectrum of the summed task matrix
``iso_cts``                   isotropic merge in common + task-specific subspaces
============================  ==========================================================

Tensor inputs: methods registered with ``takes_deltas=True`` receive the task vectors
``τ_i = θ_i − θ_base`` (never modified in place: a resident merger caches them); the
``base_optional`` ones (``nuslerp``, ``multislerp``) only when the recipe has a ``base_model``,
else the model tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods import SORTED_ABS_ATTR, combine_deltas, elect_sign, sign_agreement_mask
from evomerge.merge.registry import FRACTION, POSITIVE, REQUIRED, MergeMethod, ParamRange, register

__all__ = [
    "breadcrumbs_sparsify",
    "della_keep_probabilities",
    "della_sparsify",
    "model_stock_t",
    "nuslerp_pair",
    "karcher_mean",
    "polar_factor",
    "as_matrix",
    "SVD_CACHE_ATTR",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "nearswap",
    "tsv",
    "iso_c",
    "iso_cts",
]


# ----------------------------------------------------------------------------- validation


def _fraction(name: str, value: float, *, lo_open: bool = False) -> float:
    v = float(value)
    if math.isnan(v) or v < 0.0 or v > 1.0 or (lo_open and v == 0.0):
        rng = "(0, 1]" if lo_open else "[0, 1]"
        raise EvomergeError(f"parameter {name!r} must be in {rng}, got {value}")
    return v


def _per_model(name: str, values: Sequence[float], n: int) -> list[float]:
    if len(values) != n:
        raise EvomergeError(f"parameter {name!r}: got {len(values)} values for {n} models")
    return [float(v) for v in values]


# ----------------------------------------------------------------------------- sparsification


def breadcrumbs_sparsify(delta: Tensor, density: float, gamma: float, *, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs mask: drop the ``gamma`` fraction of largest-magnitude entries (outliers)
    and then the smallest ones, so that a ``density`` fraction is kept.

    With ``n = numel``: ``n_keep = ⌊density·n⌋``, ``n_top = min(⌊γ·n⌋, n − n_keep)`` (fewer
    outliers are dropped when the density asks for more entries), ``n_bot = n − n_keep − n_top``.
    With the magnitudes in ascending order ``m_(1) ≤ … ≤ m_(n)``, an entry is kept iff
    ``m_(n_bot+1) ≤ |x| ≤ m_(n − n_top)`` (entries tied with a kept one are kept).

    Difference from mergekit (``magnitude_outliers``): when ``n_top`` rounds to 0 (small tensors,
    or ``γ·n < 1``) mergekit's slice ``indices[n_bot:-0]`` is empty and the *whole* task vector is
    zeroed; here ``n_top = 0`` simply drops no outlier. ``density >= 1`` keeps everything (γ is
    then moot, as in mergekit). ``rescale`` divides the kept entries by ``density``.
    A resident task vector carrying the sorted-magnitude cache (``InMemoryMerger(...,
    magnitude_cache=True)``) is sorted once and then indexed: same thresholds, same bits.
    """
    density = _fraction("density", density)
    gamma = _fraction("gamma", gamma)
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    n_keep = int(density * n)
    if n_keep == 0:
        return torch.zeros_like(delta)
    n_top = min(int(gamma * n), n - n_keep)
    n_bot = n - n_keep - n_top
    mags = delta.abs().reshape(-1)
    keep = torch.ones_like(mags, dtype=torch.bool)
    cache = getattr(delta, SORTED_ABS_ATTR, None)
    if cache is True:  # a resident task vector opted into the sorted-magnitude cache: sort once
        cache = mags.sort().values
        setattr(delta, SORTED_ABS_ATTR, cache)

    def order_stat(i: int) -> Tensor:  # the i-th smallest magnitude, 1-based (same value either way)
        return cache[i - 1] if cache is not None else torch.kthvalue(mags, i).values

    if n_bot > 0:
        keep &= mags >= order_stat(n_bot + 1)
    if n_top > 0:
        keep &= mags <= order_stat(n - n_top)
    out = delta * keep.reshape(delta.shape)
    if rescale:
        out = out / density
    return out


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MAGPRUNE keep probabilities, ranked by magnitude within each row (last dim).

    ``p = (density − ε) + 2ε · r / (n − 1)`` where ``r ∈ {0, …, n−1}`` is the entry's magnitude
    rank in its row (0 = smallest) and ``n`` the row length (``p = density`` when ``n = 1``), so
    ``p`` spans ``[density − ε, density + ε]`` with mean ``density``. 1-D tensors are one row.

    Difference from mergekit (which raises unless ``density ± ε ∈ (0, 1)``): ε is shrunk to
    ``min(ε, density, 1 − density)`` so that every (density, ε) pair a search proposes is valid.
    """
    density = _fraction("density", density)
    eps = min(abs(float(epsilon)), density, 1.0 - density)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    n = rows.shape[-1]
    if n <= 1:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=-1, stable=True)  # ties: lower index ranks lower
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    p = (density - eps) + (2.0 * eps / (n - 1)) * ranks.to(torch.float32)
    return p.reshape(delta.shape)


def della_sparsify(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    generator: torch.Generator | None = None,
    rescale: bool = True,
) -> Tensor:
    """DELLA MAGPRUNE: keep entry ``j`` with probability ``p_j`` (:func:`della_keep_probabilities`)
    and, with ``rescale``, divide a kept entry by its own ``p_j`` (``E[out] = delta``).

    Draws ``delta.numel()`` uniforms from ``generator``; ``density >= 1`` returns ``delta`` and
    draws nothing; ``density == 0`` returns zeros.
    """
    density = _fraction("density", density)
    if density >= 1.0:
        return delta
    if density == 0.0:
        return torch.zeros_like(delta)
    p = della_keep_probabilities(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    keep = u < p
    if not rescale:
        return delta * keep
    return torch.where(keep, delta / p.clamp_min(1e-12), torch.zeros_like(delta))


# ----------------------------------------------------------------------------- GTA-family methods


def _lam(kw: dict) -> float:
    return float(kw.get("lambda", 1.0))


def breadcrumbs(deltas, base, *, generator=None, weight, density, gamma, normalize=False, rescale=False, **kw):
    """Model Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795), mergekit's ``breadcrumbs``.

    ``θ = θ0 + λ Σ_i w_i · B(τ_i)`` where ``B`` drops the γ largest and the smallest entries
    (:func:`breadcrumbs_sparsify`); ``normalize`` divides by ``Σ w_i``.
    """
    n = len(deltas)
    w = _per_model("weight", weight, n)
    sparse = [breadcrumbs_sparsify(d, p, g, rescale=rescale)
              for d, p, g in zip(deltas, _per_model("density", density, n), _per_model("gamma", gamma, n))]
    return combine_deltas(sparse, base, w, consensus=None, normalize=normalize, lam=_lam(kw))


def breadcrumbs_ties(deltas, base, *, generator=None, weight, density, gamma, normalize=False, rescale=False, **kw):
    """Breadcrumbs sparsification + TIES sign election (mergekit's ``breadcrumbs_ties``).

    Majority sign ``s = sign(Σ_i w_i B(τ_i))`` (0 → +); ``θ = θ0 + λ Σ_i w_i B(τ_i)·[sign = s]``,
    divided by ``Σ_i w_i [sign = s]`` when ``normalize`` (mergekit default: off).
    """
    n = len(deltas)
    w = _per_model("weight", weight, n)
    sparse = [breadcrumbs_sparsify(d, p, g, rescale=rescale)
              for d, p, g in zip(deltas, _per_model("density", density, n), _per_model("gamma", gamma, n))]
    return combine_deltas(sparse, base, w, consensus="sum", normalize=normalize, lam=_lam(kw))


def della(deltas, base, *, generator=None, weight, density, epsilon, normalize=True, rescale=True, **kw):
    """DELLA-Merging (Deep et al. 2024, arXiv:2406.11617): MAGPRUNE, then TIES sign election.

    ``τ̃_i = MAGPRUNE(τ_i; density_i, ε_i)`` (keep probability rank-dependent in
    ``density ± ε``, kept entries rescaled by ``1/p``), majority sign of ``Σ w_i τ̃_i``, disjoint
    merge, normalized by the agreeing weights (default), times λ, added to the base.
    """
    n = len(deltas)
    w = _per_model("weight", weight, n)
    sparse = [della_sparsify(d, p, e, generator=generator, rescale=rescale)
              for d, p, e in zip(deltas, _per_model("density", density, n), _per_model("epsilon", epsilon, n))]
    return combine_deltas(sparse, base, w, consensus="sum", normalize=normalize, lam=_lam(kw))


def della_linear(deltas, base, *, generator=None, weight, density, epsilon, normalize=False, rescale=True, **kw):
    """DELLA MAGPRUNE, then task arithmetic: ``θ = θ0 + λ Σ w_i τ̃_i`` (no sign election)."""
    n = len(deltas)
    w = _per_model("weight", weight, n)
    sparse = [della_sparsify(d, p, e, generator=generator, rescale=rescale)
              for d, p, e in zip(deltas, _per_model("density", density, n), _per_model("epsilon", epsilon, n))]
    return combine_deltas(sparse, base, w, consensus=None, normalize=normalize, lam=_lam(kw))


# ----------------------------------------------------------------------------- model stock


def model_stock_t(cos: Tensor, n: int) -> Tensor:
    """Model Stock interpolation ratio ``t = N·cos / (1 + (N−1)·cos)``.

    Singular-case guard: ``cos`` is clamped to ``[0, 1]`` first, so the denominator is ≥ 1 and
    ``t ∈ [0, 1]`` (mergekit clamps to ``[−1, 1]`` only: at ``cos = −1/(N−1)`` it divides by 0,
    and any negative mean cosine extrapolates *away* from the fine-tunes). A negative or
    undefined (zero-norm task vector) cosine therefore gives ``t = 0``: the base.
    """
    c = cos.clamp(0.0, 1.0)
    return (n * c) / (1.0 + (n - 1) * c)


def model_stock(deltas, base, *, generator=None, filter_wise=False):
    """Model Stock (Jang et al. 2024, arXiv:2403.19522), mergekit's ``model_stock``.

    ``cos`` = mean pairwise cosine of the task vectors (the flattened tensor, or each row
    with ``filter_wise``; a 1-D tensor is one row); ``t`` = :func:`model_stock_t`;
    ``θ = t·mean(θ_i) + (1 − t)·θ0 = θ0 + t·mean(τ_i)``. Needs ≥ 2 fine-tunes.
    """
    n = len(deltas)
    if n < 2:
        raise EvomergeError(f"merge_method 'model_stock' needs at least 2 models besides the base, got {n}")
    shape = deltas[0].shape
    if filter_wise and deltas[0].dim() >= 2:
        rows = [d.reshape(shape[0], -1) for d in deltas]
    else:
        rows = [d.reshape(1, -1) for d in deltas]
    norms = [r.norm(dim=-1) for r in rows]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cos_sum += torch.where(denom > 1e-20, dot / denom.clamp_min(1e-20), torch.zeros_like(dot))
            pairs += 1
    t = model_stock_t(cos_sum / pairs, n)  # (rows,)
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    mean.div_(n)
    mrows = mean.reshape(t.shape[0], -1) * t.unsqueeze(-1)
    return base + mrows.reshape(shape)


# ----------------------------------------------------------------------------- spherical methods


def nuslerp_pair(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True,
                 eps: float = 1e-8) -> Tensor:
    """Slerp of ``v0`` and ``v1`` vector by vector (mergekit's ``nuslerp`` kernel).

    Vectors: the flattened tensor (``flatten``), else each slice along the last dim (rows of a
    matrix), or along dim 0 with ``row_wise`` (mergekit's convention: ``dim=0``, i.e. the columns
    ``W[:, j]`` of a matrix). Per vector, with ``θ`` the angle between the directions:
    ``sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` on the unnormalised vectors, and
    ``(1−t)·v0 + t·v1`` where ``|sin θ| < eps`` (colinear). 1-D tensors are one vector.
    """
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.movedim(0, -1), v1.movedim(0, -1)
    else:
        a, b = v0, v1
    na = a.double().norm(dim=-1, keepdim=True)
    nb = b.double().norm(dim=-1, keepdim=True)
    cos = ((a.double() * b.double()).sum(dim=-1, keepdim=True) / (na * nb).clamp_min(1e-300)).clamp(-1.0, 1.0)
    cos = torch.where((na > 0) & (nb > 0), cos, torch.ones_like(cos))
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < eps
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    s0 = torch.where(colinear, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    s1 = torch.where(colinear, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    res = a * s0.to(a.dtype) + b * s1.to(b.dtype)
    if not (flatten or v0.dim() < 2) and row_wise:
        res = res.movedim(-1, 0)
    return res.reshape(shape)


def nuslerp(tensors, base=None, *, generator=None, weight, nuslerp_row_wise=False, nuslerp_flatten=True):
    """NuSLERP (mergekit's ``nuslerp``): slerp between two models with ``t = w1 / (w0 + w1)``
    (``t = 0.5`` when ``|w0 + w1| < 1e-6``); see :func:`nuslerp_pair` for the vector layout.

    Without a base: ``slerp(t, θ_0, θ_1)`` of the model tensors. With a ``base_model`` (registered
    ``base_optional`` + ``takes_deltas``: ``tensors`` then holds the task vectors
    ``τ_i = θ_i − θ0``, ``base`` is ``θ0``): ``θ0 + slerp(t, τ_0, τ_1)``, mergekit's task-vector
    mode (the base must not be one of the two models).
    """
    if len(tensors) != 2:
        raise EvomergeError(f"merge_method 'nuslerp' takes exactly 2 models, got {len(tensors)}")
    w0, w1 = _per_model("weight", weight, 2)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = tensors
    out = nuslerp_pair(t, v0, v1, row_wise=bool(nuslerp_row_wise), flatten=bool(nuslerp_flatten))
    return out if base is None else base + out


def multislerp(tensors, base=None, *, generator=None, weight, normalize_weights=True, eps=1e-8):
    """Multi-SLERP (Goddard 2025, mergekit's ``multislerp``): barycentric interpolation on the sphere.

    With ``x_i`` the flattened inputs, ``u_i = x_i/(‖x_i‖ + eps)`` and weights ``w`` (divided by
    ``Σw`` with ``normalize_weights``): ``m = Σ w_i u_i / ‖·‖``;
    tangent ``v = Σ w_i (u_i − (u_i·m) m)``; result
    ``(Σ w_i ‖x_i‖) · (cos‖v‖ · m + sin‖v‖ · v/‖v‖)``. This is mergekit's one-step rule (the
    tangent vectors are projections, not log maps); :func:`karcher` is the exact Riemannian mean.
    When ``‖Σ w_i u_i‖ < eps`` (antipodal inputs cancel): two models fall back to the weighted
    linear sum, more raise an error — except when every input is zero (a tensor no fine-tune
    changed, in task-vector mode), which gives zero (mergekit raises there for ≥ 3 models).
    One model is returned as it is.

    Without a base the inputs are the model tensors. With a ``base_model`` (registered
    ``base_optional`` + ``takes_deltas``: ``tensors`` holds the task vectors ``τ_i = θ_i − θ0`` and
    ``base`` is ``θ0``) the result above, computed from the ``τ_i``, is added to ``θ0``: mergekit's
    task-vector mode.
    """
    n = len(tensors)
    w = torch.tensor(_per_model("weight", weight, n), dtype=torch.float64)
    if n == 1:
        return tensors[0].clone() if base is None else base + tensors[0]
    if normalize_weights:
        s = float(w.sum())
        if abs(s) < 1e-12:
            raise EvomergeError("multislerp: the weights sum to 0; set normalize_weights: false or change them")
        w = w / s
    xs = list(tensors)
    flat = torch.stack([x.reshape(-1) for x in xs]).double()
    norms = flat.norm(dim=-1, keepdim=True)
    if not bool((norms > 0).any()):  # all inputs zero: nothing to interpolate
        out = torch.zeros_like(tensors[0])
        return out if base is None else base + out
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mnorm = float(mean.norm())
    if mnorm < eps:
        if n == 2:
            out = xs[0] * float(w[0]) + xs[1] * float(w[1])
            return out if base is None else base + out
        raise EvomergeError(
            "multislerp: the weighted mean direction is zero (antipodal models with balancing "
            "weights); change the weights"
        )
    mean = mean / mnorm
    tangent = ((units - (units @ mean).unsqueeze(-1) * mean) * w.view(-1, 1)).sum(0)
    tn = float(tangent.norm()) + eps
    res = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    res = res * float((norms.squeeze(-1) * w).sum())
    out = res.to(tensors[0].dtype).reshape(tensors[0].shape)
    return out if base is None else base + out


def karcher_mean(xs: Sequence[Tensor], alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher (Riemannian / Fréchet) mean of the directions of ``xs`` on the unit sphere,
    scaled by the weighted mean norm.

    ``u_i = x_i/‖x_i‖`` (tensors with ``‖x_i‖ ≤ tol`` are left out of the direction but count in the
    norm); ``α`` normalised over the rest. Start from ``μ = Σ α_i u_i / ‖·‖``, iterate the Riemannian
    gradient step ``g = Σ α_i · θ_i/sin θ_i · (u_i − cos θ_i · μ)`` (``θ_i = ∠(μ, u_i)``, the log
    map), ``μ ← cos‖g‖ · μ + sin‖g‖ · g/‖g‖``, until ``‖g‖ < tol`` or ``max_iter`` steps. Result:
    ``(Σ α_i ‖x_i‖) · μ`` with ``α`` normalised over all tensors. All zero → zeros.
    """
    alphas = [float(a) for a in alphas]
    total = sum(alphas)
    if abs(total) < 1e-12:
        raise EvomergeError("karcher: the weights sum to 0")
    flat = [x.reshape(-1).double() for x in xs]
    norms = [float(f.norm()) for f in flat]
    valid = [i for i, nm in enumerate(norms) if nm > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a_valid = [alphas[i] for i in valid]
    sv = sum(a_valid)
    if abs(sv) < 1e-12:
        raise EvomergeError("karcher: the weights of the non-zero tensors sum to 0")
    a_valid = [a / sv for a in a_valid]
    units = [flat[i] / norms[i] for i in valid]
    mu = sum(a * u for a, u in zip(a_valid, units))
    mn = float(mu.norm())
    mu = units[0].clone() if mn < tol else mu / mn
    for _ in range(int(max_iter)):
        g = torch.zeros_like(mu)
        for a, u in zip(a_valid, units):
            c = max(-1.0, min(1.0, float(mu @ u)))
            th = math.acos(c)
            if th < tol:
                continue
            g += (a * th / math.sin(th)) * (u - c * mu)
        gn = float(g.norm())
        if gn < tol:
            break
        mu = math.cos(gn) * mu + math.sin(gn) * (g / gn)
        mu = mu / mu.norm()
    scale = sum(a * nm for a, nm in zip(alphas, norms)) / total
    return (scale * mu).to(xs[0].dtype).reshape(xs[0].shape)


def karcher(tensors, base=None, *, generator=None, weight, max_iter=10, tol=1e-5):
    """Karcher mean (mergekit's ``karcher``; Karcher 1977, Grove & Karcher 1973): see
    :func:`karcher_mean`. mergekit uses equal weights; ``weight`` (default 1 each) generalises it.
    """
    return karcher_mean(tensors, _per_model("weight", weight, len(tensors)), max_iter=int(max_iter), tol=float(tol))


# ----------------------------------------------------------------------------- SCE, nearswap


def sce(deltas, base, *, generator=None, select_topk=1.0, int8_mask=False):
    """SCE merging (Wan et al. 2024, FuseChat, arXiv:2408.07990), mergekit's ``sce``.

    1. Select: with ``select_topk < 1``, keep only the ``k = ⌊select_topk · #{var > 0}⌋`` positions
       with the largest variance of ``τ_i`` across models (population variance), in every τ_i.
    2. Calculate: ``w_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (equal weights when all are 0).
    3. Erase: majority sign ``s = sign(Σ τ_i)`` (0 → +); ``θ = θ0 + Σ w_i τ_i [sign τ_i = s] /
       Σ w_i [sign τ_i = s]`` (a zero divisor → 1).

    Difference from mergekit: when ``k`` rounds to 0 but some position varies, one position is
    kept (mergekit zeroes the whole update — the same whole-tensor-zeroing as in breadcrumbs).
    """
    topk = _fraction("select_topk", select_topk)
    ds = list(deltas)
    if topk < 1.0:
        stacked = torch.stack(ds)
        var = stacked.var(dim=0, unbiased=False).reshape(-1)
        nz = int(torch.count_nonzero(var))
        k = int(topk * nz)
        if nz > 0 and k == 0 and topk > 0:
            k = 1
        mask = torch.zeros_like(var, dtype=torch.bool)
        if k > 0:
            mask[torch.topk(var, k).indices] = True
        mask = mask.reshape(ds[0].shape)
        ds = [d * mask for d in ds]
    msq = [float((d.double() ** 2).mean()) if d.numel() else 0.0 for d in ds]
    tot = sum(msq)
    w = [1.0 / len(ds)] * len(ds) if tot == 0 else [m / tot for m in msq]
    majority = elect_sign(ds, "sum")
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for d, wi in zip(ds, w):
        m = sign_agreement_mask(d, majority)
        mixed.add_(d * m, alpha=wi)
        divisor.add_(m, alpha=wi)
    divisor[divisor == 0] = 1.0
    return base + mixed / divisor


def nearswap(deltas, base, *, generator=None, t):
    """NearSwap (alchemonaut, QuartetAnemoi-70B; mergekit's ``nearswap``): keep the base where the
    other model differs a lot, take the other model where it is near.

    ``θ = θ0 + clamp(t / |τ|, 0, 1) · τ`` elementwise (``|τ| = 0`` → weight 1, which changes
    nothing); ``t > 0`` is the sameness threshold. One model besides the base.
    """
    if len(deltas) != 1:
        raise EvomergeError(f"merge_method 'nearswap' takes exactly 1 model besides the base, got {len(deltas)}")
    t = float(t)
    if not t > 0.0:
        raise EvomergeError(f"parameter 't' of nearswap must be > 0, got {t}")
    d = deltas[0]
    lw = torch.nan_to_num(t / d.abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0.0, 1.0)
    return base + lw * d


# ----------------------------------------------------------------------------- SVD-based methods


def as_matrix(x: Tensor) -> Tensor | None:
    """The matrix a tensor is treated as by TSV / Iso: 2-D as is, N-D as ``(shape[0], −1)``,
    1-D (biases, norms) ``None`` (those use the methods' documented fallback)."""
    if x.dim() < 2:
        return None
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def polar_factor(m: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``m = P Σ Qᵀ`` (the closest matrix with orthonormal
    columns or rows to ``m``, in Frobenius norm): how TSV and Iso-CTS orthogonalise."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def _weighted(deltas: Sequence[Tensor], weight: Sequence[float]) -> list[Tensor]:
    w = _per_model("weight", weight, len(deltas))
    return [d if wi == 1.0 else d * wi for d, wi in zip(deltas, w)]


def _mean_fallback(ds: Sequence[Tensor], base: Tensor, lam: float) -> Tensor:
    mean = ds[0].clone()
    for d in ds[1:]:
        mean.add_(d)
    return base + mean * (lam / len(ds))


SVD_CACHE_ATTR = "_evomerge_svd_cache"
"""Attribute a resident task vector may carry to opt into TSV's factor cache: ``True`` (cache on
first use) or the cache itself. Costs about ``k·(m + n)`` floats per task vector plus the two
orthogonalised factors (≈ twice one matrix); afterwards a TSV candidate that changes only
``weight`` magnitudes or ``lambda`` is one matrix product instead of ``T + 2`` SVDs."""


def _tsv_task_factors(d: Tensor, m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``m`` (the matrix view of task vector ``d``), cached on ``d``
    when it opted in (:data:`SVD_CACHE_ATTR`); the cached and fresh values are the same bits."""
    cache = getattr(d, SVD_CACHE_ATTR, None)
    if isinstance(cache, dict) and cache.get("k", 0) >= k:
        u, s, vh = cache["f"]
        return u[:, :k], s[:k], vh[:k, :]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    f = (u[:, :k].contiguous(), s[:k].clone(), vh[:k, :].contiguous())
    if cache is not None:
        setattr(d, SVD_CACHE_ATTR, {"k": k, "f": f, "polar": None})
    return f


def tsv(deltas, base, *, generator=None, weight, rank_fraction=None, svd=True, **kw):
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors", arXiv:2412.00081).

    Per matrix, with ``τ_i = θ_i − θ0`` and ``r = min(m, n)``: ``τ_i = U_i Σ_i V_iᵀ``; keep
    ``k = max(1, ⌊r · f⌋)`` components per task with ``f = rank_fraction`` (default ``1/T``);
    weights enter as ``w_i τ_i = (sign(w_i) U_i)(|w_i| Σ_i) V_iᵀ`` (``weight`` default 1);
    stack ``U = [sign(w_1) U_1,k … ]``, ``Σ = diag(|w_1| Σ_1,k …)``, ``V = [V_1,k … V_T,k]``;
    orthogonalise ``U⊥ = polar(U)``, ``V⊥ = polar(V)`` (:func:`polar_factor`);
    ``θ = θ0 + λ · U⊥ Σ V⊥ᵀ`` (λ default 1, as in the paper). N-D tensors are reshaped to
    ``(shape[0], −1)``. Resident task vectors may cache the factors (:data:`SVD_CACHE_ATTR`).

    1-D tensors (biases, norm weights) have no singular vectors: ``θ = θ0 + λ · mean_i w_i τ_i``
    (the reference implementation averages them too). ``svd: false`` (usually through a filter,
    e.g. for ``embed_tokens`` / ``lm_head`` as the LLM ports of these methods do) applies that
    fallback to a matrix as well; the same switch exists for ``iso_c`` and ``iso_cts``.
    """
    lam = _lam(kw)
    w = _per_model("weight", weight, len(deltas))
    mats = [as_matrix(d) for d in deltas]
    if mats[0] is None or not svd:
        return _mean_fallback(_weighted(deltas, w), base, lam)
    T = len(mats)
    r = min(mats[0].shape)
    frac = 1.0 / T if rank_fraction is None else _fraction("rank_fraction", rank_fraction, lo_open=True)
    k = min(r, max(1, int(r * frac)))
    factors = [_tsv_task_factors(d, m, k) for d, m in zip(deltas, mats)]
    signs = tuple(-1.0 if wi < 0 else 1.0 for wi in w)
    key = (k, signs, tuple(id(d) for d in deltas))
    cache = getattr(deltas[0], SVD_CACHE_ATTR, None)
    polar = cache.get("polar") if isinstance(cache, dict) else None
    if polar is not None and polar[0] == key:
        u_perp, vh_perp = polar[1], polar[2]
    else:
        u_perp = polar_factor(torch.cat([u if sg > 0 else -u for (u, _, _), sg in zip(factors, signs)], dim=1))
        vh_perp = polar_factor(torch.cat([vh for _, _, vh in factors], dim=0))
        if isinstance(cache, dict):
            cache["polar"] = (key, u_perp, vh_perp)
    sigma = torch.cat([s * abs(wi) for (_, s, _), wi in zip(factors, w)])
    merged = (u_perp * sigma.unsqueeze(0)) @ vh_perp
    return base + (lam * merged).reshape(base.shape)


def iso_c(deltas, base, *, generator=None, weight, svd=True, **kw):
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind", arXiv:2502.04959).

    ``Δ = Σ_i w_i τ_i = U Σ Vᵀ`` (task arithmetic sum), then flatten the spectrum:
    ``θ = θ0 + λ · σ̄ · U Vᵀ`` with ``σ̄ = mean(diag Σ)`` over all ``min(m, n)`` singular values.
    N-D tensors are reshaped to ``(shape[0], −1)``; 1-D tensors: ``θ0 + λ · mean_i(w_i τ_i)``
    (the reference implementation averages non-matrix parameters).
    """
    lam = _lam(kw)
    ds = _weighted(deltas, weight)
    if as_matrix(ds[0]) is None or not svd:
        return _mean_fallback(ds, base, lam)
    total = ds[0].clone()
    for d in ds[1:]:
        total.add_(d)
    m = as_matrix(total)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    merged = s.mean() * (u @ vh)
    return base + (lam * merged).reshape(base.shape)


def iso_cts_sizes(r: int, T: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_common, s_per_task)`` for Iso-CTS with ``k_common + T · s_per_task = r``.

    As the reference: ``k = ⌊r · frac⌋``, ``s = round((r − k) / T)`` (so the task-specific part
    divides equally), ``k = r − T·s``; additionally ``s ≤ ⌊r / T⌋`` so that ``k ≥ 0`` on tiny
    matrices (the reference can go negative there). ``s = 0`` is Iso-C.
    """
    k = int(r * common_space_fraction)
    s = int(round((r - k) / T))
    s = max(0, min(s, r // T))
    return r - T * s, s


def iso_cts(deltas, base, *, generator=None, weight, common_space_fraction=0.8, svd=True, **kw):
    """Iso-CTS (Marczak et al., ICML 2025, arXiv:2502.04959): isotropic merge in the common and
    task-specific subspaces.

    ``Δ = Σ_i w_i τ_i = U Σ Vᵀ``; common subspace: the top ``k`` of ``U, Σ, V``
    (:func:`iso_cts_sizes`, ``k ≈ r · common_space_fraction``). For each task, the part outside
    the common subspace ``τ̂_i = τ_i − U_k U_kᵀ τ_i`` contributes its top ``s`` singular triplets.
    The ``r`` stacked left / right vectors are orthogonalised (:func:`polar_factor`) and the
    spectrum is made isotropic: ``θ = θ0 + λ · σ̄ · U⊥ V⊥ᵀ`` with ``σ̄`` the mean of the ``r``
    stacked singular values (common ones and task-specific ones). ``s = 0`` reduces to Iso-C.
    1-D tensors: ``θ0 + λ · mean_i(w_i τ_i)``, as the reference.
    """
    lam = _lam(kw)
    frac = _fraction("common_space_fraction", common_space_fraction)
    ds = _weighted(deltas, weight)
    mats = [as_matrix(d) for d in ds]
    if mats[0] is None or not svd:
        return _mean_fallback(ds, base, lam)
    total = mats[0].clone()
    for m in mats[1:]:
        total.add_(m)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = s.shape[0]
    k, per = iso_cts_sizes(r, len(mats), frac)
    if per == 0:
        merged = s.mean() * (u @ vh)
        return base + (lam * merged).reshape(base.shape)
    uc, sc, vhc = u[:, :k], s[:k], vh[:k, :]
    us, ss, vhs = [], [], []
    for m in mats:
        resid = m - uc @ (uc.T @ m)
        ut, st, vht = torch.linalg.svd(resid, full_matrices=False)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vhs.append(vht[:per, :])
    u_all = polar_factor(torch.cat(us + [uc], dim=1))
    vh_all = polar_factor(torch.cat(vhs + [vhc], dim=0))
    sigma = torch.cat(ss + [sc]).mean()
    merged = sigma * (u_all @ vh_all)
    return base + (lam * merged).reshape(base.shape)


# ----------------------------------------------------------------------------- registration

# `int8_mask` only changes mergekit's memory use, never the result: accepted and ignored.
_GTA = {"lambda": 1.0, "int8_mask": False}

register(MergeMethod(
    name="breadcrumbs", fn=breadcrumbs, needs_base=True, takes_deltas=True,
    model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    global_params={"normalize": False, "rescale": False, **_GTA}, ranges={"density": FRACTION, "gamma": FRACTION},
    reference="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
))
register(MergeMethod(
    name="breadcrumbs_ties", fn=breadcrumbs_ties, needs_base=True, takes_deltas=True,
    model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    global_params={"normalize": False, "rescale": False, **_GTA}, ranges={"density": FRACTION, "gamma": FRACTION},
    reference="Davari & Belilovsky 2024 (arXiv:2312.06795) + TIES sign election (arXiv:2306.01708)",
))
register(MergeMethod(
    name="della", fn=della, needs_base=True, takes_deltas=True, randomized=True,
    model_params={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    global_params={"normalize": True, "rescale": True, **_GTA}, ranges={"density": FRACTION, "epsilon": FRACTION},
    reference="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
))
register(MergeMethod(
    name="della_linear", fn=della_linear, needs_base=True, takes_deltas=True, randomized=True,
    model_params={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    global_params={"normalize": False, "rescale": True, **_GTA}, ranges={"density": FRACTION, "epsilon": FRACTION},
    reference="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
))
register(MergeMethod(
    name="model_stock", fn=model_stock, needs_base=True, takes_deltas=True, min_models=2,
    global_params={"filter_wise": False},
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
))
register(MergeMethod(
    name="nuslerp", fn=nuslerp, needs_base=False, base_optional=True, takes_deltas=True, min_models=2, max_models=2,
    model_params={"weight": REQUIRED},
    global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    reference="mergekit nuslerp (Goddard, arcee-ai/mergekit); Shoemake 1985",
))
register(MergeMethod(
    name="multislerp", fn=multislerp, needs_base=False, base_optional=True, takes_deltas=True, min_models=1,
    model_params={"weight": REQUIRED},
    global_params={"normalize_weights": True, "eps": 1e-8}, ranges={"eps": POSITIVE},
    reference="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
))
register(MergeMethod(
    name="karcher", fn=karcher, needs_base=False, min_models=1,
    model_params={"weight": 1.0},
    global_params={"max_iter": 10, "tol": 1e-5},
    ranges={"max_iter": ParamRange(1, None, integer=True), "tol": POSITIVE},
    reference="Karcher 1977 (Riemannian center of mass); mergekit karcher",
))
register(MergeMethod(
    name="sce", fn=sce, needs_base=True, takes_deltas=True,
    global_params={"select_topk": 1.0, "int8_mask": False}, ranges={"select_topk": FRACTION},
    reference="Wan et al. 2024, FuseChat: SCE merging (arXiv:2408.07990)",
))
register(MergeMethod(
    name="nearswap", fn=nearswap, needs_base=True, takes_deltas=True, min_models=1, max_models=1,
    global_params={"t": REQUIRED}, ranges={"t": POSITIVE},
    reference="alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card); mergekit nearswap",
))
register(MergeMethod(
    name="tsv", fn=tsv, needs_base=True, takes_deltas=True,
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0, "rank_fraction": None, "svd": True},
    ranges={"rank_fraction": ParamRange(0.0, 1.0, lo_open=True)},
    reference="Gargiulo et al. 2025, Task Singular Vectors, CVPR (arXiv:2412.00081)",
))
register(MergeMethod(
    name="iso_c", fn=iso_c, needs_base=True, takes_deltas=True,
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0, "svd": True},
    reference="Marczak et al. 2025, No Task Left Behind: Iso-C, ICML (arXiv:2502.04959)",
))
register(MergeMethod(
    name="iso_cts", fn=iso_cts, needs_base=True, takes_deltas=True,
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0, "common_space_fraction": 0.8, "svd": True},
    ranges={"common_space_fraction": FRACTION},
    reference="Marczak et al. 2025, No Task Left Behind: Iso-CTS, ICML (arXiv:2502.04959)",
))
