"""Per-task TSV factors of fine-tunes of one base, and TSV merges of any subset of the tasks.

For every tensor of the base: a matrix (2-D; N-D as ``(shape[0], −1)``) keeps, per task, the
top-``k`` singular triplets ``(U_t, σ_t, V_tᵀ)`` of its task matrix ``τ_t = θ_t − θ0`` with
``k = tsv_rank(min(m, n), T, rank_fraction)`` (default ``1/T``, as the ``tsv`` method); a 1-D
tensor (norm weights, biases) keeps the whole ``τ_t``. :meth:`TaskFactors.merge` of a subset
``S`` of the tasks is TSV-Merge restricted to ``S``: ``θ0 + U⊥ diag(σ_S) V⊥ᵀ`` from the
stored factors of the tasks in ``S`` (1-D tensors: ``θ0 + mean_{t∈S} τ_t``). With every task
it is tensor-equal to the ``tsv`` merge method (weights 1, λ = 1) on the same checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.spectral import (
    as_matrix,
    mean_merge,
    top_singular_triplets,
    tsv_matrix,
    tsv_orthogonal_factors,
    tsv_rank,
)

Factors = tuple[Tensor, Tensor, Tensor]


@dataclass
class TaskFactors:
    """The base's tensors and, per task and tensor, TSV factors (matrices) or the task vector
    (1-D tensors). ``tasks``: the task names in order; ``base``: name -> float32 tensor."""

    tasks: list[str]
    base: dict[str, Tensor]
    factors: dict[str, dict[str, Factors]] = field(default_factory=dict)  # task -> name -> (U, σ, Vᵀ)
    vectors: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # task -> name -> τ (1-D)

    def task_index(self, subset: Sequence[str]) -> tuple[str, ...]:
        """``subset`` in the order of :attr:`tasks` (checked: known, no repeats, not empty)."""
        unknown = [t for t in subset if t not in self.tasks]
        if unknown or not subset or len(set(subset)) != len(subset):
            raise EvomergeError(f"task subset {list(subset)}: give one or more distinct tasks among "
                                f"{', '.join(self.tasks)}")
        return tuple(t for t in self.tasks if t in subset)

    def merge(self, subset: Sequence[str]) -> dict[str, Tensor]:
        """The TSV merge of the tasks in ``subset``: name -> float32 tensor, for every tensor."""
        chosen = self.task_index(subset)
        out: dict[str, Tensor] = {}
        for name, base in self.base.items():
            if name in self.factors[chosen[0]]:
                f = [self.factors[t][name] for t in chosen]
                ones = (1.0,) * len(f)
                u_perp, vh_perp = tsv_orthogonal_factors(f, ones)
                out[name] = base + (1.0 * tsv_matrix(u_perp, vh_perp, f, ones)).reshape(base.shape)
            else:
                out[name] = mean_merge([self.vectors[t][name] for t in chosen], base)
        return out

    def routing_basis(self, name: str) -> Tensor:
        """``(T, k, n)``: each task's top right singular vectors ``V_tᵀ`` of tensor ``name``."""
        if name not in self.base:
            raise EvomergeError(f"routing tensor {name!r}: the base model has no such tensor")
        if name not in self.factors[self.tasks[0]]:
            raise EvomergeError(f"routing tensor {name!r} is not a matrix (shape {list(self.base[name].shape)}); "
                                "give a 2-D weight such as model.layers.3.mlp.down_proj.weight")
        return torch.stack([self.factors[t][name][2] for t in self.tasks])

    def storage_numel(self) -> int:
        """Floats stored for the tasks (factors and 1-D task vectors), without the base."""
        n = sum(u.numel() + s.numel() + vh.numel() for f in self.factors.values() for u, s, vh in f.values())
        return n + sum(v.numel() for d in self.vectors.values() for v in d.values())


def compute_task_factors(base: dict[str, Tensor], experts: dict[str, Callable[[str], Tensor]],
                         rank_fraction: float | None = None) -> TaskFactors:
    """:class:`TaskFactors` from the base's float32 tensors and, per task name, a function giving
    the fine-tune's tensor of a name. Task vectors are ``x.float() − base`` (as the merge engine)."""
    tasks = list(experts)
    if len(tasks) < 2:
        raise EvomergeError(f"routing needs at least two fine-tunes of the base (got {len(tasks)})")
    tf = TaskFactors(tasks=tasks, base=base, factors={t: {} for t in tasks}, vectors={t: {} for t in tasks})
    for name, b in base.items():
        deltas = {t: get(name).float() - b for t, get in experts.items()}
        mats = {t: as_matrix(d) for t, d in deltas.items()}
        if mats[tasks[0]] is None:
            for t, d in deltas.items():
                tf.vectors[t][name] = d
            continue
        k = tsv_rank(min(mats[tasks[0]].shape), len(tasks), rank_fraction)
        for t, m in mats.items():
            tf.factors[t][name] = top_singular_triplets(m, k)
    return tf


def factors_from_checkpoints(base_path: Path, expert_paths: dict[str, Path],
                             rank_fraction: float | None = None, allow_pickle: bool = False) -> TaskFactors:
    """:func:`compute_task_factors` on checkpoint folders (checked to be one architecture, same
    tensor names and shapes, before any compute)."""
    from evomerge.checkpoint import CheckpointReader, check_compatible

    base_reader = CheckpointReader(base_path, allow_pickle=allow_pickle)
    readers = {t: CheckpointReader(p, allow_pickle=allow_pickle) for t, p in expert_paths.items()}
    check_compatible([(f"base {base_path}", base_reader)]
                     + [(f"model {expert_paths[t]}", r) for t, r in readers.items()])
    names = base_reader.tensor_names()
    for t, r in readers.items():
        extra = sorted(set(r.tensor_names()) - set(names))
        if extra:
            raise EvomergeError(f"tensor {extra[0]!r} is in model {expert_paths[t]} but not in the base "
                                f"{base_path}; routing needs fine-tunes of the base")
    floats = [n for n in names if base_reader.dtype(n).is_floating_point]
    if len(floats) != len(names):
        odd = next(n for n in names if n not in floats)
        raise EvomergeError(f"base {base_path}: tensor {odd!r} is not floating point; routing merges float "
                            "weights only")
    base = {n: base_reader.get(n).float() for n in names}
    return compute_task_factors(base, {t: r.get for t, r in readers.items()}, rank_fraction)
