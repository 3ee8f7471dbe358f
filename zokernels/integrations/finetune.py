"""finetune: one call to ZO fine-tune a causal LM (transformers' PreTrainedModel or look-alike)
with any zokernels optimizer, with a progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..optim import LeZO, MeZO, PseuZO, TeZO, ZOOptimizer
from .causal_lm import pseuzo_causal_lm
from .layers import find_transformer_layers

OPTIMIZERS = {"mezo": MeZO, "lezo": LeZO, "tezo": TeZO, "pseuzo": PseuZO}


def finetune(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *,
             optimizer: str | ZOOptimizer = "mezo", steps: int | None = None,
             log_every: int = 10, progress: bool = True, **optimizer_kwargs: Any
             ) -> tuple[ZOOptimizer, list[float]]:
    """ZO fine-tuning of `model` on `batches` (dicts with input_ids, optional attention_mask and
    labels, as transformers' causal LMs take them; the model computes the loss from labels).

    optimizer: "mezo", "lezo" (layers default to find_transformer_layers(model), n_active to a
    quarter of them), "tezo", "pseuzo" (the hidden-state / head split of pseuzo_causal_lm), or an
    optimizer built beforehand. optimizer_kwargs go to its constructor (lr, eps, seed, ...).
    Trains the parameters that require grad, in eval mode (no dropout: both forwards of a step
    must see the same function). Stops after `steps` steps or when `batches` ends. Prints
    `step, loss (mean of the last log_every), steps/s` to stderr every log_every steps.
    Returns (the optimizer, the loss of every step).
    """
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} or a ZO optimizer, "
                             f"got {optimizer!r}")
        kwargs = dict(optimizer_kwargs)
        if optimizer == "lezo" and "layers" not in kwargs:
            kwargs["layers"] = find_transformer_layers(model)
            if "n_active" not in kwargs and "n_dropped" not in kwargs:
                kwargs["n_active"] = max(1, len(kwargs["layers"]) // 4)
        name = optimizer
        optimizer = OPTIMIZERS[optimizer](model.named_parameters(), **kwargs)
    elif isinstance(optimizer, ZOOptimizer):
        if optimizer_kwargs:
            raise ValueError("optimizer_kwargs are for an optimizer given by name")
        name = optimizer.algorithm
    else:
        raise TypeError(f"optimizer must be a name or a ZOOptimizer, got {type(optimizer).__name__}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    model.eval()
    losses: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if steps is not None and step >= steps:
            break
        if name == "pseuzo":
            loss = optimizer.step(*pseuzo_causal_lm(model, batch))
        else:
            loss = optimizer.step(lambda batch=batch: model(**batch).loss)
        losses.append(float(loss))
        if progress and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            rate = (step + 1) / (time.perf_counter() - start)
            total = f"/{steps}" if steps is not None else ""
            print(f"[{name}] step {step + 1}{total}  loss {sum(recent) / len(recent):.4f}  "
                  f"{rate:.1f} steps/s", file=sys.stderr, flush=True)
    return optimizer, losses
