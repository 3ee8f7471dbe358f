"""Helpers that connect zokernels to model code (pure torch; transformers optional)."""

from .layers import find_transformer_layers

__all__ = ["find_transformer_layers"]
