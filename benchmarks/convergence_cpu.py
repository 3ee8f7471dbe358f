"""Convergence vs wall clock on CPU: MeZO / LeZO / TeZO / PseuZO (zokernels) and MeZO's
per-parameter loop fine-tuning the same small pretrained language model.

The model (the built-in decoder of zokernels.bench.models, preset "small": 7.0M parameters) is
first trained with Adam on task A, next-token prediction over sequences from a random Markov chain,
then fine-tuned with each ZO method on task B, a chain whose transitions are half A's and half
new. Every method gets the same wall-clock budget, batches and evaluation set; the held-out loss
is recorded against seconds of fine-tuning (evaluation time excluded). The shape of the papers'
time-to-accuracy figures, on a scale two CPU cores can run.

    python benchmarks/convergence_cpu.py --seconds 60 \\
        --json benchmarks/results/cpu_convergence_small.json \\
        --plot benchmarks/results/cpu_convergence_small.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

import torch

from zokernels.bench.models import build_model
from zokernels.bench.runner import environment
from zokernels.bench.step import mezo_loop_step
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO

METHODS = ("mezo-loop", "mezo", "lezo", "tezo", "pseuzo")


def markov_chain(vocab: int, seed: int, branching: int = 4) -> torch.Tensor:
    """A sparse random transition matrix: each token is followed by one of `branching` tokens."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab, vocab)
    for token in range(vocab):
        nxt = torch.randint(0, vocab, (branching,), generator=g)
        probs[token, nxt] += torch.rand(branching, generator=g) + 0.1
    return probs / probs.sum(1, keepdim=True)


def sample(chain: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, chain.shape[0], (batch,), generator=g)
    for t in range(1, seq):
        ids[:, t] = torch.multinomial(chain[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def pretrain(model, chain, steps: int, batch: int, seq: int) -> None:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.module.parameters(), lr=3e-3)
    model.module.train()
    for step in range(steps):
        ids = sample(chain, batch, seq, g)
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
    model.module.eval()


def make_optimizer(name: str, model, lr: float, eps: float):
    named = list(model.module.named_parameters())
    if name == "mezo":
        return MeZO(named, lr=lr, eps=eps, seed=0)
    if name == "lezo":
        return LeZO(named, layers=model.blocks, n_active=max(1, len(model.blocks) // 3), lr=lr,
                    eps=eps, seed=0)
    if name == "tezo":
        return TeZO(named, rank=8, lr=lr, eps=eps, seed=0)
    if name == "pseuzo":
        return PseuZO(named, lr=lr, eps=eps, seed=0, window=14, beta=0.5)
    return None


def finetune(name: str, state: dict, args, chain_b, eval_ids) -> list[tuple[float, float, int]]:
    model = build_model(args.model, torch.float32, "cpu")
    model.module.load_state_dict(state)
    opt = make_optimizer(name, model, args.lr, args.eps)
    params = [p for p in model.module.parameters()]
    g = torch.Generator().manual_seed(2)

    def evaluate() -> float:
        with torch.no_grad():
            return float(model.loss(eval_ids))

    curve = [(0.0, evaluate(), 0)]
    elapsed, step, next_eval = 0.0, 0, args.eval_every
    while elapsed < args.seconds:
        ids = sample(chain_b, args.batch, args.seq, g)  # data sampling is not timed either
        start = time.perf_counter()
        if name == "mezo-loop":
            mezo_loop_step(params, lambda: model.loss(ids), seed=1000 + step, eps=args.eps,
                           lr=args.lr)
        elif name == "pseuzo":
            opt.step(lambda: model.features(ids), lambda h: model.head_loss(h, ids))
        else:
            opt.step(lambda: model.loss(ids))
        elapsed += time.perf_counter() - start
        step += 1
        if elapsed >= next_eval or elapsed >= args.seconds:
            curve.append((elapsed, evaluate(), step))
            next_eval += args.eval_every
            print(f"  {name}: {elapsed:6.1f} s  step {step:5d}  loss {curve[-1][1]:.4f}",
                  file=sys.stderr, flush=True)
    return curve


def plot(path: str, curves: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=name)
    ax.set_xlabel("fine-tuning wall clock (s), 2 CPU threads")
    ax.set_ylabel("held-out loss on task B")
    ax.set_title(f"ZO fine-tuning, {args.model} decoder ({args.numel / 1e6:.1f}M params), "
                 f"batch {args.batch}x{args.seq}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=60.0, help="fine-tuning budget per method")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=float, default=5.0, help="seconds between evals")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")

    model = build_model(args.model, torch.float32, "cpu")
    args.numel = model.numel
    vocab = model.vocab
    chain_a = markov_chain(vocab, seed=10)
    chain_b = 0.5 * chain_a + 0.5 * markov_chain(vocab, seed=11)
    start = time.perf_counter()
    pretrain(model, chain_a, args.pretrain_steps, 16, args.seq)
    print(f"pretrained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    eval_ids = sample(chain_b, 32, args.seq, torch.Generator().manual_seed(3))
    curves = {}
    for name in methods:
        curves[name] = finetune(name, state, args, chain_b, eval_ids)
    print(f"{'method':10s} {'steps':>6s} {'loss at 0':>9s} {'final':>8s} {'s/step':>7s}")
    for name, curve in curves.items():
        steps = curve[-1][2]
        print(f"{name:10s} {steps:6d} {curve[0][1]:9.4f} {curve[-1][1]:8.4f} "
              f"{curve[-1][0] / max(1, steps):7.3f}")
    if args.json:
        document = environment(["cpu"])
        document.update(
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=shlex.join(["python", "benchmarks/convergence_cpu.py", *(argv or sys.argv[1:])]),
            settings={k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            results=[{"method": name, "curve": [{"seconds": t, "loss": l, "step": s}
                                                for t, l, s in curve]}
                     for name, curve in curves.items()])
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    if args.plot:
        plot(args.plot, curves, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
