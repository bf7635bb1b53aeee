"""Evaluators that turn a model + prompts into answers.

- ``evomerge.backends.hf.HFEvaluator``: resident transformers model, CPU or CUDA.

Import the submodule you need (this package imports no torch by itself).
"""
