"""Helpers that connect zokernels to model code (pure torch; transformers optional)."""

from .causal_lm import causal_lm_loss, pseuzo_causal_lm
from .finetune import finetune
from .layers import find_transformer_layers

__all__ = ["find_transformer_layers", "pseuzo_causal_lm", "causal_lm_loss", "finetune"]
