"""Helpers that connect zokernels to model code (pure torch; transformers optional)."""

from .causal_lm import causal_lm_loss, lm_inputs, pseuzo_causal_lm, pseuzo_parameters
from .finetune import finetune
from .layers import find_transformer_layers

__all__ = ["find_transformer_layers", "pseuzo_causal_lm", "pseuzo_parameters", "causal_lm_loss",
           "lm_inputs", "finetune"]
