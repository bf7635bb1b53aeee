"""The MASS routed model: what ``Task.answer`` asks of an evaluator (``generate``,
``loglikelihoods``), answered in two passes.

First pass: the TSV merge of all tasks (as the reference, whose router sits inside the
TSV-merged model) reads each prompt up to the routing layer; :mod:`evomerge.routing.router`
turns its features into a task subset. Second pass: prompts are grouped by subset (at most
``2^T − 1`` groups); each subset's TSV merge is materialised once (kept in a small cache),
written into the one resident transformers model, and answers its group in batches. A
multiple-choice item is routed on its context, so all its choices see the same model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from evomerge.routing.factors import TaskFactors
from evomerge.routing.router import (
    RoutingSettings,
    prompt_features,
    relative_residuals,
    route_probabilities,
    select_tasks,
)


class RoutedModel:
    """A MASS model over a resident :class:`~evomerge.backends.hf.HFEvaluator` (holding the base
    architecture): ``generate`` / ``loglikelihoods`` / ``answer`` route each prompt, then answer
    with its subset's merge. ``cached_merges``: how many subset merges to keep in memory (each
    one model's float32 weights). ``last_routes``: the subset (task names) of each prompt of the
    last call."""

    backend = "hf"

    def __init__(self, factors: TaskFactors, settings: RoutingSettings, evaluator, cached_merges: int = 8):
        self.factors = factors
        self.settings = settings
        self.evaluator = evaluator
        self.tasks = list(factors.tasks)
        self.basis = factors.routing_basis(settings.tensor)
        self.num_parameters = evaluator.num_parameters
        self.cached_merges = max(1, int(cached_merges))
        self._merges: OrderedDict[tuple[str, ...], dict[str, torch.Tensor]] = OrderedDict()
        self._loaded: tuple[str, ...] | None = None
        self.last_routes: list[tuple[str, ...]] = []

    # ------------------------------------------------------------------ merges
    def merged(self, subset: Sequence[str]) -> dict[str, torch.Tensor]:
        """The TSV merge of ``subset`` (name -> float32 tensor), from the cache when it is there."""
        key = self.factors.task_index(subset)
        if key in self._merges:
            self._merges.move_to_end(key)
            return self._merges[key]
        state = self.factors.merge(key)
        self._merges[key] = state
        while len(self._merges) > self.cached_merges:
            self._merges.popitem(last=False)
        return state

    def clear_cache(self) -> None:
        """Forget the subset merges (the next use of each computes it again)."""
        self._merges.clear()
        self._loaded = None

    def use(self, subset: Sequence[str]) -> None:
        """Make the resident model the merge of ``subset`` (a no-op when it already is)."""
        key = self.factors.task_index(subset)
        if key != self._loaded:
            self.evaluator.load_weights(self.merged(key).items())
            self._loaded = key

    # ------------------------------------------------------------------ routing
    def route_scores(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """First pass: ``(residuals, probabilities)``, each ``(len(prompts), T)``."""
        self.use(self.tasks)
        ev = self.evaluator
        z = prompt_features(ev.model, ev.tokenizer, list(prompts), self.settings.tensor, ev.pad_token_id,
                              ev.batch_size)
        resid = relative_residuals(z, self.basis)
        return resid, route_probabilities(resid, self.settings.temperature, self.settings.standardize)

    def route(self, prompts: Sequence[str]) -> list[tuple[str, ...]]:
        """The task subset (names, in task order) each prompt is answered with."""
        _, probs = self.route_scores(prompts)
        picks = select_tasks(probs, self.settings.threshold, self.settings.max_tasks)
        return [tuple(self.tasks[i] for i in p) for p in picks]

    def _groups(self, prompts: Sequence[str]) -> OrderedDict[tuple[str, ...], list[int]]:
        routes = self.route(prompts)
        self.last_routes = routes
        groups: OrderedDict[tuple[str, ...], list[int]] = OrderedDict()
        for i, r in enumerate(routes):
            groups.setdefault(r, []).append(i)
        return groups

    # ------------------------------------------------------------------ what tasks ask
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations, each prompt answered by its routed subset's merge."""
        prompts = list(prompts)
        if not prompts:
            return []
        texts: list[str] = [""] * len(prompts)
        for subset, idx in self._groups(prompts).items():
            self.use(subset)
            for i, t in zip(idx, self.evaluator.generate([prompts[i] for i in idx], max_new_tokens)):
                texts[i] = t
        return texts

    def loglikelihoods(self, requests: Sequence[tuple[str, str]]) -> np.ndarray:
        """Log p(continuation | context) per request, each routed on its context."""
        requests = list(requests)
        out = np.zeros(len(requests), dtype=np.float64)
        if not requests:
            return out
        for subset, idx in self._groups([c for c, _ in requests]).items():
            self.use(subset)
            out[idx] = self.evaluator.loglikelihoods([requests[i] for i in idx])
        return out

    def answer(self, task, items=None) -> np.ndarray:
        """0/1 correctness (int8) of the routed answers to ``items`` of ``task`` (default: all)."""
        return task.answer(self, items)

    def close(self) -> None:
        self.clear_cache()
        self.evaluator.close()
