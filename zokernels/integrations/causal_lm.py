"""PseuZO's model split for causal language models (transformers' *ForCausalLM and look-alikes):
the output o is the hidden state before the LM head; loss_fn(o) applies the head and the shifted
cross-entropy, so PseuZO's autograd runs through the head only. Duck-typed: no transformers
import; a model needs get_output_embeddings() and base_model (transformers' names); a PEFT
wrapper is looked through with its get_base_model()."""

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


def lm_inputs(batch: Any, where: str = "batch") -> dict[str, Any]:
    """The model inputs of a language-modelling batch, with labels: the batch's own, or by
    default input_ids with the padding (attention_mask == 0) set to -100, as transformers'
    DataCollatorForLanguageModeling makes them. A new dict; the batch is not modified.
    Raises ValueError / TypeError naming `where` for a batch that is not a mapping holding an
    integer input_ids tensor."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} must be a mapping (input_ids, optional attention_mask and "
                        f"labels), got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise ValueError(f"{where} must hold input_ids")
    ids = batch["input_ids"]
    if (not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex()
            or ids.dtype == torch.bool):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{where}['input_ids'] must be an integer tensor, got {got}")
    inputs = dict(batch)
    if inputs.get("labels") is None:
        mask = inputs.get("attention_mask")
        inputs["labels"] = (ids if mask is None
                            else ids.masked_fill(torch.as_tensor(mask, device=ids.device) == 0,
                                                 IGNORE_INDEX))
    return inputs


def _split(model: torch.nn.Module, caller: str) -> tuple[torch.nn.Module, Any]:
    """(LM head, base model producing the hidden state) of a causal LM, or TypeError."""
    if callable(getattr(model, "get_base_model", None)):  # a PEFT wrapper
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise TypeError(f"{caller} needs a causal LM with get_output_embeddings() and "
                        "base_model (transformers' *ForCausalLM)")
    return head, base


def pseuzo_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs PseuZO should perturb: model.named_parameters() that require
    grad, minus the LM head's parameters that no other module holds, i.e. the output embeddings
    when they are NOT tied to the input embeddings (a tied weight is also the input embedding,
    which the hidden state depends on, so it stays).

    Why: PseuZO's output o is the hidden state before the head (pseuzo_causal_lm), and every
    parameter's update is c_k z_k with c_k = <o(theta + eps z_k) - o(theta), dL/do> / eps. An
    untied head does not change o, so c_k is independent of the head's z: its update would be
    noise with zero mean (a random walk of the head), on top of two wasted passes over its
    weights per step. Names are model.named_parameters()'s (wrapper prefixes included; the noise
    keys drop them, see ParameterSpace).
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    head, _ = _split(inner, "pseuzo_parameters")
    in_head = {id(m) for m in head.modules()}
    # parameters any module outside the head holds (a tied weight: the input embedding's)
    upstream = {id(p) for m in inner.modules() if id(m) not in in_head
                for p in m.parameters(recurse=False)}
    head_only = {id(p) for p in head.parameters() if id(p) not in upstream}
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in head_only]


def pseuzo_causal_lm(model: torch.nn.Module, batch: Mapping[str, Any]
                     ) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(forward, loss_fn) for PseuZO.step on one batch (input_ids, optional attention_mask and
    labels; labels default to input_ids with padding ignored, see lm_inputs).

    forward() = model.base_model(input_ids, attention_mask).last_hidden_state (the LM head's
    input; for a PEFT model, that of get_base_model());
    loss_fn(o) = causal_lm_loss(lm_head(o), labels).
    Train only pseuzo_parameters(model) with it: an untied head gets no signal through o.
    """
    head, base = _split(model, "pseuzo_causal_lm")
    inputs = lm_inputs(batch)
    labels = inputs["labels"]
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def forward() -> torch.Tensor:
        out = base(**inputs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return hidden

    def loss_fn(hidden: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(head(hidden), labels)

    return forward, loss_fn
