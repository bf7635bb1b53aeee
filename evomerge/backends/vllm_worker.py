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

import os
import signal
import threading
import time


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie counts as gone)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:  # no such process, or no /proc (then ask the kernel)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class MergeWorker:
    """vLLM worker extension: a resident merge engine that reloads merged weights in place."""

    def evomerge_watch(self, driver_pid: int) -> None:
        """Stop this engine when the search's process is gone: vLLM's engine and worker processes
        outlive a driver killed with SIGKILL (found in the kill -9 test: each orphan kept ~1 GB and
        a core busy; on a GPU it would keep the GPU's memory). A daemon thread checks every second
        and then kills the engine-core process (this worker's parent) and this process."""
        me = os.getpid()
        if driver_pid == me:
            return  # vLLM runs in the driver's process: nothing can outlive it
        engine = me if os.getppid() == driver_pid else os.getppid()

        def watch() -> None:
            while True:
                time.sleep(1.0)
                if _alive(driver_pid):
                    continue
                if engine != me:
                    try:
                        os.kill(engine, signal.SIGKILL)
                    except OSError:
                        pass
                os._exit(0)

        threading.Thread(target=watch, name="evomerge-driver-watch", daemon=True).start()

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

    def evomerge_apply(self, recipe: dict):
        """Merge ``recipe`` here and reload the result in place; returns (seconds, None), or
        (None, error message): an exception raised here would stop vLLM's engine."""
        from evomerge.merge.recipe import MergeRecipe

        t0 = time.perf_counter()
        try:
            r = MergeRecipe.from_dict(recipe)
            merger = self._evomerge_merger
            merger.check_shapes(r, self._evomerge_shapes)
            self.model_runner.reload_weights(weights_iterator=merger.merged_tensors(r))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it
            return None, f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - t0, None

    def evomerge_load_weights(self, weights: list):
        """Load checkpoint-named tensors in place, sent as ``(name, dtype, shape, bytes)`` (the RPC
        layer does not carry tensors); returns None or an error message."""
        import torch

        try:
            pairs = [(name, torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape))
                     for name, dtype, shape, raw in weights]
            missing = [n for n, _ in pairs if n not in self._evomerge_shapes]
            if missing:
                return f"the model has no tensor {missing[0]!r}"
            self.model_runner.reload_weights(weights_iterator=iter(pairs))
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None
