"""Folding a path's input scales into the weights, and the tensors of the folded model.

Folding the scales into the weights (supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3``;
anything else is refused with :class:`DataflowError`).
These are pre-norm blocks whose only reads of the residual stream go through RMSNorm::

    n(h)  = w * h / sqrt(mean(h^2) + eps)           (RMSNorm, weight w)
    f(h)  = u + Mlp(n2(u)),   u = h + Attn(n1(h))   (one decoder layer)

``Attn`` ends in ``o_proj`` and ``Mlp`` in ``down_proj``; both are affine in their weights
(bias included if the config has one). Write ``f^(c)`` for the same layer with ``o_proj``
and ``down_proj`` (weight and bias) divided by ``c``. With ``eps = 0``, ``n(c h) = n(h)``
for ``c > 0``, so::

    f(c h) = c h + Attn(n1(h))                         = c (h + Attn(n1(h)) / c) = c u'
             + Mlp(n2(c u')) = c u' + Mlp(n2(u'))      = c (u' + Mlp(n2(u')) / c)
    =>  f(c h) = c * f^(c)(h)

The DFS forward pass is ``h_0 = embed(x)``, ``h_k = f_k(s_k h_{k-1})``, logits from
``lm_head(norm(h_K))``. Let ``C_k = s_1 s_2 ... s_k`` (cumulative scale) and
``g_k = f_k^(C_k)(g_{k-1})``, ``g_0 = h_0``. By induction ``h_k = C_k g_k``:
``h_k = f_k(s_k C_{k-1} g_{k-1}) = f_k(C_k g_{k-1}) = C_k f_k^(C_k)(g_{k-1}) = C_k g_k``.
Finally ``norm(h_K) = norm(C_K g_K) = norm(g_K)``. So the folded model -- layer ``k`` with
``o_proj`` and ``down_proj`` divided by the cumulative scale ``C_k``, nothing else changed --
gives the same logits as the explicit-scale forward pass, with no custom modeling code.
Qwen3's q_norm/k_norm act on projections of ``n1(h)`` and change nothing above.

The eps effect: with eps > 0, ``n(c g) = w g / sqrt(mean(g^2) + eps / c^2)``: the reference
(stream ``C_k g``) normalises with an effective ``eps / C_k^2`` where the folded model uses
``eps``. Each norm's output differs by the factor ``sqrt((ms + eps/C^2) / (ms + eps))``
(``ms = mean(g^2)`` per token), i.e. relatively by about ``eps |1 - 1/C^2| / (2 ms)`` --
negligible for real models (ms >> eps), visible for tiny random models whose residual stream
is ~1e-3 in size, exactly zero for ``C = 1`` and for ``eps = 0``. Since eps is one config value
for every layer it cannot be folded exactly; this is the only approximation. Measured on tiny
random Llamas (float32, a 6-step path with scales 0.6..1.9, max |logit| ~3.8 with weight init 0.2,
~0.35 with init 0.02): eps = 0 -> max |logit diff| 1.6e-6 / 9e-8 (rounding); eps = 1e-6 ->
2.7e-6 (stream ms ~4e-2) / 2.4e-4 (stream ms ~4e-4); eps = 1e-5 -> 1.3e-5 / 2.3e-3. The error
grows with eps / ms as derived, and a reference whose norms use eps * C_k^2 matches the folded
model to < 1e-6 (tests/test_dataflow.py::test_eps_is_the_only_difference).

Refused (:class:`~evomerge.dataflow.path.DataflowError`): non-positive / non-finite scales, cumulative scales outside
``[1e-18, 1e18]`` (the reference stream itself would be meaningless in float32), folded
weights that overflow the dtype, layer indexes out of range, sources whose layers are not
interchangeable (hidden size, heads, rope, eps, activation, ... differ).

:func:`iter_tensors` is the one per-tensor function behind both the in-memory candidates
(:class:`~evomerge.dataflow.build.DataflowBuilder`) and the checkpoint on disk
(:func:`~evomerge.dataflow.build.write_dataflow_checkpoint`), so the two are bit-identical.
"""

from __future__ import annotations

import copy as _copy
from typing import TYPE_CHECKING, Any, Iterator

from evomerge.dataflow.path import DataflowError, DataflowPath, cumulative_scales
from evomerge.dataflow.sources import LAYER_RE, Source, layer_tensor_names

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Plan", "fold_tensor", "make_plan", "out_config", "iter_specs", "iter_tensors"]

Plan = list[tuple[Source, int, float]]
"""One entry per step: (source model, its layer index, cumulative scale ``C_k``)."""

_FOLDED_SUFFIXES = (
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
)


def fold_tensor(name_suffix: str, t: "torch.Tensor", cum: float, where: str) -> "torch.Tensor":
    """The per-tensor function shared by the in-memory and the on-disk paths."""
    import torch

    if cum == 1.0 or not name_suffix.endswith(_FOLDED_SUFFIXES):
        return t
    if t.dtype in (torch.float32, torch.float64):
        out = t / cum
    else:
        out = (t.to(torch.float32) / cum).to(t.dtype)
    # fp32 / bf16 / fp64 share float32's exponent range or more: with 1e-18 <= cum <= 1e18 (checked in
    # cumulative_scales) finite weights cannot overflow, so only float16 needs the (costly) check.
    if t.dtype == torch.float16 and not bool(torch.isfinite(out).all()):
        raise DataflowError(f"{where}: dividing by cumulative scale {cum:.3g} overflows {t.dtype}")
    return out


def make_plan(path: DataflowPath, a: Source, b: Source) -> Plan:
    """The steps of ``path`` resolved to (source, layer, cumulative scale); checks the layer indexes."""
    if not isinstance(path, DataflowPath):
        raise DataflowError(f"expected a DataflowPath, got {type(path).__name__}")
    cums = cumulative_scales(path)
    out: Plan = []
    for k, (st, c) in enumerate(zip(path, cums)):
        src = a if st.model == "A" else b
        if st.layer >= src.num_layers:
            raise DataflowError(
                f"dataflow path step {k}: {st.model}{st.layer} but model {st.model} has {src.num_layers} layers"
            )
        out.append((src, st.layer, c))
    return out


def out_config(a: Source, plan: Plan, path: DataflowPath) -> dict[str, Any]:
    """A's config.json for the folded model: ``num_hidden_layers`` = path length, ``layer_types``
    re-mapped per step when present."""
    cfg = _copy.deepcopy(a.config)
    cfg["num_hidden_layers"] = len(plan)
    if a.layer_types is not None or any(src.layer_types is not None for src, _, _ in plan):
        lts = []
        for src, l, _ in plan:
            lts.append(src.layer_types[l] if src.layer_types is not None else "full_attention")
        cfg["layer_types"] = lts
    if cfg.get("model_type") == "qwen2" and "max_window_layers" in cfg:
        # layer_types above is authoritative; keep max_window_layers consistent with "no override"
        cfg["max_window_layers"] = min(int(cfg["max_window_layers"]), len(plan))
    return cfg


def iter_specs(a: Source, b: Source, plan: Plan) -> Iterator[tuple[str, tuple[int, ...], "torch.dtype"]]:
    """(output name, shape, dtype) in the order of :func:`iter_tensors`, without reading data."""
    layer_names = {id(a): layer_tensor_names(a), id(b): layer_tensor_names(b)}
    for n in a.names():
        if not LAYER_RE.match(n):
            yield (n, *a.spec(n))
    for k, (src, l, _c) in enumerate(plan):
        for suf in layer_names[id(src)].get(l, []):
            yield (f"model.layers.{k}.{suf}", *src.spec(f"model.layers.{l}.{suf}"))


def iter_tensors(a: Source, b: Source, plan: Plan, dtype=None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(output name, tensor) for the folded model, one tensor at a time. ``dtype``: floating
    tensors are cast to it *before* folding (as the builder does), so disk == memory bitwise."""

    def cast(t):
        return t.to(dtype) if (dtype is not None and t.is_floating_point() and t.dtype != dtype) else t

    layer_names = {id(a): layer_tensor_names(a), id(b): layer_tensor_names(b)}
    for n in a.names():
        if not LAYER_RE.match(n):
            yield n, cast(a.get(n))
    for k, (src, l, c) in enumerate(plan):
        suffixes = layer_names[id(src)].get(l)
        if not suffixes:
            raise DataflowError(f"model {src.label}: no tensors for decoder layer {l} (model.layers.{l}.*)")
        for suf in suffixes:
            t = cast(src.get(f"model.layers.{l}.{suf}"))
            yield f"model.layers.{k}.{suf}", fold_tensor(suf, t, c, f"step {k} ({src.label}{l}) {suf}")
