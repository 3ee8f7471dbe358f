"""A virtual probe's draw, two ways: out of place (perturb_'s `sources=`: read theta, write the
perturbed piece in one pass) against a clone of the piece and an in-place pass over it.

A weight is drawn piece by piece (`--rows` rows per piece, each at its contract offset, as
zokernels.dense_probe draws row chunks) into a new tensor, both ways interleaved, `--repeats`
times after one warm-up: medians per way and their ratio. The two ways write the same bits
(checked). On the CPU both are timed by the calling thread's CPU time at 1 thread (`--clock
cpu`) or by wall time; on CUDA by wall time around synchronized launches. `--reuse yes` writes
every piece into one preallocated buffer (no allocation, no page faults) to separate the pass
from the allocator; `both` runs each way.

Usage: python benchmarks/draw_out_of_place.py [--device cpu] [--dtype float32,bfloat16]
       [--shape 16384x2048] [--rows 1024] [--repeats 15] [--threads 1] [--clock cpu]
       [--reuse no|yes|both] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from zokernels._dispatch import implementation, resolve_backend
from zokernels.bench.runner import write_report

CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def measure(device: torch.device, dtype: torch.dtype, rows: int, columns: int,
            rows_per_piece: int, reuse: bool, repeats: int, clock) -> dict | None:
    """Medians of both ways over `repeats` interleaved rounds (None: they drew different bits)."""
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)).to(
        dtype).to(device)
    perturb = implementation(resolve_backend("auto", device), "perturb")
    scales = torch.tensor([1e-3], device=device)
    decays = torch.ones(1, device=device)
    pieces = [(weight[s:s + rows_per_piece], s * columns)
              for s in range(0, rows, rows_per_piece)]
    buffer = torch.empty_like(pieces[0][0])

    def draw(piece: torch.Tensor, start: int, out_of_place: bool) -> torch.Tensor:
        out = buffer[:piece.shape[0]] if reuse else torch.empty_like(piece)
        if out_of_place:
            extra = {"sources": [piece]}
        else:
            out.copy_(piece)
            extra = {}
        perturb([out], [3], [12345], scales, decays, "gaussian", "nearest", 12345,
                index_maps=[(start, out.numel(), out.numel())], **extra)
        return out

    bits = torch.int16 if weight.element_size() == 2 else torch.int32
    for piece, start in pieces[:2]:  # warm-up, and the same bits both ways
        if not torch.equal(draw(piece, start, True).clone().view(bits),
                           draw(piece, start, False).view(bits)):
            return None
    times: dict[str, list[float]] = {"out_of_place": [], "clone_in_place": []}
    for _ in range(repeats):
        for name, out_of_place in (("out_of_place", True), ("clone_in_place", False)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start_time = clock()
            for piece, start in pieces:
                draw(piece, start, out_of_place)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(1e3 * (clock() - start_time))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return dict(shape=[rows, columns], rows_per_piece=rows_per_piece, pieces=len(pieces),
                dtype=str(dtype).removeprefix("torch."), reuse=reuse,
                ms_out_of_place=medians["out_of_place"],
                ms_clone_in_place=medians["clone_in_place"],
                ratio=medians["out_of_place"] / medians["clone_in_place"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--shape", default="16384x2048", help="ROWSxCOLUMNS of the weight")
    parser.add_argument("--rows", type=int, default=1024, help="rows per piece")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--reuse", choices=["no", "yes", "both"], default="no",
                        help="every piece written into one preallocated buffer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    torch.set_num_threads(args.threads)
    rows, columns = (int(v) for v in args.shape.lower().split("x"))
    results = []
    for dtype in args.dtype.split(","):
        if dtype not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtype: {dtype!r} is not float32, bfloat16 or float16")
        for reuse in {"no": [False], "yes": [True], "both": [False, True]}[args.reuse]:
            row = measure(device, getattr(torch, dtype), rows, columns, args.rows, reuse,
                          args.repeats, CLOCKS[args.clock])
            if row is None:
                print("out-of-place and clone + in-place draws differ", file=sys.stderr)
                return 1
            row["clock"] = args.clock
            results.append(row)
            print(f"{dtype} {rows}x{columns} in {row['pieces']} pieces of {args.rows} rows"
                  f"{' (one reused buffer)' if reuse else ''}: out of place "
                  f"{row['ms_out_of_place']:.2f} ms, clone + in place "
                  f"{row['ms_clone_in_place']:.2f} ms, ratio {row['ratio']:.3f} "
                  f"(medians of {args.repeats}, {args.clock} clock)")
    if args.json:
        write_report(args.json, [args.device], "benchmarks/draw_out_of_place.py", argv,
                     repeats=args.repeats, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
