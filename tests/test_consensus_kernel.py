"""The CPU consensus kernels against the reference chain: the fused torch kernel (methods/consensus.py)
and the compiled one (methods/consensus_compiled.py) give the same bits, signs of zeros included; their
DARE masks are bernoulli_keep_mask's, and the compiled kernel's PCG64 is numpy's, word for word."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge.methods import consensus, consensus_compiled, sparsify
from evomerge.merge.methods import task_arithmetic as ta


def _inputs(n: int, models: int = 3):
    g = torch.Generator().manual_seed(11)
    base = 0.02 * torch.randn(n, generator=g)
    base[:300] = -0.0  # an all-zero mix added to -0 must stay +0 where the reference gives +0
    deltas = [0.002 * torch.randn(n, generator=g) for _ in range(models)]
    for d in deltas:
        d[:200] = 0.0
        d[200:300] = -0.0
        d[300:400] = torch.round(d[300:400] * 1e3) / 1e3  # ties with the magnitude threshold
    if models > 1:
        deltas[1][400:450] = -deltas[0][400:450]  # totals of exactly 0
    return deltas, base


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


KERNELS = pytest.mark.parametrize("kernel", [consensus.consensus_fused, consensus_compiled.consensus_compiled],
                                  ids=["fused", "compiled"])


@KERNELS
@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (False, 0.7), (True, -1.3)])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.5, -0.3, 0.0], [1.0]])
def test_cpu_consensus_kernels_are_bit_identical_to_the_reference(kernel, method, normalize, lam, weights):
    n = 2 * consensus.FUSED_BLOCK + 1237  # two blocks and a ragged tail
    deltas, base = _inputs(n, len(weights))
    for trim in (False, True):
        thr = [sparsify.magnitude_threshold(d, p) for d, p in zip(deltas, (0.5, 1.0, 0.3))] if trim else None
        want = consensus.consensus_reference(deltas, base, weights, method, normalize, lam, thr)
        out = torch.full_like(base, 7.0)
        got = kernel(deltas, base, weights, method, normalize, lam, thr, out=out)
        assert got is out and _same(got, want)


@KERNELS
@pytest.mark.parametrize("rescale", [True, False])
def test_fused_dare_is_bit_identical_to_sparsifying_first(kernel, rescale):
    n = consensus.FUSED_BLOCK + 1001  # a tail that is not a multiple of 4 entries
    deltas, base = _inputs(n)
    dens = (0.5, 1.0, 0.3)  # density 1 draws nothing, as bernoulli_sparsify
    g = torch.Generator().manual_seed(3)
    sparse = [sparsify.bernoulli_sparsify(d, p, generator=g, rescale=rescale) for d, p in zip(deltas, dens)]
    want = consensus.consensus_reference(sparse, base, [0.5, 0.3, 0.2], "sum", True, 1.0)
    g = torch.Generator().manual_seed(3)
    streams = consensus.dare_streams(dens, g, rescale)
    got = kernel(deltas, base, [0.5, 0.3, 0.2], "sum", True, 1.0, dare=streams)
    assert _same(got, want)
    # and through the method: dare_ties on CPU float32 takes the fused path
    g = torch.Generator().manual_seed(3)
    via = ta.dare_ties(deltas, base, generator=g, weight=[0.5, 0.3, 0.2], density=list(dens),
                       normalize=True, rescale=rescale)
    assert _same(via, want)


def test_dare_stream_draws_the_bits_of_bernoulli_keep_mask():
    n = 3 * 4096 + 3
    g = torch.Generator().manual_seed(9)
    mask, p = sparsify.bernoulli_keep_mask((n,), 0.37, g, "cpu")
    g = torch.Generator().manual_seed(9)
    (stream,) = consensus.dare_streams([0.37], g, True)
    got = np.empty(n, dtype=np.float32)
    for s in range(0, n, 4096):  # block by block continues the same stream
        chunk = np.empty(min(4096, n - s), dtype=np.float32)
        stream.mask(chunk.size, chunk)
        got[s:s + chunk.size] = chunk
    assert np.array_equal(got.astype(bool), mask.numpy()) and stream.scale == p


@KERNELS
def test_non_finite_inputs_stay_non_finite(kernel):
    deltas, base = _inputs(1000)
    deltas[2][7] = float("nan")
    deltas[0][8], deltas[1][8] = float("inf"), -float("inf")
    got = kernel(deltas, base, [0.5, 0.3, 0.2], "sum", True, 1.0)
    assert not torch.isfinite(got[7]) and not torch.isfinite(got[8])
    assert torch.isfinite(got[9:]).all()


def test_compiled_pcg64_is_numpys_stream_and_advances_the_generator_alike():
    n = 2 * consensus_compiled.COMPILED_BLOCK + 7  # a last block whose draws end inside a word
    deltas, base = _inputs(n)
    g = torch.Generator().manual_seed(5)
    streams = consensus.dare_streams([0.6, 0.4, 0.9], g, True)
    twins = [np.random.PCG64() for _ in streams]
    for twin, s in zip(twins, streams):
        twin.state = s.bits.state
    consensus_compiled.consensus_compiled(deltas, base, [0.5, 0.3, 0.2], "sum", True, 1.0, dare=streams)
    for twin, s in zip(twins, streams):
        twin.random_raw((n + 3) // 4)  # what the kernel drew: ceil(n / 4) words
        assert s.bits.state == twin.state
        assert np.array_equal(s.bits.random_raw(1000), twin.random_raw(1000))  # and the stream goes on alike
    # the word generator alone, against numpy
    bits = np.random.PCG64(2024)
    state = consensus_compiled.pcg64_state(bits)
    words = np.empty(5000, dtype=np.uint64)
    consensus_compiled._pcg64_words(state, words, np.zeros(64, dtype=np.float32), 0)
    assert np.array_equal(words, np.random.PCG64(2024).random_raw(5000))


def test_combine_deltas_takes_the_compiled_kernel_on_cpu_float32(monkeypatch):
    deltas, base = _inputs(5000)
    calls = []
    real = consensus_compiled.consensus_compiled
    monkeypatch.setattr(consensus_compiled, "consensus_compiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ta.combine_deltas(deltas, base, [0.5, 0.3, 0.2], consensus="sum", normalize=True)
    want = consensus.consensus_reference(deltas, base, [0.5, 0.3, 0.2], "sum", True, 1.0)
    assert calls and _same(got, want)
