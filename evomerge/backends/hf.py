"""The resident Hugging Face evaluator (CPU or CUDA): the ``hf`` backend.

``HFEvaluator`` loads a checkpoint once and keeps it in memory; its merge engine (built from
:class:`~evomerge.backends.evaluator.MergeSources`) writes each candidate's merged weights
straight into the model's parameters, and it answers task items by batched greedy decoding or
scores multiple-choice items by log-likelihood.

Decoding is a small KV-cached greedy loop over ``model(...)`` rather than
``model.generate``: for tiny models the per-step overhead of ``generate`` dominates. It is
equivalent to ``generate(do_sample=False)`` (tested): left padding with position ids that skip
the pad tokens, stop per row at EOS (or any id in ``generation_config.eos_token_id``).
Measured on the zoo (1 CPU thread): 300 prompts in ~0.6 s, 20 prompts in ~0.05 s, the same as
transformers 5 ``generate``; prompts are sorted by length before batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from evomerge.backends.tokens import decode_until_eos, encode_pair, encode_prompt, eos_ids
from evomerge.devices import check_device, torch_dtype
from evomerge.errors import EvomergeError

# below this many parameters one CPU thread is fastest (tiny matrices; cores shared with other work)
_ONE_THREAD_BELOW = 50_000_000


class HFEvaluator:
    """A resident causal LM + tokenizer: merges candidates into itself, answers prompts by
    batched greedy decoding and scores continuations by log-likelihood.

    ``num_threads``: torch CPU threads (process-wide); ``"auto"``: one thread for models under
    50M parameters on the CPU (tiny matrices run fastest on one), else torch's default.
    ``sources``: what :meth:`apply_recipe` merges from (none: only :meth:`load_weights` and
    :meth:`load_model` change the model).
    """

    backend = "hf"

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype="float32",
                 batch_size: int = 64, tokenizer_path: str | Path | None = None,
                 num_threads: int | str | None = None, sources=None):
        from transformers import AutoTokenizer

        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise EvomergeError(f"{model_path}: not a Hugging Face model folder (config.json "
                                "missing)")
        self.device = check_device(device, "device")
        self.dtype = torch_dtype(dtype)
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
        self.model_path = model_path
        self.set_model(self._load(model_path))
        self._resident = self._model  # the model recipes are merged into
        self.num_parameters = int(sum(p.numel() for p in self._model.parameters()))
        if num_threads == "auto":
            num_threads = 1 if (self.device.type == "cpu" and self.num_parameters < _ONE_THREAD_BELOW) else None
        if num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(int(num_threads))
        self.sources = sources
        self._merger = None

    def _load(self, path: Path):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=self.dtype, trust_remote_code=False, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"{path}: cannot load model ({exc})") from exc

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        """The transformers model being evaluated (for tests and tools; the search does not
        reach into it)."""
        return self._model

    def set_model(self, model) -> None:
        """Evaluate ``model`` (an in-memory transformers model) from now on."""
        model = model.to(self.device)
        model.eval()
        self._model = model
        self._eos = eos_ids(self.tokenizer, getattr(model, "generation_config", None), model.config)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self._eos[0] if self._eos else 0
        self._pad = int(pad)
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep")
                              if k in params), None)

    @property
    def pad_token_id(self) -> int:
        """The id prompts are left-padded with."""
        return self._pad

    def load_model(self, model) -> None:
        """Evaluate another model: a checkpoint folder or an in-memory transformers model (a
        data-flow candidate). The next :meth:`apply_recipe` returns to the resident model."""
        self.set_model(self._load(Path(model)) if isinstance(model, (str, Path)) else model)

    def _merge_target(self):
        if self._model is not self._resident:
            self.set_model(self._resident)
        return self._resident

    def _engine(self):
        if self._merger is None:
            if self.sources is None:
                raise EvomergeError("this evaluator was made without merge sources; it cannot apply recipes")
            self._merger = self.sources.merger()
        return self._merger

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._resident.state_dict().items()}

    def check_recipe(self, recipe: dict) -> None:
        from evomerge.merge.recipe import MergeRecipe

        self._engine().check_fits(MergeRecipe.from_dict(recipe), self._resident)

    def apply_recipe(self, recipe: dict) -> None:
        from evomerge.merge.recipe import MergeRecipe

        self._engine().apply(MergeRecipe.from_dict(recipe), self._merge_target())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        model = self._merge_target()
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update((n, b) for n, b in model.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, t in weights:
                if name not in targets:
                    raise EvomergeError(f"load_weights: the model has no tensor {name!r}")
                targets[name].data.copy_(t)

    def close(self) -> None:
        self._merger = None
        self._model = self._resident = None

    # ------------------------------------------------------------------ decoding
    def _encode(self, prompts: Sequence[str]):
        enc = [encode_prompt(self.tokenizer, p) for p in prompts]
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
        return out[:, :steps].tolist()

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
                texts[i] = decode_until_eos(self.tokenizer, t, self._eos)
        return texts

    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[tuple[str, str]]) -> np.ndarray:
        """Sum of log p(continuation | context) per ``(context, continuation)`` pair, computed in
        float32 from one forward pass over context + continuation (right-padded batches)."""
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        out = np.zeros(len(pairs), dtype=np.float64)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            n = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), n), self._pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)
            for r, q in enumerate(seqs):
                ids[r, :len(q)] = torch.tensor(q, dtype=torch.long)
                mask[r, :len(q)] = 1
            logits = self._model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                ctx, cont = pairs[i]
                if not cont:
                    continue
                # the token at position p is predicted by the logits at p - 1
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logp.device)
                tgt = torch.tensor(cont, dtype=torch.long, device=logp.device)
                out[i] = float(logp[r, pos, tgt].double().sum())
        return out

    def answer(self, task, items=None) -> np.ndarray:
        """0/1 correctness (int8) of the model's answers to ``items`` (default: all)."""
        return task.answer(self, items)
