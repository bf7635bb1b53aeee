"""Core merge methods: linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, passthrough.

Every method is a pure function of float32 tensors (see :mod:`evomerge.merge.registry` for the
signature). The building blocks are public so that other method modules
(:mod:`evomerge.merge.methods_extra`) reuse them rather than re-deriving the conventions:

- :func:`magnitude_sparsify` — keep the ``density`` fraction of largest-magnitude entries (TIES).
- :func:`bernoulli_sparsify` — keep each entry with probability ``density`` (quantised to
  1/65536), optionally rescale the kept ones by the inverse of that probability (DARE).
- :func:`elect_sign` / :func:`sign_agreement_mask` — TIES sign election: the majority sign is the
  sign of the sum of the *weighted* (sparsified) deltas, zero goes to ``+``; a model counts at a
  position only when its delta's sign equals the majority sign (a zero delta never counts).
- :func:`combine_deltas` — the generalized task arithmetic of mergekit: weighted sum of deltas,
  optional consensus mask, optional ``normalize`` (divide by the sum of the weights of the models
  that count at each position, 0 → 1), scale by ``lambda``, add to the base.
- :func:`slerp` / :func:`lerp` — spherical interpolation with mergekit's lerp fallback.

Task-arithmetic-family methods are registered with ``takes_deltas=True``: they receive the task
vectors ``τ_i = θ_i − θ_base`` instead of the model tensors, so that a resident merger computes
them once. The engine computes ``τ_i`` as ``tensor.float() - base.float()`` on both the disk and
the in-memory path.

Deliberate differences from mergekit (all documented at the function):

- magnitude sparsification selects by a threshold (the k-th largest magnitude, exactly
  ``torch.kthvalue``'s, see :func:`kth_largest`) instead of an ``argsort``: entries tied with the threshold are all kept,
  and the result does not depend on a sort's tie order (deterministic on every device);
- DARE keeps an entry with probability ``density`` rounded to a multiple of 1/65536 and rescales
  by the inverse of that probability (exactly unbiased; mergekit divides by ``density``); on the
  CPU the keep mask comes from a numpy PCG64 stream seeded by the tensor's generator (25 % faster
  DARE-TIES merges here, see benchmarks/merge_speed.py), so masks differ from mergekit's for the
  same seed — as they would between any two RNGs;
- ``linear`` with ``normalize`` divides by the weight sum only when ``|Σw| ≥ 1e-8`` (mergekit
  would produce inf/NaN) — the same guard mergekit applies in its task-arithmetic family;
- ``slerp`` returns the endpoint exactly at ``t = 0`` and ``t = 1`` (mergekit's formula gives the
  same values up to rounding).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.registry import DENSITY, FRACTION, REQUIRED, MergeMethod, register

__all__ = [
    "task_vectors",
    "kth_largest",
    "magnitude_sparsify",
    "magnitude_threshold",
    "bernoulli_sparsify",
    "bernoulli_keep_mask",
    "elect_sign",
    "sign_agreement_mask",
    "combine_deltas",
    "weighted_sum",
    "lerp",
    "slerp",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "slerp_method",
    "passthrough",
]

WEIGHT_EPS = 1e-8
SORTED_ABS_ATTR = "_evomerge_sorted_abs"
"""Attribute a resident tensor may carry: ``True`` (sort on first use) or its sorted |values|."""
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


# ----------------------------------------------------------------------------- helpers


def task_vectors(tensors: Sequence[Tensor], base: Tensor) -> list[Tensor]:
    """``τ_i = θ_i − θ_base`` for each source tensor (float32 in, float32 out)."""
    return [t - base for t in tensors]


def _check_density(density: float) -> float:
    density = float(density)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise EvomergeError(f"parameter 'density' must be in (0, 1], got {density}")
    return density


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor (1 ≤ k ≤ numel) — exactly ``torch.kthvalue``'s
    ``(n − k + 1)``-th smallest, found faster on large tensors.

    A deterministic strided sample brackets the answer; only the entries inside the bracket go
    through ``kthvalue`` (falls back to the full ``kthvalue`` when the bracket misses).
    """
    n = values.numel()
    if n <= 1 << 17:
        return torch.kthvalue(values, n - k + 1).values
    step = n // 65536
    sample = values[::step].sort().values
    s = sample.numel()
    q = k / n
    r = s - q * s  # ascending rank of the answer in the sample
    margin = 6.0 * math.sqrt(s * q * (1.0 - q)) + 32.0
    lo_i, hi_i = int(r - margin), int(math.ceil(r + margin))
    above = 0
    sel = None
    if hi_i < s:
        gt = values > sample[hi_i]
        above = int(gt.sum())
        sel = ~gt
    if lo_i > 0:
        ge = values >= sample[lo_i]
        sel = ge if sel is None else sel & ge
    cand = values[sel] if sel is not None else values
    j = k - above
    if not (0 < j <= cand.numel()):
        return torch.kthvalue(values, n - k + 1).values
    return torch.kthvalue(cand, cand.numel() - j + 1).values


def magnitude_threshold(delta: Tensor, density: float, mags: Tensor | None = None) -> Tensor | None:
    """The magnitude at or above which entries are kept when keeping a ``density`` fraction.

    Returns ``None`` when everything is kept (``density >= 1`` or ``k == numel``). ``k`` is
    ``int(density * numel)`` (mergekit), at least 1. ``mags`` may pass ``delta.abs()``.
    """
    density = _check_density(density)
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return None
    k = max(1, int(density * n))
    if k >= n:
        return None
    cache = getattr(delta, SORTED_ABS_ATTR, None)
    if cache is not None:
        # A resident task vector may carry its sorted magnitudes (InMemoryMerger with
        # magnitude_cache=True): the same value as the selection, found by indexing.
        if cache is True:
            cache = delta.abs().reshape(-1).sort().values
            setattr(delta, SORTED_ABS_ATTR, cache)
        return cache[n - k]
    if mags is None:
        mags = delta.abs()
    return kth_largest(mags.reshape(-1), k)


def magnitude_sparsify(delta: Tensor, density: float, *, rescale: bool = False) -> Tensor:
    """Keep the ``density`` fraction of ``delta``'s entries with the largest magnitude (TIES trim).

    Difference from mergekit: entries equal to the threshold magnitude are all kept (mergekit's
    ``argsort`` keeps exactly ``k`` and breaks ties by sort order). With ``rescale`` the kept
    entries are divided by ``density`` (off by default, as in TIES).
    """
    if _check_density(density) >= 1.0:
        return delta
    mags = delta.abs()
    thr = magnitude_threshold(delta, density, mags)
    if thr is None:
        return delta
    out = delta * (mags >= thr)
    if rescale:
        out = out / float(density)
    return out


KEEP_MASK_LEVELS = 1 << 16  # DARE keep probabilities are multiples of 1/65536


def bernoulli_keep_mask(shape, density: float, generator: torch.Generator | None, device) -> tuple[Tensor, float]:
    """A boolean mask with each entry True independently with probability ``p``, and ``p``:
    ``density`` rounded to a multiple of 1/65536 (at least 1/65536).

    Randomness comes only from ``generator``. On the CPU it gives one 62-bit seed to a numpy
    PCG64 stream of 16-bit integers (entry kept iff its integer < 65536·p): torch's CPU
    ``rand`` is one sequential stream and was ~40 % of a DARE-TIES merge (2.4–3.8× slower per
    entry than this); on other devices ``torch.rand`` on the device.
    """
    device = torch.device(device)
    thr = min(KEEP_MASK_LEVELS, max(1, round(float(density) * KEEP_MASK_LEVELS)))
    if device.type == "cpu":
        import numpy as np

        seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
        n = math.prod(shape)
        bits = np.random.default_rng(seed).integers(0, KEEP_MASK_LEVELS, n, dtype=np.uint16)
        mask = torch.from_numpy(bits < thr).reshape(tuple(shape))
    else:
        mask = torch.rand(tuple(shape), generator=generator, device=device) < thr / KEEP_MASK_LEVELS
    return mask, thr / KEEP_MASK_LEVELS


def bernoulli_sparsify(
    delta: Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
    rescale: bool = True,
) -> Tensor:
    """DARE drop: keep each entry with probability ``p`` ≈ ``density``; rescale kept ones by 1/p.

    ``p`` is ``density`` rounded to a multiple of 1/65536 (:func:`bernoulli_keep_mask`; it equals
    ``density`` whenever ``65536·density`` is an integer, and is within 8e-6 of it otherwise), and
    the rescale uses the same ``p``, so the result stays exactly unbiased (mergekit divides by
    ``density``). ``density >= 1`` returns ``delta`` unchanged and draws nothing.
    """
    density = _check_density(density)
    if density >= 1.0:
        return delta
    mask, p = bernoulli_keep_mask(delta.shape, density, generator, delta.device)
    out = delta * mask
    if rescale:
        out = out / p
    return out


def elect_sign(weighted_deltas: Sequence[Tensor], method: str = "sum") -> Tensor:
    """Majority sign per position (+1 / −1; a zero total goes to +1), as in mergekit.

    ``method="sum"``: sign of the sum of the weighted deltas (TIES as implemented by mergekit);
    ``method="count"``: sign of the sum of the signs (one vote per model).
    """
    if method == "sum":
        total = weighted_deltas[0].clone()
        for d in weighted_deltas[1:]:
            total.add_(d)
    elif method == "count":
        total = weighted_deltas[0].sign()
        for d in weighted_deltas[1:]:
            total.add_(d.sign())
    else:
        raise EvomergeError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    return torch.where(total >= 0, 1.0, -1.0).to(weighted_deltas[0].dtype)


def sign_agreement_mask(delta: Tensor, majority_sign: Tensor) -> Tensor:
    """Boolean mask of positions where ``delta``'s sign equals the majority sign (0 never does)."""
    return delta.sign() == majority_sign


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ w_i · t_i`` accumulated in order (float32)."""
    out = tensors[0] * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=float(w))
    return out


CONSENSUS_BLOCK = 1 << 18
"""Entries per block of the CPU consensus merge: the block's temporaries stay in the CPU caches."""
CONSENSUS_BLOCK_GPU = 1 << 24
"""Entries per block on a GPU: few kernel launches, yet the temporaries (a few per model) of a
7B model's embedding matrix take ~0.5 GB instead of ~3 GB next to the evaluated model."""


def combine_deltas(
    deltas: Sequence[Tensor],
    base: Tensor,
    weights: Sequence[float],
    *,
    consensus: str | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    thresholds: Sequence[Tensor | float | None] | None = None,
) -> Tensor:
    """mergekit's generalized task arithmetic on already-sparsified deltas.

    ``δ_i = w_i τ_i``; with ``consensus`` ("sum"/"count") only the δ_i whose sign matches the
    elected sign count at each position; ``normalize`` divides by the sum of the weights of the
    models that count there (without consensus: by ``Σ w_i``), a zero divisor becomes 1; the mix
    is multiplied by ``lam`` and added to ``base``. ``thresholds`` (consensus only): one magnitude
    per delta (None = keep all); entries with ``|τ_i|`` below it count as zero — the TIES trim,
    fused in (the same result as :func:`magnitude_sparsify` first, without its full-size passes).
    """
    if len(deltas) != len(weights):
        raise EvomergeError(f"got {len(weights)} weights for {len(deltas)} models")
    if consensus is not None:
        return _consensus_merge(deltas, base, weights, consensus, normalize, float(lam), thresholds)
    if thresholds is not None:
        raise EvomergeError("combine_deltas: thresholds need a consensus method")
    # Σ w_i δ_i accumulated in one buffer (the inputs are never modified)
    mixed = weighted_sum(deltas, weights)
    if normalize:
        total = float(sum(float(w) for w in weights))
        if abs(total) >= WEIGHT_EPS:
            mixed.div_(total)
    if float(lam) != 1.0:
        mixed.mul_(float(lam))
    return mixed.add_(base)


def _consensus_merge(deltas, base, weights, method, normalize, lam, thresholds):
    """The consensus branch of :func:`combine_deltas`, block by block.

    Each block runs the whole chain (trim, weight, elect, mask, sum, normalize, scale, add base):
    on the CPU its temporaries stay in cache (~15 % faster than full-tensor passes), on a GPU they
    stay small. Most of the speed-up (~4x, benchmarks/merge_speed.py) comes from the float masks
    below. Elementwise, in the same operation order as the full-tensor formulas of
    :func:`elect_sign` / :func:`sign_agreement_mask`: the same bits (tested).
    """
    if method not in ("sum", "count"):
        raise EvomergeError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    thresholds = [None] * len(deltas) if thresholds is None else list(thresholds)
    if len(thresholds) != len(deltas):
        raise EvomergeError(f"got {len(thresholds)} thresholds for {len(deltas)} models")
    ws = [float(w) for w in weights]
    flat = [d.reshape(-1) for d in deltas]
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    n = out.numel()
    block = CONSENSUS_BLOCK if out.device.type == "cpu" else CONSENSUS_BLOCK_GPU
    # Masks are float 0/1 written by comparisons (torch.ge(..., out=float)): multiplying by a bool
    # tensor or torch.where on a random bool mask is ~20x slower per entry on the CPU.
    mask = torch.empty(min(block, n), dtype=out.dtype, device=out.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        m = mask[: e - s]
        wd = []
        for x, w, thr in zip(flat, ws, thresholds):
            x = x[s:e]
            v = x * w
            if thr is not None:  # TIES trim: (τ·[|τ| ≥ thr])·w, the same bits as trimming first
                v.mul_(torch.ge(x.abs(), thr, out=m))
            wd.append(v)
        if method == "sum":
            total = wd[0].clone()
            for v in wd[1:]:
                total.add_(v)
        else:
            total = wd[0].sign()
            for v in wd[1:]:
                total.add_(v.sign())
        elected = torch.ge(total, 0, out=total).mul_(2.0).sub_(1.0)  # +1 where the total is >= 0, else -1
        mixed = out[s:e].zero_()
        divisor = torch.zeros_like(mixed) if normalize else None
        for v, w in zip(wd, ws):
            agree = torch.gt(v * elected, 0, out=m)  # sign(v) == elected sign; 0 and NaN never agree
            mixed.add_(v.mul_(agree))
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            divisor.add_(torch.eq(divisor, 0, out=m))  # a zero divisor becomes 1
            mixed.div_(divisor)
        if lam != 1.0:
            mixed.mul_(lam)
        mixed.add_(flat_base[s:e])
    return out.reshape(base.shape)


def lerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """``(1 − t)·v0 + t·v1``."""
    return v0 * (1.0 - float(t)) + v1 * float(t)


def slerp(
    t: float,
    v0: Tensor,
    v1: Tensor,
    *,
    dot_threshold: float = SLERP_DOT_THRESHOLD,
    eps: float = SLERP_EPS,
) -> Tensor:
    """Spherical interpolation of the flattened tensors (mergekit's ``slerp``).

    Directions come from the tensors normalised by their norms (when the norm exceeds ``eps``);
    when ``|cos| > dot_threshold`` (near-colinear) it falls back to :func:`lerp`. The result
    is ``s0·v0 + s1·v1`` on the *unnormalised* tensors, as in mergekit. ``t=0`` gives ``v0``
    and ``t=1`` gives ``v1`` exactly.
    """
    t = float(t)
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    a = v0.reshape(-1).double()
    b = v1.reshape(-1).double()
    na = float(a.norm())
    nb = float(b.norm())
    if na > eps:
        a = a / na
    if nb > eps:
        b = b / nb
    dot = float((a * b).sum())
    if abs(dot) > dot_threshold or not math.isfinite(dot):
        return lerp(t, v0, v1)
    theta0 = math.acos(max(-1.0, min(1.0, dot)))
    sin0 = math.sin(theta0)
    s0 = math.sin(theta0 - theta0 * t) / sin0
    s1 = math.sin(theta0 * t) / sin0
    return v0 * s0 + v1 * s1


def _one_model(name: str, tensors: Sequence[Tensor]) -> None:
    if len(tensors) != 1:
        raise EvomergeError(f"merge_method {name!r} takes exactly one model besides the base, got {len(tensors)}")


# ----------------------------------------------------------------------------- methods


def linear(tensors, base=None, *, generator=None, weight, normalize=True):
    """Weighted average ``Σ w_i θ_i / Σ w_i`` (model soups; Wortsman et al. 2022).

    With ``normalize=False`` the plain weighted sum. Difference from mergekit: a weight sum with
    ``|Σw| < 1e-8`` is not divided by (mergekit would produce inf/NaN).
    """
    out = weighted_sum(tensors, weight)
    if normalize:
        total = float(sum(float(w) for w in weight))
        if abs(total) >= WEIGHT_EPS and total != 1.0:
            out = out / total
    return out


def task_arithmetic(deltas, base, *, generator=None, weight, normalize=False, **kw):
    """Task arithmetic (Ilharco et al. 2023): ``θ = θ_base + λ Σ w_i τ_i``."""
    return combine_deltas(deltas, base, weight, consensus=None, normalize=normalize, lam=kw["lambda"])


def ties(deltas, base, *, generator=None, weight, density, normalize=True, **kw):
    """TIES-merging (Yadav et al. 2023): trim by magnitude, elect sign by Σ of weighted deltas, disjoint merge."""
    thresholds = [magnitude_threshold(d, p) for d, p in zip(deltas, density)]  # = magnitude_sparsify, fused
    return combine_deltas(deltas, base, weight, consensus="sum", normalize=normalize, lam=kw["lambda"],
                          thresholds=thresholds)


def dare_ties(deltas, base, *, generator=None, weight, density, normalize=False, rescale=True, **kw):
    """DARE (Yu et al. 2024) drop-and-rescale, then TIES sign consensus."""
    sparse = [bernoulli_sparsify(d, p, generator=generator, rescale=rescale) for d, p in zip(deltas, density)]
    return combine_deltas(sparse, base, weight, consensus="sum", normalize=normalize, lam=kw["lambda"])


def dare_linear(deltas, base, *, generator=None, weight, density, normalize=False, rescale=True, **kw):
    """DARE drop-and-rescale, then task arithmetic (no sign consensus)."""
    sparse = [bernoulli_sparsify(d, p, generator=generator, rescale=rescale) for d, p in zip(deltas, density)]
    return combine_deltas(sparse, base, weight, consensus=None, normalize=normalize, lam=kw["lambda"])


def slerp_method(tensors, base, *, generator=None, t):
    """SLERP between the base (``t = 0``) and the one other model (``t = 1``)."""
    _one_model("slerp", tensors)
    return slerp(t, base, tensors[0])


def passthrough(tensors, base=None, *, generator=None, scale):
    """Copy the one model's tensor (multiplied by ``scale``; mergekit's passthrough)."""
    _one_model("passthrough", tensors)
    s = float(scale[0])
    return tensors[0].clone() if s == 1.0 else tensors[0] * s


# `int8_mask` is accepted for compatibility with mergekit recipes; it only changes mergekit's
# memory use, never the result, so it is ignored here.
_GTA_GLOBALS = {"lambda": 1.0, "int8_mask": False}

register(MergeMethod(
    name="linear", fn=linear, needs_base=False,
    model_params={"weight": REQUIRED}, global_params={"normalize": True},
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
))
register(MergeMethod(
    name="task_arithmetic", fn=task_arithmetic, needs_base=True, takes_deltas=True,
    model_params={"weight": REQUIRED}, global_params={"normalize": False, **_GTA_GLOBALS},
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
))
register(MergeMethod(
    name="ties", fn=ties, needs_base=True, takes_deltas=True,
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params={"normalize": True, **_GTA_GLOBALS}, ranges={"density": DENSITY},
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
))
register(MergeMethod(
    name="dare_ties", fn=dare_ties, needs_base=True, takes_deltas=True, randomized=True,
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params={"normalize": False, "rescale": True, **_GTA_GLOBALS}, ranges={"density": DENSITY},
    reference="Yu et al. 2024, Language models are Super Mario (arXiv:2311.03099)",
))
register(MergeMethod(
    name="dare_linear", fn=dare_linear, needs_base=True, takes_deltas=True, randomized=True,
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params={"normalize": False, "rescale": True, **_GTA_GLOBALS}, ranges={"density": DENSITY},
    reference="Yu et al. 2024, Language models are Super Mario (arXiv:2311.03099)",
))
register(MergeMethod(
    name="slerp", fn=slerp_method, needs_base=True, min_models=1, max_models=1,
    global_params={"t": REQUIRED}, ranges={"t": FRACTION},
    reference="Shoemake 1985; mergekit slerp",
))
register(MergeMethod(
    name="passthrough", fn=passthrough, needs_base=False, min_models=1, max_models=1,
    model_params={"scale": 1.0},
    reference="mergekit passthrough (frankenmerges via slices)",
))
