"""Tokenisation shared by every backend, so that a model sees the same token ids whichever
backend runs it: prompts for generation, (context, continuation) pairs for log-likelihoods, and
the decoding of generated ids back to text."""

from __future__ import annotations

from typing import Sequence


def eos_ids(tokenizer, *configs) -> list[int]:
    """Every end-of-sequence id named by the tokenizer or the model / generation configs."""
    eos: set[int] = set()
    for src in (*configs, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is None:
            continue
        eos.update(e if isinstance(e, (list, tuple)) else [e])
    return sorted(int(e) for e in eos)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids a prompt is given to the model as (with the tokenizer's special tokens, e.g. BOS)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring ``continuation`` after ``context``.

    As lm-evaluation-harness does: the pair is tokenised as one string and split where the
    context's own tokens end, so the continuation is scored with the tokens the model would see
    in running text; trailing spaces of the context move into the continuation first. If the
    joint tokenisation does not start with the context's tokens, the continuation is tokenised
    on its own."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = encode_prompt(tokenizer, context)
    whole = encode_prompt(tokenizer, context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    return ctx, cont


def decode_until_eos(tokenizer, ids: Sequence[int], eos: Sequence[int]) -> str:
    """Text of generated ``ids`` up to (not including) the first end-of-sequence id."""
    stop = set(eos)
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return tokenizer.decode(out, skip_special_tokens=True)


def pad_right(sequences: Sequence[Sequence[int]], pad: int = 0):
    """Token id lists as one right-padded batch: ``(ids, attention_mask)``, long tensors of shape
    ``(len(sequences), longest)`` (the mask is 1 on real tokens)."""
    import torch

    n = max(len(q) for q in sequences)
    ids = torch.full((len(sequences), n), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for r, q in enumerate(sequences):
        ids[r, :len(q)] = torch.tensor(list(q), dtype=torch.long)
        mask[r, :len(q)] = 1
    return ids, mask
