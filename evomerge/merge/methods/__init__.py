"""The built-in merge methods, one module per family (importing a module registers its methods):

- :mod:`~evomerge.merge.methods.averaging` — ``linear``, ``model_stock``, ``nearswap``,
  ``passthrough``;
- :mod:`~evomerge.merge.methods.task_arithmetic` — the task-arithmetic family (``task_arithmetic``,
  ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
  ``della_linear``: one parameterised merge, a table of variants) and ``sce``;
- :mod:`~evomerge.merge.methods.spherical` — ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``;
- :mod:`~evomerge.merge.methods.spectral` — ``tsv``, ``iso_c``, ``iso_cts``;
- building blocks: :mod:`~evomerge.merge.methods.sparsify` (magnitude / Bernoulli / breadcrumbs /
  DELLA sparsifiers, TIES sign election), :mod:`~evomerge.merge.methods.params` (parameter checks).

Every method is a pure function of float32 tensors with the signature of
:mod:`evomerge.merge.registry`; docs/methods.md is the table of formulas and references.
"""
