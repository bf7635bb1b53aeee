"""The one per-tensor function of the merge engine: :func:`merge_one` (both paths call it, so disk and
in-memory merges are bit-identical on the same device)."""

from __future__ import annotations

import hashlib
import math

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.plan import MergePlan, TensorJob, job_params
from evomerge.merge.recipe import MergeRecipe

ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})
"""Methods whose output at a position depends only on the inputs at that position (scalar
parameters, no randomness, no statistic of the whole tensor): :func:`merge_one` runs them chunk
by chunk on the CPU (the same bits as one call on the whole tensors)."""
MERGE_CHUNK = 1 << 18
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
    (rounded to its dtype) instead of returning a new float32 tensor; a method whose function has
    ``writes_into = True`` (the task-arithmetic family) gets a float32 ``out`` as its own ``out=``.
    Methods in :data:`ELEMENTWISE_METHODS` run :data:`MERGE_CHUNK` entries at a time on the CPU.
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
    # a method that takes out= writes straight into a float32 output (no copy pass)
    into = (getattr(spec.fn, "writes_into", False) and out is not None and out.dtype == torch.float32
            and out.is_contiguous())
    extremes = []
    scratch = [torch.empty(MERGE_CHUNK, device=device) for _ in inputs] if chunked and subtract_base else None
    with torch.no_grad():
        for s, e, xs, b in pieces:
            b = None if b is None else b.float()
            xs = [x.float() for x in xs]
            if scratch is not None:  # a chunk's task vectors in reused (cache-resident) buffers
                xs = [torch.sub(x, b, out=t[: e - s]) for x, t in zip(xs, scratch)]
            elif subtract_base:
                xs = [x - b for x in xs]
            expected = (e - s,) if chunked else job.shape
            dest = (out.view(-1)[s:e] if chunked else out) if into else None
            res = spec.fn(xs, b, generator=gen, **params) if dest is None else spec.fn(
                xs, b, generator=gen, out=dest, **params)
            if tuple(res.shape) != expected:
                raise EvomergeError(f"merge_method {spec.name!r} returned shape {list(res.shape)} for tensor "
                                    f"{job.name!r}, expected {list(expected)}")
            if res.numel():
                extremes.append(torch.aminmax(res.reshape(-1)))
            if out is None:
                out = res  # one whole tensor, returned as the method made it
            elif res is not dest:
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


def f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)
