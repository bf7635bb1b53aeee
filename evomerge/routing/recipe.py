"""A MASS routed model as a recipe: ``merge_method: mass`` for ``evomerge merge``.

A routed model is not one checkpoint (see :mod:`evomerge.routing`), so this recipe is not a
merge method of the engine: ``evomerge merge`` recognises it by its ``merge_method`` and writes
the routed folder (base/, factors.safetensors, routing.json) that ``evomerge eval DIR`` and
:func:`evomerge.routing.load_routed` run — the same folder as ``evomerge route``::

    merge_method: mass
    base_model: base/
    models:
      - model: lang_expert/
      - model: cipher_expert/
    parameters:          # all optional; the values below are the defaults
      routing_tensor: null      # the second-to-last layer's mlp.gate_proj.weight
      temperature: 1.0
      threshold: 0.2
      max_tasks: null           # no limit
      standardize: true
      rank_fraction: null       # 1/T, as tsv

Model references are folders (relative ones are read from the recipe's folder), ``zoo:NAME`` or
hub ids. It cannot be searched and has no mergekit equivalent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError

__all__ = ["RoutedRecipe", "is_routed_recipe", "load_routed_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoutedParameters(_Strict):
    """The routing settings (``evomerge route``'s options)."""

    routing_tensor: Optional[str] = None
    temperature: float = Field(1.0, gt=0)
    threshold: float = Field(0.2, ge=0, le=1)
    max_tasks: Optional[int] = Field(None, ge=1)
    standardize: bool = True
    rank_fraction: Optional[float] = Field(None, gt=0, le=1)


class RoutedModel(_Strict):
    model: str


class RoutedRecipe(_Strict):
    """``merge_method: mass``: the base, two or more fine-tunes of it, the routing settings."""

    merge_method: Literal["mass"]
    base_model: str
    models: list[RoutedModel] = Field(min_length=2)
    parameters: RoutedParameters = Field(default_factory=RoutedParameters)
    name: Optional[str] = None


def is_routed_recipe(path: str | Path) -> bool:
    """Whether the recipe file at ``path`` asks for a MASS routed model (``merge_method: mass``).
    Unreadable files answer False (the ordinary recipe reader then names the problem)."""
    p = Path(path)
    if not p.is_file():
        return False
    from evomerge.merge.mergekit_io import read_recipe_yaml

    try:
        data = read_recipe_yaml(p)
    except EvomergeError:
        return False
    return isinstance(data, dict) and data.get("merge_method") == "mass"


def load_routed_recipe(path: str | Path) -> RoutedRecipe:
    """Read and validate a ``merge_method: mass`` recipe; errors name the file and field."""
    from evomerge.merge.mergekit_io import read_recipe_yaml
    from evomerge.merge.recipe import validate_mapping

    p = Path(path)
    return validate_mapping(RoutedRecipe, read_recipe_yaml(p), str(p))


def resolve_reference(ref: str, recipe_dir: Path, what: str) -> Path:
    """A recipe's model reference as a folder: relative to the recipe's folder when that exists,
    else as ``evomerge.models.resolve_model`` reads it (a folder, zoo:NAME, a hub id)."""
    from evomerge.models import resolve_model

    local = recipe_dir / ref
    if not Path(ref).is_absolute() and local.is_dir():
        return local
    return resolve_model(ref, what=what)


def write_routed_model(out: str | Path, base: Path, experts: list[Path], params: RoutedParameters,
                       overwrite: bool = False, allow_pickle: bool = False, names=None):
    """Save the routed model of ``base`` and ``experts`` with ``params`` to ``out`` (atomically);
    returns the task factors (:func:`evomerge.routing.disk.save_routed`) and the routing tensor."""
    from evomerge.checkpoint import CheckpointReader
    from evomerge.routing.disk import save_routed
    from evomerge.routing.router import RoutingSettings, default_routing_tensor

    tensor = params.routing_tensor
    if tensor is None:
        tensor = default_routing_tensor(CheckpointReader(base, allow_pickle=allow_pickle).num_layers)
    try:
        settings = RoutingSettings(tensor, temperature=params.temperature, threshold=params.threshold,
                                   max_tasks=params.max_tasks, standardize=params.standardize)
    except EvomergeError as exc:
        raise EvomergeError(f"routing_tensor: {exc}") from None
    tf = save_routed(out, base, experts, settings, rank_fraction=params.rank_fraction, names=names,
                     overwrite=overwrite, allow_pickle=allow_pickle)
    return tf, tensor


def merge_routed_recipe(path: str | Path, out: str | Path, overwrite: bool = False, allow_pickle: bool = False):
    """``evomerge merge`` of a ``merge_method: mass`` recipe: resolve its models, write the routed
    folder to ``out``; returns the task factors and the routing tensor."""
    import contextlib
    import sys

    rec = load_routed_recipe(path)
    where = Path(path).absolute().parent
    with contextlib.redirect_stdout(sys.stderr):  # a zoo build's progress lines
        base = resolve_reference(rec.base_model, where, "base_model")
        experts = [resolve_reference(m.model, where, f"models[{i}].model") for i, m in enumerate(rec.models)]
    try:
        return write_routed_model(out, base, experts, rec.parameters, overwrite=overwrite, allow_pickle=allow_pickle)
    except EvomergeError as exc:
        msg = str(exc).removeprefix("routing_tensor: ")
        if msg.startswith("routing tensor"):
            msg = f"field 'parameters.routing_tensor': {msg}"
        raise EvomergeError(f"{path}: {msg}") from None
