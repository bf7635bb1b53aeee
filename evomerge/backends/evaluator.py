"""The evaluator contract: everything the search asks of a backend, and how one is made.

The search (calibration, generations, held-out evaluation) talks to a backend only through
:class:`Evaluator`. Two backends implement it:

- ``hf`` (:class:`evomerge.backends.hf.HFEvaluator`): a resident transformers model in this
  process; recipes are merged by an :class:`~evomerge.merge.engine.InMemoryMerger` straight into
  its parameters.
- ``vllm`` (:class:`evomerge.backends.vllm.VLLMEvaluator`): a vLLM engine; the merge engine's
  resident sources live in vLLM's worker process (a worker extension) and a candidate is merged
  there and reloaded in place, so only the recipe crosses the process boundary.

Both tokenise with the model's Hugging Face tokenizer in this process (:mod:`evomerge.backends.tokens`),
so the token ids a model sees, hence its answers, do not depend on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from evomerge.errors import EvomergeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.merge.engine import InMemoryMerger

__all__ = ["Evaluator", "MergeSources", "make_evaluator", "BACKENDS"]

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class MergeSources:
    """What a backend's merge engine holds resident: the model folders a recipe may name (base
    first) and where they live. Plain values, so it can be sent to another process."""

    paths: tuple[str, ...]
    device: str = "cpu"
    compute_device: str | None = None
    resident: str = "float32"
    method: str | None = None  # the search's merge method: which caches help (None: data-flow)

    def merger(self) -> "InMemoryMerger":
        """A fresh :class:`InMemoryMerger` over these sources (nothing loaded until first use)."""
        from evomerge.merge.engine import InMemoryMerger, resident_caches

        return InMemoryMerger(list(self.paths), device=self.device, compute_device=self.compute_device,
                              resident=self.resident, **resident_caches(self.method))


@runtime_checkable
class Evaluator(Protocol):
    """A resident model that is changed in place and answers task items.

    ``recipe`` arguments are mergekit-style dicts (:class:`evomerge.merge.recipe.MergeRecipe`
    form) whose model references are folders among the evaluator's :class:`MergeSources`.
    """

    backend: str
    num_parameters: int

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint-named tensors of the evaluated model and their shapes."""
        ...

    def check_recipe(self, recipe: dict) -> None:
        """Raise :class:`EvomergeError` unless every tensor ``recipe`` produces exists in the model
        with the same shape (reads only headers)."""
        ...

    def apply_recipe(self, recipe: dict) -> None:
        """Make the evaluated model ``recipe``'s merge (merged where the backend keeps its sources)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Overwrite checkpoint-named tensors of the evaluated model."""
        ...

    def load_model(self, model) -> None:
        """Evaluate another model (a checkpoint folder, or for ``hf`` an in-memory transformers
        model): data-flow candidates change the layer count. The next :meth:`apply_recipe`
        returns to the resident model."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` (prompt and special tokens stripped)."""
        ...

    def loglikelihoods(self, requests: Sequence[tuple[str, str]]) -> np.ndarray:
        """Sum of the log-probabilities of each ``continuation`` given its ``context``
        (float64, one per ``(context, continuation)`` request)."""
        ...

    def answer(self, task, items=None) -> np.ndarray:
        """0/1 correctness (int8) of the model's answers to ``items`` of ``task`` (default: all)."""
        ...

    def close(self) -> None:
        """Free the model (and, for vLLM, stop the engine)."""
        ...


def make_evaluator(ev, model_path: Path, sources: MergeSources | None = None) -> Evaluator:
    """The evaluator an ``EvaluatorConfig`` names, holding ``model_path`` resident and merging
    from ``sources``."""
    if ev.backend == "vllm":
        from evomerge.backends.vllm import VLLMEvaluator

        return VLLMEvaluator(model_path, sources=sources, device=ev.device, dtype=ev.dtype,
                             kv_cache_gib=ev.kv_cache_gib,
                             gpu_memory_utilization=ev.gpu_memory_utilization)
    if ev.backend != "hf":
        raise EvomergeError(f"evaluator.backend: {ev.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    from evomerge.backends.hf import HFEvaluator

    return HFEvaluator(model_path, device=ev.device, dtype=ev.dtype, batch_size=ev.batch_size,
                       num_threads=ev.threads if ev.threads is not None else "auto", sources=sources)
