"""C²M³: cycle-consistent matching of N Llama-style models (Crisostomi et al., NeurIPS 2024,
"C²M³: Cycle-Consistent Multi-Model Merging", arXiv:2405.17897).

Every model ``a`` gets, per permutation group, a map ``P_a`` from its own coordinates into one
shared *universe*; the map from model ``b`` to model ``a`` is ``P_a⁻¹ ∘ P_b``, so the pairwise
maps compose to the identity around every cycle by construction. The maps maximise

    f(P_1..P_N) = Σ_{a<b} Σ_tensors ⟨P_a(W_a), P_b(W_b)⟩

(the pairwise weight-matching objective of Git Re-Basin, taken in the universe; since
permutations keep norms it is ``(‖Σ_a P_a(W_a)‖² − const) / 2``: the universe-space average is
as large — as little cancelled — as possible). It is optimised with Frank-Wolfe over the
relaxation where every ``P`` is a doubly-stochastic matrix (an attention group: a pair of
query-head / kv-head matrices in the hull of the group-respecting permutations): the linear
oracle is a linear assignment on the gradient, the step size maximises ``f`` exactly along the
segment (``f`` is a polynomial of degree ≤ 4 in the step), and it stops when the Frank-Wolfe
gap is below ``tol·|f|``. Finally every soft map is projected to the nearest permutation (a
linear assignment maximising ``⟨P_soft, P⟩``). Model 0's map is fixed to the identity (the
universe's gauge); the others start at their Git Re-Basin match to model 0 (the paper's
identity start is available: on permuted copies of one model it stalls in local optima
where the other models agree among themselves but not with model 0).

Memory: the N models in float32 plus their universe images (about 3 N copies): a tool for
small models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from evomerge.align.matching import solve_assignment, unit_rows, weight_matching
from evomerge.align.symmetries import (
    LlamaLayout,
    Permutations,
    compose,
    identity_permutations,
    invert,
    kv_permutation,
)

Tensors = Mapping[str, torch.Tensor]
SoftMaps = dict[str, dict[str, torch.Tensor]]  # group -> unit -> (n, n) matrix


@dataclass
class C2M3Result:
    """``to_universe[a]``: model a's permutations into the universe (apply with
    ``permute_model``); per Frank-Wolfe iteration the relaxed objective and the gap; the
    objective of the start and of the projected solution, and which of the two was kept."""

    to_universe: list[Permutations]
    iterations: int
    objective: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    start_value: float = 0.0
    projected_value: float = 0.0
    kept: str = "projected"

    def pairwise_map(self, source: int, target: int) -> Permutations:
        """The permutation taking model ``source`` into model ``target``'s coordinates."""
        return compose(self.to_universe[source], invert(self.to_universe[target]))


def _units(group: str) -> tuple[str, ...]:
    return ("head", "kv_head") if group.startswith("attention.") else ("unit",)


def _unit_count(group: str, unit: str, layout: LlamaLayout) -> int:
    n = layout.group_size(group)
    return n // layout.heads_per_group if unit == "kv_head" else n


def permutation_matrices(group: str, perm: torch.Tensor, layout: LlamaLayout) -> dict[str, torch.Tensor]:
    """``perm`` as 0/1 matrices ``M`` with ``(M x)[i] = x[perm[i]]``, one per unit of the group."""
    out = {}
    for unit in _units(group):
        p = kv_permutation(perm, layout) if unit == "kv_head" else perm
        m = torch.zeros(len(p), len(p))
        m[torch.arange(len(p)), p] = 1.0
        out[unit] = m
    return out


def _apply(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` applied to the units along ``axis`` (a head unit is a block of rows)."""
    x = t.movedim(axis, 0)
    shape = x.shape
    y = matrix @ x.reshape(matrix.shape[1], -1)
    return y.reshape(shape).movedim(0, axis)


def soft_transform(name: str, tensor: torch.Tensor, layout: LlamaLayout, maps: SoftMaps,
                   skip_axis: int | None = None) -> torch.Tensor:
    """``tensor`` (float32) mapped by soft permutation matrices along every permuted axis but
    ``skip_axis``."""
    out = tensor.float()
    for k, ax in enumerate(layout.axes[name]):
        if ax is not None and k != skip_axis:
            out = _apply(out, k, maps[ax.group][ax.unit])
    return out


def _universe(models: Sequence[Tensors], layout: LlamaLayout, maps: Sequence[SoftMaps]):
    return [{n: soft_transform(n, m[n], layout, mp) for n in layout.axes} for m, mp in zip(models, maps)]


def objective(models: Sequence[Tensors], layout: LlamaLayout, maps: Sequence[SoftMaps]) -> float:
    """``Σ_{a<b} Σ_tensors ⟨P_a(W_a), P_b(W_b)⟩`` for soft or hard maps."""
    images = _universe(models, layout, maps)
    total = 0.0
    for n in layout.axes:
        stack = [img[n].double() for img in images]
        s = sum(stack)
        total += 0.5 * (float((s * s).sum()) - sum(float((u * u).sum()) for u in stack))
    return total


def _gradients(models, layout, maps) -> list[SoftMaps]:
    images = _universe(models, layout, maps)
    sums = {n: sum(img[n] for img in images) for n in layout.axes}
    grads = [{g: {u: torch.zeros(_unit_count(g, u, layout), _unit_count(g, u, layout)) for u in _units(g)}
              for g in layout.groups()} for _ in models]
    for a, model in enumerate(models):
        for name, axes in layout.axes.items():
            others = sums[name] - images[a][name]
            for k, ax in enumerate(axes):
                if ax is None:
                    continue
                d = layout.unit_size(ax.unit)
                x = soft_transform(name, model[name], layout, maps[a], skip_axis=k)
                grads[a][ax.group][ax.unit] += unit_rows(others, k, d) @ unit_rows(x, k, d).T
    return grads


def _best_step(values: list[float]) -> float:
    """argmax over [0, 1] of the quartic through ``values`` at t = 0, 1/4, 1/2, 3/4, 1."""
    poly = np.polynomial.Polynomial.fit(np.linspace(0, 1, 5), values, 4, domain=[0, 1], window=[0, 1])
    candidates = [0.0, 1.0] + [float(r.real) for r in poly.deriv().roots()
                               if abs(r.imag) < 1e-12 and 0.0 < r.real < 1.0]
    return max(candidates, key=lambda t: poly(t))


def _mix(maps: Sequence[SoftMaps], vertices: Sequence[SoftMaps], t: float) -> list[SoftMaps]:
    return [{g: {u: (1 - t) * m[g][u] + t * v[g][u] for u in m[g]} for g in m} for m, v in zip(maps, vertices)]


def _start(models, layout: LlamaLayout, init: str, seed: int) -> list[Permutations]:
    if init == "identity":
        return [identity_permutations(layout) for _ in models]
    if init == "rebasin":
        return [identity_permutations(layout)] + [weight_matching(models[0], m, layout, seed=seed).perms
                                                  for m in models[1:]]
    raise ValueError(f"c2m3: init must be 'rebasin' or 'identity', not {init!r}")


def _as_maps(perms: Permutations, layout: LlamaLayout) -> SoftMaps:
    return {g: permutation_matrices(g, p, layout) for g, p in perms.items()}


def c2m3(models: Sequence[Tensors], layout: LlamaLayout, init: str = "rebasin", max_iter: int = 100,
         tol: float = 1e-6, seed: int = 0) -> C2M3Result:
    """Cycle-consistent maps of ``models`` (two or more) into a shared universe (see the module
    docstring); ``result.pairwise_map(b, a)`` takes model b into model a's coordinates.

    ``init``: ``"rebasin"`` starts every model at its Git Re-Basin match to model 0 (a
    cycle-consistent start), ``"identity"`` at the identity. Model 0's map stays the identity
    (the universe is defined up to one global permutation; fixing it breaks the symmetry that
    otherwise lets all models move at once). Frank-Wolfe is a local method: the result is the
    better, on the objective, of the projected Frank-Wolfe solution and the start."""
    if len(models) < 2:
        raise ValueError("c2m3 needs at least two models")
    start = _start(models, layout, init, seed)
    maps = [_as_maps(p, layout) for p in start]
    result = C2M3Result(to_universe=[], iterations=0)
    for _ in range(max_iter):
        result.iterations += 1
        grads = _gradients(models, layout, maps)
        vertices, gap = [maps[0]], 0.0
        for grad, current in zip(grads[1:], maps[1:]):
            vertex = {}
            for g in layout.groups():
                sims = {u: grad[g][u].double().numpy() for u in grad[g]}
                vertex[g] = permutation_matrices(g, solve_assignment(g, sims, layout), layout)
                gap += sum(float((grad[g][u] * (vertex[g][u] - current[g][u])).sum()) for u in grad[g])
            vertices.append(vertex)
        values = [objective(models, layout, _mix(maps, vertices, t)) for t in np.linspace(0, 1, 5)]
        result.objective.append(values[0])
        result.gap.append(gap)
        if gap <= tol * max(1.0, abs(values[0])):
            break
        step = _best_step(values)
        if step <= 0.0:
            break
        maps = _mix(maps, vertices, step)
    projected = [
        {g: solve_assignment(g, {u: m[g][u].double().numpy() for u in m[g]}, layout) for g in layout.groups()}
        for m in maps
    ]
    result.projected_value = objective(models, layout, [_as_maps(p, layout) for p in projected])
    result.start_value = objective(models, layout, [_as_maps(p, layout) for p in start])
    result.kept = "projected" if result.projected_value >= result.start_value else "start"
    result.to_universe = projected if result.kept == "projected" else start
    return result
