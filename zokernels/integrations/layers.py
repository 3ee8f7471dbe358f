"""Finding a model's repeated blocks (LeZO's sparsifiable layers) from its module structure."""

from __future__ import annotations

import torch


def _trainable_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def find_transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the model's main stack, in order: the nn.ModuleList whose children are >= 2
    modules of one class holding the most trainable parameters.

    This finds OPT's `model.decoder.layers`, LLaMA / Qwen / Mistral's `model.layers`, GPT-2's
    `transformer.h` and BERT's `encoder.layer` without naming them, and works for wrapped models
    (DDP, PEFT, torch.compile) because it follows the structure, not the names. Raises ValueError
    when the model has no such list.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    best: list[torch.nn.Module] | None = None
    best_numel = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        numel = sum(_trainable_numel(c) for c in children)
        if numel > best_numel:
            best, best_numel = children, numel
    if best is None:
        raise ValueError("no repeated block list found: pass LeZO's layers explicitly (a list of "
                         "modules or of parameter-name lists)")
    return best
