"""evomerge: evolutionary model merging with IRT-estimated fitness."""

__version__ = "0.1.0"
