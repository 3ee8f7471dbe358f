"""Grouping of a call's tensors into (device, dtype) groups: one backend launch per group."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


_is_contiguous = torch.Tensor.is_contiguous


def _increment_version(tensors: list[torch.Tensor]) -> None:
    if tensors:
        bump = getattr(torch.autograd.graph, "increment_version", None)
        if bump is not None:
            bump(tensors)
        else:  # torch < 2.1
            for t in tensors:
                torch._C._increment_version(t)


def group_indices(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions of the non-empty tensors per (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for j, t in enumerate(tensors):
        if t.numel() > 0:
            groups.setdefault((t.device, t.dtype), []).append(j)
    return groups


@contextmanager
def contiguous_views(tensors: list[torch.Tensor],
                     write_back: bool = True) -> Iterator[list[torch.Tensor]]:
    """Contiguous tensors to write into; non-contiguous inputs get a temporary copy
    that is copied back only when the body succeeds, so a failure leaves them untouched. Every
    write of a parameter goes through here: version counters bumped, autocast's cached casts
    dropped. write_back=False: the body only reads (no copy back, no version bump)."""
    if write_back:
        # torch.autocast keeps its cast of a weight (a leaf that requires grad) for the whole
        # autocast region, keyed by the tensor and blind to in-place writes: a forward after
        # this write would read the cast of the old values (a step run inside autocast probed
        # -eps with the +eps weights). Dropped before the write, so a failure inside drops it too.
        torch.clear_autocast_cache()
    # Contiguous tensors are written directly: backends run under no_grad and the fast ones only
    # read data_ptr(), so no detached alias is needed (detach() costs microseconds per tensor).
    if all(map(_is_contiguous, tensors)):  # the common case, at C speed (LoRA: thousands)
        yield tensors
        if write_back:
            _increment_version(tensors)
        return
    work = [t if t.is_contiguous() else t.detach().contiguous() for t in tensors]
    yield work
    if not write_back:
        return
    written_in_place = []
    with torch.no_grad():
        for original, written in zip(tensors, work):
            if written is original:
                written_in_place.append(original)
            else:
                original.copy_(written)  # copy_ bumps the version counter itself
    # The fast backends write through data_ptr(), unseen by autograd: bump the version counters
    # so that a tensor saved for backward and perturbed since is reported, as torch would.
    _increment_version(written_in_place)


def select(values: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """values[indices] for a per-tensor vector; the whole vector when one group holds every tensor
    (the common case, which then skips an indexing kernel)."""
    if len(indices) == values.numel():
        return values
    return values[indices]
