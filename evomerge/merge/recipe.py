"""Merge recipes: mergekit-style YAML in and out, validated with errors that name the field.

A recipe is either ``models`` (whole models) or ``slices`` (layer ranges, mergekit's
``slices: [{sources: [{model, layer_range: [start, end]}]}]``, end exclusive)::

    merge_method: ties
    base_model: models/base
    models:
      - model: models/expert_a
        parameters: {weight: 0.6, density: 0.5}
      - model: models/expert_b
        parameters:
          weight: [0.2, 0.8]          # gradient over the layers
          density:
            - filter: self_attn       # first matching filter wins
              value: 0.3
            - value: 0.7              # no filter: matches everything
    parameters: {lambda: 1.0}
    dtype: bfloat16

Parameter values (mergekit): a scalar; a list of numbers interpolated linearly at
``t = layer / (L − 1)`` over the *output* layers (tensors outside the decoder layers use the
first value; a list of one value is constant); or a list of ``{filter, value}`` entries where the
first entry whose ``filter`` is a substring of the tensor name wins (no filter matches
everything). Lookup order for a per-model parameter: the model (or slice source) entry, the
slice's ``parameters``, the top-level ``parameters``, the method's default.

Differences from mergekit: computation is always float32; ``dtype`` (or ``out_dtype``, which
wins) is the output dtype; ``tokenizer_source`` is ``base``, ``union`` or a model folder (differing
vocabularies are mapped by token in :mod:`evomerge.merge.vocab`); models are local folders only; ``seed`` (not a mergekit key, written only when
set) seeds randomized methods (DARE) per tensor so that merges are reproducible.

``align`` (not a mergekit key): models from different initialisations are first permuted into
one model's coordinates (:mod:`evomerge.align.recipe_step`)::

    align: {method: activations, reference: run1/, data: zoo:lang, seed: 0}

``method`` rebasin (default), c2m3 or activations; ``reference`` a model as written in the recipe
or a 0-based index into its distinct models, base first (default: the first of them); ``data``
one task or a list (``zoo:NAME`` or a task folder), for activations only.
"""

from __future__ import annotations

import math
import os
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from evomerge.align.spec import AlignSpec
from evomerge.devices import DTYPE_CHOICES, dtype_name
from evomerge.errors import EvomergeError, yaml_error_message

Scalar = Union[bool, int, float, str]


def _check_value(v: Any, where: str) -> Any:
    """Validate one parameter setting (scalar, gradient list, or filter list)."""
    if isinstance(v, bool) or isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: value {v} is not finite")
        return v
    if isinstance(v, str):
        return v
    if isinstance(v, dict):  # a single {filter, value}
        return _check_value([v], where)
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"{where}: empty list")
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
            for e in v:
                if not math.isfinite(float(e)):
                    raise ValueError(f"{where}: value {e} is not finite")
            return [float(e) if isinstance(e, float) else e for e in v]
        if all(isinstance(e, dict) for e in v):
            out = []
            for i, e in enumerate(v):
                extra = set(e) - {"filter", "value"}
                if extra:
                    raise ValueError(f"{where}[{i}]: unknown key(s) {sorted(extra)}; use 'filter' and 'value'")
                if "value" not in e:
                    raise ValueError(f"{where}[{i}]: missing 'value'")
                f = e.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ValueError(f"{where}[{i}].filter must be a string")
                val = e["value"]
                if isinstance(val, (dict,)) or (isinstance(val, list) and any(isinstance(x, dict) for x in val)):
                    raise ValueError(f"{where}[{i}].value must be a scalar or a list of numbers")
                out.append({"filter": f, "value": _check_value(val, f"{where}[{i}].value")} if f is not None
                           else {"value": _check_value(val, f"{where}[{i}].value")})
            return out
        raise ValueError(f"{where}: a list must hold only numbers (a gradient) or only {{filter, value}} entries")
    raise ValueError(f"{where}: unsupported value {v!r}")


def evaluate_setting(value: Any, tensor_name: str, t: float | None) -> Any:
    """Resolve a parameter setting for one tensor (``t``: layer position in [0, 1] or None)."""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for entry in value:
                f = entry.get("filter")
                if f is None or f == "*" or f in tensor_name:  # mergekit: '*' matches all
                    return evaluate_setting(entry["value"], tensor_name, t)
            return None
        if len(value) == 1 or t is None:
            return value[0]
        scaled = float(t) * (len(value) - 1)
        i0 = min(int(math.floor(scaled)), len(value) - 1)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        if frac == 0.0:
            return value[i0]
        return (1.0 - frac) * value[i0] + frac * value[i1]
    return value


def _validate_params(v):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("must be a mapping of parameter name to value")
    return {k: _check_value(val, str(k)) for k, val in v.items()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(_Strict):
    """One input model (``models:`` entry or slice source)."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    layer_range: tuple[int, int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"model": v} if isinstance(v, str) else v

    @field_validator("parameters", mode="before")
    @classmethod
    def check_parameters(cls, v):
        return _validate_params(v)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class SliceEntry(_Strict):
    """One output slice: sources with the same number of layers."""

    sources: list[ModelEntry]
    parameters: dict[str, Any] = Field(default_factory=dict)
    base_model: str | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def check_parameters(cls, v):
        return _validate_params(v)

    @model_validator(mode="after")
    def _ranges(self):
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        lens = []
        for i, s in enumerate(self.sources):
            if s.layer_range is None:
                raise ValueError(f"sources[{i}].layer_range is required in a slice")
            lens.append(s.layer_range[1] - s.layer_range[0])
        if len(set(lens)) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {lens}")
        return self


class MergeRecipe(_Strict):
    """A merge recipe (mergekit-compatible subset; see the module docstring)."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None
    seed: int | None = None
    align: AlignSpec | None = None

    _recipe_dir: str | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> str | None:
        """The folder of the file this recipe was read from, if any: relative model paths are
        also tried against it (:func:`evomerge.models.resolve_model`)."""
        return self._recipe_dir

    @field_validator("parameters", mode="before")
    @classmethod
    def check_parameters(cls, v):
        return _validate_params(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is None:
            return v
        name = dtype_name(v)
        if name is None:
            raise ValueError(f"unknown dtype {v!r}; use {DTYPE_CHOICES}")
        return name

    @model_validator(mode="after")
    def _check(self):
        from evomerge.merge.registry import REQUIRED, get_method

        if (self.models is None) == (self.slices is None):
            raise EvomergeError("give exactly one of 'models' or 'slices'")
        if self.models is not None:
            if not self.models:
                raise EvomergeError("field 'models': at least one model is needed")
            for i, m in enumerate(self.models):
                if m.layer_range is not None:
                    raise EvomergeError(f"field 'models[{i}].layer_range': use 'slices' for layer ranges")
        spec = get_method(self.merge_method)
        known = set(spec.model_params) | set(spec.global_params)

        def check_params(params: dict, where: str, per_model: bool, model: str | None = None) -> None:
            for k in params:
                if k in known:
                    for v in _scalars(params[k]):
                        why = spec.check_value(k, v)
                        if why is not None:
                            who = f"model {model!r}: " if model is not None else ""
                            raise EvomergeError(f"field '{where}.{k}': {who}{why}")
                if k not in known:
                    hint = f"; {spec.name} accepts: {', '.join(sorted(known))}" if known else f"; {spec.name} takes no parameters"
                    raise EvomergeError(f"field '{where}.{k}': unknown parameter {k!r}{hint}")
                if per_model and k not in spec.model_params:
                    raise EvomergeError(
                        f"field '{where}.{k}': {k!r} is a method-level parameter of {spec.name}; "
                        "set it under the top-level 'parameters'"
                    )

        check_params(self.parameters, "parameters", per_model=False)
        groups = [("models", self.models or [], {}, None)] if self.models is not None else [
            (f"slices[{i}].sources", s.sources, s.parameters, s.base_model) for i, s in enumerate(self.slices or [])
        ]
        if self.slices is not None:
            for i, s in enumerate(self.slices):
                check_params(s.parameters, f"slices[{i}].parameters", per_model=False)
        if spec.needs_base and self.base_model is None and not (self.slices and all(s.base_model for s in self.slices)):
            raise EvomergeError(f"field 'base_model': merge_method {spec.name!r} needs a base_model")
        for where, entries, slice_params, slice_base in groups:
            for i, m in enumerate(entries):
                check_params(m.parameters, f"{where}[{i}].parameters", per_model=True, model=m.model)
            # a base-optional method (nuslerp, multislerp) uses the base when one is given: then, as
            # for needs_base methods, an entry naming the base is not one of the merged models
            with_base = spec.uses_base(slice_base or self.base_model)
            sources = [m for m in entries if not (with_base and self._is_base(m.model, slice_base))]
            n = len(sources)
            if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
                want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                        else f"at least {spec.min_models}" + (f" and at most {spec.max_models}" if spec.max_models else ""))
                raise EvomergeError(
                    f"field '{where}': merge_method {spec.name!r} takes {want} model(s)"
                    + (" besides the base_model" if with_base else "") + f", got {n}"
                )
            for i, m in enumerate(entries):
                if with_base and self._is_base(m.model, slice_base):
                    continue
                for p, default in spec.model_params.items():
                    if default is REQUIRED and p not in m.parameters and p not in self.parameters and p not in slice_params:
                        raise EvomergeError(
                            f"field '{where}[{i}].parameters.{p}': model {m.model!r} needs parameter "
                            f"{p!r} for {spec.name} (set it per model or under top-level 'parameters')"
                        )
        for p, default in spec.global_params.items():
            if default is REQUIRED and p not in self.parameters and not (
                self.slices and all(p in s.parameters for s in self.slices)
            ):
                raise EvomergeError(f"field 'parameters.{p}': {spec.name} needs parameter {p!r}")
        if self.align is not None:
            self.align_reference()
        return self

    def align_reference(self) -> int:
        """The index of ``align.reference`` among :meth:`model_paths` (0 when not given)."""
        refs, ref = self.model_paths(), self.align.reference
        if len(refs) < 2:
            raise EvomergeError("field 'align': alignment needs at least two distinct models in the recipe")
        if ref is None:
            return 0
        if isinstance(ref, int):
            if not 0 <= ref < len(refs):
                raise EvomergeError(f"field 'align.reference': index {ref} is out of range; the recipe has "
                                    f"{len(refs)} distinct models (0-based, base first)")
            return ref
        for i, r in enumerate(refs):
            if _same_model(r, ref):
                return i
        raise EvomergeError(f"field 'align.reference': {ref!r} is not one of the recipe's models "
                            f"({', '.join(refs)}); give it as written there, or its 0-based index")

    def _is_base(self, model: str, slice_base: str | None = None) -> bool:
        base = slice_base or self.base_model
        return base is not None and _same_model(model, base)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        """Plain dict in mergekit's layout (unset optional keys left out)."""
        d: dict[str, Any] = {}
        if self.slices is not None:
            d["slices"] = [
                {k: v for k, v in {
                    "sources": [_entry_dict(s) for s in sl.sources],
                    "parameters": sl.parameters or None,
                    "base_model": sl.base_model,
                }.items() if v is not None}
                for sl in self.slices
            ]
        else:
            d["models"] = [_entry_dict(m) for m in self.models or []]
        d["merge_method"] = self.merge_method
        if self.base_model is not None:
            d["base_model"] = self.base_model
        if self.parameters:
            d["parameters"] = _plain(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source", "name", "seed"):
            v = getattr(self, key)
            if v is not None:
                d[key] = v
        if self.align is not None:
            d["align"] = self.align.model_dump(exclude_none=True)
        return d

    def to_yaml(self) -> str:
        """mergekit-compatible YAML (``seed`` and ``align`` only when set)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "MergeRecipe":
        """Validate a dict; errors become :class:`EvomergeError` naming the field."""
        return validate_mapping(cls, data, source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> "MergeRecipe":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EvomergeError(yaml_error_message(source, exc)) from None
        return cls.from_dict(data, source)

    # ------------------------------------------------------------------ helpers
    def model_paths(self) -> list[str]:
        """All distinct model references, base first."""
        seen: list[str] = []
        refs = [self.base_model] if self.base_model else []
        if self.models is not None:
            refs += [m.model for m in self.models]
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs += [src.model for src in s.sources]
        for r in refs:
            if r is not None and not any(_same_model(r, x) for x in seen):
                seen.append(r)
        return seen

    def structure_key(self) -> tuple:
        """What the merge plan depends on (everything but parameter values and seed). Every merge
        (on disk or in memory) plans through it, so a recipe whose ``align`` was not carried out
        is refused here rather than merged unaligned."""
        if self.align is not None:
            raise EvomergeError("field 'align': the merge engine merges the models as given; align them first "
                                "with evomerge.align.recipe_step.resolve_alignment(recipe) (evomerge merge and "
                                "evomerge eval do)")
        if self.slices is not None:
            sl = tuple((s.base_model, tuple((x.model, x.layer_range) for x in s.sources)) for s in self.slices)
        else:
            sl = None
        models = tuple(m.model for m in self.models) if self.models is not None else None
        return (self.merge_method, self.base_model, models, sl)


def _scalars(setting: Any):
    """The scalar values inside a parameter setting (scalar, gradient list or filter list)."""
    if isinstance(setting, list):
        for e in setting:
            yield from _scalars(e["value"] if isinstance(e, dict) else e)
    else:
        yield setting


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _entry_dict(m: ModelEntry) -> dict:
    d: dict[str, Any] = {"model": m.model}
    if m.layer_range is not None:
        d["layer_range"] = list(m.layer_range)
    if m.parameters:
        d["parameters"] = _plain(m.parameters)
    return d


def validate_mapping(model: type[BaseModel], data: Any, source: str):
    """``model.model_validate(data)`` for a top-level mapping read from ``source``; a non-mapping or
    a validation error (or an :class:`EvomergeError` from a validator) becomes one
    :class:`EvomergeError` naming ``source`` and the field."""
    if not isinstance(data, dict):
        raise EvomergeError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EvomergeError(f"{source}: {_format_validation_error(exc)}") from None
    except EvomergeError as exc:
        raise EvomergeError(f"{source}: {exc}") from None


def _format_validation_error(exc: ValidationError) -> str:
    msgs = []
    for err in exc.errors():
        loc = ""
        for part in err.get("loc", ()):
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        typ = err.get("type", "")
        msg = err.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if typ == "extra_forbidden":
            key = loc.rsplit(".", 1)[-1]
            msgs.append(f"unknown key {key!r} at '{loc}'")
        elif typ == "missing":
            msgs.append(f"field '{loc}' is required")
        else:
            msgs.append(f"field '{loc}': {msg}" if loc else msg)
    return "; ".join(msgs)
