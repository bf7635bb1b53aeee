"""Merges weighted by statistics of each model on its own task's inputs (see :mod:`evomerge.stats`).

- ``fisher`` (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"): per parameter,
  ``θ* = Σ_i w_i (F_i + ε) θ_i / Σ_i w_i (F_i + ε)`` with ``F_i`` the diagonal Fisher of model i on its
  task. Equal Fishers give the (weighted) plain mean.
- ``regmean`` (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"):
  for every linear layer, the weight that best reproduces every model's outputs on its own inputs,
  ``W* = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹`` with ``G_i = X_iᵀ X_i`` the Gram matrix of the layer's inputs
  under model i and ``G̃_i = α G_i + (1 − α) diag(G_i)`` (the paper's shrinkage of the off-diagonal
  entries; α = 1 is the plain least-squares solution). Other tensors (norms, embeddings): the mean.

Both take ``stats``: the statistics files, comma-separated, one per model in the order of the
recipe's models (``evomerge stats`` writes them). The files are read one tensor at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.registry import FRACTION, POSITIVE, REQUIRED, MergeMethod, ParamRange, register


def stats_paths(text: str) -> list[str]:
    """``"a.safetensors, b.safetensors"`` -> the paths."""
    return [p.strip() for p in text.split(",") if p.strip()]


def _open_all(text: str, kind: str, n_models: int):
    from evomerge.stats import open_stats

    paths = stats_paths(text)
    if len(paths) != n_models:
        raise EvomergeError(f"parameters.stats: {len(paths)} file(s) for {n_models} model(s); give one "
                            f"{kind} file per model, comma-separated, in the order of the models")
    return [open_stats(p, kind) for p in paths]


def _stats_problem(kind: str):
    def check(value: str) -> str | None:
        from evomerge.stats import open_stats

        paths = stats_paths(value)
        if not paths:
            return f"give the {kind} files (`evomerge stats --kind {kind}`), comma-separated, one per model"
        try:
            for p in paths:
                open_stats(p, kind)
        except EvomergeError as e:
            return str(e)
        return None
    return check


def fisher(tensors: Sequence[Tensor], base=None, *, generator=None, tensor_name: str, stats: str,
           weight: Sequence[float], epsilon: float = 1e-10) -> Tensor:
    """Fisher-weighted average of the models' tensors (see the module docstring)."""
    files = _open_all(stats, "fisher", len(tensors))
    num = torch.zeros_like(tensors[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, files, weight):
        fi = f.get(tensor_name).reshape(t.shape) + float(epsilon)
        num += float(w) * fi * t
        den += float(w) * fi
    return num / den


def regmean_linear(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> Tensor:
    """``(Σ W_i G̃_i)(Σ G̃_i)⁻¹`` for weights (out, in) and Gram matrices (in, in), in float64."""
    lhs = None
    rhs = None
    for w, g in zip(weights, grams):
        g = g.double()
        shrunk = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        term = w.double() @ shrunk
        lhs = shrunk if lhs is None else lhs + shrunk
        rhs = term if rhs is None else rhs + term
    # W* G = R  <=>  G W*ᵀ = Rᵀ (G symmetric)
    try:
        solved = torch.linalg.solve(lhs, rhs.t()).t()
    except RuntimeError:  # singular (an input direction no model saw): least squares
        solved = torch.linalg.lstsq(lhs, rhs.t()).solution.t()
    return solved.float()


def regmean(tensors: Sequence[Tensor], base=None, *, generator=None, tensor_name: str, stats: str,
            alpha: float = 0.9) -> Tensor:
    """RegMean (see the module docstring): linear layers in closed form, other tensors averaged."""
    files = _open_all(stats, "gram", len(tensors))
    if tensors[0].dim() != 2 or not all(f.has(tensor_name) for f in files):
        return torch.stack(list(tensors)).mean(0)
    grams = [f.get(tensor_name) for f in files]
    if grams[0].shape != (tensors[0].shape[1],) * 2:
        raise EvomergeError(f"{files[0].path}: the Gram matrix of {tensor_name!r} is {list(grams[0].shape)}, the "
                            f"layer takes {tensors[0].shape[1]} inputs (statistics of another model?)")
    return regmean_linear(tensors, grams, float(alpha))


register(MergeMethod(
    "fisher", fisher, needs_base=False, min_models=2, model_params={"weight": 1.0},
    global_params={"stats": REQUIRED, "epsilon": 1e-10}, text_params=("stats",), path_params=("stats",), takes_name=True,
    checks={"stats": _stats_problem("fisher")}, ranges={"weight": ParamRange(0.0, None), "epsilon": POSITIVE},
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, arXiv:2111.09832",
))
register(MergeMethod(
    "regmean", regmean, needs_base=False, min_models=2,
    global_params={"stats": REQUIRED, "alpha": 0.9}, text_params=("stats",), path_params=("stats",), takes_name=True,
    checks={"stats": _stats_problem("gram")}, ranges={"alpha": FRACTION},
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models, arXiv:2212.09849",
))
