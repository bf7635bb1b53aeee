"""Merges whose coefficients are learned by gradient descent on unlabeled task inputs.

- :mod:`evomerge.learned.adamerging`: AdaMerging (Yang et al., ICLR 2024): task-wise or
  layer-wise coefficients of task arithmetic, learned by minimising the entropy of the merged
  model's predictions on the tasks' prompts. The result is an ordinary ``task_arithmetic`` recipe.
- :mod:`evomerge.learned.metamerging`: MetaMerging ("Learn to Merge"): task arithmetic's
  coefficients meta-learned (MAML, second order or FOMAML) together with one feature adapter per
  task (:mod:`evomerge.learned.adapters`) that aligns the merged model's final hidden states with
  each fine-tune's. The result is a ``task_arithmetic`` recipe plus per-task adapter files: a
  task-routed model. ``evomerge metamerge``: :mod:`evomerge.metamerge_cli`.
"""
