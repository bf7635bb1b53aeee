"""Computing the statistics: the model labels the task's prompts itself, then one pass per item.

Labels: for a generation task, the model's own greedy continuation (``max_new_tokens`` of the
task); for a multiple-choice task, the choice the model scores highest. The answers in the task
files are never read.

- :func:`fisher_diagonal`: the empirical Fisher of the model's own labels, ``F = 1/N Σ_n (∇θ log
  p(y_n | x_n))²`` with one backward pass per item (per-item gradients, as the diagonal Fisher needs;
  ``log p`` summed over the label's tokens).
- :func:`input_grams`: for every ``nn.Linear``, ``G = Σ_n X_nᵀ X_n`` over every token position of
  prompt + label (no padding), ``X_n`` the layer's input (tokens × in_features). Sums, not means:
  tasks with more tokens weigh more, as in RegMean's least-squares problem on the union of the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Sequences:
    """Token ids of the items: (context, label) pairs, and how the labels were made."""

    pairs: list[tuple[list[int], list[int]]]
    labels: str

    @property
    def tokens(self) -> int:
        return sum(len(c) + len(x) for c, x in self.pairs)


def label_items(evaluator, task, items: Sequence | None = None) -> Sequences:
    """The items' prompts with the model's own answers as labels (never the task's answers)."""
    from evomerge.backends.tokens import encode_pair

    items = list(task.items if items is None else items)
    tok = evaluator.tokenizer
    if task.kind == "choice":
        scores = task.choice_scores(evaluator.loglikelihoods(task.choice_requests(items)), items)
        pairs = []
        for s, it in zip(scores, items):
            choice = it.choices[int(max(range(len(s)), key=lambda j: s[j]))]
            pairs.append(encode_pair(tok, task.format_prompt(it), task.choice_delimiter + choice))
        return Sequences(pairs, "the model's highest-scoring choice")
    prompts = task.prompts(items)
    outputs = evaluator.generate(prompts, task.max_new_tokens)
    pairs = [encode_pair(tok, p, o) for p, o in zip(prompts, outputs)]
    return Sequences(pairs, f"the model's greedy continuation (max {task.max_new_tokens} new tokens)")


def _forward(model, ctx: list[int], label: list[int]):
    device = next(model.parameters()).device
    ids = torch.tensor([ctx + label], dtype=torch.long, device=device)
    return model(input_ids=ids).logits[0].float()


def label_logprob(logits: torch.Tensor, ctx: list[int], label: list[int]) -> torch.Tensor:
    """log p(label | context): the token at position p is predicted by the logits at p - 1."""
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(label) - 1, device=logits.device)
    tgt = torch.tensor(label, dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits, dim=-1)[pos, tgt].sum()


def fisher_diagonal(model, seqs: Sequences) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of every parameter over the items (float32, CPU)."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    model.eval()
    used = 0
    for ctx, label in seqs.pairs:
        if not label or not ctx:
            continue
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            label_logprob(_forward(model, ctx, label), ctx, label).backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach().float().cpu() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    return {n: a / max(used, 1) for n, a in acc.items()}


def linear_weight_names(model) -> dict[str, str]:
    """Module name -> the name of its weight, for every ``nn.Linear`` of ``model``."""
    return {m: f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def input_grams(model, seqs: Sequences, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``Σ Xᵀ X`` of the inputs of every linear layer, keyed by the layer's weight name (float32).

    Batches are right-padded; padded positions are left out of the sums."""
    from evomerge.backends.tokens import pad_right

    grams: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor] = []  # the current batch's real (not padding) positions, flattened
    hooks = []
    modules = dict(model.named_modules())

    def hook(weight_name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])[keep[0]].double()
            g = (x.t() @ x).cpu()
            grams[weight_name] = grams[weight_name] + g if weight_name in grams else g
        return fn

    for m, w in linear_weight_names(model).items():
        hooks.append(modules[m].register_forward_pre_hook(hook(w)))
    device = next(model.parameters()).device
    seq_ids = [c + x for c, x in seqs.pairs if c or x]
    try:
        with torch.no_grad():
            for s in range(0, len(seq_ids), batch_size):
                ids, mask = pad_right(seq_ids[s:s + batch_size])
                keep[:] = [mask.reshape(-1).bool().to(device)]
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: g.float() for n, g in grams.items()}
