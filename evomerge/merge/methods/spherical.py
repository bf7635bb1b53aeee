"""Spherical interpolation methods: ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``.

Every method is a pure function of float32 tensors with the signature of
:mod:`evomerge.merge.registry`. ``nuslerp`` and ``multislerp`` are ``base_optional`` +
``takes_deltas``: with a ``base_model`` they interpolate the task vectors ``τ_i = θ_i − θ_base``
and add the result to the base; without one they interpolate the model tensors.

Difference from mergekit: ``slerp`` returns the endpoint exactly at ``t = 0`` and ``t = 1``
(mergekit's formula gives the same values up to rounding); the others are documented at their
functions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.params import check_one_model, per_model
from evomerge.merge.registry import FRACTION, POSITIVE, REQUIRED, MergeMethod, ParamRange, register

__all__ = ["lerp", "slerp", "slerp_method", "nuslerp_pair", "nuslerp", "multislerp", "karcher_mean", "karcher"]

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


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


def slerp_method(tensors, base, *, generator=None, t):
    """SLERP between the base (``t = 0``) and the one other model (``t = 1``)."""
    check_one_model("slerp", tensors)
    return slerp(t, base, tensors[0])


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
    w0, w1 = per_model("weight", weight, 2)
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
    w = torch.tensor(per_model("weight", weight, n), dtype=torch.float64)
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
    return karcher_mean(tensors, per_model("weight", weight, len(tensors)), max_iter=int(max_iter), tol=float(tol))


# ----------------------------------------------------------------------------- registration


register(MergeMethod(
    name="slerp", fn=slerp_method, needs_base=True, min_models=1, max_models=1,
    global_params={"t": REQUIRED}, ranges={"t": FRACTION},
    reference="Shoemake 1985; mergekit slerp",
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
