"""Aligning models that do not share an initialisation: the permutation symmetries of a
Llama-style decoder (:mod:`~evomerge.align.symmetries`), Git Re-Basin weight matching for two
models (:mod:`~evomerge.align.matching`), C²M³ cycle-consistent matching for N models
(:mod:`~evomerge.align.c2m3`), and the ``evomerge align`` step that writes aligned
checkpoints (:mod:`~evomerge.align.disk`).

Import-light: torch and scipy are imported by the submodules, not here.
"""
