"""Merges whose coefficients are learned by gradient descent on unlabeled task inputs.

- :mod:`evomerge.learned.adamerging`: AdaMerging (Yang et al., ICLR 2024): task-wise or
  layer-wise coefficients of task arithmetic, learned by minimising the entropy of the merged
  model's predictions on the tasks' prompts. The result is an ordinary ``task_arithmetic`` recipe.
"""
