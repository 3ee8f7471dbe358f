"""Contract element indices of a sharded tensor's local elements (reference side)."""

import torch


def map_indices(index_map, local: torch.Tensor) -> torch.Tensor:
    """int64 g(i) for the local flat indices `local` under index_map = (offset, local_span,
    global_span): g(i) = offset + (i // local_span) * global_span + i % local_span
    (docs/sharding.md)."""
    offset, local_span, global_span = index_map
    return (offset + torch.div(local, local_span, rounding_mode="floor") * global_span
            + local % local_span)


def global_indices(index_map, start: int, count: int, device) -> torch.Tensor:
    """g(i) for the local flat elements i = start .. start + count - 1."""
    return map_indices(index_map, torch.arange(start, start + count, dtype=torch.int64,
                                               device=device))
