"""The ``align:`` step of merge recipes and search configs: align the models once into a
content-addressed cache folder, then merge the aligned checkpoints.

The folder is ``<cache root>/aligned/<key>``: the key hashes the alignment settings (method,
reference, data, seed) and each input model's identity (its resolved folder and the name, size
and modification time of every file in it), so the same models and settings reuse one folder
and a changed model gets a new one. The cache root is ``$EVOMERGE_CACHE`` or
``~/.cache/evomerge``. The folder is written atomically by :func:`~evomerge.align.disk.align_to_disk`
(``alignment.json`` inside records what was done).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from evomerge.errors import EvomergeError

ALIGN_FORMAT = 1
"""Bumped when the aligned output of the same inputs and settings changes."""


def cache_root() -> Path:
    """``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``."""
    env = os.environ.get("EVOMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge"


def _model_identity(path: Path) -> dict:
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file())
    return {"path": os.path.realpath(path), "files": files}


def alignment_key(paths: Sequence[Path], method: str, reference: int, data: Sequence[str], seed: int) -> str:
    """The cache key of aligning ``paths`` to ``paths[reference]`` with these settings."""
    record = {"format": ALIGN_FORMAT, "method": method, "reference": reference, "seed": seed,
              "data": list(data), "models": [_model_identity(Path(p)) for p in paths]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def _check_llama_style(paths: Sequence[Path], where: str) -> None:
    from evomerge.align.symmetries import LLAMA_STYLE_MODEL_TYPES

    for p in paths:
        try:
            model_type = json.loads((Path(p) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise EvomergeError(f"{where}: cannot read {p}/config.json ({exc})") from None
        if model_type not in LLAMA_STYLE_MODEL_TYPES:
            raise EvomergeError(f"{where}: model {p} has model_type {model_type!r}; alignment knows the "
                                f"permutation symmetries of {', '.join(LLAMA_STYLE_MODEL_TYPES)} decoders only")


def _task_refs(data: Sequence[str], base_dir: str | Path | None, where: str) -> list[str]:
    """``data`` with task folders made absolute (``zoo:NAME`` as given)."""
    from evomerge.align.data import task_folder

    return [d if d.startswith("zoo:") else str(task_folder(d, where, base_dir)) for d in data]


def aligned_folder(paths: Sequence[Path], method: str, reference: int, data: Sequence[str], seed: int, where: str,
                   base_dir: str | Path | None = None) -> Path:
    """The cache folder of aligning ``paths`` with these settings (nothing is computed; the
    models are checked to be Llama-style and the data tasks to exist)."""
    paths = [Path(p) for p in paths]
    _check_llama_style(paths, where)
    data = _task_refs(data, base_dir, where)
    return cache_root() / "aligned" / alignment_key(paths, method, reference, data, seed)


def align_models(paths: Sequence[Path], method: str, reference: int, data: Sequence[str], seed: int, where: str,
                 base_dir: str | Path | None = None, log: Callable[[str], None] | None = None
                 ) -> tuple[Path, list[Path]]:
    """Align ``paths`` (resolved model folders) into ``paths[reference]``'s coordinates, or reuse
    the cached result: ``(cache folder, aligned folder per input)``. Errors name ``where``."""
    from evomerge.align.disk import align_to_disk, output_names

    paths = [Path(p) for p in paths]
    folder = aligned_folder(paths, method, reference, data, seed, where, base_dir)
    names = output_names(paths)
    if (folder / "alignment.json").is_file() and all((folder / n).is_dir() for n in names):
        if log is not None:
            log(f"reusing the aligned models in {folder}")
        return folder, [folder / n for n in names]
    if log is not None:
        log(f"aligning {len(paths)} models ({method}) into {folder}")
    try:
        align_to_disk(paths, folder, method=method, reference=reference, seed=seed, overwrite=True,
                      data=_task_refs(data, base_dir, where), names=names)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}: {exc}") from None
    return folder, [folder / n for n in names]


def resolve_alignment(recipe, log: Callable[[str], None] | None = None):
    """``recipe`` itself when it has no ``align``; else the same recipe over the aligned
    checkpoints (every model reference replaced by its aligned folder, ``align`` removed)."""
    from evomerge.merge.recipe import MergeRecipe
    from evomerge.models import resolve_model

    if recipe.align is None:
        return recipe
    refs = recipe.model_paths()
    paths = [resolve_model(r, base_dir=recipe.source_dir) for r in refs]
    spec = recipe.align
    _, aligned = align_models(paths, spec.method, recipe.align_reference(), spec.tasks, spec.seed,
                              "field 'align'", base_dir=recipe.source_dir, log=log)
    by_path = {os.path.realpath(p): str(a) for p, a in zip(paths, aligned)}

    def fix(ref):
        if ref is None:
            return None
        return by_path[os.path.realpath(resolve_model(ref, base_dir=recipe.source_dir))]

    d = recipe.to_dict()
    d.pop("align")
    for holder, key in _model_fields(d):
        holder[key] = fix(holder[key])
    out = MergeRecipe.from_dict(d, "recipe (aligned)")
    out._recipe_dir = recipe.source_dir
    return out


def _model_fields(d: dict) -> list[tuple[dict, str]]:
    """``(holder, key)`` of every model reference in a recipe dict (not tokenizer_source)."""
    fields = [(d, "base_model")] if d.get("base_model") is not None else []
    fields += [(m, "model") for m in d.get("models") or []]
    for s in d.get("slices") or []:
        if s.get("base_model") is not None:
            fields.append((s, "base_model"))
        fields += [(src, "model") for src in s.get("sources") or []]
    return fields
