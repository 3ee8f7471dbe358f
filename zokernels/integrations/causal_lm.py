"""PseuZO's model split for causal language models (transformers' *ForCausalLM and look-alikes):
the output o is the hidden state before the LM head; loss_fn(o) applies the head and the shifted
cross-entropy, so PseuZO's autograd runs through the head only. Duck-typed: no transformers
import; a model needs get_output_embeddings() and base_model (transformers' names); a PEFT
wrapper is looked through with its get_base_model().

The split is exact only where the model's logits are lm_head(hidden state) and its loss the
shifted cross-entropy. Refused, for a transformers model: one that is not a causal LM (a masked
LM's head has a transform before its decoder, and its labels are not shifted), and a config with
a logit transform the split does not apply (final_logit_softcapping, logit_scale,
logits_scaling). check_causal_lm_split compares the split's logits with the model's own on a
batch, for transforms this list does not know."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' label for positions without a loss
# config attributes of transformers' logit transforms after the LM head, and their identity
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1, "logits_scaling": 1}


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
    integer input_ids tensor, or whose attention_mask (labels defaulted) is not input_ids'
    shape."""
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
        if mask is not None:
            mask = torch.as_tensor(mask, device=ids.device)
            if mask.shape != ids.shape:  # a broadcast mask would mark other tokens as padding
                raise ValueError(f"{where}['attention_mask'] must have input_ids' shape "
                                 f"{list(ids.shape)} to mark its padding (labels default to "
                                 f"input_ids without it), got {list(mask.shape)}; or pass labels")
        inputs["labels"] = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return inputs


def _unwrapped(model: torch.nn.Module, caller: str) -> torch.nn.Module:
    """The model inside a PEFT wrapper (the model itself otherwise), or ValueError for prompt /
    prefix tuning: their virtual tokens and past key values live in the wrapper's forward,
    which the split (the inner model's hidden state) does not run, so the trained prompt would
    not change PseuZO's output and every step would update nothing."""
    if not callable(getattr(model, "get_base_model", None)):
        return model
    try:
        config = model.active_peft_config
    except Exception:  # not a PeftModel, or no active adapter
        config = None
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(f"{caller}: PEFT prompt / prefix tuning ({type(config).__name__}) acts "
                         "in the PEFT wrapper's forward, outside the split PseuZO uses; train "
                         "it with MeZO, LeZO or TeZO (whole-model losses)")
    return model.get_base_model()


def _split(model: torch.nn.Module, caller: str) -> tuple[torch.nn.Module, Any]:
    """(LM head, base model producing the hidden state) of a causal LM, or TypeError."""
    model = _unwrapped(model, caller)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise TypeError(f"{caller} needs a causal LM with get_output_embeddings() and "
                        "base_model (transformers' *ForCausalLM)")
    transformers = sys.modules.get("transformers")  # loaded if `model` is one of its models
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        _check_transformers_model(model, caller)
    return head, base


def _check_transformers_model(model: Any, caller: str) -> None:
    """TypeError for a transformers model that is not a causal LM, ValueError for a config
    with a logit transform the split would skip."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    if not any(cls.__name__ in causal for cls in type(model).__mro__):
        raise TypeError(f"{caller} needs a causal LM (a class of transformers' "
                        f"AutoModelForCausalLM), got {type(model).__name__}: its loss is not "
                        "the shifted cross-entropy of lm_head(hidden state)")
    configs = [model.config]
    if callable(getattr(model.config, "get_text_config", None)):
        configs.append(model.config.get_text_config())
    for config in configs:
        for name, identity in _LOGIT_TRANSFORMS.items():
            value = getattr(config, name, None)
            if value is not None and value != identity:
                raise ValueError(f"{caller}: {type(model).__name__}'s config has {name}="
                                 f"{value!r}, a transform of the logits after the LM head that "
                                 "the split does not apply (its loss would not be the model's); "
                                 "use MeZO, LeZO or TeZO for this model")


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
    inner = _unwrapped(model, "pseuzo_parameters")
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
    labels; labels default to input_ids with padding ignored, see lm_inputs; every other key,
    position_ids for one, goes to the base model, as the full model passes it).

    forward() = model.base_model(**batch without labels).last_hidden_state (the LM head's
    input; for a PEFT model, that of get_base_model());
    loss_fn(o) = causal_lm_loss(lm_head(o), labels).
    Train only pseuzo_parameters(model) with it: an untied head gets no signal through o.
    Models whose loss this is not are refused (module docstring); check_causal_lm_split
    checks the logits on a batch.
    """
    head, base = _split(model, "pseuzo_causal_lm")
    inputs = lm_inputs(batch)
    labels = inputs.pop("labels")

    def forward() -> torch.Tensor:
        out = base(**inputs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return hidden

    def loss_fn(hidden: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(head(hidden), labels)

    return forward, loss_fn


def check_causal_lm_split(model: torch.nn.Module, batch: Mapping[str, Any],
                          rtol: float = 1e-3) -> None:
    """ValueError if pseuzo_causal_lm's logits, lm_head(hidden state), differ from the model's
    own logits on `batch` by more than rtol of the largest logit: a transform after the head
    that the split would skip. One full forward without gradients; put the model in eval mode
    first (dropout). A model whose output has no logits is not checked."""
    head, _ = _split(model, "check_causal_lm_split")
    forward, _ = pseuzo_causal_lm(model, batch)
    inputs = {k: v for k, v in lm_inputs(batch).items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is None:
            return
        hidden = forward()
        if hidden.shape[:-1] != logits.shape[:-1]:
            raise ValueError(f"check_causal_lm_split: the model's logits have shape "
                             f"{tuple(logits.shape)}, the hidden state {tuple(hidden.shape)}")
        # a few positions at a time: the logits span the vocabulary, a second full copy (and
        # its float32 difference) may not fit where the training steps do
        hidden, logits = hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1])
        error = scale = 0.0
        for start in range(0, logits.shape[0], 256):
            own = logits[start:start + 256].float()
            split = head(hidden[start:start + 256]).float()
            if split.shape != own.shape:
                raise ValueError(f"check_causal_lm_split: lm_head(hidden state) has "
                                 f"{split.shape[-1]} logits per position, the model "
                                 f"{own.shape[-1]}")
            error = max(error, float(split.sub_(own).abs_().max()))
            scale = max(scale, float(own.abs().max()))
    if not error <= rtol * scale:
        raise ValueError(f"check_causal_lm_split: {type(model).__name__}'s logits differ from "
                         f"lm_head(hidden state) by up to {error:.3g} (largest logit "
                         f"{scale:.3g}): the model transforms its logits after the head, which "
                         "PseuZO's split would skip; use MeZO, LeZO or TeZO for this model")
