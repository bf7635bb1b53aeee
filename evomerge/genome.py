"""Search spaces: a genome in [0, 1]^d  <->  a merge recipe.

The optimizer only ever sees the unit box; a :class:`ParameterSpace` maps each coordinate to
one merge parameter value: ``lo + x * (hi - lo)`` for the gene's bounds. A gene is one
parameter of the merge method (``weight``, ``density``, ``t`` ...), per source model when the
method takes it per model, and with ``layer_groups = k`` it becomes k values that mergekit
interpolates linearly across the layers (a "gradient"). A gene may be limited to tensors whose
name matches a filter (``self_attn``, ``mlp``), as in mergekit YAML.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class GeneSlot:
    """Where one block of genome coordinates goes."""

    name: str                 # merge parameter
    model: str | None         # endpoint reference for per-model parameters, None for global
    filter: str | None
    bounds: tuple[float, float]
    start: int                # first coordinate
    size: int                 # layer_groups

    def label(self) -> str:
        who = f"[{self.model}]" if self.model else ""
        where = f"{{{self.filter}}}" if self.filter else ""
        return f"{self.name}{who}{where}"


class ParameterSpace:
    """Parameter-space recipes for one merge method over a base and its endpoints."""

    def __init__(self, method: str, base: str, endpoints: list[str], genes, fixed: dict | None = None,
                 dtype: str = "float32", seed: int = 0, tokenizer_source: str | None = None):
        from evomerge.merge.registry import get_method

        self.method = method
        self.spec = get_method(method)
        self.base = base
        self.endpoints = list(endpoints)
        self.fixed = dict(fixed or {})
        self.dtype = dtype
        self.seed = seed
        self.tokenizer_source = tokenizer_source
        n = len(self.endpoints)
        if n < self.spec.min_models or (self.spec.max_models and n > self.spec.max_models):
            hi = self.spec.max_models or "any"
            raise EvomergeError(f"models.endpoints: merge method {method!r} takes "
                                f"{self.spec.min_models}..{hi} models besides the base, got {n}")
        known = set(self.spec.model_params) | set(self.spec.global_params)
        for key, value in self.fixed.items():
            if key not in known:
                raise EvomergeError(f"search_space.fixed.{key}: not a parameter of {method!r}; "
                                    f"it takes: {', '.join(sorted(known)) or 'none'}")
            why = self.spec.check_value(key, value) if not isinstance(value, (list, dict)) else None
            if why is not None:
                raise EvomergeError(f"search_space.fixed.{key}: {why}")
        slots: list[GeneSlot] = []
        pos = 0
        for i, g in enumerate(genes):
            if g.name in self.spec.model_params:
                owners: list[str | None] = list(self.endpoints)
            elif g.name in self.spec.global_params:
                owners = [None]
            else:
                raise EvomergeError(f"search_space.genes: {g.name!r} is not a parameter of "
                                    f"{method!r}; it takes: {', '.join(sorted(known)) or 'none'}")
            if g.name in self.fixed:
                raise EvomergeError(f"search_space: {g.name!r} is both a gene and fixed")
            why = self.spec.check_bounds(g.name, *g.bounds)
            if why is not None:
                raise EvomergeError(f"search_space.genes.{i}.bounds: {why}")
            for owner in owners:
                slots.append(GeneSlot(g.name, owner, g.filter, tuple(g.bounds), pos, g.layer_groups))
                pos += g.layer_groups
        if pos == 0:
            raise EvomergeError("search_space.genes: no genes; name at least one parameter")
        self.slots = slots
        self.dim = pos

    def initial_genome(self) -> np.ndarray:
        """Every gene at the middle of its bounds (Sakana: all genes start at 0.5)."""
        return np.full(self.dim, 0.5)

    def values(self, genome) -> dict[GeneSlot, list[float]]:
        """Gene values in parameter units, per slot."""
        x = np.asarray(genome, dtype=float)
        if x.shape != (self.dim,):
            raise EvomergeError(f"genome has {x.size} values; this search space has {self.dim}")
        out = {}
        for s in self.slots:
            lo, hi = s.bounds
            u = np.clip(x[s.start:s.start + s.size], 0.0, 1.0)
            out[s] = [float(lo + v * (hi - lo)) for v in u]
        return out

    def decode(self, genome) -> dict:
        """The mergekit-style recipe (a plain dict) that this genome stands for."""
        per_model: dict[str, dict[str, list]] = {m: {} for m in self.endpoints}
        global_: dict[str, list] = {}
        for s, vals in self.values(genome).items():
            value = vals[0] if len(vals) == 1 else vals
            target = per_model[s.model] if s.model else global_
            target.setdefault(s.name, []).append((s.filter, value))
        recipe = {
            "merge_method": self.method,
            "base_model": self.base,
            "models": [{"model": m, "parameters": _collapse(per_model[m])} for m in self.endpoints],
            "parameters": {**self.fixed, **_collapse(global_)},
            "dtype": self.dtype,
        }
        if self.tokenizer_source is not None:
            recipe["tokenizer_source"] = self.tokenizer_source
        if self.spec.randomized:
            # one seed for every candidate: DARE drops the same positions at the same density
            # (common random numbers), so candidates differ by their genes, not by luck
            recipe["seed"] = self.seed
        return recipe

    def labels(self) -> list[str]:
        return [s.label() for s in self.slots]


def _collapse(params: dict[str, list]) -> dict:
    """(filter, value) pairs -> mergekit value: plain when unfiltered, else a filter list."""
    out = {}
    for name, entries in params.items():
        if len(entries) == 1 and entries[0][0] is None:
            out[name] = entries[0][1]
        else:
            # filtered entries first (first match wins), the unfiltered default last
            entries = sorted(entries, key=lambda e: e[0] is None)
            out[name] = [({"filter": f, "value": v} if f else {"value": v}) for f, v in entries]
    return out
