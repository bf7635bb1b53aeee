"""Reading and writing Hugging Face checkpoints (safetensors, lazy, sharded, atomic)."""
