"""AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575): task arithmetic's coefficients learned from
unlabeled inputs by entropy minimisation.

The merged model is ``θ(λ) = θ0 + Σ_k λ_k,g τ_k`` with ``τ_k`` the task vectors; ``g`` is the
coefficient group of a tensor: one group for the whole model (``task`` granularity) or one per decoder
layer plus one for the tensors outside the layers — embeddings, final norm, lm_head (``layer``
granularity). ``λ`` starts at task arithmetic's weights (``init``) and follows Adam on the mean
entropy of the merged model's next-token distribution at the end of every prompt (the first token of
its answer), over the prompts of every task's search items — the inputs only, never the answers.

The learned coefficients are written as a ``task_arithmetic`` recipe (per-layer values as a mergekit
gradient with one value per layer; the other group through name filters), so the result merges,
evaluates and exports like any recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from evomerge.checkpoint import layer_index
from evomerge.errors import EvomergeError

OUTSIDE_FILTERS = ("embed_tokens", "lm_head", "model.norm")
"""Name filters of the tensors outside the decoder layers (Llama-style names)."""


@dataclass
class AdaMergingResult:
    """The learned coefficients ``(models, groups)`` and the entropy after each step (step 0 = start)."""

    coefficients: torch.Tensor
    entropy: list[float] = field(default_factory=list)
    granularity: str = "layer"

    def recipe(self, base: str, models: Sequence[str]) -> dict:
        """The coefficients as a ``task_arithmetic`` recipe over ``base`` and ``models``."""
        lam = self.coefficients.detach().double()
        entries = []
        for k, m in enumerate(models):
            if self.granularity == "task":
                weight = float(lam[k, 0])
            else:
                outside = float(lam[k, -1])
                weight = [{"filter": f, "value": outside} for f in OUTSIDE_FILTERS]
                weight.append({"value": [float(v) for v in lam[k, :-1]]})
            entries.append({"model": str(m), "parameters": {"weight": weight}})
        return {"merge_method": "task_arithmetic", "base_model": str(base), "models": entries}


def coefficient_group(name: str, num_layers: int, granularity: str) -> int:
    """The coefficient group of tensor ``name``: 0 for ``task``; its layer, or ``num_layers`` for
    the tensors outside the layers, for ``layer``."""
    if granularity == "task":
        return 0
    i = layer_index(name)
    return num_layers if i is None else i


def last_token_entropy(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions at positions ``last`` (one per row)."""
    rows = logits[torch.arange(logits.shape[0]), last].float()
    logp = torch.log_softmax(rows, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int):
    """``(ids, mask, last)`` per batch of ``prompts``: right-padded ids and mask, and each row's last
    prompt position."""
    from evomerge.backends.tokens import encode_prompt, pad_right

    enc = [encode_prompt(tokenizer, p) for p in prompts]
    for s in range(0, len(enc), batch_size):
        chunk = enc[s:s + batch_size]
        ids, mask = pad_right(chunk)
        yield ids, mask, torch.tensor([len(e) - 1 for e in chunk])


def adamerge(base: str | Path, models: Sequence[str | Path], prompts: Sequence[str], *,
             granularity: str = "layer", init: float | Sequence[float] = 1.0, steps: int = 100, lr: float = 1e-2,
             batch_size: int = 32, log=None) -> AdaMergingResult:
    """Learn task arithmetic's coefficients for ``models`` over ``base`` on ``prompts`` (see the module).

    ``steps = 0`` returns the initial coefficients: task arithmetic with weights ``init``."""
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if granularity not in ("task", "layer"):
        raise EvomergeError(f"granularity {granularity!r}: use task or layer")
    if not prompts:
        raise EvomergeError("AdaMerging needs task prompts (none given)")
    skeleton = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    skeleton.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    base_sd = {n: p.detach() for n, p in skeleton.named_parameters()}
    vectors = []
    for m in models:
        sd = read_state(Path(m))
        missing = [n for n in base_sd if n not in sd]
        if missing:
            raise EvomergeError(f"{m}: no tensor {missing[0]!r} (not a fine-tune of {base}?)")
        vectors.append({n: sd[n].float() - base_sd[n] for n in base_sd})
    n_layers = int(skeleton.config.num_hidden_layers)
    groups = {n: coefficient_group(n, n_layers, granularity) for n in base_sd}
    n_groups = 1 if granularity == "task" else n_layers + 1
    init_t = torch.tensor([float(init)] * len(models) if isinstance(init, (int, float)) else list(init),
                          dtype=torch.float32)
    lam = init_t[:, None].repeat(1, n_groups).clone().requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=lr)
    data = list(prompt_batches(tokenizer, prompts, batch_size))

    def entropy() -> torch.Tensor:
        params = {n: base_sd[n] + sum(lam[k, groups[n]] * v[n] for k, v in enumerate(vectors)) for n in base_sd}
        total = 0.0
        for ids, mask, last in data:
            logits = functional_call(skeleton, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
            total = total + last_token_entropy(logits, last) * len(ids)
        return total / len(prompts)

    history = []
    for step in range(steps + 1):
        loss = entropy()
        history.append(float(loss.detach()))
        if log is not None:
            log(step, history[-1], lam.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return AdaMergingResult(lam.detach().clone(), history, granularity)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder."""
    from evomerge.checkpoint.io import CheckpointReader

    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.tensor_names()}
