"""Reading and writing Hugging Face checkpoints (safetensors, lazy, sharded, atomic).

- :class:`CheckpointReader` reads a model folder lazily, one tensor at a time; names, shapes and
  dtypes come from the safetensors headers without reading any tensor data.
- :func:`check_compatible` compares architectures, tensor names and shapes of several readers
  before any compute and names the model / tensor at fault.
- :class:`CheckpointWriter` streams tensors into sharded safetensors whose headers are computed
  up front from the planned shapes (memory: one tensor at a time), inside a temporary folder
  that is renamed into place on :meth:`CheckpointWriter.commit`; :func:`write_checkpoint` is the
  convenience form for an iterable of tensors.
- :func:`layer_index` gives the decoder layer of a tensor name.

Pickle checkpoints (``pytorch_model*.bin``) are read only with ``allow_pickle=True`` (and then
with ``torch.load(weights_only=True)``). No modeling code is ever imported or executed.
"""

from __future__ import annotations

from evomerge.checkpoint.names import layer_index, parse_size, set_layer_index

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
"""Default shard size (5 GB, as transformers)."""

_LAZY = {"CheckpointReader", "CheckpointWriter", "check_compatible", "write_checkpoint"}


def __getattr__(name: str):
    # torch is imported only when the reader / writer is first used (the CLI stays light).
    if name in _LAZY:
        from evomerge.checkpoint import io

        return getattr(io, name)
    raise AttributeError(name)


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "CheckpointReader",
    "CheckpointWriter",
    "check_compatible",
    "layer_index",
    "parse_size",
    "set_layer_index",
    "write_checkpoint",
]
