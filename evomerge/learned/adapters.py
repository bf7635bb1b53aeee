"""Per-task feature adapters: a residual two-layer MLP on a causal LM's final hidden state.

An adapter maps the input of ``lm_head`` (the last hidden state, after the final norm) as
``h' = h + W2 act(W1 h + b1) + b2``; ``W2`` and ``b2`` start at zero, so a fresh adapter is the
identity. Adapters are plain tensor dicts (``w1 (width, hidden)``, ``b1``, ``w2 (hidden, width)``,
``b2``) evaluated functionally, so meta-learning can differentiate through updates of them.

Files: one safetensors file per task, the four tensors plus metadata ``format``
(``evomerge-adapter``), ``task``, ``hidden_size``, ``width`` and ``activation``.
:func:`adapted` puts an adapter in front of a transformers model's ``lm_head`` (generation with
the KV cache and ``logits_to_keep`` work unchanged: the adapter acts position by position).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.errors import EvomergeError

ADAPTER_FORMAT = "evomerge-adapter"
ADAPTER_KEYS = ("w1", "b1", "w2", "b2")
ADAPTER_SUFFIX = ".safetensors"


def init_adapter(hidden_size: int, width: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A fresh adapter (the identity): ``W1 ~ N(0, 1/hidden)``, ``b1 = 0``, ``W2 = 0``, ``b2 = 0``."""
    w1 = torch.randn((width, hidden_size), generator=generator) / hidden_size ** 0.5
    return {"w1": w1, "b1": torch.zeros(width), "w2": torch.zeros((hidden_size, width)),
            "b2": torch.zeros(hidden_size)}


def apply_adapter(params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``h + W2 gelu(W1 h + b1) + b2`` over the last dimension of ``h``."""
    inner = torch.nn.functional.gelu(h @ params["w1"].T + params["b1"])
    return h + inner @ params["w2"].T + params["b2"]


class AdaptedHead(torch.nn.Module):
    """``lm_head`` with an adapter in front: ``head(adapter(h))``."""

    def __init__(self, head: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.head = head
        like = head.weight
        self.adapter = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(params[k].detach().to(like.device, like.dtype), requires_grad=False)
             for k in ADAPTER_KEYS})

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(apply_adapter(dict(self.adapter.items()), h))


@contextmanager
def adapted(model, params: dict[str, torch.Tensor] | None, where: str = "adapter"):
    """Within the block, ``model`` (a transformers causal LM with ``lm_head``) applies the adapter
    ``params`` to its final hidden states; its own ``lm_head`` is put back afterwards. ``None``:
    the model unchanged. Errors name ``where`` (the adapter's origin)."""
    if params is None:
        yield model
        return
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Module) or isinstance(head, AdaptedHead):
        raise EvomergeError(f"{type(model).__name__}: no plain lm_head to put an adapter in front of")
    check_fits(params, int(head.weight.shape[1]), where)
    model.lm_head = AdaptedHead(head, params)
    try:
        yield model
    finally:
        model.lm_head = head


def check_fits(params: dict[str, torch.Tensor], hidden_size: int, where: str) -> None:
    """Raise naming ``where`` unless ``params`` is a well-formed adapter for ``hidden_size``."""
    missing = [k for k in ADAPTER_KEYS if k not in params]
    if missing:
        raise EvomergeError(f"{where}: not an adapter (no tensor {missing[0]!r})")
    width = params["w1"].shape[0] if params["w1"].ndim == 2 else -1
    shapes = {"w1": (width, hidden_size), "b1": (width,), "w2": (hidden_size, width), "b2": (hidden_size,)}
    for k, want in shapes.items():
        if tuple(params[k].shape) != want:
            raise EvomergeError(f"{where}: tensor {k} has shape {tuple(params[k].shape)}, expected {want} for "
                                f"a model of hidden size {hidden_size} (an adapter trained for another model?)")


def save_adapter(path: str | os.PathLike, params: dict[str, torch.Tensor], task: str) -> Path:
    """Write ``params`` to ``path`` (safetensors, atomically) with the task name and sizes."""
    from safetensors.torch import save_file

    from evomerge.fsutil import atomic_output

    hidden = int(params["b2"].shape[0])
    check_fits(params, hidden, str(path))
    meta = {"format": ADAPTER_FORMAT, "task": str(task), "hidden_size": str(hidden),
            "width": str(int(params["b1"].shape[0])), "activation": "gelu"}
    tensors = {k: params[k].detach().float().contiguous().cpu() for k in ADAPTER_KEYS}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_adapter(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """``(task, params)`` of an adapter file; errors name the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            params = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file: say which
        raise EvomergeError(f"{path}: cannot read as a safetensors adapter ({exc})") from None
    if meta.get("format") != ADAPTER_FORMAT or "task" not in meta or "hidden_size" not in meta:
        raise EvomergeError(f"{path}: not an evomerge adapter file (metadata format={meta.get('format')!r}); "
                            "write adapters with `evomerge metamerge`")
    check_fits(params, int(meta["hidden_size"]), str(path))
    return meta["task"], params


def load_adapter_dir(folder: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: params}`` for every ``*.safetensors`` adapter file in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvomergeError(f"--adapters {folder}: folder not found (give the adapters/ folder that "
                            "`evomerge metamerge` wrote)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob("*" + ADAPTER_SUFFIX)):
        task, params = load_adapter(f)
        if task in out:
            raise EvomergeError(f"--adapters {folder}: two files hold an adapter for task {task!r}")
        out[task] = params
    if not out:
        raise EvomergeError(f"--adapters {folder}: no *.safetensors adapter files in it")
    return out
