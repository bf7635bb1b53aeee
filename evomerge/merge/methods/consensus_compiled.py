"""The TIES / DARE-TIES consensus merge as one compiled pass (numba): the CPU kernel.

:func:`consensus_compiled` computes the bits of
:func:`~evomerge.merge.methods.consensus.consensus_fused` (and so of the reference chain) with
one compiled function instead of ~25 eager torch operations per block: per block of
``COMPILED_BLOCK`` entries, each model's weighted (trimmed / DARE-dropped) delta is written to an
L1-resident scratch row, then the elected sign, the agreeing sum, the divisor, ``lam`` and the
base are applied while the block is in cache. Every operation is the float32 operation the torch
chain performs, in the same order; numba compiles without fast-math, so LLVM neither reorders
nor contracts ``a*b + c`` into a fused multiply-add (the tests compare bit for bit).

DARE's keep masks come from the models' PCG64 streams (:class:`~evomerge.merge.methods.consensus.
DareStream`), stepped inside the kernel: numpy's PCG64 step (128-bit LCG, XSL-RR output) written
with LLVM's 128-bit integers, 1.6 ns per word against numpy's ``random_raw`` 2.6 ns; the stream
is the one numpy draws (tested word for word) and the generator's state is advanced as numpy's
would be.

numba is a dependency of evomerge (and of vLLM); where it cannot be imported, :data:`AVAILABLE`
is False and the engine uses the torch kernel. The first call per number of models compiles
(~2 s); the machine code is cached on disk (numba's ``cache=True``) for later processes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

try:  # an optional import: the torch kernel is complete on its own
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a declared dependency
    AVAILABLE = False

__all__ = ["AVAILABLE", "COMPILED_BLOCK", "consensus_compiled", "pcg64_state", "set_pcg64_state"]

COMPILED_BLOCK = 2048
"""Entries per inner block (a multiple of 4: a block takes whole PCG64 words): the models'
scratch rows (8 KiB each) and buffers stay in the L1 / L2 cache (2048 measured best of 512-4096)."""
PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
"""numpy's PCG64 (pcg64.h ``PCG_DEFAULT_MULTIPLIER_128``)."""
_LOW64 = (1 << 64) - 1


def pcg64_state(bits) -> np.ndarray:
    """A ``numpy.random.PCG64``'s state as the kernel's four uint64: state high, low, inc high, low."""
    st = bits.state["state"]
    return np.array([st["state"] >> 64, st["state"] & _LOW64, st["inc"] >> 64, st["inc"] & _LOW64], dtype=np.uint64)


def set_pcg64_state(bits, words: np.ndarray) -> None:
    """Write the kernel's state back into the ``numpy.random.PCG64`` (as if it had drawn the words)."""
    st = bits.state
    st["state"]["state"] = (int(words[0]) << 64) | int(words[1])
    bits.state = st


if AVAILABLE:
    @intrinsic
    def _lcg128(typingctx, hi, lo, inc_hi, inc_lo):
        """PCG64's state step ``state * multiplier + inc`` modulo 2^128, on (high, low) halves."""
        sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64, types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            i64, i128 = ir.IntType(64), ir.IntType(128)

            def join(high, low):
                return builder.or_(builder.shl(builder.zext(high, i128), ir.Constant(i128, 64)),
                                   builder.zext(low, i128))

            state = builder.add(builder.mul(join(args[0], args[1]), ir.Constant(i128, PCG64_MULTIPLIER)),
                                join(args[2], args[3]))
            high = builder.trunc(builder.lshr(state, ir.Constant(i128, 64)), i64)
            return context.make_tuple(builder, signature.return_type, [high, builder.trunc(state, i64)])

        return sig, codegen

    @intrinsic
    def _prefetch(typingctx, arr, index):
        """Ask for the cache line of ``arr[index]`` (LLVM's prefetch: read, keep in all levels)."""
        sig = types.void(arr, index)

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            array = context.make_array(array_type)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]], wraparound=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True, nogil=True)
    def _pcg64_words(state, out, ahead, first):
        """Fill ``out`` with the next words of the PCG64 stream ``state`` (advanced in place):
        step, then XSL-RR output, as numpy's ``pcg64_next64``. Meanwhile the cache lines of
        ``ahead[first:]`` (one per 4 words, as far as ``ahead`` goes) are prefetched, so that
        memory works while the core computes words (DARE-TIES at 134M: 3.8x -> 3.1x the floor)."""
        hi, lo, inc_hi, inc_lo = state[0], state[1], state[2], state[3]
        c58, c63, c64 = np.uint64(58), np.uint64(63), np.uint64(64)
        for w in range(out.size):
            if w % 4 == 0 and first + 4 * w < ahead.size:
                _prefetch(ahead, first + 4 * w)
            hi, lo = _lcg128(hi, lo, inc_hi, inc_lo)
            x = hi ^ lo
            rot = hi >> c58
            out[w] = (x >> rot) | (x << ((c64 - rot) & c63))
        state[0] = hi
        state[1] = lo


def _weighted_row(x, row, w, threshold, trim, kept, level, p, dare, rescale):
    """One model's block, sparsified and weighted, into ``row``: ``((τ·keep)/p)·w`` (DARE, ``p``
    only with rescale), ``(τ·w)·[|τ| ≥ threshold]`` (TIES' trim) or ``τ·w``."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if dare:
        if rescale:
            for j in range(row.size):
                row[j] = ((x[j] * (one if kept[j] < level else zero)) / p) * w
        else:
            for j in range(row.size):
                row[j] = (x[j] * (one if kept[j] < level else zero)) * w
    elif trim:
        for j in range(row.size):
            row[j] = (x[j] * w) * (one if abs(x[j]) >= threshold else zero)
    else:
        for j in range(row.size):
            row[j] = x[j] * w


def _election_total(rows, k, total, count):
    """The weighted sum of the rows' first ``k`` entries ("sum") or the sum of their signs
    ("count"), model by model."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    first = rows[0, :k]
    if count:
        for j in range(total.size):
            total[j] = (one if first[j] > zero else zero) - (one if first[j] < zero else zero)
        for i in range(1, rows.shape[0]):
            row = rows[i, :k]
            for j in range(total.size):
                total[j] = total[j] + ((one if row[j] > zero else zero) - (one if row[j] < zero else zero))
    else:
        for j in range(total.size):
            total[j] = first[j]
        for i in range(1, rows.shape[0]):
            row = rows[i, :k]
            for j in range(total.size):
                total[j] = total[j] + row[j]


def _agreeing_sum(rows, k, sign, mixed, divisor, divisor_weights):
    """The agreeing models' sum from +0 (v·0 keeps a NaN, as addcmul does) and the divisor (the
    agreeing models' divisor weights), the election total made ±1 on the way (+1 where it is
    >= 0; at -0 no model agrees with either sign)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    first = rows[0, :k]
    w0 = divisor_weights[0]
    for j in range(sign.size):
        e = -one if sign[j] < zero else one
        sign[j] = e
        agree = one if first[j] * e > zero else zero
        mixed[j] = zero + first[j] * agree
        divisor[j] = agree * w0
    for i in range(1, rows.shape[0]):
        row = rows[i, :k]
        w = divisor_weights[i]
        for j in range(sign.size):
            agree = one if row[j] * sign[j] > zero else zero
            mixed[j] = mixed[j] + row[j] * agree
            divisor[j] = divisor[j] + agree * w


def _kernel(xs, base, out, weights, thresholds, trim, states, levels, dare, scales, rescale,
            count, divisor_weights, lam):
    """The consensus merge of the flat ``xs`` onto ``base`` into ``out`` (see the module docstring).

    ``states[i]``: model i's PCG64 state (state high, low, increment high, low), advanced in place
    by the words its DARE draws take: entry j is kept iff the j-th 16-bit draw is below ``levels[i]``.
    Every inner loop runs over a block slice indexed by its loop variable, without branches on
    the settings, so that LLVM vectorises it; the helpers take ``rows`` and ``k`` and slice
    ``rows[i, :k]`` themselves (a 2-D slice ``rows[:, :k]`` is non-contiguous to numba, and its
    loops are not vectorised: TIES 4.7x the floor instead of 2.6x).
    """
    m = len(xs)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    block = COMPILED_BLOCK
    rows = np.empty((m, block), dtype=np.float32)
    words = np.empty(block // 4, dtype=np.uint64)
    draws = words.view(np.uint16)
    sign_buf = np.empty(block, dtype=np.float32)
    mixed_buf = np.empty(block, dtype=np.float32)
    divisor_buf = np.empty(block, dtype=np.float32)
    n = out.size
    for s in range(0, n, block):
        k = min(n, s + block) - s
        for i in range(m):
            if dare[i]:  # the words of this block; meanwhile, this model's next block is fetched
                _pcg64_words(states[i], words[:(k + 3) // 4], xs[i], s + block)
            _weighted_row(xs[i][s:s + k], rows[i, :k], weights[i], thresholds[i], trim[i], draws[:k], levels[i],
                          scales[i], dare[i], rescale[i])
        sign = sign_buf[:k]
        _election_total(rows, k, sign, count)
        mixed = mixed_buf[:k]
        divisor = divisor_buf[:k]
        _agreeing_sum(rows, k, sign, mixed, divisor, divisor_weights)
        # a zero divisor (or -0) becomes 1 (without normalize every divisor weight is 0: /1 is
        # exact), · lam (1 is exact), + base
        o = out[s:s + k]
        b = base[s:s + k]
        for j in range(k):
            d = divisor[j] + (one if divisor[j] == zero else zero)
            o[j] = ((mixed[j] / d) * lam) + b[j]


if AVAILABLE:
    _weighted_row = njit(cache=True, nogil=True)(_weighted_row)
    _election_total = njit(cache=True, nogil=True)(_election_total)
    _agreeing_sum = njit(cache=True, nogil=True)(_agreeing_sum)
    _kernel = njit(cache=True, nogil=True)(_kernel)


def consensus_compiled(deltas: Sequence[Tensor], base: Tensor, weights: Sequence[float], method: str,
                       normalize: bool, lam: float, thresholds=None, dare=None, out: Tensor | None = None) -> Tensor:
    """:func:`~evomerge.merge.methods.consensus.consensus_fused` (same arguments, same bits, the
    DARE streams advanced alike) in one compiled pass; float32 CPU tensors only."""
    from evomerge.merge.methods.consensus import _check

    m = len(deltas)
    thresholds = _check(method, m, thresholds)
    dare = [None] * m if dare is None else list(dare)
    xs = tuple(d.detach().reshape(-1).numpy() for d in deltas)
    flat_base = base.detach().reshape(-1).numpy()
    if out is None:
        out = torch.empty_like(base)
    f32 = np.float32
    states = np.zeros((m, 4), dtype=np.uint64)
    for i, d in enumerate(dare):
        if d is not None:
            states[i] = pcg64_state(d.bits)
    _kernel(xs, flat_base, out.view(-1).numpy(),
            np.array([float(w) for w in weights], dtype=f32),
            np.array([float(t) if t is not None else 0.0 for t in thresholds], dtype=f32),
            np.array([t is not None for t in thresholds], dtype=np.bool_),
            states,
            np.array([d.level if d is not None else 0 for d in dare], dtype=np.int32),
            np.array([d is not None for d in dare], dtype=np.bool_),
            np.array([d.scale if d is not None and d.scale is not None else 1.0 for d in dare], dtype=f32),
            np.array([d is not None and d.scale is not None for d in dare], dtype=np.bool_),
            method == "count",
            np.array([float(w) if normalize else 0.0 for w in weights], dtype=f32), f32(lam))
    for i, d in enumerate(dare):
        if d is not None:
            set_pcg64_state(d.bits, states[i])
    return out
