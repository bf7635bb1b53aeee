"""The merge engine: apply a recipe tensor by tensor, to disk or into a live model.

Both paths build the same :class:`MergePlan` from safetensors headers (architectures, names and
shapes are checked before any compute), resolve each tensor's parameters the same way, prepare
the method's inputs the same way (``tensor.float()``, task vectors ``t.float() - base.float()``)
and call the same :func:`merge_one` — so :func:`merge_to_disk` and
:meth:`InMemoryMerger.apply` produce bit-identical tensors on the same device.

- :func:`merge_to_disk` streams: it holds the inputs of one output tensor plus that output,
  writing each tensor's bytes straight into the (pre-planned) safetensors shards of a temporary
  folder that is renamed into place at the end.
- :class:`InMemoryMerger` keeps the inputs resident (float32 on ``device``; task vectors are
  computed once on first use) and writes merged tensors into a ``transformers`` model in place.
  The plan is cached per recipe *structure* (method, models, slices), so recipes that differ only
  in parameter values (what a search produces) cost only the tensor math.

Randomized methods (DARE) get a ``torch.Generator`` seeded from ``(recipe.seed or 0, tensor
name)``: reproducible, and independent of the order tensors are processed in.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from evomerge.checkpoint import DEFAULT_MAX_SHARD_BYTES, layer_index, set_layer_index
from evomerge.checkpoint.io import CheckpointReader, CheckpointWriter, check_compatible
from evomerge.devices import check_device, torch_dtype
from evomerge.errors import EvomergeError
from evomerge.merge.mergekit_io import load_recipe
from evomerge.merge.recipe import MergeRecipe, ModelEntry, evaluate_setting
from evomerge.models import resolve_model
from evomerge.merge.methods.sparsify import SORTED_ABS_ATTR
from evomerge.merge.methods.spectral import SVD_CACHE_ATTR
from evomerge.merge.registry import REQUIRED, MergeMethod, get_method
from evomerge.merge.vocab import prepare_vocab

__all__ = ["MergePlan", "TensorJob", "build_plan", "merge_one", "merge_to_disk", "InMemoryMerger", "tensor_seed",
           "resident_caches"]

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


# ----------------------------------------------------------------------------- per-tensor math

ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})
"""Methods whose output at a position depends only on the inputs at that position (scalar
parameters, no randomness, no statistic of the whole tensor): :func:`merge_one` runs them chunk
by chunk on the CPU (the same bits as one call on the whole tensors)."""
MERGE_CHUNK = 1 << 20
"""Entries per chunk of an elementwise merge on the CPU: a chunk's inputs and temporaries stay in
the CPU caches, so memory sees each input read once and the output written once."""


def tensor_seed(seed: int | None, name: str) -> int:
    """Stable 63-bit seed from the recipe seed and a tensor name."""
    h = hashlib.sha256(f"{int(seed or 0)}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def is_finite(t: torch.Tensor) -> bool:
    """No NaN / inf in ``t`` (one reduction pass: min and max propagate NaN and show ±inf)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def merge_one(
    plan: MergePlan,
    recipe: MergeRecipe,
    job: TensorJob,
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    subtract_base: bool = False,
) -> torch.Tensor:
    """The one per-tensor function both paths call; returns the merged tensor, checked for NaN/inf.

    ``inputs`` / ``base``: the source tensors on the compute device, in any float dtype (widened
    to float32 here, exactly): task vectors when the method ``takes_deltas`` and the job has a
    base, or, with ``subtract_base``, the model tensors, whose task vectors
    (``x.float() - base.float()``) are computed here. The method always sees float32.
    ``out``: a contiguous tensor of the job's shape (any float dtype) to write the result into
    (rounded to its dtype) instead of returning a new float32 tensor. Methods in
    :data:`ELEMENTWISE_METHODS` run :data:`MERGE_CHUNK` entries at a time on the CPU.
    """
    spec = plan.spec
    params = job_params(recipe, plan, job)
    device = (inputs[0] if inputs else base).device
    gen = None
    if spec.randomized:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(recipe.seed, job.name))
    if spec.takes_name:
        params["tensor_name"] = job.name
    n = math.prod(job.shape)
    chunked = spec.name in ELEMENTWISE_METHODS and device.type == "cpu" and n > MERGE_CHUNK
    # whole tensors go in as they are (a resident task vector keeps its cache attributes)
    pieces = [(0, n, inputs, base)] if not chunked else _chunks(inputs, base, n)
    if out is None and chunked:
        out = torch.empty(job.shape, dtype=torch.float32, device=device)
    extremes = []
    with torch.no_grad():
        for s, e, xs, b in pieces:
            b = None if b is None else b.float()
            xs = [x.float() for x in xs]
            if subtract_base:
                xs = [x - b for x in xs]
            res = spec.fn(xs, b, generator=gen, **params)
            expected = (e - s,) if chunked else job.shape
            if tuple(res.shape) != expected:
                raise EvomergeError(f"merge_method {spec.name!r} returned shape {list(res.shape)} for tensor "
                                    f"{job.name!r}, expected {list(expected)}")
            if res.numel():
                extremes.append(torch.aminmax(res.reshape(-1)))
            if out is None:
                out = res  # one whole tensor, returned as the method made it
            else:
                out.view(-1)[s:e].copy_(res.reshape(-1))
    if extremes and not bool(torch.isfinite(torch.stack([v for pair in extremes for v in pair])).all()):
        _raise_not_finite(plan, job, inputs, base)
    return out


def _chunks(inputs: list[torch.Tensor], base: torch.Tensor | None, n: int):
    """``(start, end, inputs, base)`` for each :data:`MERGE_CHUNK` entries of the flattened tensors."""
    flat_in = [x.reshape(-1) for x in inputs]
    flat_base = None if base is None else base.reshape(-1)
    for s in range(0, n, MERGE_CHUNK):
        e = min(n, s + MERGE_CHUNK)
        yield s, e, [x[s:e] for x in flat_in], None if flat_base is None else flat_base[s:e]


def _raise_not_finite(plan: MergePlan, job: TensorJob, inputs, base) -> None:
    """The NaN/inf error of one tensor, naming the input models that already hold NaN/inf."""
    bad = [plan.labels.get(k, k) for (k, _), x in zip(job.sources, inputs) if not is_finite(x)]
    if base is not None and not is_finite(base):
        bad.append(plan.labels.get(job.base[0], job.base[0]) + " (base)")
    why = (f"the input model(s) {bad} already hold NaN/inf there" if bad
           else "check the recipe's parameters (weights, lambda, normalize with weights summing to ~0)")
    raise EvomergeError(f"merge produced NaN/inf in tensor {job.name!r} (merge_method {plan.spec.name!r}): {why}")


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------- disk


def merge_to_disk(
    recipe: MergeRecipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_tokenizer: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``recipe`` into an HF checkpoint folder ``out_dir`` (atomic).

    An existing ``out_dir`` is replaced only if it holds nothing but a model evomerge could have
    written, or with ``overwrite=True`` (see :class:`CheckpointWriter`); never when it is, or
    holds, one of the inputs. Streams tensor by tensor: memory holds one output tensor's inputs
    (memory-mapped) plus the output. Returns the output folder.
    """
    if not isinstance(recipe, MergeRecipe):
        recipe = load_recipe(recipe)
    device = torch.device(device)
    plan = build_plan(recipe, allow_pickle=allow_pickle)
    _check_out_dir(plan, out_dir, overwrite)
    specs = [(j.name, j.shape, j.out_dtype) for j in plan.jobs]
    tok = plan.tokenizer_from if copy_tokenizer else None
    # two sets of output buffers (one per dtype each), alternated: one tensor is written to disk
    # by a writer thread while the next is merged (the thread releases the GIL inside write)
    scratch: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
    with CheckpointWriter(out_dir, specs, plan.config, tok, max_shard_bytes, overwrite=overwrite) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer") as write_thread:
        pending = None  # the write in flight
        for i, job in enumerate(plan.jobs):
            if job.copy_from is not None:
                k, n = job.copy_from
                tensor = plan.readers[k].get(n)
            else:
                tensor = _merge_from_disk(plan, recipe, job, device, scratch[i % 2])
            if pending is not None:
                pending.result()  # in order, and the other buffer is free again
            pending = write_thread.submit(writer.write, job.name, tensor)
            if progress is not None:
                progress(i + 1, len(plan.jobs), job.name)
        if pending is not None:
            pending.result()
        return writer.commit()


def _check_out_dir(plan: MergePlan, out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output folder that is, or holds, an input (or that holds foreign files)."""
    from evomerge.checkpoint.io import check_output_folder

    target = os.path.realpath(out_dir)
    inputs = [(key, f"model {label!r}") for key, label in plan.labels.items()]
    if plan.tokenizer_from is not None:
        inputs.append((str(plan.tokenizer_from), f"tokenizer source {str(plan.tokenizer_from)!r}"))
    for key, label in inputs:
        src = os.path.realpath(key)
        if src == target:
            raise EvomergeError(f"--out {out_dir} is the input {label}; write the merge to another folder")
        if src.startswith(target.rstrip(os.sep) + os.sep):
            raise EvomergeError(f"--out {out_dir} holds the input {label}; replacing it would delete that "
                                "model — write the merge to another folder")
    check_output_folder(out_dir, overwrite=overwrite)  # before any tensor is read (headers only so far)


def _merge_from_disk(plan: MergePlan, recipe: MergeRecipe, job: TensorJob, device: torch.device,
                     scratch: dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
    """One merged tensor, at the output dtype, in a reused buffer (valid until the next call).

    The sources are read in their stored dtype (memory-mapped on the CPU) and widened by
    :func:`merge_one`, which also computes the task vectors: an elementwise method then reads each
    source once, chunk by chunk."""
    def read(key_name: tuple[str, str]) -> torch.Tensor:
        t = plan.readers[key_name[0]].get(key_name[1])
        return t if device.type == "cpu" else t.to(device)

    base = read(job.base) if job.base else None
    inputs = [read(src) for src in job.sources]
    numel = math.prod(job.shape)
    buf = scratch.get(job.out_dtype)
    if buf is None or buf.numel() < numel:
        buf = scratch[job.out_dtype] = torch.empty(numel, dtype=job.out_dtype, device=device)
    out = buf[:numel].view(job.shape)
    merge_one(plan, recipe, job, inputs, base, out, subtract_base=plan.spec.takes_deltas and base is not None)
    if job.out_dtype == torch.float16 and not is_finite(out):
        raise EvomergeError(f"tensor {job.name!r} overflows float16; use dtype bfloat16 or float32")
    return out


# ----------------------------------------------------------------------------- in memory

_MAGNITUDE_CACHE_METHODS = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
"""Methods whose sparsification reads ``SORTED_ABS_ATTR`` (magnitude thresholds). Not DARE (random
masks) nor DELLA (per-row ranks): the sorted whole-tensor magnitudes do not help them."""
_SVD_CACHE_METHODS = frozenset({"tsv"})
"""Methods that read ``SVD_CACHE_ATTR`` (Iso-C / Iso-CTS decompose the weighted sum, which changes
with every candidate: nothing to cache per task vector)."""


def resident_caches(method: str | None) -> dict[str, bool]:
    """The :class:`InMemoryMerger` cache options that speed up repeated merges (a search) with
    ``method``: ``{"magnitude_cache": …, "svd_cache": …}``, True only where the method reads
    that cache (each costs memory only once a merge uses it)."""
    return {"magnitude_cache": method in _MAGNITUDE_CACHE_METHODS, "svd_cache": method in _SVD_CACHE_METHODS}



class InMemoryMerger:
    """Resident sources; :meth:`apply` writes a recipe's merge into a live model in place.

    ``recipe_or_paths``: a :class:`MergeRecipe` (its models are loaded at once, inputs prepared
    for its method: task vectors for task-arithmetic methods) or a sequence of model folders
    (loaded lazily on the first :meth:`apply`). Inputs are kept as float32 on ``device``
    (task vectors computed once), or with ``resident="native"`` in the checkpoints' own dtype
    (bf16 models: half the memory, no resident task vectors: each apply computes
    ``t.float() - base.float()`` per tensor, as the disk path does; same bits either way).

    ``compute_device`` (default: ``device``): where the merge math runs. With ``device="cpu"``
    and ``compute_device="cuda"`` the sources stay in host memory and each tensor's inputs are
    copied to the GPU (in their resident dtype), merged there and written into the model: models
    whose sources do not fit on the GPU next to the evaluated model merge at PCIe speed instead of
    CPU speed (with ``resident="native"``, base + 3 bf16 7B fine-tunes are ~58 GB per candidate
    over the bus). The sources are not page-locked (pinned): pinning ~58 GB would take nearly all
    the RAM of a 64 GB machine (CUDA's host allocator also rounds blocks up to powers of two), for
    about twice the copy speed. The same computation as ``merge_to_disk(device=compute_device)``.
    The two caches below live on resident tensors and are off when streaming.

    ``magnitude_cache=True`` keeps each task vector's sorted magnitudes (sorted once, on first
    use) so that magnitude sparsification (TIES) at any density is a lookup instead of a
    selection pass; it doubles the resident memory of the task vectors and gives the same
    thresholds (hence the same bits) as the disk path.

    ``svd_cache=True`` lets TSV keep, on each resident task vector, its top singular triplets
    (computed on first use, for the largest rank asked so far) and, per tensor, the orthogonalised
    stacked factors: a later TSV candidate that changes only ``weight`` magnitudes or ``lambda``
    costs one matrix product per tensor instead of ``T + 2`` SVDs, and one with another
    ``rank_fraction`` only the two orthogonalisations (see ``methods.spectral.SVD_CACHE_ATTR``). Costs
    about ``k·(m + n)`` floats per task matrix plus the two orthogonal factors per tensor (about
    two matrices with the default rank ``r/T``); same bits as the disk path.

    :func:`resident_caches` says which of the two help a given method.
    """

    def __init__(
        self,
        recipe_or_paths: MergeRecipe | Sequence[str | os.PathLike],
        *,
        device: str | torch.device = "cpu",
        compute_device: str | torch.device | None = None,
        allow_pickle: bool = False,
        magnitude_cache: bool = False,
        svd_cache: bool = False,
        resident: str = "float32",
    ):
        if resident not in ("float32", "native"):
            raise EvomergeError(f"resident must be 'float32' or 'native', got {resident!r}")
        self.device = check_device(device, "merge engine device")
        self.compute_device = (self.device if compute_device is None
                               else check_device(compute_device, "merge engine compute_device"))
        # streamed: sources resident on `device`, each tensor's inputs copied to `compute_device`
        # per merge
        self.streamed = self.compute_device != self.device
        self.resident = resident
        # native: sources stay in their checkpoint dtype (half the memory of float32 for bf16
        # models) and task vectors are computed per apply -- so no per-task-vector caches; the
        # caches live on resident tensors, so a streamed merger (which computes on copies) has none
        self.magnitude_cache = magnitude_cache and resident == "float32" and not self.streamed
        self.svd_cache = svd_cache and resident == "float32" and not self.streamed
        self.allow_pickle = allow_pickle
        self.readers: dict[str, CheckpointReader] = {}
        self._plans: dict[tuple, MergePlan] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._model_params: tuple[weakref.ref, dict[str, torch.Tensor]] | None = None
        if isinstance(recipe_or_paths, MergeRecipe):
            self.prepare(recipe_or_paths)
        else:
            for p in recipe_or_paths:
                path = resolve_model(str(p))
                if str(path) not in self.readers:
                    self.readers[str(path)] = CheckpointReader(path, allow_pickle=allow_pickle)

    # -- resident inputs (on self.device)
    def _resident(self, key: str, name: str) -> torch.Tensor:
        """A source tensor as kept: float32, or with resident="native" its checkpoint dtype."""
        ck = ("t", key, name)
        t = self._cache.get(ck)
        if t is None:
            raw = self.readers[key].get(name)
            t = raw.to(self.device) if self.resident == "native" else _f32(raw, self.device)
            self._cache[ck] = t
        return t

    def _resident_delta(self, key: str, name: str, base: tuple[str, str]) -> torch.Tensor:
        """A float32 task vector, computed once (resident="float32" only)."""
        ck = ("d", key, name, base)
        d = self._cache.get(ck)
        if d is None:
            raw = self._cache.get(("t", key, name))
            x = raw if raw is not None else _f32(self.readers[key].get(name), self.device)
            d = x - self._resident(*base)
            if self.magnitude_cache:
                setattr(d, SORTED_ABS_ATTR, True)
            if self.svd_cache and d.dim() >= 2:
                setattr(d, SVD_CACHE_ATTR, True)
            self._cache[ck] = d
        return d

    # -- inputs of one merge (float32 on self.compute_device)
    def _on_compute(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.compute_device) if self.streamed else t

    def _tensor(self, key: str, name: str) -> torch.Tensor:
        # native: copied in the checkpoint dtype, then widened (the values the disk path computes with)
        return self._on_compute(self._resident(key, name)).to(dtype=torch.float32)

    def _inputs(self, plan: MergePlan, job: TensorJob):
        """One job's sources on the compute device, its base, and whether :func:`merge_one` is to
        subtract the base (resident="native": task vectors are computed per apply)."""
        base = self._on_compute(self._resident(*job.base)) if job.base else None
        deltas = plan.spec.takes_deltas and job.base is not None
        if deltas and self.resident == "float32":
            return [self._on_compute(self._resident_delta(k, n, job.base)) for k, n in job.sources], base, False
        return [self._on_compute(self._resident(k, n)) for k, n in job.sources], base, deltas

    def plan(self, recipe: MergeRecipe) -> MergePlan:
        """The (cached) plan of ``recipe``'s structure."""
        key = recipe.structure_key()
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(recipe, self.readers, allow_pickle=self.allow_pickle)
            self._plans[key] = plan
        return plan

    def prepare(self, recipe: MergeRecipe) -> None:
        """Load (and turn into task vectors) everything ``recipe``'s structure needs, now."""
        plan = self.plan(recipe)
        for job in plan.jobs:
            if job.copy_from is not None:
                self._resident(*job.copy_from)
                continue
            if job.base is not None:
                self._resident(*job.base)
            for k, n in job.sources:
                if plan.spec.takes_deltas and job.base is not None and self.resident == "float32":
                    self._resident_delta(k, n, job.base)
                else:
                    self._resident(k, n)

    @property
    def resident_bytes(self) -> int:
        """Bytes of resident inputs (and sorted-magnitude / SVD caches)."""

        def size(x) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, dict):
                return sum(size(v) for v in x.values())
            if isinstance(x, (list, tuple)):
                return sum(size(v) for v in x)
            return 0

        total = 0
        for t in self._cache.values():
            total += size(t) + size(getattr(t, SORTED_ABS_ATTR, None)) + size(getattr(t, SVD_CACHE_ATTR, None))
        return total

    def release(self) -> None:
        """Drop resident tensors and plans (readers stay open)."""
        self._cache.clear()
        self._plans.clear()

    # -- merging
    def merged_tensors(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, float32 merged tensor)`` (non-float tensors as stored)."""
        plan = self.plan(recipe)
        for job in plan.jobs:
            if job.copy_from is not None:
                yield job.name, self._tensor(*job.copy_from)
                continue
            inputs, base, subtract = self._inputs(plan, job)
            yield job.name, merge_one(plan, recipe, job, inputs, base, subtract_base=subtract)

    def _targets(self, model) -> dict[str, torch.Tensor]:
        if self._model_params is not None and self._model_params[0]() is model:
            return self._model_params[1]
        targets = dict(model.named_parameters(remove_duplicate=False))
        for n, b in model.named_buffers(remove_duplicate=False):
            targets.setdefault(n, b)
        self._model_params = (weakref.ref(model), targets)
        return targets

    def check_fits(self, recipe: MergeRecipe, model) -> None:
        """Raise, before any compute, unless every tensor ``recipe`` produces exists in ``model``
        with the same shape (reads only headers; plans are cached, so this costs nothing later)."""
        self.check_shapes(recipe, {n: tuple(t.shape) for n, t in self._targets(model).items()})

    def check_shapes(self, recipe: MergeRecipe, shapes: dict[str, tuple[int, ...]]) -> None:
        """:meth:`check_fits` against a name -> shape mapping (a model held elsewhere, e.g. in vLLM)."""
        plan = self.plan(recipe)
        missing = [j.name for j in plan.jobs if j.name not in shapes]
        if missing:
            raise EvomergeError(
                f"the model has no tensor {missing[0]!r} (and {len(missing) - 1} more) that the merge produces; "
                f"the recipe yields {plan.num_layers} layers — is the model of the same architecture and depth?"
            )
        for j in plan.jobs:
            shape = tuple(shapes[j.name])
            if shape != tuple(j.shape):
                raise EvomergeError(f"tensor {j.name!r}: model has shape {list(shape)}, merge gives {list(j.shape)}"
                                    + (" (a different vocabulary size: see tokenizer_source)"
                                       if j.name.endswith(("embed_tokens.weight", "lm_head.weight")) else ""))

    def apply(self, recipe: MergeRecipe, model) -> Any:
        """Write ``recipe``'s merge into ``model`` (a ``torch.nn.Module`` whose state-dict names
        match the checkpoints, e.g. a ``transformers`` model) in place; returns ``model``.

        The model keeps its own dtype and device (``param.data.copy_``); the recipe's dtype is
        not used. Tensors of the model that the merge does not produce are left untouched.
        Names and shapes are checked before the first tensor is written (:meth:`check_fits`).
        """
        self.check_fits(recipe, model)
        targets = self._targets(model)
        plan = self.plan(recipe)
        with torch.no_grad():
            for job in plan.jobs:
                target = targets[job.name].data
                if job.copy_from is not None:
                    target.copy_(self._tensor(*job.copy_from))
                    continue
                inputs, base, subtract = self._inputs(plan, job)
                # straight into the parameter's storage when it can take the result in place
                direct = (target.is_floating_point() and target.is_contiguous()
                          and target.device == (inputs[0] if inputs else base).device)
                out = merge_one(plan, recipe, job, inputs, base, target if direct else None, subtract_base=subtract)
                if not direct:
                    target.copy_(out)
        return model
