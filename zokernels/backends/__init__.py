"""Three implementations of one semantics: torch (reference), cpu (C++), triton."""

from operator import attrgetter

# not `import torch`: the subpackage zokernels.backends.torch takes that name here
from torch import int32 as _INT32

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


def check_selector_rows(selector_log, held_log, name: str) -> None:
    """Selector logs (SelectorBuffers) whose regions are int32 rows of at least 2 words: a
    header, and word 1, a spilled block's check (the C++ kernels refuse fewer themselves)."""
    for what, buffers in (("selector_log", selector_log), ("held_log", held_log)):
        if buffers is None:
            continue
        regions = buffers.regions
        if regions.dtype != _INT32 or regions.dim() != 2 or regions.shape[1] < 2:
            raise ValueError(f"{name}: {what}.regions must be int32 rows of >= 2 words, got "
                             f"{regions.dtype} of shape {tuple(regions.shape)}")


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
