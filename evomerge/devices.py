"""Float dtypes by name and devices by name: the one dtype map and the one device check.

torch is imported inside the functions, so that the config and recipe schemas (which use
:data:`DtypeName` / :func:`dtype_name`) stay torch-free.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from evomerge.errors import EvomergeError

DtypeName = Literal["float32", "bfloat16", "float16"]
"""The canonical dtype names a config, the CLI and the engines accept."""
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
"""Other spellings a recipe (mergekit's) or a Python caller may use."""
DTYPE_CHOICES = "float32, bfloat16 or float16"
"""The canonical names, as an error message lists them."""


def dtype_name(value: Any) -> str | None:
    """The canonical name of a dtype given by name, alias or ``torch.dtype`` (case-insensitive,
    a ``torch.`` prefix ignored: ``"bf16"``, ``"torch.bfloat16"`` -> ``"bfloat16"``); None when
    it names none of them."""
    key = str(value).lower().replace("torch.", "")
    return key if key in DTYPE_NAMES else DTYPE_ALIASES.get(key)


def torch_dtype(value: Any):
    """The ``torch.dtype`` of a dtype name or alias (:func:`dtype_name`); a ``torch.dtype`` is
    returned as it is. An unknown name is an :class:`EvomergeError`."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = dtype_name(value)
    if name is None:
        raise EvomergeError(f"unknown dtype {value!r}: use {DTYPE_CHOICES}")
    return getattr(torch, name)


def check_device(value: Any, what: str):
    """``torch.device(value)``, refused with an :class:`EvomergeError` naming ``what`` (the field or
    option that set it) when it is not a device name, not cpu / cuda, or a GPU this machine lacks."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise EvomergeError(f"{what}: {str(value)!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise EvomergeError(f"{what}: {str(value)!r}: only cpu and cuda devices are supported")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise EvomergeError(f"{what}: {str(value)!r}, but torch {torch.__version__} sees no CUDA GPU on this "
                            "machine; use cpu here, or run on a machine with a GPU")
    if dev.index is not None and dev.index >= n:
        raise EvomergeError(f"{what}: {str(value)!r}, but this machine has {n} CUDA GPU(s): cuda:0..cuda:{n - 1}")
    return dev
