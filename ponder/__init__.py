"""ponder: adaptive-computation and brain-inspired Transformers in JAX."""

__version__ = "0.1.0"
