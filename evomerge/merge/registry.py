"""Registry of merge methods.

A merge method is a pure function of tensors: it never reads files, never changes dtype or
device on its own, and has no hidden state (randomness comes from the ``generator`` argument).
The engine owns I/O, dtype (methods receive float32 tensors and return float32), device, and
the per-tensor resolution of parameters (layer gradients, name filters).

Signature of every method function::

    fn(tensors: list[Tensor], base: Tensor | None, *, generator: torch.Generator | None,
       **params) -> Tensor

- ``tensors``: one tensor per source model (not including the base), same shape, float32.
- ``base``: the base model's tensor (float32) when the method uses a base (``spec.needs_base``,
  or ``spec.base_optional`` and the recipe names a ``base_model``; see
  :meth:`MergeMethod.uses_base`); otherwise None.
- per-model parameters (``spec.model_params``) arrive as ``list[float]`` aligned with
  ``tensors``; method-level parameters (``spec.global_params``) arrive as scalars.
- all parameters listed in the spec are always passed (defaults filled in by the engine).
- a method must never modify its input tensors in place: the in-memory merger passes its
  resident tensors (the same objects on every call).
- ``spec.takes_deltas``: when True the first argument holds the task vectors
  ``τ_i = tensor_i − base`` (float32, computed by the engine as ``t.float() - base.float()``)
  instead of the model tensors, so that a resident merger computes them once; ``base`` is
  passed as well. Task-arithmetic-family methods set it. For a ``base_optional`` method it holds
  only when a base is passed: without one the method receives the model tensors.
- ``spec.base_optional``: the method runs with or without a base (mergekit's ``nuslerp`` /
  ``multislerp``: with a ``base_model`` they interpolate the task vectors and add the result to
  the base). With a base, a model entry that *is* the base is left out of the inputs, as for
  ``needs_base`` methods; without one, every entry is an input and ``base`` is None.
- ``spec.takes_name``: the method also receives ``tensor_name=`` (the output tensor's name), for
  methods whose math depends on a tensor's role (``nino``).
- ``spec.text_params``: parameters whose values are strings (``nino``'s checkpoint path).
- ``spec.randomized``: the method draws from ``generator`` (the engine passes one seeded from
  the recipe seed and the tensor name, so disk and in-memory merges are identical).

The built-in methods live in :mod:`evomerge.merge.methods`, one module per family; the reusable
building blocks (sparsifiers and sign election, generalized task arithmetic, slerp) in
:mod:`evomerge.merge.methods.sparsify`, :mod:`~evomerge.merge.methods.task_arithmetic` and
:mod:`~evomerge.merge.methods.spherical`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from evomerge.errors import EvomergeError

REQUIRED = object()
"""Marker for a parameter without a default: the recipe must set it."""


@dataclass(frozen=True)
class ParamRange:
    """The values a numeric method parameter accepts (``None`` = unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def contains(self, v: float) -> bool:
        if self.integer and float(v) != int(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        return kind


FRACTION = ParamRange(0.0, 1.0)
"""[0, 1]."""
DENSITY = ParamRange(0.0, 1.0, lo_open=True)
"""(0, 1]: a kept fraction that must keep something."""
POSITIVE = ParamRange(0.0, None, lo_open=True)
ANY = ParamRange()


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and the parameters it accepts."""

    name: str
    fn: Callable[..., Any]
    needs_base: bool
    model_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    reference: str = ""
    randomized: bool = False
    takes_deltas: bool = False
    base_optional: bool = False
    ranges: dict[str, ParamRange] = field(default_factory=dict)
    """Valid values of numeric parameters (unlisted numeric ones take any finite number)."""
    text_params: tuple[str, ...] = ()
    """Parameters whose values are strings (a file path, a list written as text): never genes."""
    path_params: tuple[str, ...] = ()
    """Text parameters that name files (comma-separated): a relative path in a recipe file is also
    looked up in the recipe's folder, as model paths are (:func:`evomerge.merge.mergekit_io.load_recipe`)."""
    takes_name: bool = False
    """The method also receives ``tensor_name=`` (the output tensor's name), e.g. to know its role."""
    checks: dict[str, Callable[[Any], "str | None"]] = field(default_factory=dict)
    """Extra checks of a parameter's value (e.g. that a file exists): the reason it is wrong, or None."""

    def __post_init__(self):
        if self.needs_base and self.base_optional:
            raise ValueError(f"merge method {self.name!r}: needs_base and base_optional exclude each other")
        if self.takes_deltas and not (self.needs_base or self.base_optional):
            raise ValueError(f"merge method {self.name!r}: takes_deltas needs a base (needs_base or base_optional)")

    def uses_base(self, has_base: bool) -> bool:
        """Whether a merge with (``has_base``) or without a base model gives this method a base
        tensor: always for ``needs_base``, when one is given for ``base_optional``."""
        return self.needs_base or (self.base_optional and bool(has_base))

    def param_kind(self, name: str) -> str:
        """'bool' for a true/false parameter (its default is a bool), 'text' for a string parameter,
        else 'number'."""
        if name in self.text_params:
            return "text"
        default = self.model_params.get(name, self.global_params.get(name))
        return "bool" if isinstance(default, bool) else "number"

    def param_range(self, name: str) -> ParamRange:
        return self.ranges.get(name, ANY)

    def check_value(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not a valid setting of parameter ``name`` (one scalar), or None."""
        if self.param_kind(name) == "bool":
            if not isinstance(value, bool):
                return f"{name!r} of {self.name} is true or false, got {value!r}"
            return None
        if self.param_kind(name) == "text":
            if not isinstance(value, str) or not value.strip():
                return f"{name!r} of {self.name}: expected a non-empty string, got {value!r}"
            return self.checks[name](value) if name in self.checks else None
        if value is None and self.model_params.get(name, self.global_params.get(name, REQUIRED)) is None:
            return None  # an optional parameter left at its default (e.g. tsv's rank_fraction)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name!r} of {self.name}: expected a number, got {value!r}"
        if not math.isfinite(float(value)):
            return f"{name!r} of {self.name}: expected a finite number, got {value!r}"
        rng = self.param_range(name)
        if not rng.contains(float(value)):
            return f"{name!r} of {self.name} must be {rng.describe()}, got {value!r}"
        return None

    def check_bounds(self, name: str, lo: float, hi: float) -> str | None:
        """Why a gene searching ``name`` over [lo, hi] could leave the parameter's valid values, or None."""
        if self.param_kind(name) == "bool":
            return f"{name!r} of {self.name} is true or false and cannot be searched; set it under search_space.fixed"
        if self.param_kind(name) == "text":
            return f"{name!r} of {self.name} is a string and cannot be searched; set it under search_space.fixed"
        rng = self.param_range(name)
        if rng.integer:
            return f"{name!r} of {self.name} is an integer and cannot be searched; set it under search_space.fixed"
        if not (rng.contains(lo) and rng.contains(hi)):
            return f"{name!r} of {self.name} must be {rng.describe()}; bounds {[lo, hi]} leave that range"
        return None

    def __call__(self, tensors, base=None, *, generator=None, **params):
        return self.fn(tensors, base, generator=generator, **params)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; an unknown name is a user error listing the known ones."""
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise EvomergeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin_methods()
    return sorted(METHODS)


def _load_builtin_methods() -> None:
    # Importing the modules registers their methods.
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_BUILTIN_MODULES = [
    "evomerge.merge.methods.averaging",
    "evomerge.merge.methods.task_arithmetic",
    "evomerge.merge.methods.spherical",
    "evomerge.merge.methods.spectral",
    "evomerge.merge.methods.nino",
    "evomerge.merge.methods.stat_weighted",
]
