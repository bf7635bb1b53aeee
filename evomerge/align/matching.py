"""Weight matching of two Llama-style models (Git Re-Basin, Ainsworth et al., ICLR 2023,
arXiv:2209.04836), and the linear-assignment pieces C²M³ shares.

For a reference model A and a model B, find the allowed permutation ``p`` of B (see
:mod:`~evomerge.align.symmetries`) maximising ``Σ_tensors ⟨W_A, p(W_B)⟩`` — equivalently
minimising ``‖W_A − p(W_B)‖²``. The problem is solved by coordinate descent: with all other
groups fixed, the best permutation of one group is a linear assignment problem (scipy's
``linear_sum_assignment``) on the similarity of A's and B's slices along that group's axes.
Groups are visited in a random order each pass until a whole pass improves nothing.

An attention group is solved exactly for its structure (grouped-query attention): for every
pair of kv groups (A's j, B's j') the best assignment of their query heads is one small
assignment problem; the kv groups are then assigned on the kv similarity plus those optima.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from evomerge.align.symmetries import LlamaLayout, Permutations, identity_permutations, permute_tensor

Sims = dict[str, np.ndarray]  # unit ("unit" | "head" | "kv_head") -> similarity matrix (float64)


def unit_rows(tensor: torch.Tensor, axis: int, unit_size: int) -> torch.Tensor:
    """``tensor`` as a matrix with one row per permuted index along ``axis`` (float32)."""
    t = tensor.float().movedim(axis, 0)
    return t.reshape(t.shape[0] // unit_size, -1)


def _assign(sim: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim, maximize=True)
    return cols[np.argsort(rows)], float(sim[rows, cols].sum())


def solve_assignment(group: str, sims: Sims, layout: LlamaLayout) -> torch.Tensor:
    """The permutation of ``group`` maximising ``Σ_i sims[i, p[i]]`` (summed over units)."""
    if not group.startswith("attention."):
        return torch.from_numpy(_assign(sims["unit"])[0]).long()
    g, n_kv = layout.heads_per_group, layout.num_kv_heads
    heads = sims.get("head", np.zeros((layout.num_heads, layout.num_heads)))
    kv = sims.get("kv_head", np.zeros((n_kv, n_kv)))
    inner = {}
    outer = np.array(kv, dtype=np.float64)
    for ja in range(n_kv):
        for jb in range(n_kv):
            cols, value = _assign(heads[ja * g:(ja + 1) * g, jb * g:(jb + 1) * g])
            inner[ja, jb] = cols
            outer[ja, jb] += value
    groups, _ = _assign(outer)
    perm = np.concatenate([groups[ja] * g + inner[ja, groups[ja]] for ja in range(n_kv)])
    return torch.from_numpy(perm).long()


def assignment_value(group: str, sims: Sims, perm: torch.Tensor, layout: LlamaLayout) -> float:
    """``Σ_i sims[i, p[i]]`` over the units of ``group`` (kv heads follow the query heads)."""
    p = perm.numpy()
    total = 0.0
    for unit, sim in sims.items():
        q = p[::layout.heads_per_group] // layout.heads_per_group if unit == "kv_head" else p
        total += float(sim[np.arange(len(q)), q].sum())
    return total


def group_similarities(group: str, ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                       layout: LlamaLayout, perms: Permutations) -> Sims:
    """Similarity of ``ref``'s and ``other``'s slices along ``group``'s axes, with ``other``'s
    other axes permuted by ``perms``: entry ``[i, j]`` is ``⟨ref slice i, other slice j⟩``."""
    sims: Sims = {}
    for name, axis, unit in layout.tensors_of(group):
        b = permute_tensor(name, other[name], layout, perms, skip_axis=axis)
        d = layout.unit_size(unit)
        s = (unit_rows(ref[name], axis, d) @ unit_rows(b, axis, d).T).double().numpy()
        sims[unit] = sims[unit] + s if unit in sims else s
    return sims


@dataclass
class MatchResult:
    """Permutations of the second model, the number of passes, and the objective per pass."""

    perms: Permutations
    passes: int
    objective: list[float] = field(default_factory=list)


def weight_matching(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], layout: LlamaLayout,
                    seed: int = 0, max_passes: int = 100) -> MatchResult:
    """Git Re-Basin weight matching: the permutation ``p`` of ``other`` (apply it with
    :func:`~evomerge.align.symmetries.permute_model`) that brings it closest to ``ref``.

    Coordinate descent from the identity over the groups in a random order (``seed``) per pass,
    stopping after the first pass that improves no group (or ``max_passes``). Holds both models
    in memory; each pass reads every tensor about twice."""
    perms = identity_permutations(layout)
    rng = random.Random(seed)
    groups = layout.groups()
    result = MatchResult(perms=perms, passes=0)
    for _ in range(max_passes):
        result.passes += 1
        improved = False
        rng.shuffle(groups)
        for group in groups:
            sims = group_similarities(group, ref, other, layout, perms)
            old = assignment_value(group, sims, perms[group], layout)
            candidate = solve_assignment(group, sims, layout)
            new = assignment_value(group, sims, candidate, layout)
            if new > old + 1e-9 * max(1.0, abs(old)):
                perms[group] = candidate
                improved = True
        result.objective.append(inner_product(ref, other, layout, perms))
        if not improved:
            break
    return result


def inner_product(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], layout: LlamaLayout,
                  perms: Permutations) -> float:
    """``Σ_tensors ⟨ref, p(other)⟩`` (the matching objective)."""
    return float(sum((ref[n].double() * permute_tensor(n, other[n], layout, perms).double()).sum()
                     for n in layout.axes))


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``Σ_tensors ‖a − b‖²`` (float64)."""
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a))
