"""Layer-dataflow (DFS) recipes: which decoder layers a token passes through, in which order,
with which input scale -- materialised as an ordinary checkpoint.

The data-flow search space of Sakana AI's evolutionary model merging (arXiv 2403.13187), for two
models A and B of one architecture (``llama``, ``mistral``, ``qwen2``, ``qwen3``); embeddings,
final norm, lm_head and tokenizer come from A. The package, by job:

* :mod:`~evomerge.dataflow.path` -- :class:`DataflowStep` / :class:`DataflowPath` (the recipe,
  its JSON form ``dataflow_path.json``), :func:`cumulative_scales`, :class:`DataflowError`.
* :mod:`~evomerge.dataflow.space` -- :class:`DataflowSpace`: genome in ``[0, 1]^dim`` (an
  indicator per layer slot, a scale matrix ``W``) <-> path; the encoding is described there.
* :mod:`~evomerge.dataflow.sources` -- the two source models (folders read with
  :class:`evomerge.checkpoint.CheckpointReader`, or live ``transformers`` models) and the
  checks that their layers are interchangeable.
* :mod:`~evomerge.dataflow.fold` -- folding the input scales into each block's ``o_proj`` /
  ``down_proj`` (exact for pre-norm RMSNorm blocks up to the norm's eps: derivation and
  measured tolerances there) and the folded model's tensors, one at a time.
* :mod:`~evomerge.dataflow.build` -- :class:`DataflowBuilder` (a live candidate per path,
  sharing unscaled tensors with the sources), :func:`build_dataflow_model`,
  :func:`write_dataflow_checkpoint` (the same tensors as an atomic checkpoint).

Importing the package does not import torch or transformers (they load on first use).
"""

from __future__ import annotations

from evomerge.dataflow.build import DataflowBuilder, build_dataflow_model, write_dataflow_checkpoint
from evomerge.dataflow.path import (
    MAX_CUM_SCALE,
    MIN_CUM_SCALE,
    PATH_FILE,
    PATH_FORMAT,
    DataflowError,
    DataflowPath,
    DataflowStep,
    cumulative_scales,
)
from evomerge.dataflow.sources import SUPPORTED_MODEL_TYPES, ModelLike
from evomerge.dataflow.space import DataflowSpace

__all__ = [
    "DataflowError",
    "DataflowStep",
    "DataflowPath",
    "DataflowSpace",
    "DataflowBuilder",
    "build_dataflow_model",
    "write_dataflow_checkpoint",
    "cumulative_scales",
    "SUPPORTED_MODEL_TYPES",
    "PATH_FILE",
    "PATH_FORMAT",
    "MIN_CUM_SCALE",
    "MAX_CUM_SCALE",
    "ModelLike",
]
