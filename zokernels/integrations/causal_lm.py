"""PseuZO's model split for causal language models (transformers' *ForCausalLM and look-alikes):
the output o is the hidden state before the LM head; loss_fn(o) applies the head and the shifted
cross-entropy, so PseuZO's autograd runs through the head only. Duck-typed: no transformers
import; a model needs get_output_embeddings() and base_model (transformers' names)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' label for positions without a loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 over labels != -100 (shifted by one)."""
    shifted = logits[..., :-1, :].float()
    targets = labels[..., 1:]
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE_INDEX)


def pseuzo_causal_lm(model: torch.nn.Module, batch: Mapping[str, Any]
                     ) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(forward, loss_fn) for PseuZO.step on one batch (input_ids, optional attention_mask and
    labels; labels default to input_ids, as for language modelling).

    forward() = model.base_model(**inputs).last_hidden_state (the LM head's input);
    loss_fn(o) = causal_lm_loss(lm_head(o), labels).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise TypeError("pseuzo_causal_lm needs a causal LM with get_output_embeddings() and "
                        "base_model (transformers' *ForCausalLM)")
    if "input_ids" not in batch:
        raise ValueError("batch must hold input_ids")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    labels = batch.get("labels", batch["input_ids"])

    def forward() -> torch.Tensor:
        out = base(**inputs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return hidden

    def loss_fn(hidden: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(head(hidden), labels)

    return forward, loss_fn
