"""Merge methods (pure tensor functions), recipes, and the engine that applies them.

Public entry points (imported lazily so that ``import evomerge.merge`` stays torch-free):
``MergeRecipe`` (recipe.py), ``load_recipe`` (mergekit_io.py), ``merge_to_disk``, ``InMemoryMerger`` (engine.py),
``get_method``, ``method_names``, ``register``, ``MergeMethod`` (registry.py).
"""

from __future__ import annotations

_LAZY = {
    "MergeRecipe": "evomerge.merge.recipe",
    "load_recipe": "evomerge.merge.mergekit_io",
    "merge_to_disk": "evomerge.merge.engine",
    "InMemoryMerger": "evomerge.merge.engine",
    "get_method": "evomerge.merge.registry",
    "method_names": "evomerge.merge.registry",
    "register": "evomerge.merge.registry",
    "MergeMethod": "evomerge.merge.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
