"""One training step (zo_step + zo_update) of a MeZO-style trainer: unpatched vs patch_mezo_trainer
vs patch_mezo_trainer(fuse_restore_update=True), timed side by side in one run.

The trainer is written like MeZO's large_models/trainer.py (torch.manual_seed + torch.normal per
parameter, `param.data = param.data + scaling_factor * z * eps`); the model is a small stack of
OPT-like decoder MLP blocks built here (names with layer_norm / bias, so the no-decay rule acts).
The two forwards of a step are timed alone too, so the noise part of each step is visible.

Usage: python benchmarks/compat_trainer.py [--hidden 768 --layers 4 --tokens 64 --repeats 7]
       [--dtype float32|bfloat16] [--threads N] [--json benchmarks/results/cpu_compat_trainer.json]
(PYTHONPATH=. from a source checkout). On a CPU shared with other jobs, --threads 1 (and
OMP_NUM_THREADS=1 for the zokernels extension) avoids OpenMP barriers spinning against the other
load, which can slow small matmuls by more than 10x and hide what is being measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import types

import numpy as np
import torch

from zokernels.bench.lora import measure_interleaved
from zokernels.bench.runner import environment
from zokernels.compat import patch_mezo_trainer


class Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.self_attn_layer_norm = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)
        self.final_layer_norm = torch.nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(torch.relu(self.fc1(self.self_attn_layer_norm(x))))
        return self.final_layer_norm(x)


class Model(torch.nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class MeZOTrainer:
    """MeZO's zo_step / zo_perturb_parameters / zo_update, as in large_models/trainer.py."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, weight_decay: float) -> None:
        self.model = model
        self.args = types.SimpleNamespace(zo_eps=eps, weight_decay=weight_decay)
        self.lr = lr
        self.lr_scheduler = types.SimpleNamespace(step=lambda: None)
        self.named_parameters_to_optim: list[tuple[str, torch.nn.Parameter]] = []
        self.zo_random_seed = 0
        self.projected_grad = 0.0

    def _get_learning_rate(self) -> float:
        return self.lr

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(random_seed if random_seed is not None else self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.args.zo_eps

    def zo_forward(self, model, inputs):
        x, y = inputs
        with torch.inference_mode():
            return torch.nn.functional.mse_loss(model(x).float(), y)

    def zo_step(self, model, inputs):
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters()
                                          if p.requires_grad]
        self.zo_random_seed = np.random.randint(1000000000)
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(model, inputs)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(model, inputs)
        self.projected_grad = ((loss1 - loss2) / (2 * self.args.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self, model):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self._get_learning_rate() * (
                    self.projected_grad * z + self.args.weight_decay * param.data)
            else:
                param.data = param.data - self._get_learning_rate() * (self.projected_grad * z)
        self.lr_scheduler.step()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="rows of the batch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
    y = torch.randn(args.tokens, 2, generator=g)
    cases = {"unpatched": None, "patched": dict(),
             "patched, fuse_restore_update": dict(fuse_restore_update=True)}
    trainers = {}
    for label, options in cases.items():
        torch.manual_seed(0)  # the same initial weights for every case
        trainer = MeZOTrainer(Model(args.hidden, args.layers).to(dtype), 1e-6, 1e-3, 0.1)
        trainers[label] = trainer if options is None else patch_mezo_trainer(trainer, **options)
    model = next(iter(trainers.values())).model
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))

    def step(trainer: MeZOTrainer):
        def run() -> None:
            trainer.zo_step(trainer.model, (x, y))
            trainer.zo_update(trainer.model)
        return run

    def forwards() -> None:  # the two forwards of a step, nothing else
        trainer = trainers["unpatched"]
        trainer.zo_forward(trainer.model, (x, y))
        trainer.zo_forward(trainer.model, (x, y))

    np.random.seed(0)
    fns = [step(t) for t in trainers.values()] + [forwards]
    timings = measure_interleaved(fns, device="cpu", warmup=args.warmup, repeats=args.repeats)
    forward_ms = timings[-1].median_ms
    base = timings[0].median_ms
    print(f"MeZO-style step, {args.layers} x {args.hidden} MLP blocks: {tensors} tensors, "
          f"{numel / 1e6:.2f}M {args.dtype} parameters, batch {args.tokens} x {args.hidden}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (interleaved)")
    print(f"  {'case':<30} {'step ms':>9} {'p20-p80':>15} {'noise ms':>9} {'speedup':>8}")
    results = []
    for label, timing in zip(list(trainers) + ["two forwards only"], timings):
        noise = timing.median_ms - forward_ms
        is_step = label != "two forwards only"
        print(f"  {label:<30} {timing.median_ms:9.1f} {timing.spread():>15} "
              f"{noise if is_step else 0.0:9.1f} "
              f"{(base / timing.median_ms if is_step else float('nan')):7.2f}x")
        results.append(dict(case=label, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                            p80_ms=timing.p80_ms, samples_ms=timing.samples_ms,
                            noise_ms=noise if is_step else None,
                            speedup_vs_unpatched=base / timing.median_ms if is_step else None))
    print("  noise ms = step - two forwards: the perturbation and update passes")
    if args.json:
        document = environment(["cpu"])
        document.update(
            mode="compat_trainer",
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=shlex.join(["python", "benchmarks/compat_trainer.py", *argv]),
            settings=dict(hidden=args.hidden, layers=args.layers, tokens=args.tokens,
                          dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
                          omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                          parameters=numel, tensors=tensors),
            results=results)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
