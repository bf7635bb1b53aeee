"""MASS's data-free router: which tasks' subspaces explain a prompt's intermediate features.

Following the authors' code (github.com/crisostomi/mass, ``MassGate``): the router sits at one
linear layer; ``z`` is that layer's *input* during a forward pass over the prompt, averaged over
the prompt's tokens (pads excluded; the reference averages over the padded sequence); each
task's subspace is spanned by the top right singular vectors ``V_t`` of that layer's task matrix
(TSV's factors, rank ``r/T``). Which layer: the reference hooks, for CLIP ViTs, the first MLP
matrix of the second-to-last block (``resblocks.10.mlp.c_fc`` of 12) and, in its Mistral config,
the last block's ``mlp.down_proj``. The default here is the ViT choice's analogue, the
second-to-last layer's ``mlp.gate_proj`` (input: the normalised residual stream): on the zoo it
routes 94% of search-split prompts to their own task, the last ``down_proj`` 47% (README).

Residuals ``r_t = ‖z − V_t V_tᵀ z‖ / ‖z‖`` (relative; the reference uses the plain norm: the
same argmin, and the same standardised logits up to the 1e-6) become probabilities
``p = softmax(ℓ / temperature)`` with ``ℓ = −r`` standardised across tasks
(``(ℓ − mean) / (std + 1e-6)``, as the reference's ``topk`` mode) or, with
``standardize: false``, ``ℓ = −r`` as is. Selected: the tasks with ``p ≥ threshold``, at most
``max_tasks`` (the most probable), at least the most probable one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError

SETTING_FIELDS = ("tensor", "temperature", "threshold", "max_tasks", "standardize")


def default_routing_tensor(num_layers: int) -> str:
    """The default routing tensor of a Llama-style decoder with ``num_layers`` layers: the
    second-to-last layer's MLP gate projection (see the module docstring)."""
    return f"model.layers.{max(0, num_layers - 2)}.mlp.gate_proj.weight"


@dataclass(frozen=True)
class RoutingSettings:
    """Where and how MASS routes. ``tensor``: the 2-D weight (of a linear layer) whose input is
    ``z`` and whose task matrices' right singular vectors span the task subspaces;
    ``max_tasks``: ``None`` for no limit (the reference's LLM config allows 3)."""

    tensor: str
    temperature: float = 1.0
    threshold: float = 0.2
    max_tasks: int | None = None
    standardize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, str) or not self.tensor.endswith(".weight"):
            raise EvomergeError(f"routing tensor {self.tensor!r}: give a linear layer's weight name "
                                "(e.g. model.layers.3.mlp.down_proj.weight)")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise EvomergeError(f"routing temperature {self.temperature!r}: must be a number > 0")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold <= 1.0:
            raise EvomergeError(f"routing threshold {self.threshold!r}: must be a number in [0, 1]")
        if self.max_tasks is not None and (isinstance(self.max_tasks, bool) or not isinstance(self.max_tasks, int)
                                           or self.max_tasks < 1):
            raise EvomergeError(f"routing max_tasks {self.max_tasks!r}: must be an integer >= 1 (or null: no limit)")
        if not isinstance(self.standardize, bool):
            raise EvomergeError(f"routing standardize {self.standardize!r}: must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RoutingSettings":
        """Settings from a JSON object; unknown or missing fields are named with ``where``."""
        if not isinstance(d, dict):
            raise EvomergeError(f"{where}: 'routing' must be an object with {', '.join(SETTING_FIELDS)}")
        unknown = sorted(set(d) - set(SETTING_FIELDS))
        if unknown:
            raise EvomergeError(f"{where}: unknown routing field {unknown[0]!r} (known: {', '.join(SETTING_FIELDS)})")
        if "tensor" not in d:
            raise EvomergeError(f"{where}: routing.tensor is missing")
        try:
            return cls(**d)
        except EvomergeError as exc:
            raise EvomergeError(f"{where}: {exc}") from None


def relative_residuals(z: Tensor, basis: Tensor) -> Tensor:
    """``(B, T)``: ``‖z − V_t V_tᵀ z‖ / ‖z‖`` for features ``z`` ``(B, n)`` and per-task
    orthonormal rows ``basis`` ``(T, k, n)``."""
    coords = torch.einsum("bn,tkn->btk", z, basis)
    proj = torch.einsum("btk,tkn->btn", coords, basis)
    resid = torch.linalg.vector_norm(z.unsqueeze(1) - proj, dim=-1)
    return resid / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)


def route_probabilities(residuals: Tensor, temperature: float, standardize: bool) -> Tensor:
    """``(B, T)`` softmax over tasks of ``−r`` (standardised across tasks first if asked)."""
    logits = -residuals
    if standardize and logits.shape[1] > 1:
        logits = (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-6)
    return torch.softmax(logits / temperature, dim=1)


def select_tasks(probs: Tensor, threshold: float, max_tasks: int | None) -> list[tuple[int, ...]]:
    """Per row: the task indices with ``p ≥ threshold`` (the ``max_tasks`` most probable of them;
    the most probable task if none), in increasing index order."""
    out = []
    for row in probs:
        order = torch.argsort(row, descending=True, stable=True).tolist()
        chosen = [i for i in order if float(row[i]) >= threshold]
        if max_tasks is not None:
            chosen = chosen[:max_tasks]
        out.append(tuple(sorted(chosen or order[:1])))
    return out


class _Captured(Exception):
    """Raised by the feature hook to stop the forward pass once ``z`` is known."""


def _left_padded(tokenizer, prompts: Sequence[str], pad: int, device) -> tuple[Tensor, Tensor]:
    from evomerge.backends.tokens import encode_prompt

    enc = [encode_prompt(tokenizer, p) for p in prompts]
    n = max(1, max(len(e) for e in enc))
    ids = torch.full((len(enc), n), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        if e:
            ids[i, n - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, n - len(e):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def prompt_features(model, tokenizer, prompts: Sequence[str], tensor: str, pad: int,
                    batch_size: int = 64) -> Tensor:
    """``(B, n)`` float32: the input of the linear layer owning ``tensor`` during a forward pass of
    ``model`` over each prompt, averaged over the prompt's tokens. The pass stops at that layer."""
    module_name = tensor.removesuffix(".weight")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise EvomergeError(f"routing tensor {tensor!r}: the model has no layer {module_name!r}") from None
    if not isinstance(module, torch.nn.Linear):
        raise EvomergeError(f"routing tensor {tensor!r}: {module_name!r} is a {type(module).__name__}, not a "
                            "linear layer (its input is what the router reads)")
    device = next(model.parameters()).device
    seen: list[Tensor] = []

    def hook(mod, args):
        seen.append(args[0])
        raise _Captured

    out = []
    handle = module.register_forward_pre_hook(hook)
    try:
        for s in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(tokenizer, prompts[s:s + batch_size], pad, device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            seen.clear()
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            except _Captured:
                pass
            x = seen[0].float()
            w = mask.unsqueeze(-1).to(x.dtype)
            out.append((x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0))
    finally:
        handle.remove()
    return torch.cat(out).cpu()
