"""Formula checks of the merge methods beyond the core ones (breadcrumbs, DELLA, Model Stock, the
spherical and spectral methods, SCE, NearSwap) on small tensors (evomerge.merge.methods)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from scipy.linalg import polar

from evomerge.errors import EvomergeError
from evomerge.merge.methods import averaging, sparsify, spectral, spherical
from evomerge.merge.registry import REQUIRED, get_method

# tiny matrices: LAPACK / BLAS threads only wait on each other on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


EXTRA = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp",
         "karcher", "sce", "nearswap", "tsv", "iso_c", "iso_cts"]


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def default_params(spec, n):
    """Every declared parameter, REQUIRED ones given a plausible value."""
    fill = {"weight": 1.0, "t": 0.01}
    p = {k: [fill.get(k, v) if v is REQUIRED else v for _ in range(n)] for k, v in spec.model_params.items()}
    p.update({k: (fill[k] if v is REQUIRED else v) for k, v in spec.global_params.items()})
    return p


def call(name, tensors, base, n=None, seed=0, **over):
    spec = get_method(name)
    n = len(tensors) if n is None else n
    p = default_params(spec, n)
    p.update(over)
    gen = torch.Generator().manual_seed(seed) if spec.randomized else None
    with_base = spec.uses_base(base is not None)  # as the engine: base_optional methods use a given base
    inputs = [t - base for t in tensors] if (spec.takes_deltas and with_base) else tensors
    return spec(inputs, base if with_base else None, generator=gen, **p)


# ----------------------------------------------------------------------------- registry contract


@pytest.mark.parametrize("name", EXTRA)
def test_registered_with_declared_params(name):
    spec = get_method(name)
    assert spec.reference
    sig = inspect.signature(spec.fn)
    accepts_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for p in list(spec.model_params) + list(spec.global_params):
        assert p in sig.parameters or accepts_kw, (name, p)
    # numeric parameters are search genes: their defaults are numbers (or REQUIRED / None = auto)
    for p, v in {**spec.model_params, **spec.global_params}.items():
        assert v is REQUIRED or v is None or isinstance(v, (bool, int, float)), (name, p, v)


@pytest.mark.parametrize("name", EXTRA)
def test_no_nan_inputs_untouched_and_shape(name):
    base = rnd(6, 5, seed=1)
    n = 1 if name == "nearswap" else 2 if name == "nuslerp" else 3
    models = [base + 0.1 * rnd(6, 5, seed=10 + i) for i in range(n)]
    copies = [m.clone() for m in models]
    out = call(name, models, base)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for m, c in zip(models, copies):
        assert torch.equal(m, c)
    # 1-D tensors (biases / norms) take every method's fallback without error
    b1 = rnd(7, seed=2)
    out1 = call(name, [b1 + 0.1 * rnd(7, seed=20 + i) for i in range(n)], b1)
    assert out1.shape == b1.shape and torch.isfinite(out1).all()


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "nearswap",
                                  "karcher", "multislerp", "tsv"])
def test_single_model_endpoint(name):
    base = rnd(5, 4, seed=3)
    model = base + 0.2 * rnd(5, 4, seed=4)
    over = {"t": 1e6} if name == "nearswap" else {}
    if name == "tsv":
        over["rank_fraction"] = 1.0
    out = call(name, [model], base, **over)
    torch.testing.assert_close(out, model, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_sparsify_keeps_the_middle_band():
    x = rnd(1000, seed=5)
    out = sparsify.breadcrumbs_sparsify(x, density=0.3, gamma=0.05)
    order = torch.argsort(x.abs())
    kept = torch.zeros(1000, dtype=torch.bool)
    kept[order[650:950]] = True  # n_bot = 650, n_top = 50
    assert torch.equal(out != 0, kept)
    assert torch.equal(out[kept], x[kept])


def test_breadcrumbs_top_count_rounding_to_zero_does_not_zero_the_tensor():
    x = rnd(50, seed=6)  # gamma * n = 0.5 -> n_top = 0 (mergekit would zero everything here)
    out = sparsify.breadcrumbs_sparsify(x, density=0.2, gamma=0.01)
    assert int((out != 0).sum()) == 10
    assert torch.equal(out != 0, x.abs() >= x.abs().kthvalue(41).values)


def test_breadcrumbs_density_limits_the_outlier_drop():
    x = rnd(100, seed=7)
    out = sparsify.breadcrumbs_sparsify(x, density=0.95, gamma=0.1)  # n_top cut from 10 to 5
    assert int((out != 0).sum()) == 95
    assert x.abs().max() > out.abs().max()
    assert torch.equal(sparsify.breadcrumbs_sparsify(x, 1.0, 0.1), x)
    with pytest.raises(EvomergeError):
        sparsify.breadcrumbs_sparsify(x, 1.5, 0.1)


def _np_ties(deltas, weights, base, normalize, lam):
    wd = np.stack([w * d for w, d in zip(weights, deltas)])
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(wd) == sign
    mixed = (wd * mask).sum(0)
    if normalize:
        div = (np.array(weights)[:, None] * mask.reshape(len(weights), -1)).sum(0).reshape(mixed.shape)
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_and_ties_formula(normalize):
    base = rnd(10, 10, seed=8)
    models = [base + rnd(10, 10, seed=9 + i) for i in range(3)]
    w, dens, gam, lam = [0.5, 1.0, 0.7], [0.5, 0.6, 0.4], [0.05, 0.02, 0.1], 0.8
    sparse = [sparsify.breadcrumbs_sparsify(m - base, d, g).numpy() for m, d, g in zip(models, dens, gam)]
    out = call("breadcrumbs", models, base, weight=w, density=dens, gamma=gam, normalize=normalize, **{"lambda": lam})
    exp = base.numpy() + lam * sum(wi * s for wi, s in zip(w, sparse)) / (sum(w) if normalize else 1.0)
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-5, atol=1e-5)
    out = call("breadcrumbs_ties", models, base, weight=w, density=dens, gamma=gam, normalize=normalize,
               **{"lambda": lam})
    np.testing.assert_allclose(out.numpy(), _np_ties(sparse, w, base.numpy(), normalize, lam), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- della


def test_della_keep_probabilities_span_density_pm_epsilon():
    x = torch.tensor([[0.1, -3.0, 0.5, 2.0, -0.01], [5.0, 4.0, 3.0, 2.0, 1.0]])
    p = sparsify.della_keep_probabilities(x, density=0.5, epsilon=0.2)
    # row 0 ranks by |x|: 0.01 < 0.1 < 0.5 < 2 < 3 -> p = 0.3, 0.4, 0.5, 0.6, 0.7
    torch.testing.assert_close(p[0], torch.tensor([0.4, 0.7, 0.5, 0.6, 0.3]))
    torch.testing.assert_close(p[1], torch.tensor([0.7, 0.6, 0.5, 0.4, 0.3]))
    # epsilon is shrunk to keep the band inside [0, 1]
    q = sparsify.della_keep_probabilities(x, density=0.9, epsilon=0.3)
    assert float(q.max()) == pytest.approx(1.0) and float(q.min()) == pytest.approx(0.8)


def test_della_sparsify_is_unbiased_and_keeps_at_rate_p():
    row = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.01])
    x = row.repeat(4000, 1)  # 4000 independent draws of the same row
    out = sparsify.della_sparsify(x, 0.5, 0.2, generator=torch.Generator().manual_seed(0))
    p = sparsify.della_keep_probabilities(row, 0.5, 0.2)
    kept = out != 0
    torch.testing.assert_close(out[kept], (x / p)[kept])  # kept entries rescaled by 1/p
    rate = kept.float().mean(0)
    assert torch.allclose(rate, p, atol=0.03)
    assert torch.allclose(out.mean(0), row, atol=0.05 * 3.0)
    no_rescale = sparsify.della_sparsify(x, 0.5, 0.2, generator=torch.Generator().manual_seed(0), rescale=False)
    assert torch.equal(no_rescale != 0, kept)
    torch.testing.assert_close(no_rescale[kept], x[kept])


@pytest.mark.parametrize("name,consensus", [("della", True), ("della_linear", False)])
def test_della_formula(name, consensus):
    base = rnd(8, 8, seed=11)
    models = [base + rnd(8, 8, seed=12 + i) for i in range(2)]
    w, dens, eps = [0.6, 0.9], [0.5, 0.7], [0.1, 0.2]
    gen = torch.Generator().manual_seed(5)
    sparse = [sparsify.della_sparsify(m - base, d, e, generator=gen).numpy() for m, d, e in zip(models, dens, eps)]
    normalize = consensus
    out = call(name, models, base, seed=5, weight=w, density=dens, epsilon=eps)
    if consensus:
        exp = _np_ties(sparse, w, base.numpy(), normalize, 1.0)
    else:
        exp = base.numpy() + sum(wi * s for wi, s in zip(w, sparse))
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- model stock


def test_model_stock_t_formula_and_guard():
    c = torch.tensor([0.0, 0.5, 1.0, -0.5, -1.0])
    t = averaging.model_stock_t(c, 3)
    torch.testing.assert_close(t, torch.tensor([0.0, 1.5 / 2.0, 1.0, 0.0, 0.0]))


def test_model_stock_known_angle():
    base = torch.zeros(2)
    a = 0.6
    t1 = torch.tensor([1.0, 0.0])
    t2 = 2.0 * torch.tensor([math.cos(a), math.sin(a)])
    out = call("model_stock", [base + t1, base + t2], base)
    c = math.cos(a)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, t * (t1 + t2) / 2)
    # opposite task vectors: cos = -1 = -1/(N-1), the singular point -> the base, finite
    out = call("model_stock", [base + t1, base - t1], base)
    torch.testing.assert_close(out, base)
    # identical fine-tunes: cos = 1, t = 1 -> the fine-tune
    out = call("model_stock", [base + t2, base + t2, base + t2], base)
    torch.testing.assert_close(out, t2)


def test_model_stock_filter_wise_rows():
    base = rnd(2, 3, seed=13)
    d1 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    d2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # row cos: 1/sqrt2 and 0
    out = call("model_stock", [base + d1, base + d2], base, filter_wise=True)
    c = 1 / math.sqrt(2)
    exp = base.clone()
    exp[0] += (2 * c / (1 + c)) * (d1[0] + d2[0]) / 2
    torch.testing.assert_close(out, exp)


# ----------------------------------------------------------------------------- spherical


def test_nuslerp_orthogonal_flattened():
    e0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e1 = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    out = call("nuslerp", [e0, e1], None, weight=[1.0, 3.0])  # t = 0.75
    t = 0.75
    torch.testing.assert_close(out, math.cos(t * math.pi / 2) * e0 + math.sin(t * math.pi / 2) * e1)
    out = call("nuslerp", [e0, e1], None, weight=[1.0, 0.0])
    torch.testing.assert_close(out, e0)


def test_nuslerp_per_row_and_per_column():
    v0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    v1 = torch.tensor([[0.0, 1.0], [4.0, 0.0]])  # row 0 orthogonal, row 1 colinear -> lerp
    out = call("nuslerp", [v0, v1], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(out, torch.tensor([[s, s], [3.0, 0.0]]))
    out_cols = call("nuslerp", [v0.T.contiguous(), v1.T.contiguous()], None, weight=[1.0, 1.0],
                    nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(out_cols, out.T)


def _np_slerp(t, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    th = np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def test_base_optional_registration():
    for name in ("nuslerp", "multislerp"):
        spec = get_method(name)
        assert spec.base_optional and spec.takes_deltas and not spec.needs_base
        assert spec.uses_base(True) and not spec.uses_base(False)
    assert get_method("ties").uses_base(False) and not get_method("linear").uses_base(True)
    from evomerge.merge.registry import MergeMethod

    with pytest.raises(ValueError, match="takes_deltas needs a base"):
        MergeMethod("x", fn=lambda *a, **k: None, needs_base=False, takes_deltas=True)
    with pytest.raises(ValueError, match="exclude each other"):
        MergeMethod("x", fn=lambda *a, **k: None, needs_base=True, base_optional=True)


def test_nuslerp_with_base_slerps_task_vectors():
    """mergekit's task-vector mode: θ0 + slerp(t, θ_0 − θ0, θ_1 − θ0), against a direct computation."""
    base = rnd(3, 4, seed=14)
    a, b = rnd(3, 4, seed=15), rnd(3, 4, seed=16)
    out = call("nuslerp", [base + a, base + b], base, weight=[1.0, 3.0])  # t = 0.75
    exp = base.numpy().reshape(-1) + _np_slerp(0.75, a.numpy().reshape(-1), b.numpy().reshape(-1))
    np.testing.assert_allclose(out.numpy().reshape(-1), exp, rtol=1e-5, atol=1e-5)
    # per row (nuslerp_flatten: false): each row of the task matrices slerped on its own
    out = call("nuslerp", [base + a, base + b], base, weight=[1.0, 1.0], nuslerp_flatten=False)
    for r in range(3):
        exp = base[r].numpy() + _np_slerp(0.5, a[r].numpy(), b[r].numpy())
        np.testing.assert_allclose(out[r].numpy(), exp, rtol=1e-5, atol=1e-5)
    # the task vectors, not the models, are interpolated: differs from the base-free slerp
    assert not torch.allclose(out, call("nuslerp", [base + a, base + b], None, weight=[1.0, 1.0],
                                        nuslerp_flatten=False), atol=1e-3)
    # the method function itself takes the task vectors when given a base (takes_deltas)
    torch.testing.assert_close(spherical.nuslerp([a, b], base, weight=[1.0, 3.0]),
                               base + spherical.nuslerp([a, b], None, weight=[1.0, 3.0]))


def _np_multislerp(xs, w):
    x = np.stack([v.reshape(-1) for v in xs]).astype(np.float64)
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    nrm = np.linalg.norm(x, axis=1)
    u = x / nrm[:, None]
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    tang = (w[:, None] * (u - (u @ m)[:, None] * m[None, :])).sum(0)
    tn = np.linalg.norm(tang)
    return (np.cos(tn) * m + np.sin(tn) * tang / tn) * (w * nrm).sum()


def test_multislerp_formula_and_symmetric_midpoint():
    xs = [rnd(4, 3, seed=17 + i) for i in range(3)]
    w = [0.2, 0.5, 0.3]
    out = call("multislerp", xs, None, weight=w)
    np.testing.assert_allclose(out.numpy().reshape(-1), _np_multislerp([x.numpy() for x in xs], w), rtol=1e-5, atol=1e-6)
    # two orthogonal vectors, equal weights -> the normalised midpoint times the mean norm
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = call("multislerp", [e0, e1], None, weight=[1.0, 1.0])
    torch.testing.assert_close(out, 2.0 * torch.tensor([1.0, 1.0]) / math.sqrt(2))
    with pytest.raises(EvomergeError):
        call("multislerp", [e0, -e0, e0], None, weight=[1.0, 2.0, 1.0])  # directions cancel


def test_multislerp_with_base_interpolates_task_vectors():
    base = rnd(4, 3, seed=30)
    taus = [rnd(4, 3, seed=31 + i) for i in range(3)]
    w = [0.2, 0.5, 0.3]
    out = call("multislerp", [base + t for t in taus], base, weight=w)
    exp = base.numpy().reshape(-1) + _np_multislerp([t.numpy() for t in taus], w)
    np.testing.assert_allclose(out.numpy().reshape(-1), exp, rtol=1e-5, atol=1e-5)
    # one model: base + τ = the model
    torch.testing.assert_close(call("multislerp", [base + taus[0]], base, weight=[0.7]), base + taus[0])
    # a tensor no fine-tune changed (all task vectors zero) gives the base (mergekit raises for >= 3)
    out = call("multislerp", [base.clone() for _ in range(3)], base, weight=w)
    assert torch.equal(out, base)
    # one unchanged model among others: its zero vector only contributes its (zero) norm
    out = call("multislerp", [base.clone(), base + taus[1]], base, weight=[0.5, 0.5])
    torch.testing.assert_close(out, base + 0.5 * taus[1], rtol=1e-5, atol=1e-5)


def test_karcher_on_a_great_circle():
    # points on a circle (angles 0, 0.4, 1.0) embedded by a random orthogonal map in R^6
    q, _ = torch.linalg.qr(rnd(6, 6, seed=20).double())
    angles, norms, w = [0.0, 0.4, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 1.0]
    xs = [(nm * (math.cos(a) * q[:, 0] + math.sin(a) * q[:, 1])).float() for a, nm in zip(angles, norms)]
    out = call("karcher", xs, None, weight=w)
    phi = sum(wi * a for wi, a in zip(w, angles)) / sum(w)  # exact Fréchet mean on a circle arc
    scale = sum(wi * nm for wi, nm in zip(w, norms)) / sum(w)
    exp = (scale * (math.cos(phi) * q[:, 0] + math.sin(phi) * q[:, 1])).float()
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    # differs from the one-step multislerp rule when weights are unequal
    assert not torch.allclose(call("multislerp", xs, None, weight=w), exp, atol=1e-4)
    # zero tensors: skipped in the direction, counted in the norm
    z = call("karcher", [xs[0], torch.zeros(6)], None, weight=[1.0, 1.0])
    torch.testing.assert_close(z, 0.5 * xs[0])


# ----------------------------------------------------------------------------- SCE, nearswap


def _np_sce(deltas, topk):
    d = np.stack(deltas).astype(np.float64)
    if topk < 1:
        var = d.var(0).reshape(-1)
        k = int(topk * np.count_nonzero(var))
        mask = np.zeros(var.shape, bool)
        mask[np.argsort(-var)[:k]] = True
        d = d * mask.reshape(d.shape[1:])
    msq = (d ** 2).reshape(len(d), -1).mean(1)
    w = msq / msq.sum()
    sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
    m = np.sign(d) == sign
    num = (w[:, None] * (d * m).reshape(len(d), -1)).sum(0)
    den = (w[:, None] * m.reshape(len(d), -1)).sum(0)
    den[den == 0] = 1
    return (num / den).reshape(d.shape[1:])


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_formula(topk):
    base = rnd(6, 6, seed=21)
    models = [base + (1 + i) * rnd(6, 6, seed=22 + i) for i in range(3)]
    out = call("sce", models, base, select_topk=topk)
    exp = base.numpy() + _np_sce([(m - base).numpy() for m in models], topk)
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-5, atol=1e-5)


def test_sce_tiny_topk_keeps_one_position():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 0.0, 0.0, 0.2]), torch.tensor([-1.0, 0.0, 0.0, 0.1])]
    out = call("sce", models, base, select_topk=0.1)  # int(0.1 * 2) = 0 -> kept 1 position
    assert int((out != 0).sum()) == 1 and out[0] != 0


def test_nearswap_formula():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0])
    other = torch.tensor([0.0, 1.05, 3.0, 2.0])
    out = call("nearswap", [other], base, t=0.1)
    lw = torch.tensor([1.0, 1.0, 0.1, 0.1])
    torch.testing.assert_close(out, base + lw * (other - base))
    with pytest.raises(EvomergeError):
        call("nearswap", [other], base, t=0.0)


# ----------------------------------------------------------------------------- SVD-based


def _np_tsv(deltas, k, lam=1.0):
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d.astype(np.float64), full_matrices=False)
        us.append(u[:, :k]); ss.append(s[:k]); vs.append(vh[:k])
    U, _ = polar(np.concatenate(us, 1))
    V, _ = polar(np.concatenate(vs, 0).T)
    return lam * U @ np.diag(np.concatenate(ss)) @ V.T


def test_tsv_against_formula():
    base = rnd(12, 9, seed=30)
    models = [base + rnd(12, 9, seed=31 + i) for i in range(3)]
    out = call("tsv", models, base, **{"lambda": 0.7})
    exp = base.numpy() + _np_tsv([(m - base).numpy() for m in models], k=3, lam=0.7)  # r = 9, k = 9 // 3
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-4, atol=1e-4)
    out = call("tsv", models, base, rank_fraction=0.2)  # k = int(9 * 0.2) = 1
    exp = base.numpy() + _np_tsv([(m - base).numpy() for m in models], k=1)
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-4, atol=1e-4)


def test_tsv_orthogonal_low_rank_tasks_reduce_to_task_arithmetic():
    q1, _ = torch.linalg.qr(rnd(10, 10, seed=32))
    q2, _ = torch.linalg.qr(rnd(8, 8, seed=33))
    # task i lives in its own singular subspace, rank 2 <= k = 8 // 3 = 2
    taus = [q1[:, 2 * i:2 * i + 2] @ torch.diag(torch.tensor([3.0 + i, 1.0])) @ q2[:, 2 * i:2 * i + 2].T
            for i in range(3)]
    base = rnd(10, 8, seed=34)
    out = call("tsv", [base + t for t in taus], base)
    torch.testing.assert_close(out, base + sum(taus), rtol=1e-4, atol=1e-5)


def test_iso_c_isotropic_spectrum():
    base = rnd(7, 5, seed=35)
    models = [base + rnd(7, 5, seed=36 + i) for i in range(3)]
    w = [1.0, 0.5, 2.0]
    out = call("iso_c", models, base, weight=w, **{"lambda": 1.3})
    total = sum(wi * (m - base).double().numpy() for wi, m in zip(w, models))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    np.testing.assert_allclose(out.numpy(), base.numpy() + 1.3 * s.mean() * u @ vh, rtol=1e-4, atol=1e-4)
    sv = np.linalg.svd((out - base).double().numpy(), compute_uv=False)
    np.testing.assert_allclose(sv, np.full(5, 1.3 * s.mean()), rtol=1e-4)


def _np_iso_cts(deltas, frac):
    T = len(deltas)
    total = sum(deltas)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    r = len(s)
    k = int(r * frac)
    per = round((r - k) / T)
    k = r - T * per
    us, ss, vs = [], [], []
    for d in deltas:
        res = d - u[:, :k] @ u[:, :k].T @ d
        ut, st, vht = np.linalg.svd(res, full_matrices=False)
        us.append(ut[:, :per]); ss.append(st[:per]); vs.append(vht[:per])
    U, _ = polar(np.concatenate(us + [u[:, :k]], 1))
    V, _ = polar(np.concatenate(vs + [vh[:k]], 0).T)
    return np.concatenate(ss + [s[:k]]).mean() * U @ V.T


def test_iso_cts_against_formula_and_reduces_to_iso_c():
    base = rnd(16, 12, seed=40)
    models = [base + rnd(16, 12, seed=41 + i) for i in range(3)]
    deltas = [(m - base).double().numpy() for m in models]
    out = call("iso_cts", models, base, common_space_fraction=0.5)  # r = 12: k = 6 -> s = 2, k = 6
    np.testing.assert_allclose(out.numpy(), base.numpy() + _np_iso_cts(deltas, 0.5), rtol=1e-4, atol=1e-4)
    sv = np.linalg.svd((out - base).double().numpy(), compute_uv=False)
    assert np.ptp(sv) < 1e-4 * sv.mean()  # isotropic
    torch.testing.assert_close(call("iso_cts", models, base, common_space_fraction=1.0), call("iso_c", models, base))


def test_iso_cts_sizes():
    assert spectral.iso_cts_sizes(768, 8, 0.8) == (616, 19)  # k = 614, s = round(154 / 8)
    assert spectral.iso_cts_sizes(12, 3, 0.5) == (6, 2)
    assert spectral.iso_cts_sizes(2, 3, 0.0) == (2, 0)  # the reference would give k = -1 here
    k, s = spectral.iso_cts_sizes(5, 2, 0.3)
    assert k + 2 * s == 5 and k >= 0


def test_svd_methods_1d_fallback_is_mean_task_vector():
    base = rnd(9, seed=50)
    models = [base + rnd(9, seed=51 + i) for i in range(3)]
    mean = sum(m - base for m in models) / 3
    for name in ("tsv", "iso_c", "iso_cts"):
        torch.testing.assert_close(call(name, models, base, **{"lambda": 2.0}), base + 2.0 * mean)


def test_svd_methods_reshape_nd_tensors():
    base = rnd(4, 3, 2, seed=60)
    models = [base + rnd(4, 3, 2, seed=61 + i) for i in range(2)]
    out = call("iso_c", models, base)
    flat = call("iso_c", [m.reshape(4, 6) for m in models], base.reshape(4, 6))
    torch.testing.assert_close(out, flat.reshape(4, 3, 2))


def test_docs_table_lists_every_method():
    from pathlib import Path

    from evomerge.merge.registry import method_names

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    for name in method_names():
        assert f"| `{name}` |" in text, name


def _documented_params(cell: str) -> dict[str, str]:
    """``**weight**, density=1`` -> {"weight": "REQUIRED", "density": "1"} ("—": none)."""
    out = {}
    for part in [] if cell.strip() in ("—", "") else cell.split(", "):
        part = part.strip()
        if part.startswith("**"):
            out[part.strip("*")] = "REQUIRED"
        else:
            k, _, v = part.partition("=")
            out[k] = v
    return out


def _default_text(v) -> str:
    if v is REQUIRED:
        return "REQUIRED"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v
    return f"{v:g}".replace("e-0", "e-") if v is not None else "auto"


def test_docs_state_the_registered_defaults():
    """docs/methods.md and README's method table give each method's parameters with the defaults
    the registry declares (the code states them once; the docs follow)."""
    from pathlib import Path

    from evomerge.merge.registry import method_names

    repo = Path(__file__).resolve().parents[1]
    docs_rows, readme_rows = {}, {}
    for rows, path in ((docs_rows, repo / "docs" / "methods.md"), (readme_rows, repo / "README.md")):
        for line in path.read_text().splitlines():
            if line.startswith("| `"):  # the first table naming a method is the method table
                rows.setdefault(line.split(" | ")[0].strip("| `"), line.split(" | "))
    for name in method_names():
        spec = get_method(name)
        want_model = {k: _default_text(v) for k, v in spec.model_params.items()}
        want_global = {k: _default_text(v) for k, v in spec.global_params.items()}
        row = docs_rows[name]
        got_model, got_global = _documented_params(row[2]), _documented_params(row[3])
        per_model, _, method_level = readme_rows[name][1].partition("; ")
        if not per_model.startswith("per model: "):  # no per-model parameters
            per_model, method_level = "—", readme_rows[name][1]
        readme_model = _documented_params(per_model.removeprefix("per model: "))
        readme_global = _documented_params(method_level)
        for got in (got_model, readme_model):
            assert got == want_model, (name, got, want_model)
        for got in (got_global, readme_global):
            assert {k: v for k, v in got.items() if want_global.get(k) != "auto"} == \
                   {k: v for k, v in want_global.items() if v != "auto"}, (name, got, want_global)
            assert got.keys() == want_global.keys(), (name, got, want_global)


def test_docs_family_table_matches_the_variants():
    """docs/methods.md's task-arithmetic table (sign election, normalize default) is the code's
    table of variants, and names every member."""
    import re
    from pathlib import Path

    from evomerge.merge.methods.task_arithmetic import VARIANTS

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    table = text.split("| method | sparsifier `S` | sign election | normalize |", 1)[1].split("\n\n", 1)[0]
    seen = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        signs, norms = cells[2].split(" / "), cells[3].split(" / ")
        for i, name in enumerate(names):
            v = VARIANTS[name]
            assert (v.sign_election is not None) == ((signs[i] if len(signs) > 1 else signs[0]) == "yes"), name
            assert str(v.normalize).lower() == (norms[i] if len(norms) > 1 else norms[0]), name
            assert (v.sparsifier is None) == cells[1].startswith("none"), name
            seen.add(name)
    assert seen == set(VARIANTS)


# ----------------------------------------------------------------------------- on real (tiny) Llama checkpoints


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_llama import make_base, make_variant

    root = tmp_path_factory.mktemp("tiny_extra")
    base = make_base(root / "base", num_layers=2)
    return {"base": base, **{k: make_variant(base, root / k, seed=s) for k, s in (("a", 1), ("b", 2), ("c", 3))}}


def _merged(fam, method, models, parameters=None, base=True):
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    d = {"merge_method": method, "models": [{"model": str(fam[k]), "parameters": p} for k, p in models],
         "parameters": parameters or {}}
    if base:
        d["base_model"] = str(fam["base"])
    rec = MergeRecipe.from_dict(d)
    paths = [fam["base"]] + [fam[k] for k, _ in models]
    return dict(InMemoryMerger(paths).merged_tensors(rec))


def _state(path):
    from evomerge.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return {n: r.get(n).float() for n in r.tensor_names()}


def _close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for n in want:
        assert torch.isfinite(got[n]).all(), n
        torch.testing.assert_close(got[n].float(), want[n], rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("method,params,model_params", [
    ("breadcrumbs", {}, {"weight": 1.0}),
    ("breadcrumbs_ties", {}, {"weight": 1.0}),
    ("della", {}, {"weight": 1.0}),
    ("della_linear", {}, {"weight": 1.0}),
    ("sce", {}, {}),
    ("nearswap", {"t": 1e6}, {}),
    ("tsv", {"rank_fraction": 1.0}, {}),
])
def test_model_endpoint_single_fine_tune_gives_it_back(fam, method, params, model_params):
    _close(_merged(fam, method, [("a", model_params)], params), _state(fam["a"]), atol=1e-4)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher"])
def test_model_endpoint_spherical_weights_one_zero(fam, method):
    got = _merged(fam, method, [("a", {"weight": 1.0}), ("b", {"weight": 0.0})], base=False)
    _close(got, _state(fam["a"]), atol=1e-4)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv"])
def test_model_endpoint_lambda_zero_gives_base(fam, method):
    got = _merged(fam, method, [("a", {}), ("b", {})], {"lambda": 0.0})
    _close(got, _state(fam["base"]))


@pytest.mark.parametrize("method,params,model_params", [
    ("breadcrumbs", {}, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
    ("breadcrumbs_ties", {}, {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
    ("della", {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ("della_linear", {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ("model_stock", {"filter_wise": True}, {}),
    ("multislerp", {}, {"weight": 1.0}),
    ("karcher", {}, {}),
    ("sce", {"select_topk": 0.5}, {}),
    ("tsv", {}, {}),
    ("iso_c", {"lambda": 0.5}, {}),
    ("iso_cts", {"lambda": 0.5}, {}),
])
def test_model_three_way_merge_loads_and_runs(fam, method, params, model_params):
    from _tiny_llama import load_model

    got = _merged(fam, method, [(k, dict(model_params)) for k in ("a", "b", "c")], params,
                  base=method not in ("multislerp", "karcher"))
    model = load_model(fam["base"])
    sd = model.state_dict()
    with torch.no_grad():
        for n, t in got.items():
            assert torch.isfinite(t).all(), n
            sd[n].copy_(t)
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method,model_params", [("della", {"weight": 0.7, "density": 0.6}), ("iso_cts", {}),
                                                 ("breadcrumbs_ties", {"weight": 0.7, "density": 0.6})])
def test_disk_and_in_memory_identical(fam, tmp_path, method, model_params):
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.recipe import MergeRecipe

    rec = MergeRecipe.from_dict({"merge_method": method, "base_model": str(fam["base"]), "seed": 7,
                                 "models": [{"model": str(fam[k]), "parameters": model_params} for k in ("a", "b")]})
    from evomerge.merge.engine import InMemoryMerger

    disk = _state(merge_to_disk(rec, tmp_path / "o"))
    mem = dict(InMemoryMerger([fam["base"], fam["a"], fam["b"]]).merged_tensors(rec))  # same seed, same masks
    for n, t in disk.items():
        assert torch.equal(mem[n], t), n
    cached = InMemoryMerger([fam["base"], fam["a"], fam["b"]], magnitude_cache=True)
    for _ in range(2):  # first call sorts, second indexes
        mem = dict(cached.merged_tensors(rec))
        for n, t in disk.items():
            assert torch.equal(mem[n], t), n


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_base_optional_with_base_model_disk_memory_and_formula(fam, tmp_path, method):
    """nuslerp / multislerp with a base_model: task-vector mode through the engine, a model entry
    naming the base is dropped (as in mergekit), disk == in-memory bit for bit, and each tensor
    equals the method applied to θ_i − θ0 and added to θ0."""
    from evomerge.merge.engine import InMemoryMerger, merge_to_disk
    from evomerge.merge.recipe import MergeRecipe

    keys = ("a", "b") if method == "nuslerp" else ("a", "b", "c")
    w = {"a": [0.2, 0.9], "b": 0.6, "c": 0.4}
    models = [{"model": str(fam[k]), "parameters": {"weight": w[k]}} for k in keys]
    models.append({"model": str(fam["base"]), "parameters": {"weight": 5.0}})  # the base: left out
    rec = MergeRecipe.from_dict({"merge_method": method, "base_model": str(fam["base"]), "models": models,
                                 "parameters": {"nuslerp_flatten": False} if method == "nuslerp" else {}})
    disk = _state(merge_to_disk(rec, tmp_path / "o"))
    merger = InMemoryMerger([fam["base"], *(fam[k] for k in keys)])
    other = MergeRecipe.from_dict({**rec.to_dict(), "models": [
        {"model": str(fam[k]), "parameters": {"weight": 0.5}} for k in keys]})
    dict(merger.merged_tensors(other))  # resident task vectors and the plan, built by another candidate
    mem = dict(merger.merged_tensors(rec))
    assert disk.keys() == mem.keys()
    for n, t in disk.items():
        assert torch.equal(mem[n], t), n
    assert any(k[0] == "d" for k in merger._cache)  # the resident merger cached task vectors
    s0, ss = _state(fam["base"]), {k: _state(fam[k]) for k in keys}
    for n in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        t = 1.0 if "layers.1" in n else None  # output-layer position of the gradient weight
        wn = [(w[k][0] + (w[k][1] - w[k][0]) * t if t is not None else w[k][0]) if isinstance(w[k], list) else w[k]
              for k in keys]
        exp = call(method, [ss[k][n] for k in keys], s0[n], weight=wn,
                   **({"nuslerp_flatten": False} if method == "nuslerp" else {}))
        assert not torch.equal(exp, call(method, [ss[k][n] for k in keys], None, weight=wn,
                                         **({"nuslerp_flatten": False} if method == "nuslerp" else {})))
        torch.testing.assert_close(disk[n], exp, rtol=0, atol=0)


def test_base_optional_endpoints_and_validation(fam):
    base = str(fam["base"])
    got = _merged(fam, "nuslerp", [("a", {"weight": 1.0}), ("b", {"weight": 0.0})])  # t = 0: θ0 + τ_a
    _close(got, _state(fam["a"]), atol=1e-5)
    got = _merged(fam, "multislerp", [("a", {"weight": 0.0}), ("b", {"weight": 1.0}), ("c", {"weight": 0.0})])
    _close(got, _state(fam["b"]), atol=1e-5)
    from evomerge.merge.recipe import MergeRecipe

    with pytest.raises(EvomergeError, match="exactly 2 model.*besides the base_model, got 1"):
        MergeRecipe.from_dict({"merge_method": "nuslerp", "base_model": base, "models": [
            {"model": base, "parameters": {"weight": 1.0}}, {"model": str(fam["a"]), "parameters": {"weight": 1.0}}]})
    # without base_model the same two entries are two models (no task vectors)
    MergeRecipe.from_dict({"merge_method": "nuslerp", "models": [
        {"model": base, "parameters": {"weight": 1.0}}, {"model": str(fam["a"]), "parameters": {"weight": 1.0}}]})


def test_svd_switch_by_filter_averages_embeddings(fam):
    params = {"svd": [{"filter": "embed_tokens", "value": False}, {"filter": "lm_head", "value": False},
                      {"value": True}]}
    got = _merged(fam, "iso_c", [("a", {}), ("b", {})], params)
    s0, sa, sb = _state(fam["base"]), _state(fam["a"]), _state(fam["b"])
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[n], s0[n] + ((sa[n] - s0[n]) + (sb[n] - s0[n])) / 2)
    n = "model.layers.0.self_attn.q_proj.weight"
    sv = torch.linalg.svdvals((got[n] - s0[n]).double())
    assert float(sv.max() - sv.min()) < 1e-4 * float(sv.mean())  # still isotropic


# ----------------------------------------------------------------------------- on the embedded zoo


ZOO_CASES = {  # method -> (per-model params, method params, endpoint: which model the merge must equal)
    "breadcrumbs": ({"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}, None),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}, None),
    "della": ({"weight": 0.5, "density": 0.7, "epsilon": 0.1}, {}, None),
    "della_linear": ({"weight": 0.5, "density": 0.7, "epsilon": 0.1}, {}, None),
    "model_stock": ({}, {}, None),
    "nuslerp": ({"weight": [1.0, 0.0]}, {}, 0),
    "multislerp": ({"weight": [0.0, 1.0]}, {}, 1),
    "karcher": ({"weight": [1.0, 0.0]}, {}, 0),
    "sce": ({}, {"select_topk": 0.5}, None),
    "nearswap": ({}, {"t": 1e9}, 0),
    "tsv": ({}, {}, None),
    "iso_c": ({}, {"lambda": 0.0}, "base"),
    "iso_cts": ({}, {"lambda": 0.0}, "base"),
}


@pytest.mark.parametrize("method", sorted(ZOO_CASES))
def test_zoo_merges_finite_with_expected_endpoints(zoo, method):
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    z = zoo
    experts = [z.experts[t] for t in z.expert_tasks[:2]]
    if method == "nearswap":
        experts = experts[:1]
    mp, gp, endpoint = ZOO_CASES[method]
    spec = get_method(method)
    models = []
    for i, e in enumerate(experts):
        p = {k: (v[i] if isinstance(v, list) else v) for k, v in mp.items()}
        models.append({"model": str(e), "parameters": p})
    d = {"merge_method": method, "models": models, "parameters": gp, "seed": 1}
    if spec.needs_base:
        d["base_model"] = str(z.base)
    got = dict(InMemoryMerger([z.base, *experts]).merged_tensors(MergeRecipe.from_dict(d)))
    for n, t in got.items():
        assert torch.isfinite(t).all(), n
    if endpoint is not None:
        want = _state(z.base if endpoint == "base" else experts[endpoint])
        _close(got, want, atol=1e-4)


def test_breadcrumbs_sorted_magnitude_cache_gives_the_same_bits():
    from evomerge.merge.methods.sparsify import SORTED_ABS_ATTR

    x = rnd(40, 25, seed=70)
    plain = sparsify.breadcrumbs_sparsify(x, 0.4, 0.05)
    y = x.clone()
    setattr(y, SORTED_ABS_ATTR, True)
    assert torch.equal(sparsify.breadcrumbs_sparsify(y, 0.4, 0.05), plain)
    assert isinstance(getattr(y, SORTED_ABS_ATTR), torch.Tensor)  # sorted once, reused
    assert torch.equal(sparsify.breadcrumbs_sparsify(y, 0.7, 0.01), sparsify.breadcrumbs_sparsify(x, 0.7, 0.01))


def test_tsv_weights_and_factor_cache():
    base = rnd(12, 9, seed=80)
    models = [base + rnd(12, 9, seed=81 + i) for i in range(3)]
    deltas = [m - base for m in models]
    w = [0.5, 2.0, 1.0]
    out = spectral.tsv(deltas, base, weight=w)
    exp = base.numpy() + _np_tsv([(wi * d).numpy() for wi, d in zip(w, deltas)], k=3)
    np.testing.assert_allclose(out.numpy(), exp, rtol=1e-4, atol=1e-4)
    # opt-in factor cache on resident task vectors: same bits, reused across weight changes
    res = [d.clone() for d in deltas]
    for d in res:
        setattr(d, spectral.SVD_CACHE_ATTR, True)
    for ws in ([0.5, 2.0, 1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 1.0], [0.5, 2.0, 1.0]):
        got = spectral.tsv(res, base, weight=ws, **{"lambda": 0.9})
        assert torch.equal(got, spectral.tsv(deltas, base, weight=ws, **{"lambda": 0.9})), ws
    cache = getattr(res[0], spectral.SVD_CACHE_ATTR)
    assert isinstance(cache, dict) and cache["k"] == 3 and cache["polar"] is not None
    assert torch.equal(spectral.tsv(res, base, weight=[1, 1, 1], rank_fraction=0.2),
                       spectral.tsv(deltas, base, weight=[1, 1, 1], rank_fraction=0.2))
