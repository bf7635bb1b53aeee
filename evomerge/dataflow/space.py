"""The data-flow genome: a vector in ``[0, 1]^dim`` <-> a :class:`~evomerge.dataflow.path.DataflowPath`.

This is the data-flow search space of Sakana AI's evolutionary model merging (arXiv 2403.13187):

* Two models A and B with ``M = L_A + L_B`` decoder layers in total are laid out in order
  (A's layers, then B's) and the layout is repeated ``r`` times: ``T = M * r`` slots.
* An indicator per slot: the slot's layer is on the path when the indicator is > 0.
* A scale matrix ``W`` (M x M): ``W[i, j]`` multiplies the input of layer ``j`` when the
  previous layer on the path is layer ``i`` (layers numbered 0..M-1, A's first).
  The first layer on the path reads the embeddings with scale 1 (there is no predecessor;
  the embeddings come from A, whose first layers were trained on exactly that magnitude).
* Embeddings, final norm and lm_head come from model A (so do the tokenizer files).

Genome encoding (for a CMA-ES that searches the unit cube):

* ``x[:T]`` are the indicators; the paper's indicator is ``I = 2x - 1``, so a slot is kept
  when ``x > 0.5``. Values outside [0, 1] are clipped.
* ``x[T:]`` are the scales. ``scale_mode="matrix"`` (the paper): M*M genes, row-major
  ``W[i, j]``. ``"layer"``: M genes, one input scale per layer regardless of the predecessor
  (a much smaller space: T + M genes instead of T + M^2 -- 192 + 64 instead of 192 + 4096
  for the 7B setting -- which matters to CMA-ES, whose covariance is d x d).
  ``"none"``: no scale genes, every scale is 1 (the paper's "without W" ablation).
* Scales map from a gene ``u`` log-uniformly into ``scale_bounds = (lo, hi)``:
  ``s = lo * (hi / lo) ** u`` (``scale_mapping="log"``, default: scales compose by
  multiplication along the path, so 1/2 and 2 should be equally far from 1) or linearly
  ``s = lo + u (hi - lo)``. ``0 < lo <= 1 <= hi``: scales can never be non-positive and
  the identity (scale 1) is representable.
* ``initial_genome()`` keeps the slots of A's layers in the first repeat
  (``0.5 + margin``), drops the others (``0.5 - margin``) and sets every scale to 1: it
  decodes to model A itself.
* Empty path (no indicator > 0): ``empty="best"`` (default) keeps the single slot with the
  largest indicator -- a defined, continuous fallback so a search never crashes on it;
  ``empty="error"`` raises :class:`DataflowError`. ``max_layers`` (optional) keeps only the
  ``max_layers`` slots with the largest indicators (in path order) so a candidate cannot
  exceed a memory budget.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from evomerge.dataflow.path import DataflowError, DataflowPath, DataflowStep

__all__ = ["DataflowSpace"]


class DataflowSpace:
    """Genome <-> :class:`DataflowPath` for two models with ``layers_a`` and ``layers_b`` layers.

    ``dim = T + n_scale_genes`` with ``T = (layers_a + layers_b) * repeats`` indicator genes and
    ``M*M`` ("matrix"), ``M`` ("layer") or 0 ("none") scale genes. See the module docstring.
    """

    def __init__(
        self,
        layers_a: int,
        layers_b: int,
        repeats: int = 1,
        scale_bounds: tuple[float, float] | None = (0.5, 2.0),
        *,
        scale_mode: Literal["matrix", "layer", "none"] = "matrix",
        scale_mapping: Literal["log", "linear"] = "log",
        empty: Literal["best", "error"] = "best",
        max_layers: int | None = None,
        init_margin: float = 0.25,
    ) -> None:
        for name, v, lo in (("layers_a", layers_a, 1), ("layers_b", layers_b, 0), ("repeats", repeats, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise DataflowError(f"DataflowSpace: {name} must be an integer >= {lo}, got {v!r}")
        if scale_mode not in ("matrix", "layer", "none"):
            raise DataflowError(f"DataflowSpace: scale_mode must be matrix|layer|none, got {scale_mode!r}")
        if scale_mapping not in ("log", "linear"):
            raise DataflowError(f"DataflowSpace: scale_mapping must be log|linear, got {scale_mapping!r}")
        if empty not in ("best", "error"):
            raise DataflowError(f"DataflowSpace: empty must be best|error, got {empty!r}")
        if max_layers is not None and (not isinstance(max_layers, (int, np.integer)) or max_layers < 1):
            raise DataflowError(f"DataflowSpace: max_layers must be an integer >= 1 or None, got {max_layers!r}")
        if not (0.0 < init_margin <= 0.5):
            raise DataflowError(f"DataflowSpace: init_margin must be in (0, 0.5], got {init_margin!r}")
        if scale_bounds is None:
            scale_mode = "none"
            scale_bounds = (1.0, 1.0)
        lo, hi = (float(scale_bounds[0]), float(scale_bounds[1]))
        if scale_mode != "none":
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= 1.0 <= hi and lo < hi):
                raise DataflowError(
                    f"DataflowSpace: scale_bounds must satisfy 0 < lo <= 1 <= hi, lo < hi; got {scale_bounds!r} "
                    "(scales must stay positive to be foldable, and 1 must be reachable for the initial genome)"
                )
        self.layers_a = int(layers_a)
        self.layers_b = int(layers_b)
        self.repeats = int(repeats)
        self.scale_bounds = (lo, hi)
        self.scale_mode = scale_mode
        self.scale_mapping = scale_mapping
        self.empty = empty
        self.max_layers = None if max_layers is None else int(max_layers)
        self.init_margin = float(init_margin)

    # sizes
    @property
    def num_layers(self) -> int:
        """M = layers_a + layers_b."""
        return self.layers_a + self.layers_b

    @property
    def num_slots(self) -> int:
        """T = M * repeats."""
        return self.num_layers * self.repeats

    @property
    def num_scale_genes(self) -> int:
        M = self.num_layers
        return {"matrix": M * M, "layer": M, "none": 0}[self.scale_mode]

    @property
    def dim(self) -> int:
        return self.num_slots + self.num_scale_genes

    def slot_layer(self, slot: int) -> tuple[str, int, int]:
        """(model, layer index in that model, global layer index m in 0..M-1) of a slot."""
        m = slot % self.num_layers
        return ("A", m, m) if m < self.layers_a else ("B", m - self.layers_a, m)

    def _global(self, step: DataflowStep) -> int:
        return step.layer if step.model == "A" else self.layers_a + step.layer

    # scale mapping
    def _gene_to_scale(self, u: np.ndarray) -> np.ndarray:
        lo, hi = self.scale_bounds
        u = np.clip(u, 0.0, 1.0)
        if self.scale_mapping == "log":
            return np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return lo + u * (hi - lo)

    def _scale_to_gene(self, s: float) -> float:
        lo, hi = self.scale_bounds
        if not (lo * (1 - 1e-9) <= s <= hi * (1 + 1e-9)):
            raise DataflowError(f"DataflowSpace.encode: scale {s:g} is outside scale_bounds {self.scale_bounds}")
        if self.scale_mapping == "log":
            u = (math.log(s) - math.log(lo)) / (math.log(hi) - math.log(lo))
        else:
            u = (s - lo) / (hi - lo)
        return float(min(1.0, max(0.0, u)))

    def scale_matrix(self, x: np.ndarray) -> np.ndarray:
        """The M x M matrix W decoded from a genome (all ones for scale_mode='none')."""
        x = self._check(x)
        M = self.num_layers
        g = x[self.num_slots:]
        if self.scale_mode == "matrix":
            return self._gene_to_scale(g).reshape(M, M)
        if self.scale_mode == "layer":
            return np.broadcast_to(self._gene_to_scale(g)[None, :], (M, M)).copy()
        return np.ones((M, M))

    def _check(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise DataflowError(f"DataflowSpace: genome has {x.shape[0]} genes, this space has dim={self.dim}")
        if not np.all(np.isfinite(x)):
            raise DataflowError("DataflowSpace: genome contains NaN or inf")
        return x

    # genome <-> path
    def kept_slots(self, x: np.ndarray) -> list[int]:
        """Slots on the path, in order, after the empty / max_layers rules."""
        x = self._check(x)
        ind = np.clip(x[: self.num_slots], 0.0, 1.0)
        kept = [int(t) for t in np.flatnonzero(ind > 0.5)]
        if not kept:
            if self.empty == "error":
                raise DataflowError("DataflowSpace: genome keeps no slot (every indicator <= 0.5): empty path")
            kept = [int(np.argmax(ind))]  # first maximal slot
        if self.max_layers is not None and len(kept) > self.max_layers:
            order = sorted(kept, key=lambda t: (-ind[t], t))[: self.max_layers]
            kept = sorted(order)
        return kept

    def decode(self, x: np.ndarray) -> DataflowPath:
        x = self._check(x)
        W = self.scale_matrix(x)
        steps, prev = [], None
        for t in self.kept_slots(x):
            model, layer, m = self.slot_layer(t)
            s = 1.0 if prev is None else float(W[prev, m])
            if abs(s - 1.0) < 1e-12:  # the identity gene decodes to exactly 1 (bit-exact folding)
                s = 1.0
            steps.append(DataflowStep(model, layer, s))  # type: ignore[arg-type]
            prev = m
        return DataflowPath(steps)

    def initial_genome(self) -> np.ndarray:
        """A's layers of the first repeat kept, everything else dropped, all scales 1."""
        x = np.full(self.dim, 0.5 - self.init_margin)
        x[: self.layers_a] = 0.5 + self.init_margin
        if self.num_scale_genes:
            x[self.num_slots:] = self._scale_to_gene(1.0)
        return x

    def encode(self, path: DataflowPath) -> np.ndarray:
        """A genome that decodes to ``path`` (scales up to float rounding); raises when the path
        does not fit the slots (more than ``repeats`` passes) or its scales conflict with W."""
        x = self.initial_genome()
        x[: self.num_slots] = 0.5 - self.init_margin
        M, T = self.num_layers, self.num_slots
        t, prev = -1, None
        want: dict[int, float] = {}
        for k, st in enumerate(path):
            if (st.model == "A" and st.layer >= self.layers_a) or (st.model == "B" and st.layer >= self.layers_b):
                raise DataflowError(f"DataflowSpace.encode: step {k} {st.model}{st.layer} is out of range")
            m = self._global(st)
            t = t + 1 + ((m - (t + 1)) % M)  # next slot (strictly after t) holding layer m
            if t >= T:
                raise DataflowError(
                    f"DataflowSpace.encode: path needs more than repeats={self.repeats} passes over the layers"
                )
            x[t] = 0.5 + self.init_margin
            if prev is None:
                if abs(st.scale - 1.0) > 1e-9:
                    raise DataflowError("DataflowSpace.encode: the first step's scale is always 1")
            else:
                idx = {"matrix": prev * M + m, "layer": m, "none": -1}[self.scale_mode]
                if idx < 0:
                    if abs(st.scale - 1.0) > 1e-9:
                        raise DataflowError("DataflowSpace.encode: scale_mode='none' has only scale 1")
                elif idx in want and abs(want[idx] - st.scale) > 1e-9 * max(1.0, st.scale):
                    raise DataflowError(
                        f"DataflowSpace.encode: step {k} needs scale {st.scale:g} but the same gene already "
                        f"holds {want[idx]:g}"
                    )
                elif idx >= 0:
                    want[idx] = st.scale
                    x[T + idx] = self._scale_to_gene(st.scale)
            prev = m
        if self.max_layers is not None and len(path) > self.max_layers:
            raise DataflowError(f"DataflowSpace.encode: path has {len(path)} steps > max_layers={self.max_layers}")
        return x

    def labels(self) -> list[str]:
        """One name per gene: ``I[r<repeat>:A3]`` indicators, then ``W[A2->B1]`` (matrix) or
        ``W[->B1]`` (layer) scales -- same role as ``ParameterSpace.labels``."""
        def nm(m: int) -> str:
            return f"A{m}" if m < self.layers_a else f"B{m - self.layers_a}"

        M = self.num_layers
        out = [f"I[r{t // M}:{nm(t % M)}]" for t in range(self.num_slots)]
        if self.scale_mode == "matrix":
            out += [f"W[{nm(i)}->{nm(j)}]" for i in range(M) for j in range(M)]
        elif self.scale_mode == "layer":
            out += [f"W[->{nm(j)}]" for j in range(M)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "repeats": self.repeats,
            "scale_bounds": list(self.scale_bounds),
            "scale_mode": self.scale_mode,
            "scale_mapping": self.scale_mapping,
            "empty": self.empty,
            "max_layers": self.max_layers,
            "init_margin": self.init_margin,
        }
