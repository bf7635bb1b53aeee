"""The part of the ``vllm`` backend that runs inside vLLM's worker process.

vLLM mixes :class:`MergeWorker` into its worker (``LLM(worker_extension_cls=...)``); the driver
calls its methods with ``llm.collective_rpc(name, args=...)``. The worker holds the merge
engine's resident sources (base + task vectors and the method's caches, exactly as the ``hf``
backend does in its own process); per candidate the driver sends only the recipe (a small
dict), the worker merges tensor by tensor and streams the checkpoint-named results into
``model_runner.reload_weights``, which loads them into vLLM's fused / repacked layout (on the
CPU, vLLM repacks linear weights, so writing into its parameters directly would not work).

Nothing here imports vLLM: the methods only use what the worker gives them.
"""

from __future__ import annotations

import time


class MergeWorker:
    """vLLM worker extension: a resident merge engine that reloads merged weights in place."""

    def evomerge_init(self, sources: dict) -> dict:
        """Set up the merge engine over ``sources`` (:class:`MergeSources` fields); returns the
        base checkpoint's tensor shapes."""
        from evomerge.backends.evaluator import MergeSources

        src = MergeSources(**{**sources, "paths": tuple(sources["paths"])})
        self._evomerge_merger = src.merger()
        reader = next(iter(self._evomerge_merger.readers.values()))
        self._evomerge_shapes = {n: tuple(reader.shape(n)) for n in reader.tensor_names()}
        return self._evomerge_shapes

    def evomerge_check(self, recipe: dict):
        """None if ``recipe`` fits the loaded model, else (kind, message, detail)."""
        from evomerge.errors import EvomergeError
        from evomerge.merge.recipe import MergeRecipe
        from evomerge.merge.vocab import VocabSizeMismatch

        try:
            self._evomerge_merger.check_shapes(MergeRecipe.from_dict(recipe), self._evomerge_shapes)
        except VocabSizeMismatch as exc:
            return ("vocab", str(exc), exc.detail)
        except EvomergeError as exc:
            return ("error", str(exc), "")
        return None

    def evomerge_apply(self, recipe: dict) -> float:
        """Merge ``recipe`` here and reload the result in place; returns the seconds it took."""
        from evomerge.merge.recipe import MergeRecipe

        t0 = time.perf_counter()
        r = MergeRecipe.from_dict(recipe)
        merger = self._evomerge_merger
        merger.check_shapes(r, self._evomerge_shapes)
        self.model_runner.reload_weights(weights_iterator=merger.merged_tensors(r))
        return time.perf_counter() - t0

    def evomerge_load_weights(self, weights: list) -> None:
        """Load checkpoint-named ``(name, tensor)`` pairs in place."""
        self.model_runner.reload_weights(weights_iterator=iter(weights))
