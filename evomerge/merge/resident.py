"""In-memory merges: :class:`InMemoryMerger` keeps the sources resident and writes a recipe's merge
into a live model in place (what every search candidate costs)."""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterator, Sequence

import torch

from evomerge.checkpoint.io import CheckpointReader
from evomerge.devices import check_device
from evomerge.errors import EvomergeError
from evomerge.merge.per_tensor import f32, merge_one
from evomerge.merge.methods.sparsify import SORTED_ABS_ATTR
from evomerge.merge.methods.spectral import SVD_CACHE_ATTR
from evomerge.merge.plan import MergePlan, TensorJob, build_plan
from evomerge.merge.recipe import MergeRecipe
from evomerge.models import resolve_model

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
            t = raw.to(self.device) if self.resident == "native" else f32(raw, self.device)
            self._cache[ck] = t
        return t

    def _resident_delta(self, key: str, name: str, base: tuple[str, str]) -> torch.Tensor:
        """A float32 task vector, computed once (resident="float32" only)."""
        ck = ("d", key, name, base)
        d = self._cache.get(ck)
        if d is None:
            raw = self._cache.get(("t", key, name))
            x = raw if raw is not None else f32(self.readers[key].get(name), self.device)
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
