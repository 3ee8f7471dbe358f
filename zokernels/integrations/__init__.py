"""Helpers that connect zokernels to model code (pure torch; transformers optional).

ZOTrainer and ZOConfig (transformers.Trainer / TrainingArguments subclasses) are imported on
first access, so importing zokernels.integrations never imports transformers."""

from typing import Any

from .causal_lm import (causal_lm_loss, check_causal_lm_split, lm_inputs, pseuzo_causal_lm,
                        pseuzo_parameters)
from .finetune import finetune
from .layers import find_transformer_layers

# ZOTrainer / ZOConfig are left out of __all__: a star import must not need transformers
__all__ = ["find_transformer_layers", "pseuzo_causal_lm", "pseuzo_parameters", "causal_lm_loss",
           "check_causal_lm_split", "lm_inputs", "finetune"]


def __getattr__(name: str) -> Any:
    if name in ("ZOTrainer", "ZOConfig"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
