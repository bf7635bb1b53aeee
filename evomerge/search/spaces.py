"""The layer-dataflow search space as the loop sees it (the parameter space is
:class:`evomerge.genome.ParameterSpace`).

A :class:`DataflowGenomeSpace` decodes a genome to a :class:`evomerge.dataflow.DataflowPath`
(logged as its JSON form) and builds the candidate model from resident models A and B; the
evaluator then swaps that model in (``set_model``), since a path changes the layer count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DataflowGenomeSpace:
    """Sakana's DFS genome over models A and B (folders), candidates built in memory."""

    kind = "dataflow"

    def __init__(self, df_cfg, model_a: Path, model_b: Path, *, device: str, dtype: str):
        from evomerge.dataflow import DataflowBuilder

        self.model_a, self.model_b = Path(model_a), Path(model_b)
        self.builder = DataflowBuilder(self.model_a, self.model_b, dtype=dtype, device=device)
        self.space = self.builder.space(df_cfg.repeats, tuple(df_cfg.scale_bounds),
                                        scale_mode=df_cfg.scale_mode, max_layers=df_cfg.max_layers)
        self.dim = self.space.dim

    def initial_genome(self) -> np.ndarray:
        """Model A's own layers, in order, all scales 1 (the paper's initialisation)."""
        return self.space.initial_genome()

    def path(self, genome):
        return self.space.decode(np.asarray(genome, dtype=float))

    def decode(self, genome) -> dict:
        return self.path(genome).to_dict()

    def build(self, genome):
        return self.builder.build(self.path(genome))

    def labels(self) -> list[str]:
        return self.space.labels()
