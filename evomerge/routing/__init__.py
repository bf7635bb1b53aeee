"""MASS (Crisostomi et al. 2025, "MoErging through Adaptive Subspace Selection",
arXiv:2504.05342): per-input routing among fine-tunes of one base by their TSV subspaces.

Not a single static checkpoint: every prompt costs two passes (the TSV merge of all tasks up to
the routing layer, then the merge of the tasks it was routed to), and a saved routed model
holds the base plus each task's singular factors.

- ``factors.py``: per-task TSV factors; the TSV merge of any task subset.
- ``router.py``: routing settings, the features ``z``, residuals, probabilities, selection.
- ``model.py``: ``RoutedModel``: ``generate`` / ``loglikelihoods`` / ``answer`` in two passes.
- ``disk.py``: ``save_routed`` / ``load_routed`` (a folder: base/, factors, routing.json).
"""

from __future__ import annotations


def load_routed(folder, **kwargs):
    """Run a saved routed model (see :func:`evomerge.routing.disk.load_routed`)."""
    from evomerge.routing.disk import load_routed as _load

    return _load(folder, **kwargs)


__all__ = ["load_routed"]
