"""Tiny real Llama checkpoints for the merge tests (built in a temp folder, deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_CONFIG = {"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}


def tiny_config(num_layers: int = 4, vocab: int = 96, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )


def make_base(path: Path, seed: int = 0, num_layers: int = 4, **kw) -> Path:
    """A random-init LlamaForCausalLM saved with save_pretrained (+ a fake tokenizer file)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_layers, **kw))
    model.save_pretrained(path)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return Path(path)


def make_variant(base: Path, path: Path, seed: int, scale: float = 0.02) -> Path:
    """A fine-tune-like variant: base + small random deltas on every floating tensor."""
    from safetensors.torch import load_file

    from evomerge.checkpoint import write_checkpoint

    sd = load_file(str(Path(base) / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {n: (t + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in sd.items()}
    config = json.loads((Path(base) / "config.json").read_text())
    write_checkpoint(path, out, config, tokenizer_from=base)
    return Path(path)


def load_model(path: Path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=dtype)
