"""A NiNo MLP checkpoint with random weights, in NiNo's own key layout (for the tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_state_dict(seed: int = 0, hidden: int = 16, horizons: int = 40) -> dict[str, torch.Tensor]:
    """``layer_embed`` (15 edge types), ``edge_proj`` (5 states -> hidden), ``edge_mlp`` (4 layers -> horizons)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return s * torch.randn(*shape, generator=g)

    sd = {"layer_embed.weight": r(15, hidden), "edge_proj.fc.0.weight": r(hidden, 5), "edge_proj.fc.0.bias": r(hidden)}
    for i, out in zip((0, 2, 4, 6), (hidden, hidden, hidden, horizons)):
        sd[f"edge_mlp.fc.{i}.weight"] = r(out, hidden)
        sd[f"edge_mlp.fc.{i}.bias"] = r(out)
    return sd


def write_safetensors(path: Path, seed: int = 0) -> str:
    """The random checkpoint as the safetensors file the ``nino`` method reads; returns its path."""
    from safetensors.torch import save_file

    save_file(random_state_dict(seed), str(path))
    return str(path)
