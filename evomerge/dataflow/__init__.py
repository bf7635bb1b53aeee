"""Layer-dataflow (DFS) recipes: which decoder layers a token passes through, in which order,
with which input scale -- materialised as an ordinary checkpoint.

This is the data-flow search space of Sakana AI's evolutionary model merging (arXiv 2403.13187):

* Two models A and B with ``M = L_A + L_B`` decoder layers in total are laid out in order
  (A's layers, then B's) and the layout is repeated ``r`` times: ``T = M * r`` slots.
* An indicator per slot: the slot's layer is on the path when the indicator is > 0.
* A scale matrix ``W`` (M x M): ``W[i, j]`` multiplies the input of layer ``j`` when the
  previous layer on the path is layer ``i`` (layers numbered 0..M-1, A's first).
  The first layer on the path reads the embeddings with scale 1 (there is no predecessor;
  the embeddings come from A, whose first layers were trained on exactly that magnitude).
* Embeddings, final norm and lm_head come from model A (so do the tokenizer files).

Genome encoding (a vector in ``[0, 1]^dim`` for a CMA-ES that searches the unit cube):

* ``x[:T]`` are the indicators; the paper's indicator is ``I = 2x - 1``, so a slot is kept
  when ``x > 0.5``. Values outside [0, 1] are clipped.
* ``x[T:]`` are the scales. ``scale_mode="matrix"`` (the paper): M*M genes, row-major
  ``W[i, j]``. ``"layer"``: M genes, one input scale per layer regardless of the predecessor
  (a much smaller space: T + M genes instead of T + M^2 -- 192 + 64 instead of 192 + 4096
  for the 7B setting -- which matters to CMA-ES, whose covariance is d x d).
  ``"none"``: no scale genes, every scale is 1 (the paper's "without W" ablation).
* Scales map from a gene ``u`` log-uniformly into ``scale_bounds = (lo, hi)``:
  ``s = lo * (hi / lo) ** u`` (``scale_mapping="log"``, default: scales compose by
  multiplication along the path, so 1/2 and 2 should be equally far from 1) or linearly
  ``s = lo + u (hi - lo)``. ``0 < lo <= 1 <= hi``: scales can never be non-positive and
  the identity (scale 1) is representable.
* ``initial_genome()`` keeps the slots of A's layers in the first repeat
  (``0.5 + margin``), drops the others (``0.5 - margin``) and sets every scale to 1: it
  decodes to model A itself.
* Empty path (no indicator > 0): ``empty="best"`` (default) keeps the single slot with the
  largest indicator -- a defined, continuous fallback so a search never crashes on it;
  ``empty="error"`` raises :class:`DataflowError`. ``max_layers`` (optional) keeps only the
  ``max_layers`` slots with the largest indicators (in path order) so a candidate cannot
  exceed a memory budget.

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

Refused (:class:`DataflowError`): non-positive / non-finite scales, cumulative scales outside
``[1e-18, 1e18]`` (the reference stream itself would be meaningless in float32), folded
weights that overflow the dtype, layer indexes out of range, sources whose layers are not
interchangeable (hidden size, heads, rope, eps, activation, ... differ).

Materialising:

* :class:`DataflowBuilder` holds A and B resident (directories or in-memory models -- A may be
  a PS-merged model: PS+DFS) and builds a candidate ``transformers`` model per path without
  touching the disk. Candidates *share* storage with the sources for every tensor that is not
  rescaled (embeddings, norms, q/k/v, gate/up, and o/down where ``C_k == 1``): a candidate
  costs only its rescaled o_proj/down_proj. Treat candidates as read-only (or pass
  ``copy=True``); a later in-place change of A's tensors shows through the shared ones, so
  build a new candidate after changing A.
* :func:`write_dataflow_checkpoint` streams the same tensors (same per-tensor function, so the
  in-memory and on-disk models are bit-identical) into a checkpoint whose config.json has
  ``num_hidden_layers`` = path length (and ``layer_types`` re-mapped per step when present);
  it loads with ``AutoModelForCausalLM.from_pretrained``. The path is stored next to it as
  ``dataflow_path.json``.
"""

from __future__ import annotations

import copy as _copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

from evomerge.dataflow.path import (
    MAX_CUM_SCALE,
    MIN_CUM_SCALE,
    PATH_FILE,
    PATH_FORMAT,
    DataflowError,
    DataflowPath,
    DataflowStep,
    cumulative_scales,
)
from evomerge.dataflow.space import DataflowSpace

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DataflowError",
    "DataflowStep",
    "DataflowPath",
    "DataflowSpace",
    "DataflowBuilder",
    "build_dataflow_model",
    "write_dataflow_checkpoint",
    "cumulative_scales",
    "SUPPORTED_MODEL_TYPES",
    "PATH_FILE",
    "PATH_FORMAT",
    "MIN_CUM_SCALE",
    "MAX_CUM_SCALE",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Config fields that must agree for a layer of B to run inside A's architecture.
_COMPAT_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "sliding_window",
    "use_sliding_window",
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FOLDED_SUFFIXES = (
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
)


# --------------------------------------------------------------------------------------------
# Sources (directory or in-memory model) and the per-tensor function
# --------------------------------------------------------------------------------------------

ModelLike = Union[str, os.PathLike, "torch.nn.Module"]


class _DirTensors:
    """Lazy safetensors reader for one HF folder (single file or sharded)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        idx = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        elif single.exists():
            files = ["model.safetensors"]
            wm = None
        else:
            raise DataflowError(f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)")
        self._handles = {f: safe_open(str(path / f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        if wm is not None:
            missing = set(wm) - set(self._where)
            if missing:
                raise DataflowError(f"{path}: index names tensors missing from the shards, e.g. {sorted(missing)[:3]}")

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> "torch.Tensor":
        return self._handles[self._where[name]].get_tensor(name)

    def spec(self, name: str) -> tuple[tuple[int, ...], "torch.dtype"]:
        import torch

        sl = self._handles[self._where[name]].get_slice(name)
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
        code = sl.get_dtype()
        if code not in dt:
            raise DataflowError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return tuple(sl.get_shape()), dt[code]


class _Source:
    """One source model: its config dict, tensor names and tensors (from disk or a live model)."""

    def __init__(self, src: ModelLike, label: str, *, resident: bool, layers_only: bool = False) -> None:
        import torch

        self.label = label
        self.model: torch.nn.Module | None = None
        self.dir: Path | None = None
        if isinstance(src, torch.nn.Module):
            if not hasattr(src, "config"):
                raise DataflowError(f"model {label}: an in-memory model must be a transformers model (has .config)")
            self.model = src
            self.config = src.config.to_dict()
            self._sd = {k: v.detach() for k, v in src.state_dict().items()}
            self._reader = None
        else:
            self.dir = Path(src)
            cfg = self.dir / "config.json"
            if not cfg.exists():
                raise DataflowError(f"model {label}: {self.dir} has no config.json (expected a HF model folder)")
            self.config = json.loads(cfg.read_text())
            self._reader = _DirTensors(self.dir)
            self._sd = None
            if resident:
                self._sd = {
                    k: self._reader.get(k)
                    for k in self._reader.names()
                    if not layers_only or _LAYER_RE.match(k)
                }
        mt = self.config.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise DataflowError(
                f"model {label} ({src if self.dir else type(src).__name__}): model_type {mt!r} is not supported by "
                f"layer dataflow (supported: {', '.join(SUPPORTED_MODEL_TYPES)}). Folding the input scales needs "
                "pre-norm RMSNorm blocks that read the residual stream only through their norms"
            )
        n = self.config.get("num_hidden_layers")
        if not isinstance(n, int) or n < 1:
            raise DataflowError(f"model {label}: config num_hidden_layers missing or invalid ({n!r})")
        self.num_layers = n
        # transformers' normalised view of the config (old / new field spellings agree), for checks
        self.norm_config = self.config
        if self.model is None:
            try:
                from transformers import AutoConfig

                kw = {k: v for k, v in self.config.items() if k != "model_type"}
                self.norm_config = AutoConfig.for_model(mt, **kw).to_dict()
            except Exception:  # noqa: BLE001 - fall back to the raw dict
                self.norm_config = self.config
        # per-layer attention types, normalised by transformers (qwen2 derives them from max_window_layers)
        self.layer_types: list[str] | None = None
        lt = self.config.get("layer_types")
        if lt is None and self.model is None and mt == "qwen2":
            lt = self.norm_config.get("layer_types")
        if lt is not None:
            self.layer_types = list(lt)

    def spec(self, name: str) -> tuple[tuple[int, ...], "torch.dtype"]:
        if self._sd is not None:
            t = self._sd[name]
            return tuple(t.shape), t.dtype
        return self._reader.spec(name)  # type: ignore[union-attr]

    def float_dtype(self) -> "torch.dtype | None":
        for n in self.names():
            _, dt = self.spec(n)
            if dt.is_floating_point:
                return dt
        return None

    def names(self) -> list[str]:
        return list(self._sd) if self._sd is not None else self._reader.names()  # type: ignore[union-attr]

    def get(self, name: str) -> "torch.Tensor":
        if self._sd is not None:
            return self._sd[name]
        return self._reader.get(name)  # type: ignore[union-attr]


def _check_compatible(a: _Source, b: _Source) -> None:
    bad = []
    ca, cb = a.norm_config, b.norm_config
    for f in _COMPAT_FIELDS:
        va, vb = ca.get(f), cb.get(f)
        if f == "head_dim":
            va = va or ca["hidden_size"] // ca["num_attention_heads"]
            vb = vb or cb["hidden_size"] // cb["num_attention_heads"]
        if f == "num_key_value_heads":
            va = va or ca.get("num_attention_heads")
            vb = vb or cb.get("num_attention_heads")
        if f in ("attention_bias", "mlp_bias"):
            va, vb = bool(va), bool(vb)
        if va != vb:
            bad.append(f"{f}: A={va!r} B={vb!r}")
    if bad:
        raise DataflowError(
            "models A and B cannot share decoder layers, their configs differ in " + "; ".join(bad)
            + ". Layer dataflow needs two models of the same architecture (e.g. fine-tunes of one base)"
        )


def _layer_tensor_names(src: _Source) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in src.names():
        m = _LAYER_RE.match(n)
        if m:
            out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


def _fold(name_suffix: str, t: "torch.Tensor", cum: float, where: str) -> "torch.Tensor":
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


def _plan(path: DataflowPath, a: _Source, b: _Source) -> list[tuple[_Source, int, float]]:
    if not isinstance(path, DataflowPath):
        raise DataflowError(f"expected a DataflowPath, got {type(path).__name__}")
    cums = cumulative_scales(path)
    plan = []
    for k, (st, c) in enumerate(zip(path, cums)):
        src = a if st.model == "A" else b
        if st.layer >= src.num_layers:
            raise DataflowError(
                f"dataflow path step {k}: {st.model}{st.layer} but model {st.model} has {src.num_layers} layers"
            )
        plan.append((src, st.layer, c))
    return plan


def _out_config(a: _Source, plan: list[tuple[_Source, int, float]], path: DataflowPath) -> dict[str, Any]:
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


def _iter_specs(a: _Source, b: _Source, plan) -> Iterator[tuple[str, tuple[int, ...], "torch.dtype"]]:
    """(output name, shape, dtype) in the order of :func:`_iter_tensors`, without reading data."""
    layer_names = {id(a): _layer_tensor_names(a), id(b): _layer_tensor_names(b)}
    for n in a.names():
        if not _LAYER_RE.match(n):
            yield (n, *a.spec(n))
    for k, (src, l, _c) in enumerate(plan):
        for suf in layer_names[id(src)].get(l, []):
            yield (f"model.layers.{k}.{suf}", *src.spec(f"model.layers.{l}.{suf}"))


def _iter_tensors(a: _Source, b: _Source, plan, dtype=None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(output name, tensor) for the folded model, one tensor at a time. ``dtype``: floating
    tensors are cast to it *before* folding (as the builder does), so disk == memory bitwise."""

    def cast(t):
        return t.to(dtype) if (dtype is not None and t.is_floating_point() and t.dtype != dtype) else t

    layer_names = {id(a): _layer_tensor_names(a), id(b): _layer_tensor_names(b)}
    for n in a.names():
        if not _LAYER_RE.match(n):
            yield n, cast(a.get(n))
    for k, (src, l, c) in enumerate(plan):
        suffixes = layer_names[id(src)].get(l)
        if not suffixes:
            raise DataflowError(f"model {src.label}: no tensors for decoder layer {l} (model.layers.{l}.*)")
        for suf in suffixes:
            t = cast(src.get(f"model.layers.{l}.{suf}"))
            yield f"model.layers.{k}.{suf}", _fold(suf, t, c, f"step {k} ({src.label}{l}) {suf}")


# --------------------------------------------------------------------------------------------
# In-memory builder
# --------------------------------------------------------------------------------------------


class DataflowBuilder:
    """Holds models A and B resident and builds one ``transformers`` model per path, fast.

    ``model_a`` / ``model_b``: a HF folder or an in-memory transformers model (e.g. a PS-merged
    model as A: PS+DFS). ``model_b=None`` uses A's layers only. Folders are loaded once with
    ``AutoModelForCausalLM.from_pretrained(dir, dtype=dtype)`` for A (it is the template:
    embeddings, norm, lm_head, rotary buffers, generation config) and tensor-by-tensor for B.
    ``copy=False`` (default): candidates share every unscaled tensor with the sources.
    Candidates live on A's device (``device=`` moves a folder-loaded A there once; B's tensors
    follow A's device and dtype).
    """

    def __init__(
        self,
        model_a: ModelLike,
        model_b: ModelLike | None = None,
        *,
        dtype: "torch.dtype | str | None" = None,
        copy: bool = False,
        attn_implementation: str | None = None,
        device: "torch.device | str | None" = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if not isinstance(model_a, torch.nn.Module):
            kw: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
            if attn_implementation is not None:
                kw["attn_implementation"] = attn_implementation
            p = Path(model_a)
            _Source(p, "A", resident=False)  # validates architecture with a clear error first
            model_a = AutoModelForCausalLM.from_pretrained(p, **kw)
            if device is not None:
                model_a = model_a.to(device)
        elif device is not None and model_a.device != torch.device(device):
            raise DataflowError(
                f"model A is an in-memory model on {model_a.device}, not on device={device}; move it first "
                "(the builder does not move a model it does not own)"
            )
        model_a.eval()
        self.template = model_a
        self.a = _Source(model_a, "A", resident=True)
        if model_b is None:
            self.b = self.a
        else:
            self.b = _Source(model_b, "B", resident=True, layers_only=True)
            _check_compatible(self.a, self.b)
            target, dev = self.template.dtype, self.template.device
            # cast / move B's tensors to A's dtype and device once (no copy when they already agree)
            self.b._sd = {  # type: ignore[union-attr]
                k: (v.to(device=dev, dtype=target) if v.is_floating_point() else v.to(dev))
                for k, v in self.b._sd.items()  # type: ignore[union-attr]
            }
        self.copy = copy

    @property
    def layers_a(self) -> int:
        return self.a.num_layers

    @property
    def layers_b(self) -> int:
        return self.b.num_layers

    def space(self, repeats: int = 1, scale_bounds=(0.5, 2.0), **kw) -> DataflowSpace:
        return DataflowSpace(self.layers_a, self.layers_b, repeats, scale_bounds, **kw)

    def config_for(self, path: DataflowPath):
        """The transformers config object of the candidate for ``path``."""
        plan = _plan(path, self.a, self.b)
        cfg = _copy.deepcopy(self.template.config)
        d = _out_config(self.a, plan, path)
        cfg.num_hidden_layers = d["num_hidden_layers"]
        if "layer_types" in d:
            cfg.layer_types = d["layer_types"]
        if "max_window_layers" in d:
            cfg.max_window_layers = d["max_window_layers"]
        return cfg

    def build(self, path: DataflowPath) -> "torch.nn.Module":
        """A new model (same class as A) whose decoder layers follow ``path`` with scales folded."""
        import torch

        plan = _plan(path, self.a, self.b)
        cfg = self.config_for(path)
        with torch.device("meta"):
            model = type(self.template)(cfg)
        sd = {}
        for name, t in _iter_tensors(self.a, self.b, plan):
            sd[name] = t.clone() if self.copy else t
        expected = set(model.state_dict().keys())
        if getattr(cfg, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise DataflowError(
                f"dataflow build: tensor names do not match the architecture (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        model.load_state_dict(sd, strict=False, assign=True)
        if getattr(cfg, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        # non-persistent buffers (rotary inv_freq, ...): take A's by name
        src_bufs = dict(self.template.named_buffers())
        for mod_name, mod in model.named_modules():
            for bname, buf in list(mod._buffers.items()):
                if buf is None or not buf.is_meta:
                    continue
                full = f"{mod_name}.{bname}" if mod_name else bname
                if full not in src_bufs:
                    raise DataflowError(f"dataflow build: no source for buffer {full}")
                mod._buffers[bname] = src_bufs[full]
        for p in model.parameters():
            if p.is_meta:
                raise DataflowError("dataflow build: a parameter was left uninitialised (meta)")
            p.requires_grad_(False)
        if getattr(self.template, "generation_config", None) is not None:
            model.generation_config = _copy.deepcopy(self.template.generation_config)
        model.eval()
        return model

    __call__ = build


def build_dataflow_model(
    path: DataflowPath, model_a: ModelLike, model_b: ModelLike | None = None, **kw
) -> "torch.nn.Module":
    """One-shot :meth:`DataflowBuilder.build` (use a :class:`DataflowBuilder` in a search loop
    so the sources are loaded once)."""
    return DataflowBuilder(model_a, model_b, **kw).build(path)


# --------------------------------------------------------------------------------------------
# Checkpoint on disk
# --------------------------------------------------------------------------------------------


def write_dataflow_checkpoint(
    path: DataflowPath,
    model_a_dir: ModelLike,
    model_b_dir: ModelLike | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1000**3,
) -> Path:
    """Write the folded checkpoint for ``path`` to ``out_dir`` (atomically: temp folder + rename).

    Sources may be folders (read lazily, one tensor at a time) or in-memory models (PS+DFS).
    Tokenizer and generation_config.json come from A's folder (or ``tokenizer_from``).
    Writes ``dataflow_path.json`` (the path + sources) beside the weights. Returns ``out_dir``.
    """
    out = Path(out_dir)
    a = _Source(model_a_dir, "A", resident=False)
    b = a if model_b_dir is None else _Source(model_b_dir, "B", resident=False)
    if b is not a:
        _check_compatible(a, b)
    plan = _plan(path, a, b)
    config = _out_config(a, plan, path)
    if a.model is not None:
        config.pop("_name_or_path", None)
    tied = bool(config.get("tie_word_embeddings", False))
    tok = Path(tokenizer_from) if tokenizer_from is not None else a.dir
    a_dtype = a.float_dtype()

    def tensors():
        for n, t in _iter_tensors(a, b, plan, dtype=a_dtype):
            if tied and n == "lm_head.weight":
                continue
            yield n, t

    meta = {
        "model_a": str(a.dir) if a.dir else f"<in-memory {type(a.model).__name__}>",
        "model_b": (str(b.dir) if b.dir else f"<in-memory {type(b.model).__name__}>") if b is not a else None,
        "cumulative_scales": cumulative_scales(path),
    }
    from evomerge.checkpoint import CheckpointWriter

    specs = []
    for n, shape, dt in _iter_specs(a, b, plan):
        if tied and n == "lm_head.weight":
            continue
        specs.append((n, shape, a_dtype if (a_dtype is not None and dt.is_floating_point) else dt))
    with CheckpointWriter(out, specs, config, tok, max_shard_bytes) as w:
        for n, t in tensors():
            w.write(n, t)
        w.commit()
    if a.model is not None and tokenizer_from is None:
        gc = getattr(a.model, "generation_config", None)
        if gc is not None and not (out / "generation_config.json").exists():
            gc.save_pretrained(out)
    elif tok is not None and (tok / "generation_config.json").exists() and not (out / "generation_config.json").exists():
        shutil.copy2(tok / "generation_config.json", out / "generation_config.json")
    DataflowPath(path, meta={**path.meta, **meta}).save(out / PATH_FILE)
    return out
