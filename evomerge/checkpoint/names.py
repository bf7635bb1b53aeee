"""Tensor-name helpers (no torch): decoder layer index of a tensor name, size strings."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.(\d+)(\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder layer of a tensor name (``model.layers.7.mlp.up_proj.weight`` → 7), else None.

    Recognises ``layers.N.`` (Llama, Mistral, Qwen, Gemma...), ``h.N.`` (GPT-2, Falcon),
    ``blocks.N.`` / ``block.N.`` and ``layer.N.``; the first match in the name wins.
    """
    m = _LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def set_layer_index(name: str, layer: int) -> str:
    """``name`` with its decoder layer index replaced by ``layer`` (name unchanged if none)."""
    m = _LAYER_RE.search(name)
    if not m:
        return name
    return name[: m.start(3)] + str(int(layer)) + name[m.end(3) :]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5_000_000_000, ``"500MiB"`` → 524_288_000, ``123`` → 123 (bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    value = float(m.group(1))
    unit = (m.group(2) or "").lower()
    binary = "i" in unit
    letter = unit[:1] if unit[:1] in "kmgt" else ""
    mult = _UNITS[letter] if not binary else 1024 ** ("kmgt".index(letter) + 1)
    return int(value * mult)
