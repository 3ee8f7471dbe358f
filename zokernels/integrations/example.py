"""An offline, end-to-end ZO fine-tuning run: `python -m zokernels.integrations.example`.

A tiny OPT or LLaMA model is built from a transformers config with random weights (nothing is
downloaded), pre-trained briefly with AdamW on a synthetic language so that ZO starts from a
sensible point, then fine-tuned with finetune() and a zokernels optimizer on a shifted language.

The languages: token sequences over a vocabulary of V tokens that follow a successor rule.
Task A: x[t+1] = perm[x[t]] for a fixed random permutation perm. Task B (the fine-tuning task):
the same rule with the successor shifted by one, x[t+1] = (perm[x[t]] + 1) mod V, for a random
quarter of the tokens. The model starts knowing A, so B's changed transitions are what ZO has to
learn. Losses are the mean next-token cross-entropy on a fixed held-out batch of task B.

Prints the held-out loss before and after, steps/s, and the optimizer's memory (state, undo logs,
PseuZO's window); the last line is `RESULT {json}` for scripts. Needs transformers (and peft for
--lora). With --trainer the fine-tuning runs through ZOTrainer / ZOConfig (transformers.Trainer)
on a dataset of the same sequences instead of finetune(). The defaults take about 20 s on 2 CPU
cores, half of it importing transformers (150 AdamW steps about 3.5 s, 300 MeZO steps about 5 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

VOCAB = 32
SEQ = 24
ATTENTION = {"opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
             "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# Default ZO learning rates (full model, LoRA adapters), chosen on this task with both models:
# 1e-3 diverges on the LLaMA config with MeZO / TeZO, 1e-2 on the adapters. PseuZO's window sums
# several past directions per step, so it takes a smaller lr.
DEFAULT_LR = {"mezo": (5e-4, 3e-3), "lezo": (5e-4, 3e-3), "tezo": (5e-4, 3e-3),
              "pseuzo": (2e-4, 5e-4)}


def build_model(kind: str, seed: int) -> torch.nn.Module:
    """A 2-block causal LM with hidden size 64 and random weights, from a config."""
    import transformers

    torch.manual_seed(seed)
    if kind == "opt":
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                        ffn_dim=128, num_attention_heads=4,
                                        word_embed_proj_dim=64, max_position_embeddings=SEQ,
                                        dropout=0.0, attention_dropout=0.0)
        return transformers.OPTForCausalLM(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


class Language:
    """Task A's successor table and task B's (a quarter of the successors shifted by one)."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.task_a = torch.randperm(VOCAB, generator=g)
        shifted = torch.randperm(VOCAB, generator=g)[: VOCAB // 4]
        self.task_b = self.task_a.clone()
        self.task_b[shifted] = (self.task_a[shifted] + 1) % VOCAB

    @staticmethod
    def sample(successor: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
        """[batch, SEQ] sequences: a uniform first token, then x[t+1] = successor[x[t]]."""
        ids = torch.empty(batch, SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, SEQ):
            ids[:, t] = successor[ids[:, t - 1]]
        return ids


def pretrain(model: torch.nn.Module, language: Language, steps: int, seed: int) -> None:
    """AdamW (lr 3e-3) on task A, batches of 32 sequences."""
    g = torch.Generator().manual_seed(seed + 1)
    adam = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids = Language.sample(language.task_a, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
    model.eval()


def held_out_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def add_lora(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """peft LoRA (r = 8, alpha = 16, no dropout) on the attention projections; everything else
    frozen."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=ATTENTION[kind])
    return peft.get_peft_model(model, config)


def memory(opt: Any) -> dict[str, int]:
    """Bytes the optimizer holds besides the weights: its state (TeZO's moments, its factors
    drawn per pass or kept by its probes' factor cache; PseuZO's window; MeZO and LeZO keep
    none), the undo logs of exact restore, PseuZO's window on its own, and all of it with the
    virtual probes' largest draw (extra_memory_bytes); `probes`: how MeZO / LeZO evaluate their
    probes."""
    window = int(getattr(opt, "window_bytes", 0))
    state = 4 * int(getattr(opt, "state_numel", 0)) + window
    return {"state_bytes": state, "undo_log_bytes": int(opt.undo_log_bytes),
            "window_bytes": window, "extra_memory_bytes": int(opt.extra_memory_bytes),
            "probes": getattr(opt, "dense_probe_status", None)}


def train_with_trainer(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                       args: argparse.Namespace, kwargs: dict[str, Any]) -> Any:
    """The same fine-tuning through ZOTrainer: the batches' sequences as a dataset (shuffled by
    the Trainer, labels = input_ids), one epoch of args.steps steps of args.batch sequences,
    ZOConfig's options from the optimizer kwargs; checkpoints are not written. Returns the ZO
    optimizer."""
    import tempfile

    import transformers

    from . import ZOConfig, ZOTrainer

    sequences = [{"input_ids": ids, "labels": ids} for batch in batches
                 for ids in batch["input_ids"]]
    with tempfile.TemporaryDirectory() as out:
        config = ZOConfig(output_dir=out, zo_optimizer=args.optimizer, learning_rate=kwargs["lr"],
                          zo_eps=kwargs["eps"], zo_seed=kwargs["seed"], seed=args.seed,
                          zo_rounding=kwargs.get("rounding", "nearest"), max_steps=args.steps,
                          per_device_train_batch_size=args.batch,
                          logging_steps=max(1, args.steps // 5), save_strategy="no",
                          report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = ZOTrainer(model=model, args=config, train_dataset=sequences)
        if args.quiet:
            trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    return trainer.zo_optimizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import finetune

    torch.set_num_threads(args.threads)
    language = Language(args.seed)
    model = build_model(args.model, args.seed)
    begin = time.perf_counter()
    pretrain(model, language, args.pretrain_steps, args.seed)
    pretrain_s = time.perf_counter() - begin
    dtype = getattr(torch, args.dtype)
    model.to(dtype)
    if args.lora:
        model = add_lora(model, args.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(args.seed + 2)
    held_out = Language.sample(language.task_b, 64, g)
    batches = ({"input_ids": Language.sample(language.task_b, args.batch, g)}
               for _ in range(args.steps))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer][int(args.lora)]
    kwargs: dict[str, Any] = dict(lr=lr, eps=args.eps, seed=args.seed)
    if dtype != torch.float32:
        # ZO-SGD updates are mostly below half a bf16 ulp: stochastic rounding keeps them
        kwargs["rounding"] = "stochastic"
    initial = held_out_loss(model, held_out)
    begin = time.perf_counter()
    if args.trainer:
        opt = train_with_trainer(model, list(batches), args, kwargs)
    else:
        opt, _ = finetune(model, batches, optimizer=args.optimizer, steps=args.steps,
                          log_every=max(1, args.steps // 5), progress=not args.quiet, **kwargs)
    seconds = time.perf_counter() - begin
    final = held_out_loss(model, held_out)
    if args.save_trajectory:
        opt.trajectory.save(args.save_trajectory)
    return {"model": args.model, "optimizer": args.optimizer, "dtype": args.dtype,
            "lora": args.lora, "trainer": args.trainer, "seed": args.seed, "lr": lr,
            "eps": args.eps,
            "steps": opt.zo_state["step"], "trainable_params": trainable,
            "pretrain_steps": args.pretrain_steps, "pretrain_s": round(pretrain_s, 3),
            "initial_loss": initial, "final_loss": final, "zo_s": round(seconds, 3),
            "steps_per_s": opt.zo_state["step"] / seconds if seconds > 0 else None,
            "skipped_steps": opt.zo_state["skipped_steps"], **memory(opt),
            "trajectory": args.save_trajectory}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zokernels.integrations.example",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["opt", "llama"], default="opt")
    parser.add_argument("--optimizer", choices=list(DEFAULT_LR), default="mezo")
    parser.add_argument("--steps", type=int, default=300, help="ZO steps (default 300)")
    parser.add_argument("--lr", type=float, default=None,
                        help="ZO learning rate (default: per optimizer, see DEFAULT_LR)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of the fine-tuned model (pre-training runs in float32); bfloat16 "
                             "updates round stochastically")
    parser.add_argument("--lora", action="store_true",
                        help="peft LoRA r=8 on the attention projections, ZO over the adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="sequences per ZO step")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a model this small, thread "
                             "synchronization costs more than it saves)")
    parser.add_argument("--save-trajectory", metavar="PATH", default=None,
                        help="save the optimizer's trajectory (Trajectory.save) to PATH")
    parser.add_argument("--trainer", action="store_true",
                        help="fine-tune through ZOTrainer / ZOConfig (transformers.Trainer) "
                             "instead of finetune()")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.pretrain_steps < 0:
        parser.error("--pretrain-steps must be >= 0")
    if args.eps <= 0 or (args.lr is not None and args.lr < 0):
        parser.error("--eps must be > 0 and --lr >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    mib = 1 / 2**20
    print(f"{args.model} {args.dtype}{' + LoRA' if args.lora else ''}, {args.optimizer}: "
          f"{result['trainable_params']} trainable parameters, lr {result['lr']:g}, "
          f"eps {args.eps:g}")
    print(f"held-out loss on task B: {result['initial_loss']:.4f} -> {result['final_loss']:.4f} "
          f"after {result['steps']} steps ({result['steps_per_s']:.1f} steps/s; pre-training "
          f"{result['pretrain_steps']} AdamW steps took {result['pretrain_s']:.1f} s)")
    print(f"optimizer memory: state {result['state_bytes'] * mib:.3f} MiB, undo logs "
          f"{result['undo_log_bytes'] * mib:.3f} MiB, window {result['window_bytes'] * mib:.3f} MiB"
          f"; extra in all {result['extra_memory_bytes'] * mib:.3f} MiB"
          + (f" (probes: {result['probes']})" if result["probes"] else ""))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
