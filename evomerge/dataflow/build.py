"""Materialising a data-flow path: a live model per candidate, or a checkpoint on disk.

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
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.dataflow.fold import Plan, iter_specs, iter_tensors, make_plan, out_config
from evomerge.dataflow.path import PATH_FILE, DataflowError, DataflowPath, cumulative_scales
from evomerge.dataflow.sources import ModelLike, Source, check_compatible
from evomerge.dataflow.space import DataflowSpace

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DataflowBuilder", "build_dataflow_model", "write_dataflow_checkpoint"]


# --------------------------------------------------------------------------------------------
# In-memory builder
# --------------------------------------------------------------------------------------------


def _load_template(model_a: ModelLike, dtype, attn_implementation: str | None, device) -> "torch.nn.Module":
    """Model A as a live model (loaded from its folder once), on ``device`` when given."""
    import torch
    from transformers import AutoModelForCausalLM

    if not isinstance(model_a, torch.nn.Module):
        kw: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        p = Path(model_a)
        Source(p, "A", resident=False)  # validates architecture with a clear error first
        model_a = AutoModelForCausalLM.from_pretrained(p, **kw)
        if device is not None:
            model_a = model_a.to(device)
    elif device is not None and model_a.device != torch.device(device):
        raise DataflowError(
            f"model A is an in-memory model on {model_a.device}, not on device={device}; move it first "
            "(the builder does not move a model it does not own)"
        )
    model_a.eval()
    return model_a


def _take_buffers(model: "torch.nn.Module", template: "torch.nn.Module") -> None:
    """Fill the non-persistent buffers left on the meta device (rotary inv_freq, ...) with A's, by name."""
    src_bufs = dict(template.named_buffers())
    for mod_name, mod in model.named_modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            if full not in src_bufs:
                raise DataflowError(f"dataflow build: no source for buffer {full}")
            mod._buffers[bname] = src_bufs[full]


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
        self.template = _load_template(model_a, dtype, attn_implementation, device)
        self.a = Source(self.template, "A", resident=True)
        if model_b is None:
            self.b = self.a
        else:
            self.b = Source(model_b, "B", resident=True, layers_only=True)
            check_compatible(self.a, self.b)
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
        plan = make_plan(path, self.a, self.b)
        cfg = _copy.deepcopy(self.template.config)
        d = out_config(self.a, plan, path)
        cfg.num_hidden_layers = d["num_hidden_layers"]
        if "layer_types" in d:
            cfg.layer_types = d["layer_types"]
        if "max_window_layers" in d:
            cfg.max_window_layers = d["max_window_layers"]
        return cfg

    def _state_dict(self, plan: Plan, cfg, expected: set[str]) -> dict[str, "torch.Tensor"]:
        """The candidate's tensors by name, checked against the names the architecture expects."""
        sd = {}
        for name, t in iter_tensors(self.a, self.b, plan):
            sd[name] = t.clone() if self.copy else t
        if getattr(cfg, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise DataflowError(
                f"dataflow build: tensor names do not match the architecture (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        return sd

    def build(self, path: DataflowPath) -> "torch.nn.Module":
        """A new model (same class as A) whose decoder layers follow ``path`` with scales folded."""
        import torch

        plan = make_plan(path, self.a, self.b)
        cfg = self.config_for(path)
        with torch.device("meta"):
            model = type(self.template)(cfg)
        sd = self._state_dict(plan, cfg, set(model.state_dict().keys()))
        model.load_state_dict(sd, strict=False, assign=True)
        if getattr(cfg, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        _take_buffers(model, self.template)
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


def _source_label(src: Source) -> str:
    return str(src.dir) if src.dir else f"<in-memory {type(src.model).__name__}>"


def _write_specs(a: Source, b: Source, plan: Plan, tied: bool, a_dtype) -> list[tuple]:
    """(name, shape, dtype) of every tensor written, floating ones in A's dtype."""
    specs = []
    for n, shape, dt in iter_specs(a, b, plan):
        if tied and n == "lm_head.weight":
            continue
        specs.append((n, shape, a_dtype if (a_dtype is not None and dt.is_floating_point) else dt))
    return specs


def _copy_generation_config(out: Path, a: Source, tok: Path | None, tokenizer_from) -> None:
    """generation_config.json from A (a live model's object, or A's / ``tokenizer_from``'s file),
    unless the checkpoint writer already copied one."""
    if a.model is not None and tokenizer_from is None:
        gc = getattr(a.model, "generation_config", None)
        if gc is not None and not (out / "generation_config.json").exists():
            gc.save_pretrained(out)
    elif tok is not None and (tok / "generation_config.json").exists() and not (out / "generation_config.json").exists():
        shutil.copy2(tok / "generation_config.json", out / "generation_config.json")


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
    a = Source(model_a_dir, "A", resident=False)
    b = a if model_b_dir is None else Source(model_b_dir, "B", resident=False)
    if b is not a:
        check_compatible(a, b)
    plan = make_plan(path, a, b)
    config = out_config(a, plan, path)
    if a.model is not None:
        config.pop("_name_or_path", None)
    tied = bool(config.get("tie_word_embeddings", False))
    tok = Path(tokenizer_from) if tokenizer_from is not None else a.dir
    a_dtype = a.float_dtype()
    meta = {
        "model_a": _source_label(a),
        "model_b": _source_label(b) if b is not a else None,
        "cumulative_scales": cumulative_scales(path),
    }
    from evomerge.checkpoint import CheckpointWriter

    with CheckpointWriter(out, _write_specs(a, b, plan, tied, a_dtype), config, tok, max_shard_bytes) as w:
        for n, t in iter_tensors(a, b, plan, dtype=a_dtype):
            if not (tied and n == "lm_head.weight"):
                w.write(n, t)
        w.commit()
    _copy_generation_config(out, a, tok, tokenizer_from)
    DataflowPath(path, meta={**path.meta, **meta}).save(out / PATH_FILE)
    return out
