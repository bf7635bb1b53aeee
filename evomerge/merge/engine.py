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

The engine in modules: plan.py (the plan from headers, per-tensor parameters), per_tensor.py (the
per-tensor math: :func:`merge_one`), disk.py (:func:`merge_to_disk`), resident.py (:class:`InMemoryMerger`); this
module is their public face.
"""

from __future__ import annotations

from evomerge.merge.disk import merge_to_disk
from evomerge.merge.per_tensor import ELEMENTWISE_METHODS, MERGE_CHUNK, is_finite, merge_one, tensor_seed
from evomerge.merge.plan import MergePlan, TensorJob, build_plan, job_params
from evomerge.merge.resident import InMemoryMerger, resident_caches

__all__ = ["MergePlan", "TensorJob", "build_plan", "job_params", "merge_one", "merge_to_disk", "InMemoryMerger",
           "tensor_seed", "is_finite", "resident_caches", "ELEMENTWISE_METHODS", "MERGE_CHUNK"]
