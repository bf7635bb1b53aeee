"""The resident Hugging Face evaluator (CPU or CUDA).

``HFEvaluator`` loads a checkpoint once and keeps it in memory; the merge engine writes merged
weights straight into ``evaluator.model`` (or swaps it with ``set_model``) and the evaluator
answers task items with batched greedy decoding.

Decoding is a small KV-cached greedy loop over ``model(...)`` rather than
``model.generate``: for tiny models the per-step overhead of ``generate`` dominates. It is
equivalent to ``generate(do_sample=False)`` (tested): left padding with position ids that skip
the pad tokens, stop per row at EOS (or any id in ``generation_config.eos_token_id``).
Measured on the zoo (1 CPU thread): 300 prompts in ~0.6 s, 20 prompts in ~0.05 s, the same as
transformers 5 ``generate``; prompts are sorted by length before batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evomerge.errors import EvomergeError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise EvomergeError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class HFEvaluator:
    """A resident causal LM + tokenizer that answers prompts by batched greedy decoding."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype="float32",
                 batch_size: int = 64, tokenizer_path: str | Path | None = None,
                 num_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise EvomergeError(f"{model_path}: not a Hugging Face model folder (config.json "
                                "missing)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EvomergeError(f"device {device!r} requested but CUDA is not available; use "
                                "device='cpu'")
        self.device = torch.device(device)
        if num_threads is not None and self.device.type == "cpu":
            # process-wide: for tiny models one thread is often fastest, and two threads on
            # cores shared with other work can be several times slower than one
            torch.set_num_threads(int(num_threads))
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise EvomergeError("batch_size must be >= 1")
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else model_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_path),
                                                           trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - report the folder, not a stack trace
            raise EvomergeError(f"{tok_path}: cannot load tokenizer ({exc})") from exc
        self.tokenizer.padding_side = "left"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_path), dtype=self.dtype, trust_remote_code=False,
                use_safetensors=True)
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"{model_path}: cannot load model ({exc})") from exc
        self.model_path = model_path
        self.set_model(model)

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        return self._model

    def set_model(self, model) -> None:
        """Swap the resident model (e.g. a layer-dataflow candidate with another depth)."""
        model = model.to(self.device)
        model.eval()
        self._model = model
        tok = self.tokenizer
        eos: set[int] = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for e in (gen_eos, getattr(model.config, "eos_token_id", None), tok.eos_token_id):
            if e is None:
                continue
            eos.update(e if isinstance(e, (list, tuple)) else [e])
        self._eos = sorted(int(e) for e in eos)
        pad = tok.pad_token_id
        if pad is None:
            pad = self._eos[0] if self._eos else 0
        self._pad = int(pad)
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep")
                              if k in params), None)

    # ------------------------------------------------------------------ decoding
    def _encode(self, prompts: Sequence[str]):
        enc = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), self._pad, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for i, e in enumerate(enc):
            if e:
                ids[i, n - len(e):] = torch.tensor(e, dtype=torch.long)
                mask[i, n - len(e):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _generate_batch(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        model = self._model
        ids, mask = self._encode(prompts)
        bsz = ids.shape[0]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(self._eos or [-1], device=self.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        out = torch.full((bsz, max_new_tokens), self._pad, dtype=torch.long, device=self.device)
        past = None
        cur_ids, cur_pos = ids, pos
        next_pos = pos[:, -1:] + 1
        steps = 0
        for step in range(max_new_tokens):
            kw = {self._cache_kw: past}
            if self._keep_kw:
                kw[self._keep_kw] = 1
            res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                        use_cache=True, **kw)
            past = getattr(res, "cache", None)
            if past is None:
                past = res.past_key_values
            nxt = res.logits[:, -1, :].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self._pad), nxt)
            out[:, step] = nxt
            steps = step + 1
            done = done | torch.isin(nxt, eos)
            if bool(done.all()):
                break
            cur_ids = nxt[:, None]
            cur_pos = next_pos
            next_pos = next_pos + 1
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype,
                                               device=self.device)], dim=1)
        out = out[:, :steps].tolist()
        eos_set = set(self._eos)
        result = []
        for row in out:
            toks = []
            for t in row:
                if t in eos_set:
                    break
                toks.append(t)
            result.append(toks)
        return result

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of ``prompts`` (prompt and special tokens stripped)."""
        prompts = list(prompts)
        if not prompts:
            return []
        # sort by length so batches pad little; restore the order at the end
        lens = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lens[i])
        texts: list[str] = [""] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            toks = self._generate_batch([prompts[i] for i in idx], int(max_new_tokens))
            for i, t in zip(idx, toks):
                texts[i] = self.tokenizer.decode(t, skip_special_tokens=True)
        return texts

    def answer(self, task, items=None) -> np.ndarray:
        """0/1 correctness (int8) of the model's answers to ``items`` (default: all)."""
        items = task.items if items is None else list(items)
        outputs = self.generate(task.prompts(items), task.max_new_tokens)
        return task.score(outputs, items)
