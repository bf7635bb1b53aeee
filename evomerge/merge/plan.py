"""The merge plan: what every output tensor is made of, built from safetensors headers alone.

:func:`build_plan` checks architectures, names and shapes before any compute and gives one
:class:`TensorJob` per output tensor (its sources, base, dtype and layer position);
:func:`job_params` resolves a method's parameters for one tensor (gradients over layers, name
filters), the same way for the disk and the in-memory paths (evomerge/merge/engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from evomerge.checkpoint import layer_index, set_layer_index
from evomerge.checkpoint.io import CheckpointReader, check_compatible
from evomerge.devices import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.merge.recipe import MergeRecipe, ModelEntry, evaluate_setting
from evomerge.merge.registry import REQUIRED, MergeMethod, get_method
from evomerge.merge.vocab import prepare_vocab
from evomerge.models import resolve_model

_NO_VALUE = object()


@dataclass
class Group:
    """The source models of the whole merge (``models:``) or of one slice."""

    entry_idx: list[int]  # the method's input models: indices into recipe.models / slice.sources
    keys: list[str]  # reader key of each entry
    slice_idx: int | None  # None for models:
    base_key: str | None

    def entries(self, recipe: MergeRecipe) -> list[ModelEntry]:
        """This group's entries in ``recipe`` (a recipe of the same structure as the plan's)."""
        src = recipe.models if self.slice_idx is None else recipe.slices[self.slice_idx].sources
        return [src[i] for i in self.entry_idx]

    def params(self, recipe: MergeRecipe) -> dict[str, Any]:
        return {} if self.slice_idx is None else recipe.slices[self.slice_idx].parameters


@dataclass
class TensorJob:
    """One output tensor: where its inputs come from and where it sits in the layer stack."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    t: float | None  # position in the output layer stack (None: not a decoder-layer tensor)
    group: int
    sources: list[tuple[str, str]]  # (reader key, tensor name) per input model
    base: tuple[str, str] | None
    copy_from: tuple[str, str] | None = None  # non-float tensors are copied, not merged


@dataclass
class MergePlan:
    recipe_key: tuple
    spec: MergeMethod
    readers: dict[str, CheckpointReader]
    groups: list[Group]
    jobs: list[TensorJob]
    config: dict
    ref_key: str
    num_layers: int
    tokenizer_from: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)  # reader key -> model ref as written


# ----------------------------------------------------------------------------- planning


def _out_dtype(recipe: MergeRecipe, stored: torch.dtype) -> torch.dtype:
    name = recipe.out_dtype or recipe.dtype
    return torch_dtype(name) if name else stored


def build_plan(
    recipe: MergeRecipe,
    readers: dict[str, CheckpointReader] | None = None,
    *,
    allow_pickle: bool = False,
) -> MergePlan:
    """Check the recipe against the checkpoints' headers and list every output tensor.

    ``readers`` (reader key → reader) is reused and extended (the in-memory merger shares its
    readers between plans). Raises :class:`EvomergeError` for missing models or tensors,
    architecture / shape mismatches and bad layer ranges.
    """
    planner = _Planner(recipe, get_method(recipe.merge_method), readers if readers is not None else {}, allow_pickle)
    base_key = planner.key_of(recipe.base_model) if recipe.base_model else None
    # vocabulary hook (issue 6): when the models' vocabularies differ, readers become VocabReaders
    # that return embedding / lm_head rows already mapped by token to the output vocabulary.
    vocab = prepare_vocab(recipe, planner.readers, planner.key_of)
    if recipe.models is not None:
        groups, jobs, ref_key, num_layers = planner.plan_models(base_key)
    else:
        groups, jobs, ref_key, num_layers = planner.plan_slices(base_key)
    config = _output_config(recipe, planner.readers[ref_key].config, num_layers)
    tok_dir = _tokenizer_dir(recipe, vocab, planner.readers[ref_key].path)
    return MergePlan(recipe.structure_key(), planner.spec, planner.readers, groups, jobs, config, ref_key,
                     num_layers, tok_dir, planner.labels)


@dataclass
class _Planner:
    """The state :func:`build_plan` builds up: open readers and the reference each key came from."""

    recipe: MergeRecipe
    spec: MergeMethod
    readers: dict[str, CheckpointReader]
    allow_pickle: bool
    labels: dict[str, str] = field(default_factory=dict)  # reader key -> model ref as written

    def key_of(self, ref: str) -> str:
        """The reader key of a model reference (its resolved path), opening its reader once."""
        path = resolve_model(ref, base_dir=self.recipe.source_dir)
        key = str(path)
        if key not in self.readers:
            self.readers[key] = CheckpointReader(path, allow_pickle=self.allow_pickle)
        self.labels[key] = ref
        return key

    def group(self, entries: list[ModelEntry], slice_idx: int | None, base_key: str | None) -> Group:
        """The method's input models among ``entries`` (a model that is the base is left out)."""
        used, keys = [], []
        for i, e in enumerate(entries):
            k = self.key_of(e.model)
            if base_key is not None and self.spec.uses_base(True) and k == base_key:
                continue
            used.append(i)
            keys.append(k)
        return Group(used, keys, slice_idx, base_key if self.spec.uses_base(base_key is not None) else None)

    def compatible(self, keys: list[str], names: list[str]) -> None:
        check_compatible([(self.labels.get(k, k), self.readers[k]) for k in keys], names)

    def plan_models(self, base_key: str | None):
        """``models:``: every tensor of the reference model (the base, else the first model)."""
        g = self.group(self.recipe.models, None, base_key)
        ref_key = base_key or g.keys[0]
        ref = self.readers[ref_key]
        names = ref.tensor_names()
        self.compatible([ref_key] + [k for k in g.keys if k != ref_key], names)
        nl = ref.num_layers
        jobs = []
        for name in names:
            li = layer_index(name)
            t = None if li is None else (li / (nl - 1) if nl > 1 else 0.0)
            jobs.append(_job(self.recipe, self.spec, self.readers, ref_key, name, name, t, 0, g.keys, base_key))
        return [g], jobs, ref_key, nl

    def plan_slices(self, base_key: str | None):
        """``slices:``: each slice's layers, renumbered into one stack, then the non-layer tensors."""
        slices = self.recipe.slices or []
        groups = []
        for si, s in enumerate(slices):
            bkey = self.key_of(s.base_model) if s.base_model else base_key
            groups.append(self.group(s.sources, si, bkey))
        ref_key = base_key or groups[0].keys[0]
        num_layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)
        jobs: list[TensorJob] = []
        out_layer = 0
        for gi, s in enumerate(slices):
            out_layer = self._slice_layer_jobs(gi, s, groups[gi], out_layer, num_layers, jobs)
        jobs += self._non_layer_jobs(groups, ref_key)
        jobs.sort(key=lambda j: _order_key(j.name))
        return groups, jobs, ref_key, num_layers

    def _slice_layer_jobs(self, gi: int, s, g: Group, out_layer: int, num_layers: int,
                          jobs: list[TensorJob]) -> int:
        """Append the jobs of slice ``gi``'s layers (output layers from ``out_layer`` on); returns
        the next free output layer."""
        ranges = {}
        for src in s.sources:
            k = self.key_of(src.model)
            lo, hi = src.layer_range
            n_avail = self.readers[k].num_layers
            if hi > n_avail:
                raise EvomergeError(
                    f"slices[{gi}]: layer_range {[lo, hi]} of model {src.model!r} goes past its {n_avail} layers"
                )
            ranges.setdefault(k, (lo, hi))
        first_key = self.key_of(s.sources[0].model)
        base_range = ranges.get(g.base_key, ranges[first_key]) if g.base_key else None
        lo0 = ranges[first_key][0]
        length = ranges[first_key][1] - lo0
        tmpl_reader = self.readers[first_key]
        for k_local in range(length):
            j = out_layer + k_local
            t = j / (num_layers - 1) if num_layers > 1 else 0.0
            for name in tmpl_reader.tensor_names():
                if layer_index(name) != lo0 + k_local:
                    continue
                srcs = [(k, set_layer_index(name, ranges[k][0] + k_local)) for k in g.keys]
                base = None
                if g.base_key is not None:
                    base = (g.base_key, set_layer_index(name, base_range[0] + k_local))
                jobs.append(_slice_job(self.recipe, self.spec, self.readers, self.labels, set_layer_index(name, j),
                                       srcs, base, t, gi, tmpl_reader, name))
        return out_layer + length

    def _non_layer_jobs(self, groups: list[Group], ref_key: str) -> list[TensorJob]:
        """Pre-layer tensors (embeddings) from the first slice's models, the others (final norm,
        lm_head) from the last slice's, as mergekit does."""
        non_layer = [n for n in self.readers[ref_key].tensor_names() if layer_index(n) is None]
        pre = [n for n in non_layer if "embed" in n]
        post = [n for n in non_layer if "embed" not in n]
        jobs = []
        for name in pre + post:
            gi = 0 if name in pre else len(groups) - 1
            g = groups[gi]
            self.compatible([ref_key, *([g.base_key] if g.base_key else []), *g.keys], [name])
            jobs.append(_job(self.recipe, self.spec, self.readers, ref_key, name, name, None, gi, g.keys, g.base_key))
        return jobs


def _output_config(recipe: MergeRecipe, ref_config: dict, num_layers: int) -> dict:
    """The merged model's config.json: the reference model's, with the layer count of a slices
    recipe and the output dtype."""
    config = dict(ref_config)
    if recipe.slices is not None:
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(k), int):
                config[k] = num_layers
    dt = recipe.out_dtype or recipe.dtype
    if dt:
        config["dtype"] = dt
        if "torch_dtype" in config:
            config["torch_dtype"] = dt
    return config


def _tokenizer_dir(recipe: MergeRecipe, vocab, ref_path: Path) -> Path:
    """Where the merged model's tokenizer comes from (``tokenizer_source``)."""
    tok = recipe.tokenizer_source
    if vocab is not None and vocab.tokenizer_dir is not None:
        return vocab.tokenizer_dir  # tokenizer_source: union
    if tok in (None, "base"):
        return ref_path
    return resolve_model(tok, base_dir=recipe.source_dir, what="tokenizer_source")


def _order_key(name: str):
    li = layer_index(name)
    if li is None:
        return (0 if "embed" in name else 2, 0, name)
    return (1, li, name)


def _job(recipe, spec, readers, ref_key, out_name, name, t, gi, keys, bkey) -> TensorJob:
    ref = readers[ref_key]
    stored = ref.dtype(name)
    srcs = [(k, name) for k in keys]
    base = (bkey, name) if (bkey and spec.uses_base(True)) else None
    if not stored.is_floating_point:
        return TensorJob(out_name, ref.shape(name), stored, t, gi, srcs, base, copy_from=(ref_key, name))
    return TensorJob(out_name, ref.shape(name), _out_dtype(recipe, stored), t, gi, srcs, base)


def _slice_job(recipe, spec, readers, labels, out_name, srcs, base, t, gi, tmpl_reader, tmpl_name) -> TensorJob:
    shape = tmpl_reader.shape(tmpl_name)
    for k, n in srcs + ([base] if base else []):
        r = readers[k]
        if n not in r:
            raise EvomergeError(f"tensor {n!r} is missing from model {labels.get(k, k)}")
        if r.shape(n) != shape:
            raise EvomergeError(
                f"shape mismatch for tensor {n!r}: {list(r.shape(n))} in {labels.get(k, k)}, expected {list(shape)}"
            )
    stored = tmpl_reader.dtype(tmpl_name)
    if not stored.is_floating_point:
        return TensorJob(out_name, shape, stored, t, gi, srcs, base, copy_from=srcs[0])
    return TensorJob(out_name, shape, _out_dtype(recipe, stored), t, gi, srcs, base)


# ----------------------------------------------------------------------------- parameters


def _lookup(levels: Sequence[dict], p: str, name: str, t: float | None):
    for level in levels:
        if p in level:
            v = evaluate_setting(level[p], name, t)
            if v is not None:
                return v
    return _NO_VALUE


def job_params(recipe: MergeRecipe, plan: MergePlan, job: TensorJob) -> dict[str, Any]:
    """The method's keyword parameters for one tensor (per-model ones as aligned lists)."""
    spec = plan.spec
    g = plan.groups[job.group]
    gparams = g.params(recipe)
    out: dict[str, Any] = {}
    for p, default in spec.model_params.items():
        vals = []
        for e in g.entries(recipe):
            v = _lookup((e.parameters, gparams, recipe.parameters), p, job.name, job.t)
            if v is _NO_VALUE:
                if default is REQUIRED:
                    raise EvomergeError(f"model {e.model!r}: parameter {p!r} has no value for tensor {job.name!r}")
                v = default
            vals.append(v)
        out[p] = vals
    for p, default in spec.global_params.items():
        v = _lookup((gparams, recipe.parameters), p, job.name, job.t)
        if v is _NO_VALUE:
            if default is REQUIRED:
                raise EvomergeError(f"parameter {p!r} has no value for tensor {job.name!r}")
            v = default
        out[p] = v
    return out
