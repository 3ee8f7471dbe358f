"""Normalization of the `params` argument of the optimizers (torch.optim conventions)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _named_items(params: Any, where: str) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{where} must be an iterable of tensors or (name, tensor) pairs, "
                        "got a single tensor (wrap it in a list)")
    if not isinstance(params, Iterable) or isinstance(params, (str, bytes)):
        raise TypeError(f"{where} must be an iterable of tensors, (name, tensor) pairs or param "
                        f"groups, got {type(params).__name__}")
    items: list[tuple[str | None, torch.Tensor]] = []
    for j, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, tensor = item
        else:
            name, tensor = None, item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}[{j}] must be a tensor or a (name, tensor) pair, "
                            f"got {type(item).__name__}")
        # Frozen nn.Parameters (requires_grad=False) are skipped, as in MeZO's trainer: passing
        # model.named_parameters() fine-tunes only the trainable ones.
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
            continue
        items.append((name, tensor))
    return items


def normalize_param_groups(params: Any) -> list[dict[str, Any]]:
    """[{"params": [tensors], "param_names": [names], **group options}, ...].

    params: an iterable of tensors, of (name, tensor) pairs, or of dicts (param groups) whose
    "params" is either. Unnamed tensors are named "<group>.<position>" (stable as long as the
    list is); all-named or all-unnamed per optimizer.
    """
    if isinstance(params, torch.nn.Module):
        raise TypeError("params must be an iterable: pass model.named_parameters() (named: keys "
                        "that survive wrappers and freezing) or model.parameters()")
    params = list(params) if not isinstance(params, torch.Tensor) else params
    if isinstance(params, list) and params and all(isinstance(p, dict) for p in params):
        raw_groups = params
    elif isinstance(params, list) and any(isinstance(p, dict) for p in params):
        raise TypeError("params mixes param groups (dicts) and tensors")
    else:
        raw_groups = [{"params": params}]
    groups = []
    seen: set[int] = set()
    for g, raw in enumerate(raw_groups):
        if "params" not in raw:
            raise ValueError(f"param group {g} has no 'params'")
        items = _named_items(raw["params"], f"param group {g} 'params'")
        if not items:
            raise ValueError(f"param group {g} has no trainable tensor")
        for name, tensor in items:
            if id(tensor) in seen:
                raise ValueError(f"a tensor appears twice in params ({name or 'unnamed'})")
            seen.add(id(tensor))
        group = {k: v for k, v in raw.items() if k != "params"}
        group["params"] = [t for _, t in items]
        group["param_names"] = [n if n is not None else f"{g}.{j}"
                                for j, (n, _) in enumerate(items)]
        group["_named"] = all(n is not None for n, _ in items)
        if not group["_named"] and any(n is not None for n, _ in items):
            raise ValueError(f"param group {g} mixes named and unnamed tensors: name all or none")
        groups.append(group)
    return groups
