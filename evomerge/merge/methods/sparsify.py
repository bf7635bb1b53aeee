"""Sparsifiers of task vectors and TIES sign election: the building blocks of the task-arithmetic
family (:mod:`evomerge.merge.methods.task_arithmetic`).

- :func:`magnitude_sparsify` / :func:`magnitude_threshold` — keep the ``density`` fraction of
  largest-magnitude entries (TIES trim).
- :func:`bernoulli_sparsify` — keep each entry with probability ``density`` (quantised to
  1/65536), optionally rescale the kept ones by the inverse of that probability (DARE).
- :func:`breadcrumbs_sparsify` — drop the largest γ fraction and the smallest entries, keep
  ``density`` (Model Breadcrumbs).
- :func:`della_sparsify` — keep with a magnitude-rank-dependent probability in ``density ± ε``,
  rescale by its inverse (DELLA MAGPRUNE).
- :func:`elect_sign` / :func:`sign_agreement_mask` — TIES sign election: the majority sign is the
  sign of the sum of the *weighted* (sparsified) deltas, zero goes to ``+``; a model counts at a
  position only when its delta's sign equals the majority sign (a zero delta never counts).

Deliberate differences from mergekit (each documented at its function):

- magnitude sparsification selects by a threshold (the k-th largest magnitude, exactly
  ``torch.kthvalue``'s, see :func:`kth_largest`) instead of an ``argsort``: entries tied with the
  threshold are all kept, and the result does not depend on a sort's tie order (deterministic on
  every device);
- DARE keeps an entry with probability ``density`` rounded to a multiple of 1/65536 and rescales
  by the inverse of that probability (exactly unbiased; mergekit divides by ``density``); on the
  CPU the keep mask comes from a numpy PCG64 stream seeded by the tensor's generator (25 % faster
  DARE-TIES merges here, see benchmarks/merge_speed.py), so masks differ from mergekit's for the
  same seed — as they would between any two RNGs;
- breadcrumbs never zeroes a whole task vector when its outlier count rounds to 0; DELLA shrinks
  ε so that every (density, ε) pair is valid.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.params import check_density, fraction

__all__ = [
    "SORTED_ABS_ATTR",
    "kth_largest",
    "magnitude_threshold",
    "magnitude_sparsify",
    "bernoulli_keep_mask",
    "bernoulli_sparsify",
    "breadcrumbs_sparsify",
    "della_keep_probabilities",
    "della_sparsify",
    "elect_sign",
    "sign_agreement_mask",
]

SORTED_ABS_ATTR = "_evomerge_sorted_abs"
"""Attribute a resident tensor may carry: ``True`` (sort on first use) or its sorted |values|."""


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
    density = check_density(density)
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
    if check_density(density) >= 1.0:
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
    density = check_density(density)
    if density >= 1.0:
        return delta
    mask, p = bernoulli_keep_mask(delta.shape, density, generator, delta.device)
    out = delta * mask
    if rescale:
        out = out / p
    return out


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
    density = fraction("density", density)
    gamma = fraction("gamma", gamma)
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
    density = fraction("density", density)
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
    density = fraction("density", density)
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
