"""The TIES sign-election merge as block kernels: the consensus branch of
:func:`evomerge.merge.methods.task_arithmetic.combine_deltas`.

Two kernels compute the same bits for finite inputs:

- :func:`consensus_reference` — the chain written as it reads (trim, weight, elect, mask, sum,
  normalize, scale, add base), block by block; used on GPUs and as the tests' reference.
- :func:`consensus_fused` — the torch CPU kernel (the engine runs
  :mod:`~evomerge.merge.methods.consensus_compiled`, the same bits in one compiled pass, and this
  one where numba is missing): small blocks that stay in the L2 cache, every
  temporary a preallocated buffer written with ``out=``, the elected sign in one pass
  (``copysign``), each model's masked sum in one pass (``addcmul``) and, for DARE, the keep mask
  drawn block by block (:class:`DareStream`) and fused in instead of a full-size mask per model.
  In memory at 134M parameters, 1 thread: TIES 1.9x, DARE-TIES 2.5x faster than the previous
  engine (benchmarks/merge_speed.py; README "Benchmarks").

A non-finite input gives a non-finite output in both (the engine then raises); which NaN/inf it
is may differ between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.params import check_density
from evomerge.merge.methods.sparsify import KEEP_MASK_LEVELS

__all__ = ["CONSENSUS_BLOCK", "CONSENSUS_BLOCK_GPU", "FUSED_BLOCK", "DareStream", "dare_streams",
           "consensus_reference", "consensus_fused"]

CONSENSUS_BLOCK = 1 << 18
"""Entries per block of :func:`consensus_reference` on the CPU."""
CONSENSUS_BLOCK_GPU = 1 << 24
"""Entries per block on a GPU: few kernel launches, yet the temporaries (a few per model) of a
7B model's embedding matrix take ~0.5 GB instead of ~3 GB next to the evaluated model."""
FUSED_BLOCK = 1 << 15
"""Entries per block of :func:`consensus_fused`: its ~8 block buffers (128 KiB each) and the
inputs' blocks stay in a core's L2 cache."""


@dataclass
class DareStream:
    """One task vector's DARE keep mask, drawn block by block: the same bits as
    :func:`~evomerge.merge.methods.sparsify.bernoulli_keep_mask` on the CPU.

    That mask is numpy's ``default_rng(seed).integers(0, 65536, n, dtype=uint16) < level``;
    numpy draws those 16-bit integers from the PCG64 stream's 64-bit words, lowest 16 bits first,
    so the words of ``PCG64(seed).random_raw`` viewed as uint16 are the same integers (tested),
    and drawing them block after block continues the same stream.
    """

    bits: object
    """A ``numpy.random.PCG64``."""
    level: int
    """An entry is kept iff its 16-bit integer is below ``level``."""
    scale: float | None
    """The kept entries are divided by this (``p``, with ``rescale``), else None."""

    def mask(self, n: int, out) -> None:
        """Write the next ``n`` entries' keep mask (1.0 / 0.0) into the float32 array ``out[:n]``."""
        import numpy as np

        ints = self.bits.random_raw((n + 3) // 4).view(np.uint16)[:n]
        np.less(ints, self.level, out=out[:n], casting="unsafe")


def dare_streams(densities: Sequence[float], generator: torch.Generator | None,
                 rescale: bool) -> list[DareStream | None]:
    """The :class:`DareStream` of each task vector (None: density >= 1, nothing drawn), seeded
    from ``generator`` model by model, in order, as :func:`bernoulli_sparsify` draws them."""
    import numpy as np

    streams = []
    for density in densities:
        density = check_density(density)
        if density >= 1.0:
            streams.append(None)
            continue
        level = min(KEEP_MASK_LEVELS, max(1, round(float(density) * KEEP_MASK_LEVELS)))
        seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
        streams.append(DareStream(np.random.PCG64(seed), level, level / KEEP_MASK_LEVELS if rescale else None))
    return streams


def _check(method: str, n: int, thresholds) -> list:
    if method not in ("sum", "count"):
        raise EvomergeError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    thresholds = [None] * n if thresholds is None else list(thresholds)
    if len(thresholds) != n:
        raise EvomergeError(f"got {len(thresholds)} thresholds for {n} models")
    return thresholds


def consensus_reference(deltas: Sequence[Tensor], base: Tensor, weights: Sequence[float], method: str,
                        normalize: bool, lam: float, thresholds=None) -> Tensor:
    """TIES merge of (already sparsified) ``deltas`` onto ``base``, block by block.

    Elementwise, in the same operation order as the full-tensor formulas of
    :func:`~evomerge.merge.methods.sparsify.elect_sign` / ``sign_agreement_mask``.
    ``thresholds``: one magnitude per delta (None = keep all), the fused TIES trim.
    """
    thresholds = _check(method, len(deltas), thresholds)
    ws = [float(w) for w in weights]
    flat = [d.reshape(-1) for d in deltas]
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    n = out.numel()
    block = CONSENSUS_BLOCK if out.device.type == "cpu" else CONSENSUS_BLOCK_GPU
    # float 0/1 masks written by comparisons: a bool mask costs ~20x more per entry on the CPU
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


def consensus_fused(deltas: Sequence[Tensor], base: Tensor, weights: Sequence[float], method: str,
                    normalize: bool, lam: float, thresholds=None, dare: Sequence[DareStream | None] | None = None,
                    out: Tensor | None = None) -> Tensor:
    """:func:`consensus_reference` on the CPU in fewer, cache-resident passes; the same bits.

    ``dare``: per delta, a :class:`DareStream` (the DARE drop, fused: ``((τ·keep)/p)·w``, as
    :func:`bernoulli_sparsify` then the weighting compute it) or None. ``out``: a contiguous
    float32 tensor of ``base``'s shape to write into (else a new one).

    Why each step keeps the bits: sums are accumulated one model at a time in the same order;
    the sign is ``copysign(1, total)``, which differs from ``total >= 0`` only at ``total = -0``,
    where every weighted delta is ±0 and none agrees with either sign; a model's share is added
    with ``addcmul`` (``v·agree`` is exact, one rounding for the sum, as ``add_(v.mul_(agree))``).
    """
    thresholds = _check(method, len(deltas), thresholds)
    dare = [None] * len(deltas) if dare is None else list(dare)
    ws = [float(w) for w in weights]
    # scalars as float32 0-dim tensors: the value a Python float is rounded to, ~1 µs less per call
    wt = [torch.tensor(w, dtype=torch.float32) for w in ws]
    zero = torch.zeros(())
    flat = [d.reshape(-1) for d in deltas]
    flat_base = base.reshape(-1)
    if out is None:
        out = torch.empty_like(base)
    flat_out = out.view(-1)
    n = flat_out.numel()
    buf = _Buffers(len(deltas), min(FUSED_BLOCK, n))
    # DARE's p = level / 65536 is exact in float32
    scales = [None if d is None or d.scale is None else torch.tensor(d.scale, dtype=torch.float32) for d in dare]
    models = list(zip(flat, wt, thresholds, dare, scales))
    for s in range(0, n, FUSED_BLOCK):
        e = min(n, s + FUSED_BLOCK)
        b = buf.block(e - s)
        vs = [_weighted(x[s:e], w, thr, d, p, b, i) for i, (x, w, thr, d, p) in enumerate(models)]
        sign = _elect(vs, method, b)
        mixed = b["mixed"].zero_()  # from +0, as the reference: an all-zero mix stays +0
        divisor = b["divisor"] if normalize else None
        for i, (v, w) in enumerate(zip(vs, ws)):
            agree = torch.gt(torch.mul(v, sign, out=b["prod"]), zero, out=b["mask"])  # 0 and NaN never agree
            mixed.addcmul_(v, agree)
            if divisor is not None:
                if i == 0:
                    torch.mul(agree, wt[i], out=divisor)
                else:
                    divisor.add_(agree, alpha=w)
        if divisor is not None:
            divisor.add_(torch.eq(divisor, zero, out=b["mask"]))  # a zero divisor (or -0) becomes 1
            mixed.div_(divisor)
        if lam != 1.0:
            mixed.mul_(lam)
        torch.add(mixed, flat_base[s:e], out=flat_out[s:e])  # the output block written once
    return out


class _Buffers:
    """The block buffers of :func:`consensus_fused`, allocated once per call."""

    NAMES = ("sign", "mask", "prod", "divisor", "mixed", "keep")

    def __init__(self, models: int, size: int):
        self.weighted = [torch.empty(size) for _ in range(models)]
        self.named = {name: torch.empty(size) for name in self.NAMES}
        self.ones = torch.ones(size)
        self.keep_np = self.named["keep"].numpy()

    def block(self, n: int) -> dict:
        """The first ``n`` entries of every buffer (``"v"``: the per-model list)."""
        b = {name: t[:n] for name, t in self.named.items()}
        b["v"] = [t[:n] for t in self.weighted]
        b["ones"] = self.ones[:n]
        b["keep_np"] = self.keep_np
        return b


def _weighted(x: Tensor, w: Tensor, thr, dare: DareStream | None, scale: Tensor | None, b: dict, i: int) -> Tensor:
    """One model's block, sparsified and weighted, in its buffer."""
    v = b["v"][i]
    if dare is not None:  # DARE: ((τ·keep)/p)·w, as τ * bool_mask, / p, then · w
        dare.mask(x.numel(), b["keep_np"])
        torch.mul(x, b["keep"], out=v)
        if scale is not None:
            v.div_(scale)
        return v.mul_(w)
    torch.mul(x, w, out=v)
    if thr is not None:  # TIES trim: (τ·w)·[|τ| ≥ thr]
        m = b["mask"]
        v.mul_(torch.ge(torch.abs(x, out=m), thr, out=m))
    return v


def _elect(vs: list[Tensor], method: str, b: dict) -> Tensor:
    """±1 per entry: the sign of the weighted sum (``sum``) or of the sum of the signs
    (``count``), +1 where that sum is 0; accumulated model by model, in order."""
    total = b["sign"]
    if method == "sum":
        if len(vs) > 1:
            torch.add(vs[0], vs[1], out=total)
        else:
            total.copy_(vs[0])
        for v in vs[2:]:
            total.add_(v)
    else:
        torch.sign(vs[0], out=total)
        for v in vs[1:]:
            total.add_(torch.sign(v, out=b["prod"]))
    return torch.copysign(b["ones"], total, out=total)
