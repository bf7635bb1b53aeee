"""Disk merges: :func:`merge_to_disk` streams tensor by tensor into an atomically written checkpoint."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from evomerge.checkpoint import DEFAULT_MAX_SHARD_BYTES
from evomerge.checkpoint.io import CheckpointWriter
from evomerge.errors import EvomergeError
from evomerge.merge.per_tensor import is_finite, merge_one
from evomerge.merge.mergekit_io import load_recipe
from evomerge.merge.plan import MergePlan, TensorJob, build_plan
from evomerge.merge.recipe import MergeRecipe

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
