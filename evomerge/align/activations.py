"""Activation matching of Llama-style models (Git Re-Basin's activation matching, Ainsworth et
al. 2023; the correlation matching of Jordan et al.'s REPAIR and of ZipIt): run every model on
the same token sequences and pair each unit of a model with the reference's unit whose
activations it correlates best with — one linear assignment per permutation group
(scipy's ``linear_sum_assignment`` on the correlation matrix).

What is correlated, per group of :mod:`~evomerge.align.symmetries`:

- **residual**: the hidden state at every layer boundary (the embeddings, each decoder layer's
  output, the final norm's output), one permutation for all: the correlation matrices of the
  ``num_layers + 1`` boundaries are summed before the assignment.
- **mlp.L**: the input of layer L's ``down_proj``, ``act(gate) * up``.
- **attention.L**: the per-head outputs, i.e. the input of ``o_proj`` split into heads of
  ``head_dim`` values. Head ``i`` of the reference and head ``j`` of the model score the best
  one-to-one pairing of their dimensions (the dimensions inside a head are not in
  correspondence across different inits); with grouped-query attention the kv groups and the
  query heads inside each group are assigned together (:func:`~evomerge.align.matching.solve_assignment`).

The groups are independent: an MLP unit's or a head's activations are the same whatever the
residual permutation (it is a symmetry), so one forward pass of each model gives everything.
Statistics are summed over every non-padding token position (float64).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from evomerge.align.matching import solve_assignment
from evomerge.align.symmetries import (RESIDUAL, LlamaLayout, Permutations, attention_group, identity_permutations,
                                       mlp_group)

_EPS = 1e-12


class _PairStats:
    """Running sums for the correlation of a reference's features with a model's features."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        parts = {"a": a.sum(0), "b": b.sum(0), "aa": (a * a).sum(0), "bb": (b * b).sum(0), "ab": a.T @ b}
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += a.shape[0]

    def correlation(self) -> np.ndarray:
        """Pearson correlation, entry ``[i, j]``: reference feature i with model feature j."""
        s, n = self.sums, self.n
        ma, mb = s["a"] / n, s["b"] / n
        cov = s["ab"] / n - ma[:, None] * mb[None, :]
        sa = (s["aa"] / n - ma * ma).clamp_min(0).sqrt()
        sb = (s["bb"] / n - mb * mb).clamp_min(0).sqrt()
        return (cov / (sa[:, None] * sb[None, :] + _EPS)).numpy()


def features(model, ids: torch.Tensor, mask: torch.Tensor, layout: LlamaLayout) -> dict[str, torch.Tensor]:
    """The activations matched, as ``(tokens, features)`` matrices over the non-padding positions:
    ``residual.K`` (hidden state K, 0 = embeddings), ``mlp.L`` and ``attention.L`` (o_proj input)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args):
            captured[key] = args[0].detach()
        return hook

    handles = []
    for layer, block in enumerate(model.model.layers):
        handles.append(block.mlp.down_proj.register_forward_pre_hook(keep(mlp_group(layer))))
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(keep(attention_group(layer))))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for k, h in enumerate(out.hidden_states):
        captured[f"{RESIDUAL}.{k}"] = h.detach()
    keep_rows = mask.reshape(-1).bool()
    return {k: v.float().reshape(-1, v.shape[-1])[keep_rows] for k, v in captured.items()}


def token_batches(sequences: Sequence[Sequence[int]], batch_size: int = 32, pad: int = 0
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, attention_mask)`` batches of the token sequences, right-padded."""
    from evomerge.backends.tokens import pad_right

    return [pad_right(sequences[s:s + batch_size], pad) for s in range(0, len(sequences), batch_size)]


def _head_similarity(corr: np.ndarray, layout: LlamaLayout) -> np.ndarray:
    """``[i, j]``: the best one-to-one pairing of reference head i's dims with model head j's."""
    from scipy.optimize import linear_sum_assignment

    d, h = layout.head_dim, layout.num_heads
    sim = np.zeros((h, h))
    for i in range(h):
        for j in range(h):
            block = corr[i * d:(i + 1) * d, j * d:(j + 1) * d]
            rows, cols = linear_sum_assignment(block, maximize=True)
            sim[i, j] = block[rows, cols].sum()
    return sim


def _matched_mean(corr: np.ndarray, perm: torch.Tensor) -> float:
    p = perm.numpy()
    return float(corr[np.arange(len(p)), p].mean())


def permutations_from_correlations(corrs: Mapping[str, np.ndarray], layout: LlamaLayout
                                   ) -> tuple[Permutations, dict[str, dict[str, float]]]:
    """The permutation of every group from the correlation matrices (keys as :func:`features`),
    and per group the mean correlation of matched units before (identity) and after."""
    residual = sum(corrs[f"{RESIDUAL}.{k}"] for k in range(layout.num_layers + 1))
    perms: Permutations = {RESIDUAL: solve_assignment(RESIDUAL, {"unit": residual}, layout)}
    report = {RESIDUAL: _report(residual / (layout.num_layers + 1), perms[RESIDUAL])}
    for layer in range(layout.num_layers):
        mlp = mlp_group(layer)
        perms[mlp] = solve_assignment(mlp, {"unit": corrs[mlp]}, layout)
        report[mlp] = _report(corrs[mlp], perms[mlp])
        att = attention_group(layer)
        heads = _head_similarity(corrs[att], layout) / layout.head_dim
        perms[att] = solve_assignment(att, {"head": heads}, layout)
        report[att] = _report(heads, perms[att])
    return perms, report


def _report(corr: np.ndarray, perm: torch.Tensor) -> dict[str, float]:
    return {"before": _matched_mean(corr, torch.arange(corr.shape[0])), "after": _matched_mean(corr, perm)}


def activation_matching(models: Sequence, reference: int, layout: LlamaLayout,
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                        ) -> tuple[list[Permutations], list[dict]]:
    """Per model (``nn.Module`` decoders), the permutation into the reference's coordinates by
    activation matching on ``batches`` of ``(ids, attention_mask)`` (identity for the reference),
    and per model the mean matched correlation per group before/after (see
    :func:`permutations_from_correlations`). One forward pass of every model per batch."""
    stats: list[dict[str, _PairStats]] = [{} for _ in models]
    for ids, mask in batches:
        ref = features(models[reference], ids, mask, layout)
        for i, model in enumerate(models):
            if i == reference:
                continue
            other = features(model, ids, mask, layout)
            for key, a in ref.items():
                stats[i].setdefault(key, _PairStats()).add(a, other[key])
    perms, reports = [], []
    for i in range(len(models)):
        if i == reference:
            perms.append(identity_permutations(layout))
            reports.append({})
            continue
        p, r = permutations_from_correlations({k: s.correlation() for k, s in stats[i].items()}, layout)
        perms.append(p)
        reports.append(r)
    return perms, reports


def decoder_from_tensors(config: Mapping, tensors: Mapping[str, torch.Tensor]):
    """A float32 ``AutoModelForCausalLM`` in eval mode with ``tensors`` loaded (for matching)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(config))).float()
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"tensors missing from the checkpoint: {missing[:3]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
