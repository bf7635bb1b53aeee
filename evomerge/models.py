"""Model references -> local checkpoint folders: the one resolver of ``merge``, ``eval`` and
``search``.

A reference is one of

- ``zoo:NAME``: a model of the embedded demo zoo (built on first use, cached on disk);
- a local folder: absolute, ``~/...``, or relative — tried against the current directory, then
  against ``base_dir`` (a recipe file's folder);
- a Hugging Face hub id ``owner/name``, downloaded (weights, config and tokenizer files only)
  with ``huggingface_hub`` when no local folder of that name exists; offline, or with
  ``HF_HUB_OFFLINE=1``, only what the hub cache already holds is found.

Errors are :class:`~evomerge.errors.EvomergeError` naming ``what`` (the field or argument that
held the reference) and the reference, and saying what to give instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from evomerge.errors import EvomergeError

__all__ = ["resolve_model", "demo_zoo"]

#: ``owner/name``: the form of a hub id (one slash, no leading ``.``, ``/`` or ``~``)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: the files a merge or an evaluator reads from a hub model
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]

_ZOOS: dict = {}


def demo_zoo():
    """The embedded zoo (built on first use, cached on disk; looked up once per process)."""
    from evomerge.zoo import build_zoo, default_root

    root = str(default_root())
    if root not in _ZOOS:
        _ZOOS[root] = build_zoo(verbose=True)
    return _ZOOS[root]


def resolve_model(ref: str, *, base_dir: str | os.PathLike | None = None, what: str = "model") -> Path:
    """The local folder of the model ``ref`` (see the module docstring); ``what`` names where
    the reference was given, for the error message."""
    ref = str(ref)
    if ref.startswith("zoo:"):
        try:
            return Path(demo_zoo().model(ref[4:])).absolute()
        except EvomergeError as exc:
            raise EvomergeError(f"{what} {ref!r}: {exc}") from None
    p = Path(ref).expanduser()
    tries = [p] if p.is_absolute() or base_dir is None else [p, Path(base_dir) / p]
    for t in tries:
        if t.is_dir():
            return t.absolute()
    for t in tries:
        if t.exists():
            raise EvomergeError(f"{what} {ref!r}: is a file, not a model folder (give the folder that holds "
                                "config.json and the safetensors weights)")
    if HUB_ID.match(ref):
        return _download(ref, what)
    where = "the current directory" + (" and the recipe's folder" if base_dir is not None else "")
    raise EvomergeError(f"{what} {ref!r}: folder not found (give a local Hugging Face model folder — relative "
                        f"paths are resolved against {where} —, zoo:NAME, or a hub id owner/name)")


def _download(ref: str, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown id, gated...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"{what} {ref!r}: no such local folder, and not downloadable from the Hugging "
                            f"Face hub ({type(exc).__name__}: {reason}); give a local model folder") from None
