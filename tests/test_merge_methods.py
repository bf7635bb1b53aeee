"""Merge methods on small tensors: against direct formulas and their defining properties."""

import math

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import averaging, sparsify, spherical
from evomerge.merge.methods import task_arithmetic as task_arith
from evomerge.merge.registry import get_method, method_names

LAM = {"lambda": 1.0}


def _family(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base, models


def test_core_methods_registered():
    names = method_names()
    for m in ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "passthrough"]:
        assert m in names
    with pytest.raises(EvomergeError, match="unknown merge_method 'nope'.*ties"):
        get_method("nope")


def test_linear_single_weight_one_is_identity_and_weighted_mean():
    base, ms = _family()
    assert torch.equal(averaging.linear(ms[:1], None, weight=[1.0]), ms[0])
    w = [0.2, 0.5, 0.3]
    want = (0.2 * ms[0] + 0.5 * ms[1] + 0.3 * ms[2]) / 1.0
    torch.testing.assert_close(averaging.linear(ms, None, weight=w), want)
    torch.testing.assert_close(averaging.linear(ms, None, weight=[2, 2, 2]), sum(ms) / 3)
    torch.testing.assert_close(averaging.linear(ms, None, weight=[2, 2, 2], normalize=False), 2 * sum(ms))


def test_task_arithmetic_formula_and_lambda_zero():
    base, ms = _family()
    d = task_arith.task_vectors(ms, base)
    w = [0.7, -0.2, 0.4]
    out = task_arith.task_arithmetic(d, base, weight=w, **{"lambda": 0.8})
    want = base + 0.8 * sum(wi * (m - base) for wi, m in zip(w, ms))
    torch.testing.assert_close(out, want)
    assert torch.equal(task_arith.task_arithmetic(d, base, weight=w, **{"lambda": 0.0}), base)


def _ties_reference(base, models, weights, density, lam=1.0, normalize=True):
    """Direct element-wise TIES as mergekit defines it (loops, float64)."""
    base = base.double()
    deltas = [(m.double() - base) for m in models]
    n = base.numel()
    k = int(density * n)
    trimmed = []
    for d in deltas:
        flat = d.reshape(-1)
        keep = set(torch.argsort(flat.abs(), descending=True)[:k].tolist())
        trimmed.append(torch.tensor([flat[i].item() if i in keep else 0.0 for i in range(n)], dtype=torch.float64))
    out = base.reshape(-1).clone()
    for i in range(n):
        wd = [w * t[i].item() for w, t in zip(weights, trimmed)]
        sign = 1.0 if sum(wd) >= 0 else -1.0
        num = sum(x for x in wd if x != 0 and math.copysign(1.0, x) == sign)
        den = sum(w for w, x in zip(weights, wd) if x != 0 and math.copysign(1.0, x) == sign)
        mixed = num / (den if (normalize and den != 0) else 1.0)
        out[i] += lam * mixed
    return out.reshape(base.shape).float()


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_direct_formula(normalize):
    base, ms = _family(seed=3)
    w = [1.0, 0.6, 0.3]
    out = task_arith.ties(task_arith.task_vectors(ms, base), base, weight=w, density=[0.4] * 3, normalize=normalize, **{"lambda": 1.2})
    want = _ties_reference(base, ms, w, 0.4, lam=1.2, normalize=normalize)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_ties_density_one_single_model_equals_task_arithmetic():
    base, ms = _family(n=1)
    d = task_arith.task_vectors(ms, base)
    ta = task_arith.task_arithmetic(d, base, weight=[0.7], **LAM)
    ties = task_arith.ties(d, base, weight=[0.7], density=[1.0], normalize=False, **LAM)
    torch.testing.assert_close(ties, ta, rtol=0, atol=1e-7)
    # with normalize (TIES' default) the single weight cancels: weight 1 gives the same
    torch.testing.assert_close(task_arith.ties(d, base, weight=[1.0], density=[1.0], **LAM),
                               task_arith.task_arithmetic(d, base, weight=[1.0], **LAM), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_family_member_fills_the_table_defaults(name):
    """A member called with only its weights merges as with every declared default spelled out
    (per-model defaults broadcast to every model), and is one sparsified sign-election merge."""
    from evomerge.merge.registry import REQUIRED

    base, ms = _family(n=3)
    d = task_arith.task_vectors(ms, base)
    spec = get_method(name)
    full = {k: [0.5, 0.3, 0.9] if v is REQUIRED else [v] * 3 for k, v in spec.model_params.items()}
    full.update(spec.global_params)
    member = task_arith.VARIANTS[name]
    g = torch.Generator().manual_seed
    assert torch.equal(member(d, base, generator=g(1), weight=[0.5, 0.3, 0.9]),
                       spec(d, base, generator=g(1), **full))
    assert member.sign_election == "sum" and member.normalize == spec.global_params["normalize"]
    with pytest.raises(EvomergeError, match="'weight' is required"):
        member(d, base)


def _consensus_full_tensor(sparse, base, weights, method, normalize, lam):
    """The consensus merge in full-tensor passes, from the public building blocks."""
    wds = [d * float(w) for d, w in zip(sparse, weights)]
    majority = sparsify.elect_sign(wds, method)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for wd, w in zip(wds, weights):
        agree = sparsify.sign_agreement_mask(wd, majority)
        mixed += wd * agree
        divisor += agree * float(w)
    if normalize:
        divisor[divisor == 0] = 1.0
        mixed = mixed / divisor
    return mixed * lam + base if lam != 1.0 else mixed + base


@pytest.mark.parametrize("method,normalize,lam", [("sum", True, 1.0), ("sum", False, 0.7), ("count", True, 1.3)])
def test_blocked_consensus_merge_is_bit_identical_to_full_tensor_passes(method, normalize, lam):
    # several CPU blocks plus a ragged tail; exact zeros, a zero-total position and a NaN included
    n = 2 * task_arith.CONSENSUS_BLOCK + 1234
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n // 7, 7, generator=g) if n % 7 == 0 else torch.randn(n, generator=g)
    deltas = [0.01 * torch.randn(base.shape, generator=g) for _ in range(3)]
    deltas[0].view(-1)[:100] = 0.0
    deltas[1].view(-1)[100] = -deltas[2].view(-1)[100] * 0.3 / 0.9
    deltas[0].view(-1)[100] = 0.0
    deltas[2].view(-1)[7] = float("nan")
    w = [0.9, 0.3, 0.9]
    dens = [0.3, 1.0, 0.55]
    got = task_arith.combine_deltas(deltas, base, w, consensus=method, normalize=normalize, lam=lam,
                           thresholds=[sparsify.magnitude_threshold(d, p) for d, p in zip(deltas, dens)])
    sparse = [sparsify.magnitude_sparsify(d, p) for d, p in zip(deltas, dens)]
    want = _consensus_full_tensor(sparse, base, w, method, normalize, lam)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 1
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    # without thresholds the (pre-sparsified) deltas count as given
    plain = task_arith.combine_deltas(sparse, base, w, consensus=method, normalize=normalize, lam=lam)
    assert torch.equal(torch.nan_to_num(plain), torch.nan_to_num(want))
    if method == "sum":  # ties() is the fused path
        tied = task_arith.ties(deltas, base, weight=w, density=dens, normalize=normalize, **{"lambda": lam})
        assert torch.equal(torch.nan_to_num(tied), torch.nan_to_num(want))


def test_sign_election_uses_weighted_sum_and_zero_goes_plus():
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])
    b = torch.tensor([-3.0, 0.5, -2.0, 0.0])
    assert sparsify.elect_sign([a, b]).tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert sparsify.elect_sign([a, b], "count").tolist() == [1.0, 1.0, 1.0, 1.0]
    # a zero delta never counts towards the disjoint mean
    assert sparsify.sign_agreement_mask(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])).tolist() == [False, True]


def test_magnitude_sparsify_keeps_top_fraction():
    x = torch.arange(1.0, 21.0) * torch.tensor([1.0, -1.0]).repeat(10)
    out = sparsify.magnitude_sparsify(x, 0.25)
    assert (out != 0).sum() == 5
    assert set(out[out != 0].abs().tolist()) == {16.0, 17.0, 18.0, 19.0, 20.0}
    assert torch.equal(sparsify.magnitude_sparsify(x, 1.0), x)
    with pytest.raises(EvomergeError, match="density"):
        sparsify.magnitude_sparsify(x, 0.0)


def test_dare_mean_over_seeds_approaches_delta():
    base, ms = _family(n=1, shape=(20, 20))
    d = task_arith.task_vectors(ms, base)
    acc = torch.zeros_like(base)
    n = 400
    for s in range(n):
        g = torch.Generator().manual_seed(s)
        acc += task_arith.dare_linear(d, base, generator=g, weight=[1.0], density=[0.3], **LAM)
    mean_delta = acc / n - base
    err = (mean_delta - d[0]).abs().mean() / d[0].abs().mean()
    assert err < 0.15, err
    # one draw keeps about `density` of the entries, rescaled by 1/density
    g = torch.Generator().manual_seed(0)
    one = sparsify.bernoulli_sparsify(d[0], 0.3, generator=g)
    kept = one != 0
    assert 0.2 < kept.float().mean() < 0.4
    torch.testing.assert_close(one[kept], d[0][kept] / 0.3)


def test_dare_is_reproducible_from_the_generator():
    base, ms = _family()
    d = task_arith.task_vectors(ms, base)
    kw = dict(weight=[1.0, 0.5, 0.5], density=[0.5] * 3, **LAM)
    a = task_arith.dare_ties(d, base, generator=torch.Generator().manual_seed(7), **kw)
    b = task_arith.dare_ties(d, base, generator=torch.Generator().manual_seed(7), **kw)
    c = task_arith.dare_ties(d, base, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_slerp_endpoints_midpoint_and_colinear_fallback():
    base, ms = _family(n=1)
    v0, v1 = base, ms[0] * 3 - base  # not colinear
    assert torch.equal(spherical.slerp(0.0, v0, v1), v0)
    assert torch.equal(spherical.slerp(1.0, v0, v1), v1)
    a = v0.reshape(-1).double() / v0.norm().double()
    b = v1.reshape(-1).double() / v1.norm().double()
    th = math.acos(float(a @ b))
    t = 0.3
    want = v0 * (math.sin((1 - t) * th) / math.sin(th)) + v1 * (math.sin(t * th) / math.sin(th))
    torch.testing.assert_close(spherical.slerp(t, v0, v1), want)
    torch.testing.assert_close(spherical.slerp(t, v0, 2 * v0), spherical.lerp(t, v0, 2 * v0))
    out = get_method("slerp")([v1], v0, t=0.0)
    assert torch.equal(out, v0)


def test_passthrough_copies():
    base, ms = _family(n=1)
    assert torch.equal(averaging.passthrough(ms, None, scale=[1.0]), ms[0])
    torch.testing.assert_close(averaging.passthrough(ms, None, scale=[0.5]), ms[0] * 0.5)


def test_methods_do_not_modify_inputs():
    base, ms = _family()
    d = task_arith.task_vectors(ms, base)
    copies = [x.clone() for x in d] + [base.clone()]
    g = torch.Generator().manual_seed(0)
    for name in ["task_arithmetic", "ties", "dare_ties", "dare_linear"]:
        spec = get_method(name)
        params = {p: ([0.5] * 3 if p in spec.model_params else v) for p, v in {**spec.model_params, **spec.global_params}.items()}
        spec(d, base, generator=g, **params)
    for x, c in zip(d + [base], copies):
        assert torch.equal(x, c)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_kth_largest_is_exactly_kthvalue(kind):
    g = torch.Generator().manual_seed(1)
    n = 400_000
    if kind == "normal":
        x = torch.randn(n, generator=g).abs()
    elif kind == "ties":
        x = torch.randint(0, 4, (n,), generator=g).float()
    else:
        x = torch.zeros(n)
        x[:7] = 1.0
    for k in [1, 6, 7, 8, 1000, n // 3, n // 2, n - 5, n]:
        assert torch.equal(sparsify.kth_largest(x, k), torch.kthvalue(x, n - k + 1).values), (kind, k)
