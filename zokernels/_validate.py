"""Argument checks shared by the public ops.

Every check runs before any tensor is written, so a bad call raises and leaves all tensors
bit-identical. Errors name the offending argument.
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._contract import KEY_LIMIT, SEED_LIMIT

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT32_MAX = 3.4028234663852886e38  # larger numbers become inf in the float32 kernels

Scalars = Any  # a Python number, a sequence of numbers, or a tensor


def as_int(value: Any, name: str) -> int:
    """An integer argument (Python or numpy int, not bool, not float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return int(host_values(value, name)[0])
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def check_range(value: int, low: int, high: int, name: str) -> int:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def as_seed(value: Any, name: str) -> int:
    return check_range(as_int(value, name), 0, SEED_LIMIT, f"{name} (a seed, [0, 2^64))")


def as_key(value: Any, name: str) -> int:
    return check_range(as_int(value, name), 0, KEY_LIMIT, f"{name} (a tensor key, [0, 2^32))")


def as_seed_list(seeds: Any) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must hold integers, got a tensor of dtype {seeds.dtype}")
        seeds = host_values(seeds, "seeds")
    elif not isinstance(seeds, Sequence) or isinstance(seeds, (str, bytes)):
        seeds = [seeds]
    if len(seeds) == 0:
        raise ValueError("seeds must hold at least one seed")
    return [as_seed(s, f"seeds[{k}]") for k, s in enumerate(seeds)]


def as_choice(value: Any, choices: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def as_tensor_list(tensors: Any, name: str, read_only: bool = False) -> list[torch.Tensor]:
    """A list of floating-point tensors of a supported dtype (read_only: tensors a call only
    reads, e.g. perturb_'s sources: inference tensors are fine there)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, "
                        f"got {type(tensors).__name__}")
    tensors = list(tensors)
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{j}] must be a torch.Tensor, got {type(t).__name__}")
        t = tensors[j] = plain_tensor(t, f"{name}[{j}]")
        check_dtype(t, f"{name}[{j}]")
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{name}[{j}] must be a dense (strided) tensor, got layout {t.layout}")
        if t.is_inference() and not torch.is_inference_mode_enabled() and not read_only:
            raise ValueError(f"{name}[{j}] is an inference tensor: it can be updated in place "
                             "only inside torch.inference_mode()")
        if t.is_neg():
            raise ValueError(f"{name}[{j}] is a negated view (its negative bit is set, e.g. "
                             f"z.conj().imag): the kernels would {'read' if read_only else 'write'}"
                             " its memory without the sign; pass a tensor without it "
                             "(t.resolve_neg() is a copy)")
        check_addressable(t, f"{name}[{j}]")
    return tensors


def check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float32, bfloat16 "
                        "and float16")


def plain_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """t itself for a torch.Tensor or an nn.Parameter; for a subclass, a plain torch.Tensor alias
    of the same memory (same storage, offset, sizes, strides and version counter), made with
    __torch_function__ disabled and torch's own method: the checks and the kernels then read
    torch's metadata, never what a subclass's Python overrides (data_ptr, numel, stride, dtype,
    ... or its __torch_function__) say about its memory. Tensors without real storage of their
    own are refused (check_addressable)."""
    if type(t) in _PLAIN_TYPES:
        return t
    _check_real_storage(t, name)
    with torch._C.DisableTorchFunctionSubclass():
        return torch._C.TensorBase.as_subclass(t, torch.Tensor)


def check_values(t: torch.Tensor, name: str) -> None:
    """A tensor whose values a call reads (scales, factors): dense, real storage, not meta."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: it holds no values")
    if t.layout != torch.strided:  # before check_addressable: a sparse tensor has no data_ptr
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    check_addressable(t, name)


def meta_parameter_error(name: str) -> ValueError:
    """The refusal of a parameter on the meta device (a model built under torch.device("meta")
    and not materialized; to_empty() replaces such a model's parameters with new objects, so an
    optimizer must be built after it)."""
    return ValueError(f"{name} is on the meta device: it holds no values to perturb; build the "
                      "optimizer over the materialized model (to_empty() replaces a meta "
                      "model's parameters, then load or initialize its weights)")


def host_values(t: torch.Tensor, name: str) -> list:
    """A tensor of numbers the host reads (seeds, keys, a 0-d number), as a flat list: refused
    by name when it holds no values (meta, fake, storage-less), never torch's own error."""
    t = plain_tensor(t, name)
    check_values(t, name)
    return t.reshape(-1).tolist()


def as_device(value: Any, name: str = "device") -> torch.device:
    """A torch.device that exists in this process (ValueError naming the argument)."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise TypeError(f"{name} must be a torch.device or a string, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r} but CUDA is not available")
    if device.type not in ("cpu", "meta"):
        try:  # an index past the device count, a backend torch was built without, ...
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"{name}={value!r} is not available here "
                             f"({str(exc).split('. ')[0][:120] or type(exc).__name__})"
                             ) from None
    return device


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # no Python dispatch: skip that lookup


def _is_dtensor(t: torch.Tensor) -> bool:
    from .sharding import is_dtensor  # no import cycle: sharding imports only torch

    return is_dtensor(t)


def _check_real_storage(t: torch.Tensor, name: str) -> None:
    """Refuse nested, functional, fake and wrapper-subclass tensors (DTensor by name)."""
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; pass its components as separate tensors")
    if torch._is_functional_tensor(t) or (type(t) not in _PLAIN_TYPES and (
            is_traceable_wrapper_subclass(t)
            or torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python))):
        if _is_dtensor(t):
            raise TypeError(f"{name} is a DTensor: pass its local shard (to_local(), with "
                            "index_maps= from zokernels.sharding.index_map_of) or register it in "
                            "a ParameterSpace, which does both")
        raise TypeError(f"{name} is a {type(t).__name__} without real addressable storage (a "
                        "fake, functional or wrapper-subclass tensor); pass a plain tensor")


def check_addressable(t: torch.Tensor, name: str) -> None:
    """Refuse a tensor the kernels could not write through a raw pointer: one without real,
    addressable memory of its own (DTensor, FakeTensor, wrapper subclasses such as TwoTensor,
    functional tensors, nested tensors, data_ptr 0), one misaligned to its element size, or one
    whose storage is smaller than its view addresses. Meta tensors (no memory) pass: the
    backends refuse the meta device on their own."""
    _check_real_storage(t, name)
    if t.is_meta or t.numel() == 0:
        return
    pointer = t.data_ptr()
    if pointer == 0:
        raise TypeError(f"{name} has no addressable memory (data_ptr is 0)")
    if pointer % t.element_size():
        raise ValueError(f"{name} is not aligned to its element size "
                         f"(data_ptr % {t.element_size()} != 0)")
    if t.is_contiguous():
        needed = t.storage_offset() + t.numel()
    else:
        needed = (t.storage_offset() + 1
                  + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())))
    held = t.untyped_storage().nbytes()
    if needed * t.element_size() > held:
        raise ValueError(f"{name} addresses {needed * t.element_size()} bytes of its storage, "
                         f"which holds only {held} (a storage resized below its views)")


def float32_value(value: float) -> float:
    """`value` rounded to float32 (to nearest), as the kernels and a saved trajectory hold it (a
    decay of 1 - 1e-11 is 1 there)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def fits_float32(value: float | int) -> bool:
    """Finite, and finite again once rounded to float32 (huge ints included)."""
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite as a float (an int too large for a float is
    not: math.isfinite would raise OverflowError on it)."""
    if not _is_real_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_numbers(values: Any, count: int, name: str) -> None:
    """`count` real numbers, each finite in float32 (pure Python: for host-side records)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of {count} numbers, got "
                        f"{type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must have {count} value(s), got {len(values)}")
    for k, v in enumerate(values):
        if not _is_real_number(v) or not fits_float32(v):
            raise ValueError(f"{name}[{k}] must be a number finite in float32, got {v!r}")


def as_scalar_vector(values: Scalars, length: int, name: str, *, check_finite: bool,
                     allow_broadcast: bool) -> torch.Tensor:
    """Numbers or a tensor -> a detached float32 tensor of shape [length].

    A single number (or 0-d / 1-element tensor) is broadcast when allow_broadcast. Device
    tensors stay on their device; their finiteness is checked only when check_finite (that
    check costs one host synchronization).
    """
    # Only a lone number or a 0-d tensor broadcasts; a list or 1-D tensor must have `length` values.
    scalar = _is_real_number(values) or (isinstance(values, torch.Tensor) and values.dim() == 0)
    checked = False
    if isinstance(values, torch.Tensor):
        if not (values.dtype.is_floating_point or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {values.dtype}")
        values = plain_tensor(values, name)
        check_values(values, name)
        # resolve_neg: the kernels read raw memory, without a negated view's sign
        vector = values.detach().reshape(-1).to(torch.float32).resolve_neg()
    else:
        if scalar:
            values = [values]
        elif not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, "
                            f"got {type(values).__name__}")
        items = []
        for k, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = host_values(v, f"{name}[{k}]")[0]
            if not _is_real_number(v):
                raise TypeError(f"{name}[{k}] must be a real number, got {type(v).__name__}")
            if not (fits_float32(v)):
                raise ValueError(f"{name}[{k}] must be finite in float32, got {v}")
            items.append(float(v))
        vector = torch.tensor(items, dtype=torch.float32)
        checked = True  # each number was checked above: no tensor-wide pass needed
    if scalar and allow_broadcast and length != 1:
        vector = vector.expand(length)
    if vector.numel() != length:
        raise ValueError(f"{name} must have {length} value(s), got {vector.numel()}")
    if vector.numel() and not checked and (check_finite or vector.device.type == "cpu"):
        if not bool(torch.isfinite(vector).all()):
            bad = [v for v in vector.tolist() if not math.isfinite(v)]
            raise ValueError(f"{name} must be finite, got {bad[0]}")
    return vector.contiguous()


def as_keys(keys: Any, count: int) -> list[int]:
    if keys is None:
        if count > KEY_LIMIT:
            raise ValueError("more tensors than distinct default keys; pass keys")
        return list(range(count))
    if isinstance(keys, torch.Tensor):
        keys = host_values(keys, "keys")
    elif not isinstance(keys, Sequence) or isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be a sequence of integers, got {type(keys).__name__}")
    if len(keys) != count:
        raise ValueError(f"keys must have one key per tensor ({count}), got {len(keys)}")
    return [as_key(k, f"keys[{j}]") for j, k in enumerate(keys)]


def check_no_internal_overlap(t: torch.Tensor, name: str) -> None:
    """Refuse tensors whose elements may share memory (expand(), stride 0, as_strided views):
    writes would race, or the last one would win.

    Non-overlap is proven, not asked of torch (whose check answers "too hard" for most
    non-contiguous views): with the dims of size > 1 sorted by stride, each stride must exceed
    the span of the dims inside it. Every slice, transpose, permutation and channels-last layout
    passes; a view that fails may still be overlap-free but is refused (copy it first)."""
    if t.is_contiguous() or t.numel() <= 1:  # the common case; these never overlap
        return
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.size())):
        raise ValueError(f"{name} has internal memory overlap (a stride-0 / expanded view); "
                         "pass a tensor whose elements are distinct")
    span = 0  # the largest element offset reached by the dims checked so far
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz > 1):
        if stride <= span:
            raise ValueError(f"{name} has internal memory overlap, or strides {tuple(t.stride())} "
                             f"for shape {tuple(t.shape)} whose elements cannot be proven "
                             "distinct; pass a tensor whose elements are distinct (e.g. .clone())")
        span += (size - 1) * stride


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) touched by t's elements."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = sum((sz - 1) * st for sz, st in zip(t.size(), t.stride()) if sz > 0) + 1
    return start, start + extent * t.element_size()


def spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory a's elements touch meets b's (both with elements, one device)."""
    a_start, a_end = _memory_span(a)
    b_start, b_end = _memory_span(b)
    return a_start < b_end and b_start < a_end


def written_spans(written: list[tuple[str, torch.Tensor]]) -> dict[str, list[tuple[int, int, str]]]:
    """Memory spans of the tensors a call writes, sorted per device; raises if two overlap.

    Conservative: two interleaved strided views whose spans overlap are refused too. Meta
    tensors have no memory and are skipped.
    """
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for name, t in written:
        if t.numel() > 0 and t.device.type != "meta":
            spans.setdefault(str(t.device), []).append(_memory_span(t) + (name,))
    for device_spans in spans.values():
        device_spans.sort()
        for (_, end, first), (start, _, second) in zip(device_spans, device_spans[1:]):
            if start < end:
                raise ValueError(f"{first} and {second} share memory (aliased or overlapping "
                                 "tensors); each tensor must be distinct")
    return spans


def check_reads(spans: dict[str, list[tuple[int, int, str]]],
                read: list[tuple[str, Any]]) -> None:
    """Refuse read tensors (factors, scalar tensors) that share memory with written ones."""
    for name, t in read:
        if not isinstance(t, torch.Tensor):
            continue
        t = plain_tensor(t, name)  # where its memory really is, whatever a subclass says
        if t.numel() == 0 or t.device.type == "meta":
            continue
        written = overlapped_span(spans, t)
        if written is not None:
            raise ValueError(f"{name} shares memory with {written}, which this call writes")


def overlapped_span(spans: dict[str, list[tuple[int, int, Any]]], t: torch.Tensor) -> Any:
    """The name of the span of `spans` (written_spans: disjoint, sorted) that t's memory
    overlaps, or None; t has elements and memory."""
    device_spans = spans.get(str(t.device), [])
    if not device_spans:
        return None
    start, end = _memory_span(t)
    # The last span starting before `end` is the only candidate (they are disjoint).
    position = bisect.bisect_left(device_spans, (end,)) - 1
    if position >= 0 and device_spans[position][1] > start:
        return device_spans[position][2]
    return None


def check_no_overlap(written: list[tuple[str, torch.Tensor]],
                     read: list[tuple[str, Any]] = ()) -> None:
    """Refuse a call whose written tensors share memory with each other or with a tensor it reads."""
    check_reads(written_spans(written), read)


def as_index_maps(index_maps: Any, tensors: list[torch.Tensor]) -> list[tuple[int, int, int] | None]:
    """One (offset, local_span, global_span) or None per tensor (zokernels.sharding.IndexMap):
    1 <= local_span <= global_span, local_span divides numel, offset >= 0 and the last element's
    unsharded index g(numel - 1) < 2^63."""
    if index_maps is None:
        return [None] * len(tensors)
    if isinstance(index_maps, (str, bytes, torch.Tensor)) or not isinstance(index_maps, Sequence):
        raise TypeError("index_maps must be a sequence with one (offset, local_span, global_span) "
                        f"or None per tensor, got {type(index_maps).__name__}")
    if len(index_maps) != len(tensors):
        raise ValueError(f"index_maps must have one entry per tensor ({len(tensors)}), "
                         f"got {len(index_maps)}")
    maps: list[tuple[int, int, int] | None] = []
    for j, (entry, t) in enumerate(zip(index_maps, tensors)):
        name = f"index_maps[{j}]"
        if entry is None:
            maps.append(None)
            continue
        if not isinstance(entry, Sequence) or len(entry) != 3:
            raise TypeError(f"{name} must be None or (offset, local_span, global_span)")
        offset, local_span, global_span = (as_int(v, name) for v in entry)
        if offset < 0 or not 1 <= local_span <= global_span:
            raise ValueError(f"{name} = {tuple(entry)} needs offset >= 0 and "
                             "1 <= local_span <= global_span")
        numel = t.numel()
        if numel % local_span:
            raise ValueError(f"{name}: local_span {local_span} does not divide the tensor's "
                             f"{numel} elements")
        if numel and offset + (numel // local_span - 1) * global_span + local_span > 1 << 63:
            raise ValueError(f"{name}: the last element's unsharded index is >= 2^63")
        identity = offset == 0 and (local_span == global_span or local_span == numel)
        maps.append(None if identity else (offset, local_span, global_span))
    return maps


# Containers a checkpoint or a trajectory may nest (torch.load(weights_only=True) builds these):
# theirs nest about 8 deep; deeper (or cyclic) contents would make the copies and checks
# exhaust Python's stack.
MAX_NESTING = 64
_CONTAINERS = (dict, list, tuple, set, frozenset)


def check_nesting(obj: Any, name: str, limit: int = MAX_NESTING) -> None:
    """Refuse (ValueError naming the place) containers nested more than `limit` deep or
    containing themselves. Each container is visited once (a shared one is fine), so the check
    and a copy that keeps the sharing cost time linear in what a file holds."""
    done: set[int] = set()
    open_: set[int] = set()  # containers on the current path: meeting one again is a cycle

    def visit(o: Any, where: str, depth: int) -> None:
        if id(o) in done:
            return
        if id(o) in open_:
            raise ValueError(f"{where} contains itself (a cyclic container)")
        if depth > limit:
            raise ValueError(f"{where} nests containers more than {limit} deep")
        open_.add(id(o))
        items = o.items() if isinstance(o, dict) else enumerate(o)
        for key, value in items:
            for part in ((key, value) if isinstance(o, dict) else (value,)):
                if isinstance(part, _CONTAINERS):
                    visit(part, f"{where}[{key!r}]", depth + 1)
        open_.discard(id(o))
        done.add(id(o))

    if isinstance(obj, _CONTAINERS):
        visit(obj, name, 0)


class StorageBudget:
    """Bounds the work of reading the tensors of an untrusted state (a checkpoint, a trajectory):
    every value a tensor declares must be held in its storage, and the tensors viewing one
    storage together declare at most the bytes it holds. A stride-0 (expanded) view, or many
    fields viewing one small storage, cannot make a small file declare huge tensors: copying or
    listing the values costs at most what the file holds. Views that partition a storage pass.
    Meta tensors (no values) and empty ones cost nothing; other layouts are left to the
    fields' own checks."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, int], int] = {}

    def charge(self, t: torch.Tensor, name: str) -> None:
        """Count t's values against its storage (ValueError naming it when they exceed it)."""
        if t.layout != torch.strided or t.is_meta or t.numel() == 0:
            return
        t = plain_tensor(t, name)
        storage = t.untyped_storage()
        held, declared = storage.nbytes(), t.numel() * t.element_size()
        key = (str(t.device), storage.data_ptr())
        used = self._used.get(key, 0) + declared
        if declared > held:
            raise ValueError(f"{name} declares {t.numel()} values but its storage holds {held} "
                             "bytes (an expanded view)")
        if used > held:
            raise ValueError(f"{name} shares its storage with other tensors of this state: "
                             f"together they declare {used} bytes of a {held}-byte storage "
                             "(overlapping views of one storage)")
        self._used[key] = used
