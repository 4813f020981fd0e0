"""ladder_jax: transformers that take tensor-parallel communication off the critical path."""

__version__ = "0.1.0"
