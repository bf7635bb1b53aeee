"""Statistics files: one safetensors file per (model, task), tensors keyed by parameter name.

Metadata (strings): ``format`` (``evomerge-stats``), ``kind`` (``fisher`` or ``gram``), ``model``,
``task``, ``items`` (how many prompts), ``tokens`` (how many token positions were seen), ``labels``
(how the model labelled the prompts). A Gram matrix is stored under the name of the linear layer's
weight it belongs to (``model.layers.0.mlp.down_proj.weight``), shape ``(in, in)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from evomerge.errors import EvomergeError

FORMAT = "evomerge-stats"
KINDS = ("fisher", "gram")


@dataclass(frozen=True)
class StatsFile:
    """A statistics file opened for reading tensors by name (lazily, one at a time)."""

    path: str
    kind: str
    meta: dict[str, str]
    stamp: int = 0  # the file's mtime (ns) when opened: a rewritten file is read afresh

    def names(self) -> list[str]:
        return sorted(_names(self.path, self.stamp))

    def has(self, name: str) -> bool:
        return name in _names(self.path, self.stamp)

    def get(self, name: str):
        """The statistic of the parameter ``name`` (float32); a missing name is a user error."""
        if not self.has(name):
            raise EvomergeError(f"{self.path}: no {self.kind} statistic for tensor {name!r} (was it computed on "
                                f"another model? this file is for {self.meta.get('model', '?')})")
        return _handle(self.path, self.stamp).get_tensor(name).float()


@lru_cache(maxsize=32)
def _handle(path: str, stamp: int):
    from safetensors import safe_open

    return safe_open(path, framework="pt")


@lru_cache(maxsize=32)
def _names(path: str, stamp: int) -> frozenset[str]:
    return frozenset(_handle(path, stamp).keys())


def open_stats(path: str | os.PathLike, kind: str | None = None) -> StatsFile:
    """Open a statistics file written by :func:`write_stats`; ``kind`` (fisher / gram) is checked."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvomergeError(f"statistics file {str(path)!r} does not exist (make it with `evomerge stats`; a relative "
                            f"path is read from the current directory, {Path.cwd()})")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise EvomergeError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise EvomergeError(f"{path}: not an evomerge statistics file (make it with `evomerge stats`)")
    if kind is not None and meta.get("kind") != kind:
        raise EvomergeError(f"{path}: holds {meta.get('kind')!r} statistics, this needs {kind!r} "
                            f"(`evomerge stats --kind {kind}`)")
    return StatsFile(str(p.resolve()), meta["kind"], meta, p.stat().st_mtime_ns)


def write_stats(path: str | os.PathLike, tensors: Iterable, kind: str, meta: dict) -> Path:
    """Write ``(name, tensor)`` pairs as a statistics file of ``kind`` (atomically)."""
    from safetensors.torch import save

    from evomerge.fsutil import atomic_output

    if kind not in KINDS:
        raise ValueError(kind)
    info = {"format": FORMAT, "kind": kind, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    data = save({n: t.contiguous() for n, t in tensors}, metadata=info)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
