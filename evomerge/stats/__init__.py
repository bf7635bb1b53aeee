"""Statistics of a model on a task's inputs, for the merge methods that weight by them.

- the diagonal Fisher information of every parameter (Fisher merging, Matena & Raffel 2022);
- the Gram matrix ``Xᵀ X`` of the inputs of every linear layer (RegMean, Jin et al. 2023).

Both read only the task's *prompts* (its search items), never the answers: the model labels
them itself (see :mod:`evomerge.stats.collect`). ``evomerge stats`` computes and stores them once
(safetensors, with the model, task and items they came from in the metadata); the ``fisher`` and
``regmean`` merge methods read the files.
"""

from evomerge.stats.files import StatsFile, open_stats, write_stats

__all__ = ["StatsFile", "open_stats", "write_stats"]
