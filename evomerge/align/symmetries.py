"""Permutation symmetries of a Llama-style decoder (HF ``LlamaForCausalLM`` tensor names).

Three kinds of permutation leave the function a decoder computes unchanged:

- **residual**: one permutation of the hidden dimension shared by the whole residual stream:
  the columns of ``embed_tokens`` and ``lm_head``, every RMSNorm weight (RMS is invariant to
  reordering, the weight is elementwise), the input columns of q/k/v/gate/up, the output rows
  (and biases) of o_proj and down_proj. Tied embeddings are the same matrix under the same
  permutation, so they stay tied.
- **mlp.L**: the hidden units of layer L's MLP: rows of gate_proj and up_proj, columns of
  down_proj (the activation is elementwise).
- **attention.L**: the query heads of layer L, q/k/v/o together and respecting grouped-query
  attention: the key/value groups may be reordered, and the query heads inside a group among
  themselves (query head h reads kv head ``h // (heads / kv_heads)``, as HF's ``repeat_kv``).
  A head moves as a block of ``head_dim`` rows of q (and k, v for its group) and ``head_dim``
  columns of o_proj.

Not symmetries, left alone: the dimensions *inside* a q/k head (RoPE rotates fixed pairs of
dimensions at fixed frequencies, so reordering them changes the scores); the vocabulary (fixed
by the tokenizer). Permuting the dimensions inside a value head (v rows with the matching o
columns of every query head of its group) would be a symmetry too; it is not used here.

A permutation of a model is a ``dict`` group name -> 1-D ``LongTensor`` ``p`` meaning "new
index ``i`` holds old index ``p[i]``" (``torch.index_select`` semantics). For an attention
group, ``p`` is over query heads and must keep groups whole (:func:`check_permutations`); the
kv-head permutation follows from it (:func:`kv_permutation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from evomerge.errors import EvomergeError

RESIDUAL = "residual"
LLAMA_STYLE_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``model_type`` values whose decoder layers are the Llama block (same tensor names, RMSNorm,
elementwise MLP activation, RoPE on every head)."""

Permutations = dict[str, torch.Tensor]


def mlp_group(layer: int) -> str:
    return f"mlp.{layer}"


def attention_group(layer: int) -> str:
    return f"attention.{layer}"


@dataclass(frozen=True)
class Axis:
    """One tensor axis a permutation group acts on. ``unit``: ``"unit"`` (one index per entry),
    ``"head"`` (query heads, ``head_dim`` entries each) or ``"kv_head"`` (key/value heads)."""

    group: str
    unit: str = "unit"


@dataclass(frozen=True)
class LlamaLayout:
    """The sizes of a Llama-style decoder and, for every tensor, the group acting on each axis
    (``None``: an axis no permutation touches)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    axes: Mapping[str, tuple[Axis | None, ...]]

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def groups(self) -> list[str]:
        """Every permutation group, in a fixed order."""
        names = [RESIDUAL]
        for layer in range(self.num_layers):
            names += [attention_group(layer), mlp_group(layer)]
        return names

    def group_size(self, group: str) -> int:
        """Length of the group's permutation (query heads for attention groups)."""
        if group == RESIDUAL:
            return self.hidden_size
        return self.num_heads if group.startswith("attention.") else self.intermediate_size

    def unit_size(self, unit: str) -> int:
        """Tensor entries one permuted index moves along its axis."""
        return 1 if unit == "unit" else self.head_dim

    def tensors_of(self, group: str) -> list[tuple[str, int, str]]:
        """``(tensor name, axis, unit)`` of every place the group acts."""
        return [(name, k, ax.unit) for name, axes in self.axes.items()
                for k, ax in enumerate(axes) if ax is not None and ax.group == group]


_LAYER = r"model\.layers\.(\d+)\."


def _axes_of(name: str):
    """(layer or None, axes spec with group placeholders) for a known tensor name, else None."""
    R = Axis(RESIDUAL)
    fixed = {
        "model.embed_tokens.weight": (None, R),
        "lm_head.weight": (None, R),
        "model.norm.weight": (R,),
    }
    if name in fixed:
        return None, fixed[name]
    m = re.fullmatch(_LAYER + r"(.+)", name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    A, K, M = Axis(attention_group(layer), "head"), Axis(attention_group(layer), "kv_head"), Axis(mlp_group(layer))
    per_layer = {
        "input_layernorm.weight": (R,),
        "post_attention_layernorm.weight": (R,),
        "self_attn.q_proj.weight": (A, R), "self_attn.q_proj.bias": (A,),
        "self_attn.k_proj.weight": (K, R), "self_attn.k_proj.bias": (K,),
        "self_attn.v_proj.weight": (K, R), "self_attn.v_proj.bias": (K,),
        "self_attn.o_proj.weight": (R, A), "self_attn.o_proj.bias": (R,),
        "mlp.gate_proj.weight": (M, R), "mlp.gate_proj.bias": (M,),
        "mlp.up_proj.weight": (M, R), "mlp.up_proj.bias": (M,),
        "mlp.down_proj.weight": (R, M), "mlp.down_proj.bias": (R,),
        "self_attn.rotary_emb.inv_freq": (None,),
    }
    return (layer, per_layer[rest]) if rest in per_layer else None


def _config_int(config: Mapping, key: str, where: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EvomergeError(f"{where}: config.json field {key!r} is {value!r}; a Llama-style model needs a "
                            "positive integer there")
    return value


def llama_layout(config: Mapping, shapes: Mapping[str, Sequence[int]], where: str = "model") -> LlamaLayout:
    """The layout of a Llama-style checkpoint from its config.json and tensor shapes.

    Raises :class:`EvomergeError` naming ``where`` and the field or tensor when the model is not
    Llama-style (another ``model_type``, a tensor this module does not know, a shape that does not
    fit the config): permuting weights it does not understand could change the function."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_STYLE_MODEL_TYPES:
        raise EvomergeError(f"{where}: model_type {model_type!r} is not Llama-style; alignment knows the "
                            f"permutation symmetries of {', '.join(LLAMA_STYLE_MODEL_TYPES)} decoders only")
    hidden = _config_int(config, "hidden_size", where)
    heads = _config_int(config, "num_attention_heads", where)
    kv_heads = _config_int(config, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise EvomergeError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                            f"{kv_heads}")
    layout = LlamaLayout(
        num_layers=_config_int(config, "num_hidden_layers", where),
        hidden_size=hidden,
        intermediate_size=_config_int(config, "intermediate_size", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_config_int(config, "head_dim", where, default=hidden // heads),
        axes={},
    )
    axes: dict[str, tuple[Axis | None, ...]] = {}
    for name, shape in shapes.items():
        found = _axes_of(name)
        if found is None:
            raise EvomergeError(f"{where}: tensor {name!r} is not part of a Llama-style decoder; alignment "
                                "refuses models whose tensors it cannot permute safely")
        layer, spec = found
        if layer is not None and layer >= layout.num_layers:
            raise EvomergeError(f"{where}: tensor {name!r} is in layer {layer} but num_hidden_layers is "
                                f"{layout.num_layers}")
        _check_shape(name, tuple(shape), spec, layout, where)
        axes[name] = spec
    if "model.embed_tokens.weight" not in axes:
        raise EvomergeError(f"{where}: tensor 'model.embed_tokens.weight' is missing; not a Llama-style "
                            "checkpoint")
    return LlamaLayout(**{**layout.__dict__, "axes": axes})


def _check_shape(name: str, shape: tuple[int, ...], spec, layout: LlamaLayout, where: str) -> None:
    if name.endswith("inv_freq"):
        return
    if len(shape) != len(spec):
        raise EvomergeError(f"{where}: tensor {name!r} has shape {list(shape)}; expected {len(spec)} dimensions")
    for size, ax in zip(shape, spec):
        if ax is None:
            continue
        want = layout.group_size(ax.group) // (layout.heads_per_group if ax.unit == "kv_head" else 1)
        want *= layout.unit_size(ax.unit)
        if size != want:
            raise EvomergeError(f"{where}: tensor {name!r} has shape {list(shape)}, which does not fit "
                                f"config.json (expected {want} along the {ax.group} axis)")


def kv_permutation(head_perm: torch.Tensor, layout: LlamaLayout) -> torch.Tensor:
    """The key/value-head permutation implied by a query-head permutation."""
    g = layout.heads_per_group
    return head_perm[::g] // g


def axis_index(perm: torch.Tensor, unit: str, layout: LlamaLayout) -> torch.Tensor:
    """Entry indices along a tensor axis for a group permutation (heads expand to head_dim rows)."""
    if unit == "unit":
        return perm
    units = kv_permutation(perm, layout) if unit == "kv_head" else perm
    d = layout.head_dim
    return (units[:, None] * d + torch.arange(d)).reshape(-1)


def permute_tensor(name: str, tensor: torch.Tensor, layout: LlamaLayout, perms: Permutations,
                   skip_axis: int | None = None) -> torch.Tensor:
    """``tensor`` with every group permutation of ``perms`` applied along its axes (an exact
    gather: no arithmetic). ``skip_axis``: leave that axis as it is."""
    out = tensor
    for k, ax in enumerate(layout.axes[name]):
        if ax is None or k == skip_axis or ax.group not in perms:
            continue
        out = out.index_select(k, axis_index(perms[ax.group], ax.unit, layout))
    return out


def permute_model(tensors: Mapping[str, torch.Tensor], layout: LlamaLayout,
                  perms: Permutations) -> dict[str, torch.Tensor]:
    """Every tensor of a model permuted by ``perms`` (groups absent from ``perms``: identity)."""
    return {name: permute_tensor(name, t, layout, perms) for name, t in tensors.items()}


def identity_permutations(layout: LlamaLayout) -> Permutations:
    return {g: torch.arange(layout.group_size(g)) for g in layout.groups()}


def random_permutations(layout: LlamaLayout, generator: torch.Generator,
                        groups: Sequence[str] | None = None) -> Permutations:
    """Uniformly random allowed permutations of ``groups`` (default: all); attention groups
    reorder kv groups and the query heads inside each group."""
    perms = {}
    for group in groups if groups is not None else layout.groups():
        if group.startswith("attention."):
            g = layout.heads_per_group
            kv = torch.randperm(layout.num_kv_heads, generator=generator)
            perms[group] = torch.cat([kv[j] * g + torch.randperm(g, generator=generator)
                                      for j in range(layout.num_kv_heads)])
        else:
            perms[group] = torch.randperm(layout.group_size(group), generator=generator)
    return perms


def check_permutations(perms: Permutations, layout: LlamaLayout) -> None:
    """Raise ``ValueError`` unless every entry is a permutation of its group's size and every
    attention permutation keeps the query heads of a kv group together."""
    for group, p in perms.items():
        n = layout.group_size(group)
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise ValueError(f"permutation of group {group!r} is not a permutation of {n} indices")
        if group.startswith("attention."):
            g = layout.heads_per_group
            if not torch.equal(p.view(-1, g) // g, kv_permutation(p, layout)[:, None].expand(-1, g)):
                raise ValueError(f"permutation of group {group!r} splits a key/value group")


def invert(perms: Permutations) -> Permutations:
    """The inverse permutations: ``permute_model(permute_model(W, p), invert(p)) == W``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Permutations, then: Permutations) -> Permutations:
    """The permutation that applies ``first`` and then ``then`` (same groups in both)."""
    return {g: first[g][then[g]] for g in first}
