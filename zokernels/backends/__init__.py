"""Three implementations of one semantics: torch (reference), cpu (C++), triton."""

from operator import attrgetter

_dtype_of = attrgetter("dtype")


def one_dtype(tensors, name: str):
    """The dtype all `tensors` of one backend call share. The native kernels take one element
    size per call: a mixed list would be read and written at the wrong size (out of bounds), so
    it is refused here, whatever grouping the caller did."""
    dtypes = set(map(_dtype_of, tensors))  # at C speed: LoRA calls hold thousands
    if len(dtypes) != 1:
        raise ValueError(f"{name}: the tensors of one call must share one dtype, got "
                         f"{sorted(map(str, dtypes))}")
    return dtypes.pop()


def check_sources(tensors, sources, applied, log, selector_log, held_log, name: str) -> None:
    """A backend's checks of `sources` (the public op validated them): one contiguous tensor per
    tensor, of its dtype, numel and device, and no recovery or log beside them."""
    if sources is None:
        return
    if len(sources) != len(tensors):
        raise ValueError(f"{name}: sources must have one tensor per tensor")
    if any(s.dtype != t.dtype or s.numel() != t.numel() or s.device != t.device
           or not s.is_contiguous() for s, t in zip(sources, tensors)):
        raise ValueError(f"{name}: each source must be contiguous, of its tensor's dtype, numel "
                         "and device")
    if applied is not None or log is not None or selector_log is not None or held_log is not None:
        raise ValueError(f"{name}: sources exclude applied and the logs")
