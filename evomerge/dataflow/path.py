"""Data-flow paths: which decoder layers a token passes through, in which order, with which
input scale -- the recipe a data-flow search finds and a checkpoint records.

A :class:`DataflowPath` is an ordered, non-empty list of :class:`DataflowStep` ``(model 'A' | 'B',
layer, scale)``; ``scale`` multiplies the residual stream right before the layer and must be > 0
(it is folded into the weights, see :mod:`evomerge.dataflow.fold`). The first step's scale is 1
by convention (it reads the embeddings). :func:`cumulative_scales` gives ``C_k = s_1 ... s_k`` and
refuses a path whose ``C_k`` leaves ``[MIN_CUM_SCALE, MAX_CUM_SCALE]`` (the reference stream itself
would be meaningless in float32). JSON form (``PATH_FILE`` beside a written checkpoint)::

    {"format": "evomerge.dataflow/1", "steps": [{"model": "A", "layer": 0, "scale": 1.0}, ...],
     "meta": {...}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

from evomerge.errors import EvomergeError

__all__ = [
    "DataflowError",
    "DataflowStep",
    "DataflowPath",
    "cumulative_scales",
    "PATH_FORMAT",
    "PATH_FILE",
    "MIN_CUM_SCALE",
    "MAX_CUM_SCALE",
]

PATH_FORMAT = "evomerge.dataflow/1"
PATH_FILE = "dataflow_path.json"
MIN_CUM_SCALE = 1e-18
MAX_CUM_SCALE = 1e18


class DataflowError(EvomergeError):
    """A dataflow path or its sources cannot be materialised (message says why and what to do)."""


@dataclass(frozen=True)
class DataflowStep:
    """One decoder layer on the path: ``model`` 'A' or 'B', its ``layer`` index in that model,
    and the ``scale`` applied to the residual stream right before it (must be > 0)."""

    model: Literal["A", "B"]
    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.model not in ("A", "B"):
            raise DataflowError(f"dataflow step: model must be 'A' or 'B', got {self.model!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 0:
            raise DataflowError(f"dataflow step: layer must be an integer >= 0, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        try:
            s = float(self.scale)
        except (TypeError, ValueError):
            raise DataflowError(f"dataflow step {self.model}{self.layer}: scale must be a number, got {self.scale!r}") from None
        if not math.isfinite(s) or s <= 0.0:
            raise DataflowError(
                f"dataflow step {self.model}{self.layer}: scale {self.scale!r} cannot be folded into the "
                "weights (RMSNorm is invariant to positive scales only); use a scale > 0 "
                "(DataflowSpace bounds scales to (lo, hi) with lo > 0)"
            )
        object.__setattr__(self, "scale", s)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "layer": self.layer, "scale": self.scale}


class DataflowPath(Sequence[DataflowStep]):
    """An ordered, non-empty list of :class:`DataflowStep`; JSON round trip via
    :meth:`to_json` / :meth:`from_json` (``{"format": ..., "steps": [{model, layer, scale}]}``)."""

    def __init__(self, steps: Iterable[DataflowStep | dict | tuple], meta: dict | None = None) -> None:
        out: list[DataflowStep] = []
        for i, st in enumerate(steps):
            if isinstance(st, DataflowStep):
                out.append(st)
            elif isinstance(st, dict):
                unknown = set(st) - {"model", "layer", "scale"}
                if unknown or "model" not in st or "layer" not in st:
                    raise DataflowError(
                        f"dataflow path step {i}: expected keys model, layer[, scale], got {sorted(st)}"
                    )
                out.append(DataflowStep(st["model"], st["layer"], st.get("scale", 1.0)))
            else:
                out.append(DataflowStep(*st))
        if not out:
            raise DataflowError("dataflow path is empty: it must keep at least one decoder layer")
        self._steps = tuple(out)
        self.meta = dict(meta or {})

    # Sequence protocol
    def __len__(self) -> int:
        return len(self._steps)

    def __getitem__(self, i):  # type: ignore[override]
        return self._steps[i]

    def __iter__(self) -> Iterator[DataflowStep]:
        return iter(self._steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataflowPath) and self._steps == other._steps

    def __hash__(self) -> int:
        return hash(self._steps)

    def __repr__(self) -> str:
        body = " ".join(
            f"{s.model}{s.layer}" + ("" if s.scale == 1.0 else f"x{s.scale:.3g}") for s in self._steps
        )
        return f"DataflowPath[{len(self)}]({body})"

    @property
    def steps(self) -> tuple[DataflowStep, ...]:
        return self._steps

    @classmethod
    def identity(cls, num_layers: int, model: Literal["A", "B"] = "A") -> "DataflowPath":
        """The path through all layers of one model, in order, scales 1."""
        return cls(DataflowStep(model, i, 1.0) for i in range(num_layers))

    def cumulative_scales(self) -> list[float]:
        return cumulative_scales(self)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PATH_FORMAT, "steps": [s.to_dict() for s in self._steps]}
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataflowPath":
        if not isinstance(d, dict) or "steps" not in d:
            raise DataflowError("dataflow path JSON: expected an object with a 'steps' list")
        fmt = d.get("format", PATH_FORMAT)
        if fmt != PATH_FORMAT:
            raise DataflowError(f"dataflow path JSON: unknown format {fmt!r} (expected {PATH_FORMAT!r})")
        return cls(d["steps"], meta=d.get("meta"))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "DataflowPath":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataflowError(f"dataflow path JSON: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, file: str | os.PathLike) -> None:
        p = Path(file)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json(indent=1) + "\n")
        os.replace(tmp, p)

    @classmethod
    def load(cls, file: str | os.PathLike) -> "DataflowPath":
        p = Path(file)
        if p.is_dir():
            p = p / PATH_FILE
        try:
            text = p.read_text()
        except OSError as e:
            raise DataflowError(f"{p}: cannot read dataflow path ({e})") from None
        try:
            return cls.from_json(text)
        except DataflowError as e:
            raise DataflowError(f"{p}: {e}") from None


def cumulative_scales(path: DataflowPath) -> list[float]:
    """``C_k = s_1 * ... * s_k`` for every step; raises if one leaves [1e-18, 1e18]."""
    out, c = [], 1.0
    for k, st in enumerate(path):
        c *= st.scale
        if not (MIN_CUM_SCALE <= c <= MAX_CUM_SCALE):
            raise DataflowError(
                f"dataflow path step {k} ({st.model}{st.layer}): cumulative input scale {c:.3g} is outside "
                f"[{MIN_CUM_SCALE:g}, {MAX_CUM_SCALE:g}]; the scaled residual stream is not representable. "
                "Narrow scale_bounds or shorten the path"
            )
        out.append(c)
    return out
