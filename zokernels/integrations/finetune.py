"""finetune: one call to ZO fine-tune a causal LM (transformers' PreTrainedModel or look-alike)
with any zokernels optimizer, with a progress line."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .._warn import warn
from ..optim import LeZO, MeZO, PseuZO, TeZO, ZOOptimizer
from .causal_lm import check_causal_lm_split, lm_inputs, pseuzo_causal_lm, pseuzo_parameters
from .layers import find_transformer_layers

OPTIMIZERS = {"mezo": MeZO, "lezo": LeZO, "tezo": TeZO, "pseuzo": PseuZO}


def _positive_int(value: Any, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def trainable_blocks(model: torch.nn.Module, where: str = "finetune('lezo')",
                     option: str = "layers=") -> list[torch.nn.Module]:
    """LeZO's default layers: the blocks of find_transformer_layers(model) that hold a trainable
    parameter (wholly frozen blocks are left out: LeZO would spend its picks on them).
    ValueError naming `where` and `option` when there is none."""
    try:
        blocks = [block for block in find_transformer_layers(model)
                  if any(p.requires_grad for p in block.parameters())]
    except ValueError:  # no repeated block list holds a trainable parameter
        blocks = []
    if not blocks:
        raise ValueError(f"{where}: no transformer block holds a trainable parameter (every "
                         f"block frozen, or no repeated block list); pass {option}")
    return blocks


@contextlib.contextmanager
def merged_at_exit(optimizer_now: Callable[[], Any]) -> Iterator[None]:
    """Merges TeZO's pending deferred updates (update="deferred") when the block ends, returning
    or raising, so that the model holds its weights afterwards; other optimizers: nothing.
    optimizer_now() gives the optimizer when the block ends (a Trainer may build it inside). A
    merge that fails while an exception propagates does not replace that exception: the
    merge's error is added to it as a note (a warning before Python 3.11), and the updates stay
    pending (`opt.merge()` retries)."""
    def merge() -> None:
        optimizer = optimizer_now()
        if isinstance(optimizer, TeZO):
            optimizer.merge()

    try:
        yield
    except BaseException as error:
        try:
            merge()
        except Exception as failed:  # noqa: BLE001 - reported on the first error
            message = (f"TeZO.merge() after this error failed too ({failed!r}); the deferred "
                       "updates are still pending: call opt.merge()")
            if hasattr(error, "add_note"):
                error.add_note(message)
            else:
                warn(message)
        raise
    merge()


def _build(model: torch.nn.Module, name: str, kwargs: dict[str, Any],
           where: str = "finetune") -> ZOOptimizer:
    kwargs = dict(kwargs)
    if name == "lezo" and "layers" not in kwargs:
        kwargs["layers"] = trainable_blocks(model)
        if "n_active" not in kwargs and "n_dropped" not in kwargs:
            kwargs["n_active"] = max(1, len(kwargs["layers"]) // 4)
    if name == "pseuzo":
        params = pseuzo_parameters(model)
        if not params:
            raise ValueError(f"{where}('pseuzo'): nothing to train: the only trainable "
                             "parameters are an untied LM head, which PseuZO's hidden-state "
                             "output cannot see (see pseuzo_parameters)")
    else:
        params = model.named_parameters()
    return OPTIMIZERS[name](params, **kwargs)


def finetune(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *,
             optimizer: str | ZOOptimizer = "mezo", steps: int | None = None,
             log_every: int = 10, progress: bool = True, **optimizer_kwargs: Any
             ) -> tuple[ZOOptimizer, list[float]]:
    """ZO fine-tuning of `model` on `batches`: one optimizer step per batch, minimizing the mean
    next-token cross-entropy.

    batches: dicts with input_ids, optional attention_mask and labels, as transformers' causal
    LMs take them. labels default to input_ids (padding, attention_mask == 0, ignored) on every
    path, so batches without labels train too. MeZO / LeZO / TeZO minimize model(**batch).loss;
    PseuZO minimizes the same loss through pseuzo_causal_lm's split (o = the hidden state before
    the LM head, loss_fn = head + cross-entropy); a model for which that is not its loss is
    refused (pseuzo_causal_lm; check_causal_lm_split on the first batch, before any step).

    optimizer: "mezo", "lezo" (layers default to the blocks of find_transformer_layers(model)
    that hold a trainable parameter, n_active to a quarter of them), "tezo", "pseuzo", or an
    optimizer built beforehand (then used as given).
    A name trains model.named_parameters() that require grad, except for "pseuzo", which trains
    pseuzo_parameters(model): an LM head that is not tied to the input embeddings is left out
    (it cannot change PseuZO's output o, so its update would be zero-mean noise and two wasted
    passes per step) and stays unchanged. optimizer_kwargs go to its constructor (lr, eps,
    seed, ...). Models in bf16 / fp16 and frozen parameters anywhere are fine: frozen ones are
    never written.

    Runs in eval mode (no dropout: both forwards of a step must see the same function); the
    train/eval mode of every submodule is restored when finetune returns or raises. Stops after
    `steps` steps or when `batches` ends. Prints `step, loss (mean of the last log_every),
    steps/s` to stderr every log_every steps when `progress`.
    TeZO with update="deferred": its pending updates are merged into the model before finetune
    returns or raises (docs/tezo.md).
    Returns (the optimizer, the loss of every step as the optimizer's step returns it).
    Raises TypeError / ValueError naming the argument before any weight is written.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _positive_int(steps, "steps", optional=True)
    _positive_int(log_every, "log_every")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} or a ZO optimizer, "
                             f"got {optimizer!r}")
        name = optimizer
        optimizer = _build(model, name, optimizer_kwargs)
    elif isinstance(optimizer, ZOOptimizer):
        if optimizer_kwargs:
            raise ValueError("optimizer_kwargs are for an optimizer given by name")
        owned = {id(p) for p in model.parameters()}
        if not any(id(p) in owned for g in optimizer.param_groups for p in g["params"]):
            # its steps would perturb and update other tensors: the model would never change
            raise ValueError("optimizer holds none of model's parameters (build it over "
                             "model.parameters() or model.named_parameters())")
        name = optimizer.algorithm
    else:
        raise TypeError(f"optimizer must be a name or a ZOOptimizer, got "
                        f"{type(optimizer).__name__}")

    try:
        batches = iter(batches)  # an iterator stays itself: its batches past `steps` stay in it
    except TypeError:
        raise TypeError(f"batches must be an iterable of dicts (input_ids, optional "
                        f"attention_mask and labels), got {type(batches).__name__}") from None
    modes = [(module, module.training) for module in model.modules()]
    losses: list[float] = []
    try:
        with merged_at_exit(lambda: optimizer):  # update="deferred": the model holds its weights
            model.eval()
            start = time.perf_counter()
            # islice: no batch is drawn past `steps` (an iterator shared by several calls)
            for step, batch in enumerate(itertools.islice(batches, steps)):
                inputs = lm_inputs(batch, f"batches[{step}]")
                if name == "pseuzo":
                    if step == 0:  # the split's logits against the model's own, once
                        check_causal_lm_split(model, inputs)
                    loss = optimizer.step(*pseuzo_causal_lm(model, inputs))
                else:
                    loss = optimizer.step(lambda inputs=inputs: _model_loss(model, inputs))
                losses.append(float(loss))
                if progress and (step + 1) % log_every == 0:
                    recent = losses[-log_every:]
                    rate = (step + 1) / (time.perf_counter() - start)
                    total = f"/{steps}" if steps is not None else ""
                    mean = sum(recent) / len(recent)
                    print(f"[{name}] step {step + 1}{total}  loss {mean:.4f}  {rate:.1f} steps/s",
                          file=sys.stderr, flush=True)
    finally:
        for module, training in modes:
            module.training = training
    return optimizer, losses


def _model_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss although labels were given: finetune "
                         "needs a model that computes its loss from labels (a *ForCausalLM)")
    return loss
