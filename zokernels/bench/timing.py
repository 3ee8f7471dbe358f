"""Timing: medians over repeats after warm-up, with spread; CUDA-event based on GPUs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# do_bench's choice: a buffer larger than any GPU's L2 (50 MB on H100), zeroed between CUDA samples
# so a small tensor is not timed out of a cache that the previous repeat warmed.
_L2_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[str, torch.Tensor] = {}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    warmup: int = 0
    samples_ms: list[float] = field(default_factory=list)

    def spread(self) -> str:
        return f"{self.p20_ms:.1f}-{self.p80_ms:.1f}"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU, whose ops return when done)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: str) -> None:
    buffer = _flush_buffers.get(device)
    if buffer is None:
        buffer = _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8,
                                                      device=device)
    buffer.zero_()


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 1,
            repeats: int = 5, target_ms: float | None = None, max_repeats: int = 1000,
            flush_l2: bool = True) -> Timing:
    """Run fn warmup + repeats times; report the median and the 20th/80th percentiles in ms.

    CPU: wall clock around each call (CPU ops return when done). CUDA: a pair of events around
    each call, synchronized once at the end, so host time between calls is not counted but GPU
    idle time inside a call (a launch-bound loop) is; with `flush_l2` the L2 is flushed between
    samples, outside the events.

    target_ms: raise the repeats (up to max_repeats) so that the timed calls take about that long
    in total, estimated from the last warm-up call: fast calls get enough samples for a stable
    median without making slow ones take forever.
    """
    cuda = torch.device(device).type == "cuda"
    estimate_ms = None
    for index in range(warmup):
        begin = time.perf_counter()
        fn()
        if index == warmup - 1:
            synchronize(device)
            estimate_ms = (time.perf_counter() - begin) * 1e3
    synchronize(device)
    if target_ms is not None and estimate_ms is not None:
        repeats = max(repeats, min(max_repeats, int(target_ms / max(estimate_ms, 1e-3))))
    samples: list[float] = []
    if cuda:
        events = []
        for _ in range(repeats):
            if flush_l2:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8),
                  repeats, warmup, samples)
