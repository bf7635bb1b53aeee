"""Averages and interpolations of whole models and a copy: ``linear``, ``model_stock``,
``nearswap``, ``passthrough``.

Every method is a pure function of float32 tensors with the signature of
:mod:`evomerge.merge.registry`. ``model_stock`` and ``nearswap`` are registered with
``takes_deltas=True`` (they receive the task vectors ``τ_i = θ_i − θ_base``).

Differences from mergekit (documented at the functions): ``linear`` with ``normalize`` divides by
the weight sum only when ``|Σw| ≥ 1e-8`` (mergekit would produce inf/NaN), the same guard mergekit
applies in its task-arithmetic family; ``model_stock`` clamps the mean cosine to [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.params import check_one_model
from evomerge.merge.registry import POSITIVE, REQUIRED, MergeMethod, register

__all__ = ["WEIGHT_EPS", "weighted_sum", "linear", "model_stock_t", "model_stock", "nearswap", "passthrough"]

WEIGHT_EPS = 1e-8
"""A weight sum smaller than this in magnitude is not divided by."""


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ w_i · t_i`` accumulated in order (float32)."""
    out = tensors[0] * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=float(w))
    return out


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


def passthrough(tensors, base=None, *, generator=None, scale):
    """Copy the one model's tensor (multiplied by ``scale``; mergekit's passthrough)."""
    check_one_model("passthrough", tensors)
    s = float(scale[0])
    return tensors[0].clone() if s == 1.0 else tensors[0] * s


register(MergeMethod(
    name="linear", fn=linear, needs_base=False,
    model_params={"weight": REQUIRED}, global_params={"normalize": True},
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
))
register(MergeMethod(
    name="model_stock", fn=model_stock, needs_base=True, takes_deltas=True, min_models=2,
    global_params={"filter_wise": False},
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
))
register(MergeMethod(
    name="nearswap", fn=nearswap, needs_base=True, takes_deltas=True, min_models=1, max_models=1,
    global_params={"t": REQUIRED}, ranges={"t": POSITIVE},
    reference="alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card); mergekit nearswap",
))
register(MergeMethod(
    name="passthrough", fn=passthrough, needs_base=False, min_models=1, max_models=1,
    model_params={"scale": 1.0},
    reference="mergekit passthrough (frankenmerges via slices)",
))
