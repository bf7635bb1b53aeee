"""Spectral (SVD-based) methods on task matrices: ``tsv``, ``iso_c``, ``iso_cts``.

Every method is a pure function of float32 tensors with the signature of
:mod:`evomerge.merge.registry`, registered with ``takes_deltas=True`` (it receives the task
vectors ``τ_i = θ_i − θ_base``). N-D tensors are treated as ``(shape[0], −1)`` matrices
(:func:`as_matrix`); 1-D tensors (biases, norms), and matrices with ``svd: false``, take the
weighted mean of the task vectors instead. Resident task vectors may cache TSV's factors
(:data:`SVD_CACHE_ATTR`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods.params import fraction, per_model
from evomerge.merge.registry import FRACTION, MergeMethod, ParamRange, register

__all__ = ["SVD_CACHE_ATTR", "as_matrix", "polar_factor", "mean_merge", "tsv_rank", "top_singular_triplets",
           "tsv_orthogonal_factors", "tsv_matrix", "tsv", "iso_c", "iso_cts_sizes", "iso_cts"]


def _lam(kw: dict) -> float:
    return float(kw.get("lambda", 1.0))


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
    w = per_model("weight", weight, len(deltas))
    return [d if wi == 1.0 else d * wi for d, wi in zip(deltas, w)]


def mean_merge(ds: Sequence[Tensor], base: Tensor, lam: float = 1.0) -> Tensor:
    """``base + λ · mean(ds)``: the spectral methods' fallback for tensors without singular
    vectors (1-D) and for ``svd: false``."""
    mean = ds[0].clone()
    for d in ds[1:]:
        mean.add_(d)
    return base + mean * (lam / len(ds))


SVD_CACHE_ATTR = "_evomerge_svd_cache"
"""Attribute a resident task vector may carry to opt into TSV's factor cache: ``True`` (cache on
first use) or the cache itself. Costs about ``k·(m + n)`` floats per task vector plus the two
orthogonalised factors (≈ twice one matrix); afterwards a TSV candidate that changes only
``weight`` magnitudes or ``lambda`` is one matrix product instead of ``T + 2`` SVDs."""


def tsv_rank(r: int, num_tasks: int, rank_fraction: float | None = None) -> int:
    """TSV's components per task for a matrix of rank bound ``r = min(m, n)``:
    ``k = max(1, ⌊r · f⌋)`` (at most ``r``) with ``f = rank_fraction``, default ``1/T``."""
    frac = 1.0 / num_tasks if rank_fraction is None else fraction("rank_fraction", rank_fraction, lo_open=True)
    return min(r, max(1, int(r * frac)))


def top_singular_triplets(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_k, σ_k, V_kᵀ)``: the top-``k`` singular triplets of matrix ``m`` (contiguous copies)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k].contiguous(), s[:k].clone(), vh[:k, :].contiguous()


def tsv_orthogonal_factors(factors: Sequence[tuple[Tensor, Tensor, Tensor]],
                           signs: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``(U⊥, V⊥ᵀ)``: the polar factors of the stacked ``[sign_i U_i]`` and ``[V_iᵀ]`` of the
    tasks' ``(U_i, σ_i, V_iᵀ)`` factors (TSV's orthogonalisation)."""
    u_perp = polar_factor(torch.cat([u if sg > 0 else -u for (u, _, _), sg in zip(factors, signs)], dim=1))
    vh_perp = polar_factor(torch.cat([vh for _, _, vh in factors], dim=0))
    return u_perp, vh_perp


def tsv_matrix(u_perp: Tensor, vh_perp: Tensor, factors: Sequence[tuple[Tensor, Tensor, Tensor]],
               weight: Sequence[float]) -> Tensor:
    """TSV's merged task matrix ``U⊥ diag(|w_1| σ_1 … ) V⊥ᵀ`` (before ``λ`` and the base)."""
    sigma = torch.cat([s * abs(wi) for (_, s, _), wi in zip(factors, weight)])
    return (u_perp * sigma.unsqueeze(0)) @ vh_perp


def _tsv_task_factors(d: Tensor, m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``m`` (the matrix view of task vector ``d``), cached on ``d``
    when it opted in (:data:`SVD_CACHE_ATTR`); the cached and fresh values are the same bits."""
    cache = getattr(d, SVD_CACHE_ATTR, None)
    if isinstance(cache, dict) and cache.get("k", 0) >= k:
        u, s, vh = cache["f"]
        return u[:, :k], s[:k], vh[:k, :]
    f = top_singular_triplets(m, k)
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
    w = per_model("weight", weight, len(deltas))
    mats = [as_matrix(d) for d in deltas]
    if mats[0] is None or not svd:
        return mean_merge(_weighted(deltas, w), base, lam)
    k = tsv_rank(min(mats[0].shape), len(mats), rank_fraction)
    factors = [_tsv_task_factors(d, m, k) for d, m in zip(deltas, mats)]
    signs = tuple(-1.0 if wi < 0 else 1.0 for wi in w)
    key = (k, signs, tuple(id(d) for d in deltas))
    cache = getattr(deltas[0], SVD_CACHE_ATTR, None)
    polar = cache.get("polar") if isinstance(cache, dict) else None
    if polar is not None and polar[0] == key:
        u_perp, vh_perp = polar[1], polar[2]
    else:
        u_perp, vh_perp = tsv_orthogonal_factors(factors, signs)
        if isinstance(cache, dict):
            cache["polar"] = (key, u_perp, vh_perp)
    merged = tsv_matrix(u_perp, vh_perp, factors, w)
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
        return mean_merge(ds, base, lam)
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
    frac = fraction("common_space_fraction", common_space_fraction)
    ds = _weighted(deltas, weight)
    mats = [as_matrix(d) for d in ds]
    if mats[0] is None or not svd:
        return mean_merge(ds, base, lam)
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
