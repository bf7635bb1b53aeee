"""Merge methods (pure tensor functions), recipes, and the engine that applies them."""
