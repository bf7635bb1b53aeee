"""The two source models of a data-flow path: config, tensor names and tensors, from a HF
folder (read with :class:`evomerge.checkpoint.CheckpointReader`) or from a live
``transformers`` model (A may be a PS-merged model: PS+DFS); the checks that their layers are
interchangeable.

Supported (:data:`SUPPORTED_MODEL_TYPES`): pre-norm RMSNorm decoders whose blocks read the
residual stream only through their norms, which is what folding input scales needs (see
:mod:`evomerge.dataflow.fold`). Anything else, and sources whose layers are not
interchangeable (hidden size, heads, rope, eps, activation, ... differ), are refused with
:class:`~evomerge.dataflow.path.DataflowError`. Folders must hold safetensors weights
(``model.safetensors`` or ``model.safetensors.index.json``; no pickle, no unindexed shards); a
folder the reader refuses (an index naming a missing shard or tensor, a dtype it does not know
such as float8) is refused when it is opened, with the reader's message. A sharded folder's
tensors are those its index lists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Union

from evomerge.dataflow.path import DataflowError
from evomerge.errors import EvomergeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ModelLike", "SUPPORTED_MODEL_TYPES", "LAYER_RE", "Source", "check_compatible", "layer_tensor_names"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ModelLike = Union[str, os.PathLike, "torch.nn.Module"]

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

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
"""A decoder layer's tensor: group 1 the layer index, group 2 the name inside the layer."""


def _open_folder(path: Path):
    """The checkpoint reader of a folder and its tensor names, ordered by shard file, then by
    name: the order of the tensors in a written checkpoint (not the order of the headers)."""
    from evomerge.checkpoint.io import SAFE_INDEX, SAFE_SINGLE, CheckpointReader

    if not (path / SAFE_INDEX).exists() and not (path / SAFE_SINGLE).exists():
        raise DataflowError(f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)")
    try:
        reader = CheckpointReader(path)
    except EvomergeError as e:
        raise DataflowError(str(e)) from None
    names = sorted(reader.tensor_names(), key=lambda n: (reader.file_of(n), n))
    return reader, names


class Source:
    """One source model: its config dict, tensor names and tensors (from disk or a live model).

    ``resident=True`` reads a folder's tensors into memory once (``layers_only``: the decoder
    layers' only); otherwise they are read one at a time by :meth:`get`.
    """

    def __init__(self, src: ModelLike, label: str, *, resident: bool, layers_only: bool = False) -> None:
        import torch

        self.label = label
        self.model: torch.nn.Module | None = None
        self.dir: Path | None = None
        self._reader = None
        self._names: list[str] = []
        self._sd: dict[str, torch.Tensor] | None = None
        if isinstance(src, torch.nn.Module):
            self._init_model(src)
        else:
            self._init_folder(Path(src), resident, layers_only)
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
        self.norm_config = self.config if self.model is not None else self._normalised_config(mt)
        # per-layer attention types, normalised by transformers (qwen2 derives them from max_window_layers)
        self.layer_types: list[str] | None = None
        lt = self.config.get("layer_types")
        if lt is None and self.model is None and mt == "qwen2":
            lt = self.norm_config.get("layer_types")
        if lt is not None:
            self.layer_types = list(lt)

    def _init_model(self, model: "torch.nn.Module") -> None:
        if not hasattr(model, "config"):
            raise DataflowError(f"model {self.label}: an in-memory model must be a transformers model (has .config)")
        self.model = model
        self.config = model.config.to_dict()
        self._sd = {k: v.detach() for k, v in model.state_dict().items()}

    def _init_folder(self, path: Path, resident: bool, layers_only: bool) -> None:
        self.dir = path
        cfg = path / "config.json"
        if not cfg.exists():
            raise DataflowError(f"model {self.label}: {path} has no config.json (expected a HF model folder)")
        self.config = json.loads(cfg.read_text())
        self._reader, self._names = _open_folder(path)
        if resident:
            self._sd = {k: self._reader.get(k) for k in self._names if not layers_only or LAYER_RE.match(k)}

    def _normalised_config(self, model_type: str) -> dict:
        try:
            from transformers import AutoConfig

            kw = {k: v for k, v in self.config.items() if k != "model_type"}
            return AutoConfig.for_model(model_type, **kw).to_dict()
        except Exception:  # noqa: BLE001 - fall back to the raw dict
            return self.config

    def spec(self, name: str) -> tuple[tuple[int, ...], "torch.dtype"]:
        if self._sd is not None:
            t = self._sd[name]
            return tuple(t.shape), t.dtype
        return self._reader.shape(name), self._reader.dtype(name)  # type: ignore[union-attr]

    def float_dtype(self) -> "torch.dtype | None":
        for n in self.names():
            _, dt = self.spec(n)
            if dt.is_floating_point:
                return dt
        return None

    def names(self) -> list[str]:
        return list(self._sd) if self._sd is not None else list(self._names)

    def get(self, name: str) -> "torch.Tensor":
        if self._sd is not None:
            return self._sd[name]
        return self._reader.get(name)  # type: ignore[union-attr]


def check_compatible(a: Source, b: Source) -> None:
    """Raise :class:`DataflowError` unless B's decoder layers can run inside A's architecture."""
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


def layer_tensor_names(src: Source) -> dict[int, list[str]]:
    """layer index -> the names of its tensors inside the layer (``self_attn.o_proj.weight``, ...)."""
    out: dict[int, list[str]] = {}
    for n in src.names():
        m = LAYER_RE.match(n)
        if m:
            out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out
