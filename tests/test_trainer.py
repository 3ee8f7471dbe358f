"""ZOTrainer / ZOConfig on transformers' Trainer (tiny LLaMA models built from a config; nothing
is downloaded). Checked: a resumed run is bit-identical to an uninterrupted one (every optimizer,
fp32 and bf16); the trainer's steps are exactly the optimizer's steps with the scheduled lr; PEFT
LoRA trains only the adapters, LeZO finds the blocks through the wrapper, PseuZO leaves an untied
head alone; logs; option checks; 2 processes under torchrun (gloo) keep bit-identical replicas
with one all-reduce per step. Runs on the transformers CI installs and on 4.46 (.ci/run)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zokernels  # noqa: E402
from helpers import assert_bits_equal, assert_same, assert_states_equal, snapshot  # noqa: E402
from zokernels.integrations import ZOConfig, ZOTrainer  # noqa: E402
from zokernels.optim import MeZO  # noqa: E402

TESTS = Path(__file__).resolve().parent
VOCAB, SEQ = 32, 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is ~10x faster than two here (no synchronization)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-block LLaMA with hidden size 16 and an untied LM head, random weights from `seed`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config).to(dtype)


class Tokens(torch.utils.data.Dataset):
    """n random sequences with labels = input_ids."""

    def __init__(self, n: int = 48, seed: int = 1) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def config(out: Path, **overrides) -> ZOConfig:
    options = dict(output_dir=str(out), learning_rate=2e-3, max_steps=6,
                   per_device_train_batch_size=4, report_to="none", use_cpu=True,
                   disable_tqdm=True, save_strategy="no", logging_steps=2, seed=3)
    options.update(overrides)
    return ZOConfig(**options)


def trainer(model, out: Path, cls=ZOTrainer, **overrides) -> ZOTrainer:
    return cls(model=model, args=config(out, **overrides), train_dataset=Tokens())


# -- resume ---------------------------------------------------------------------------------------

OPTIONS = {"mezo": {"zo_n_spsa": 2, "zo_probe": "inplace"}, "lezo": {"lezo_n_active": 1},
           "tezo": {"tezo_rank": 2, "tezo_variant": "adam", "zo_n_spsa": 2},
           "tezo-deferred": {"tezo_rank": 2, "tezo_variant": "momentum", "tezo_update": "deferred",
                             "tezo_factor_cache": 0.0},
           "pseuzo": {"pseuzo_window": 3, "pseuzo_beta": 0.5},
           "pseuzo-inplace": {"pseuzo_window": 3, "pseuzo_beta": 0.5, "zo_probe": "inplace"}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, name, dtype):
    """6 steps saving at step 3, then a fresh trainer on a differently initialized model resumed
    from checkpoint-3: the weights and the whole optimizer state (counters, moments, window,
    trajectory) equal the uninterrupted run's bit for bit. A warmup + linear schedule and weight
    decay make the lr and the scheduler state part of it; bf16 rounds stochastically."""
    options = dict(OPTIONS[name], zo_optimizer=name.split("-")[0], save_strategy="steps",
                   save_steps=3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1)
    if dtype == torch.bfloat16:
        options["zo_rounding"] = "stochastic"
    initial = snapshot(llama(dtype=dtype))
    whole = trainer(llama(dtype=dtype), tmp_path, **options)
    whole.train()
    final = snapshot(whole.model)
    changed = [n for n in final if not torch.equal(final[n], initial[n])]
    assert len(changed) > len(final) // 2, f"{name} trained too little: {changed}"
    assert whole.zo_optimizer.zo_state["step"] == 6 and len(whole.zo_optimizer.trajectory) == 6

    resumed = trainer(llama(seed=99, dtype=dtype), tmp_path, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert_same(snapshot(resumed.model), final, f"{name} resumed at step 3")
    assert_states_equal(resumed.zo_optimizer.state_dict(), whole.zo_optimizer.state_dict())
    if name == "pseuzo":
        assert len(whole.zo_optimizer.state_dict()["extra"]["window"]) == 3


@pytest.mark.parametrize("schedule", ["reduce_lr_on_plateau", "cosine"])
def test_resume_with_other_schedules(tmp_path, schedule):
    """The resume check loads scheduler.pt into a throwaway scheduler of the run's kind and
    steps it (a state that loads but cannot step was accepted, then failed after a ZO step);
    ReduceLROnPlateau, which steps on an evaluation's metric, is loaded only. Both resume to
    the uninterrupted run's weights."""
    options = dict(save_strategy="steps", save_steps=3, lr_scheduler_type=schedule,
                   eval_strategy="steps", eval_steps=3)  # plateau steps on the eval loss

    def run(seed):
        return ZOTrainer(model=llama(seed=seed), args=config(tmp_path, **options),
                         train_dataset=Tokens(), eval_dataset=Tokens())
    whole = run(0)
    whole.train()
    resumed = run(99)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert_same(snapshot(resumed.model), snapshot(whole.model), f"{schedule} resumed at step 3")


def test_lora_resume_is_bit_identical(tmp_path):
    """A LoRA checkpoint holds the adapters: resumed onto the same base model with differently
    initialized adapters, the run ends on the uninterrupted run's adapters, bit for bit."""
    peft = pytest.importorskip("peft")

    def lora(seed):
        model = llama()
        torch.manual_seed(seed)  # the adapters' initialization
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))
    options = dict(zo_optimizer="lezo", lezo_n_active=1, save_strategy="steps", save_steps=3,
                   learning_rate=1e-2)
    whole = trainer(lora(0), tmp_path, **options)
    whole.train()
    resumed = trainer(lora(7), tmp_path, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert_same(snapshot(resumed.model), snapshot(whole.model), "LoRA resumed at step 3")
    assert_states_equal(resumed.zo_optimizer.state_dict(), whole.zo_optimizer.state_dict())


class Interrupt(transformers.TrainerCallback):
    """Raises at the end of step `at` (a crash, or a user's Ctrl-C, between steps)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_tezo_deferred_updates_are_merged_by_evaluation_and_at_the_end(tmp_path):
    """tezo_update="deferred" with an evaluation every 2 steps: the evaluation forwards merge
    (merge-on-observe), and train() merges the rest when it returns, or raises: afterwards
    nothing is pending, no hook is left on the model, and the weights are the run's (a twin
    that merges explicitly after its own 3 steps ends on the same bits)."""
    options = dict(zo_optimizer="tezo", tezo_rank=2, tezo_update="deferred", max_steps=5,
                   eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    initial = snapshot(llama())
    run = ZOTrainer(model=llama(), args=config(tmp_path / "a", **options),
                    train_dataset=Tokens(), eval_dataset=Tokens(8, seed=5))
    assert run.zo_optimizer.update == "deferred" and run.zo_optimizer.probe == "virtual"
    run.train()
    opt = run.zo_optimizer
    assert opt.zo_state["step"] == 5 and not opt._virtual.pending
    assert opt._virtual.merges >= 3  # the evaluations after steps 2 and 4, the end of train()
    assert not any(m._forward_pre_hooks or m._state_dict_pre_hooks
                   for m in run.model.modules())
    trained = snapshot(run.model)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"],
                           initial["model.layers.0.mlp.up_proj.weight"])

    stopped = ZOTrainer(model=llama(), args=config(tmp_path / "b", **dict(options, max_steps=3,
                                                                      eval_strategy="no")),
                        train_dataset=Tokens(), callbacks=[Interrupt(3)])
    twin = ZOTrainer(model=llama(), args=config(tmp_path / "c", **dict(options, max_steps=3,
                                                                   eval_strategy="no")),
                     train_dataset=Tokens())
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert stopped.zo_optimizer.zo_state["step"] == 3 and not stopped.zo_optimizer._virtual.pending
    twin.train()
    assert_same(snapshot(stopped.model), snapshot(twin.model), "interrupted after step 3")


# -- what a step is -------------------------------------------------------------------------------

class Recording(ZOTrainer):
    """Records each step's batch and the lr the optimizer holds when it steps."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(({k: v.clone() for k, v in inputs.items()},
                          self.zo_optimizer.param_groups[0]["lr"]))
        return super().training_step(model, inputs, num_items_in_batch)


def test_steps_are_the_optimizers_steps_with_the_scheduled_lr(tmp_path):
    """ZOTrainer(mezo) with a linear schedule equals a hand loop of MeZO.step on the same batches
    with the lr set by hand, bit for bit: nothing else touches the weights. No gradient is ever
    created, and the model steps in eval mode."""
    run = trainer(llama(), tmp_path, cls=Recording, lr_scheduler_type="linear", weight_decay=0.05,
                  zo_seed=11, max_steps=5)
    run.seen = []
    run.train()
    lrs = [lr for _, lr in run.seen]
    assert lrs == pytest.approx([2e-3 * (5 - k) / 5 for k in range(5)], rel=1e-12)
    assert all(p.grad is None for p in run.model.parameters())
    assert not run.model.training

    model = llama()
    opt = MeZO(model.named_parameters(), lr=1.0, eps=1e-3, weight_decay=0.05, seed=11)
    model.eval()
    for inputs, lr in run.seen:
        opt.param_groups[0]["lr"] = lr
        opt.step(lambda inputs=inputs: model(**inputs).loss)
    assert_same(snapshot(run.model), snapshot(model), "trainer vs hand loop")


def test_model_init_gets_its_own_optimizer(tmp_path):
    """With model_init, train() builds a new model and a new ZO optimizer over it."""
    run = ZOTrainer(model_init=lambda: llama(), args=config(tmp_path, max_steps=2),
                    train_dataset=Tokens())
    first = run.zo_optimizer
    run.train()
    assert run.zo_optimizer is not first and run.zo_optimizer.zo_state["step"] == 2
    params = {id(p) for g in run.zo_optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in run.model.parameters()}


def test_logs_carry_the_zo_counters_and_skipped_steps(tmp_path):
    """Every training log has loss, learning_rate, steps_per_second, zo_skipped_steps and
    zo_undo_overflows and no grad_norm; a non-finite loss skips its step (weights restored)
    and is counted; evaluation runs and logs eval_loss."""

    class NaNAtStep2(ZOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * math.nan if self.state.global_step == 2 else loss

    run = NaNAtStep2(model=llama(), args=config(tmp_path, eval_strategy="steps", eval_steps=3),
                     train_dataset=Tokens(), eval_dataset=Tokens(8, seed=5))
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        run.train()
    train_logs = [log for log in run.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [2, 4, 6]
    for log in train_logs:
        assert {"learning_rate", "steps_per_second", "zo_skipped_steps",
                "zo_undo_overflows"} <= log.keys()
        assert "grad_norm" not in log and log["steps_per_second"] > 0
    assert [log["zo_skipped_steps"] for log in train_logs] == [0, 1, 1]
    assert [log["step"] for log in run.state.log_history if "eval_loss" in log] == [3, 6]


# -- models ---------------------------------------------------------------------------------------

def test_lora_trains_only_the_adapters_and_lezo_finds_the_blocks_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    run = trainer(model, tmp_path, zo_optimizer="lezo", lezo_n_active=1)
    assert run.zo_optimizer.num_layers == 2
    names = [n for g in run.zo_optimizer.param_groups for n in g["param_names"]]
    assert names and all("lora_" in n for n in names)
    run.train()
    after = snapshot(model)
    for name in before:
        if "lora_" in name:
            continue
        assert_bits_equal(after[name], before[name], what=f"frozen {name}")
    assert any(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)


def test_lezo_layers_by_name(tmp_path):
    model = llama()
    run = trainer(model, tmp_path, zo_optimizer="lezo", lezo_layers=["model.layers"])
    by_stack = run.zo_optimizer._trajectory_meta()["groups"][0]["layers"]
    run = trainer(model, tmp_path, zo_optimizer="lezo",
                  lezo_layers=["model.layers.0", "model.layers.1"])
    assert run.zo_optimizer._trajectory_meta()["groups"][0]["layers"] == by_stack
    assert run.zo_optimizer.num_layers == 2 and run.zo_optimizer.n_active == 1


def test_pseuzo_leaves_an_untied_head_unchanged(tmp_path):
    model = llama()
    head = model.lm_head.weight.detach().clone()
    before = snapshot(model)
    run = trainer(model, tmp_path, zo_optimizer="pseuzo", pseuzo_window=2)
    names = [n for g in run.zo_optimizer.param_groups for n in g["param_names"]]
    assert "lm_head.weight" not in names and len(names) == len(before) - 1
    run.train()
    assert_bits_equal(model.lm_head.weight.detach(), head, what="lm_head")
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_pseuzo_beta_is_passed_through_unchanged(tmp_path, monkeypatch):
    """A number goes to PseuZO(beta=...) as given; "reference" also gets the reference trainer's
    epoch clock: cycles of pseuzo_beta_cycle epochs (default num_train_epochs // 2) of one step
    per batch."""
    import importlib

    from zokernels.optim import PseuZO

    finetune_module = importlib.import_module("zokernels.integrations.finetune")

    seen = []

    def build(params, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("beta", "beta_cycle", "beta_epoch_steps",
                                                 "decay_per_entry")})
        return PseuZO(params, **kwargs)
    monkeypatch.setitem(finetune_module.OPTIMIZERS, "pseuzo", build)
    for options in ({"pseuzo_beta": 0.25},
                    {"pseuzo_beta": "reference", "num_train_epochs": 4},
                    {"pseuzo_beta": "reference", "pseuzo_beta_cycle": 3,
                     "pseuzo_decay_per_entry": True}):
        made = trainer(llama(), tmp_path, zo_optimizer="pseuzo", **options)
        made.create_optimizer()
        steps_per_epoch = len(made.get_train_dataloader())
    assert seen == [
        dict(beta=0.25, beta_cycle=None, beta_epoch_steps=None, decay_per_entry=False),
        dict(beta="reference", beta_cycle=2, beta_epoch_steps=steps_per_epoch,
             decay_per_entry=False),
        dict(beta="reference", beta_cycle=3, beta_epoch_steps=steps_per_epoch,
             decay_per_entry=True)]


# -- checks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"zo_optimizer": "adam"}, "zo_optimizer"),
    ({"zo_eps": 0.0}, "zo_eps"),
    ({"zo_eps": math.inf}, "zo_eps"),
    ({"zo_seed": -1}, "zo_seed"),
    ({"zo_n_spsa": 0}, "zo_n_spsa"),
    ({"zo_optimizer": "pseuzo", "zo_n_spsa": 2}, "zo_n_spsa"),
    ({"zo_dist": "uniform"}, "zo_dist"),
    ({"zo_exact_restore": "yes"}, "zo_exact_restore"),
    ({"zo_probe": "lazy"}, "zo_probe"),
    ({"zo_rounding": "down"}, "zo_rounding"),
    ({"zo_optimizer": "lezo", "lezo_n_active": -1}, "lezo_n_active"),
    ({"zo_optimizer": "lezo", "lezo_layers": "model.layers"}, "lezo_layers"),
    ({"zo_optimizer": "lezo", "lezo_layers": []}, "lezo_layers"),
    ({"zo_optimizer": "tezo", "tezo_rank": 0}, "tezo_rank"),
    ({"zo_optimizer": "tezo", "tezo_variant": "lion"}, "tezo_variant"),
    ({"zo_optimizer": "tezo", "tezo_update": "later"}, "tezo_update"),
    ({"zo_optimizer": "tezo", "tezo_update": "deferred", "zo_probe": "inplace"},
     "tezo_update='deferred' needs zo_probe='virtual'"),
    ({"zo_optimizer": "tezo", "tezo_factor_cache": 1.5}, "tezo_factor_cache"),
    ({"zo_optimizer": "tezo", "tezo_factor_cache": math.nan}, "tezo_factor_cache"),
    ({"zo_optimizer": "tezo", "tezo_factor_cache": True}, "tezo_factor_cache"),
    ({"tezo_update": "deferred"}, "tezo_update applies to zo_optimizer='tezo'"),
    ({"zo_optimizer": "pseuzo", "pseuzo_window": 0}, "pseuzo_window"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta": 1.5}, "pseuzo_beta"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta": ""}, "pseuzo_beta"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta_cycle": 2}, "pseuzo_beta_cycle applies"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta": "reference", "pseuzo_beta_cycle": 0},
     "pseuzo_beta_cycle"),
    ({"zo_optimizer": "pseuzo", "pseuzo_decay_per_entry": 1}, "pseuzo_decay_per_entry"),
    ({"zo_optimizer": "mezo", "pseuzo_decay_per_entry": True}, "pseuzo_decay_per_entry applies"),
    ({"tezo_rank": 4}, "tezo_rank applies to zo_optimizer='tezo'"),
    ({"zo_optimizer": "tezo", "pseuzo_window": 3}, "pseuzo_window applies"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"accelerator_config": {"gradient_accumulation_kwargs": {"num_steps": 4}}},
     "accelerator_config's gradient_accumulation_kwargs num_steps"),
    ({"zo_optimizer": ["mezo"]}, "zo_optimizer"),  # unhashable: was a bare TypeError
    ({"zo_dist": None}, "zo_dist"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta": "cosine"}, "pseuzo_beta"),
    ({"zo_optimizer": "pseuzo", "label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"max_grad_norm": 1.0}, "max_grad_norm"),
    ({"bf16": True}, "bf16"),
    # accepted here, refused by the optimizer when the trainer was built, under its own name
    ({"zo_eps": 1e39}, "zo_eps must be a number in .0, 3.40282e.38."),
    ({"zo_n_spsa": 1025}, "zo_n_spsa must be at most 1024"),
    ({"zo_optimizer": "pseuzo", "pseuzo_window": 1025}, "pseuzo_window must be at most 1024"),
    ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha must be None"),  # eval mode: ignored
    # ints beyond float range: were a bare OverflowError
    ({"zo_eps": 10 ** 400}, "zo_eps must be a number"),
    ({"zo_optimizer": "tezo", "tezo_factor_cache": 10 ** 400}, "tezo_factor_cache"),
    ({"zo_optimizer": "pseuzo", "pseuzo_beta": 10 ** 400}, "pseuzo_beta"),
])
def test_config_refuses_bad_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **options)


def test_config_from_the_command_line(tmp_path):
    """HfArgumentParser builds ZOConfig from argv (options checked the same way)."""
    parser = transformers.HfArgumentParser(ZOConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "lezo", "--lezo_layers",
         "model.layers.0", "model.layers.1", "--zo_eps", "0.01", "--report_to", "none"])
    assert args.lezo_layers == ["model.layers.0", "model.layers.1"] and args.zo_eps == 0.01
    assert args.learning_rate == 1e-6 and args.max_grad_norm == 0.0
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "pseuzo", "--pseuzo_beta", "0.5"])
    assert args.pseuzo_beta == 0.5
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "tezo", "--tezo_update", "deferred",
         "--tezo_factor_cache", "0.01"])
    assert args.tezo_update == "deferred" and args.tezo_factor_cache == 0.01
    with pytest.raises(ValueError, match="zo_eps"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--zo_eps", "-1"])
    # pseuzo_beta: a schedule name or a number from argv (a Union[float, str] field was
    # parsed as float, refusing "reference")
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "pseuzo", "--pseuzo_beta",
         "reference", "--pseuzo_beta_cycle", "2"])
    assert args.pseuzo_beta == "reference" and args.pseuzo_beta_cycle == 2
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "pseuzo", "--pseuzo_beta", "1"])
    assert args.pseuzo_beta == 1.0 and type(args.pseuzo_beta) is float
    for bad in ("nan", "1.5", "cosine"):
        with pytest.raises(ValueError, match="pseuzo_beta"):
            parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--zo_optimizer",
                                                "pseuzo", "--pseuzo_beta", bad])


def test_config_stores_numpy_scalars_as_python_numbers(tmp_path):
    """The optimizers take Python ints only: numpy integers ZOConfig accepts are converted
    (they were refused when the optimizer was built: "must be an integer ..., got
    np.int64(2)")."""
    np = pytest.importorskip("numpy")
    args = config(tmp_path, zo_n_spsa=np.int64(2), zo_seed=np.uint32(5),
                  zo_eps=np.float32(1e-3), zo_dist=np.str_("rademacher"))
    assert (type(args.zo_n_spsa), type(args.zo_seed), type(args.zo_eps),
            type(args.zo_dist)) == (int, int, float, str)
    assert args.zo_n_spsa == 2 and args.zo_seed == 5 and args.zo_eps == float(np.float32(1e-3))
    built = ZOTrainer(model=llama(), args=args, train_dataset=Tokens())
    assert built.zo_optimizer.n_spsa == 2
    for options in ({"zo_optimizer": "lezo", "lezo_n_active": np.int32(1)},
                    {"zo_optimizer": "tezo", "tezo_rank": np.int64(2),
                     "tezo_factor_cache": np.float32(0.5)},
                    {"zo_optimizer": "pseuzo", "pseuzo_window": np.int64(3),
                     "pseuzo_beta": "reference", "pseuzo_beta_cycle": np.int64(2)},
                    {"zo_optimizer": "pseuzo", "pseuzo_beta": np.float64(0.5)}):
        args = config(tmp_path, **options)
        for name in options:
            assert type(getattr(args, name)) in (int, float, str), name
        ZOTrainer(model=llama(), args=args, train_dataset=Tokens())  # the optimizer accepts them


def test_trainer_checks_its_arguments_before_training(tmp_path):
    model = llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="ZOConfig"):
        ZOTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="optimizers"):
        ZOTrainer(model=model, args=config(tmp_path),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="lezo_layers: 'model.blocks'"):
        trainer(model, tmp_path, zo_optimizer="lezo", lezo_layers=["model.blocks"])
    with pytest.raises(ValueError, match="lezo_n_active = 3 exceeds the 2"):
        trainer(model, tmp_path, zo_optimizer="lezo", lezo_n_active=3)
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no transformer block holds a trainable parameter"
                                         ".*; pass lezo_layers"):
        trainer(model, tmp_path, zo_optimizer="lezo")
    assert_same(snapshot(model), before, "after refused arguments")


def test_pseuzo_refuses_a_custom_loss(tmp_path):
    """PseuZO's loss is its split's cross-entropy: a compute_loss_func or an overridden
    compute_loss was silently never called."""
    def loss_func(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean()

    if "compute_loss_func" in inspect.signature(transformers.Trainer.__init__).parameters:
        with pytest.raises(ValueError, match="compute_loss_func / an overridden compute_loss"):
            ZOTrainer(model=llama(), args=config(tmp_path, zo_optimizer="pseuzo"),
                      train_dataset=Tokens(), compute_loss_func=loss_func)

    class OwnLoss(ZOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    with pytest.raises(ValueError, match="compute_loss_func / an overridden compute_loss"):
        trainer(llama(), tmp_path, cls=OwnLoss, zo_optimizer="pseuzo")
    trainer(llama(), tmp_path, cls=OwnLoss, zo_optimizer="mezo")  # used there


def test_gradient_accumulation_set_after_the_config_is_refused(tmp_path):
    """accelerator_config's num_steps becomes gradient_accumulation_steps inside
    Trainer.__init__ (3 global steps ran 12 ZO steps): ZOTrainer refuses it before the stock
    setup copies it into the arguments."""
    args = config(tmp_path)
    args.accelerator_config.gradient_accumulation_kwargs = {"num_steps": 4}
    with pytest.raises(ValueError, match="gradient_accumulation_kwargs num_steps"):
        ZOTrainer(model=llama(), args=args, train_dataset=Tokens())
    assert args.gradient_accumulation_steps == 1


def test_mixed_precision_from_the_environment_is_refused(tmp_path, monkeypatch):
    """ACCELERATE_MIXED_PRECISION (accelerate launch --mixed_precision) reaches the accelerator
    without fp16 / bf16: its autocast would run the probes in bf16. Refused once the
    accelerator exists, naming the setting; the model is not touched."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = config(tmp_path)
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="mixed_precision is 'bf16'.*ACCELERATE_MIXED_PRECISION"):
        ZOTrainer(model=model, args=args, train_dataset=Tokens())
    assert_same(snapshot(model), before, "after the refused trainer")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert ZOTrainer(model=model, args=config(tmp_path),
                     train_dataset=Tokens()).accelerator.mixed_precision == "no"


def test_resume_needs_the_optimizer_state_of_the_same_checkpoint(tmp_path):
    """A checkpoint without optimizer.pt / scheduler.pt (save_only_model=True, or removed)
    restarted the ZO optimizer at step 0 at global step 3 (its seeds reused); an optimizer.pt
    of another checkpoint was accepted. Both are refused, naming the checkpoint, before the
    Trainer loads the model's weights: the model is left as it was."""
    import shutil

    options = dict(save_strategy="steps", save_steps=3, max_steps=6)
    trainer(llama(), tmp_path / "run", **options).train()
    saved = tmp_path / "run" / "checkpoint-3"

    def variant(name, edit):
        checkpoint = tmp_path / name / "checkpoint-3"
        shutil.copytree(saved, checkpoint)
        edit(checkpoint)
        return checkpoint
    cases = [
        (variant("no-optimizer", lambda c: (c / "optimizer.pt").unlink()),
         "has no optimizer.pt"),
        (variant("no-scheduler", lambda c: (c / "scheduler.pt").unlink()),
         "has no scheduler.pt"),
        (variant("other-optimizer", lambda c: shutil.copy(
            tmp_path / "run" / "checkpoint-6" / "optimizer.pt", c / "optimizer.pt")),
         "holds ZO step 6 but its trainer_state.json global step 3"),
        (variant("garbage-optimizer", lambda c: (c / "optimizer.pt").write_bytes(b"not a pickle")),
         "optimizer.pt cannot be read"),
        # the files the stock Trainer loads after the weights: checked before them too (a
        # broken scheduler.pt / rng_state.pth overwrote every weight, then raised a bare error)
        (variant("truncated-scheduler", lambda c: _truncate(c / "scheduler.pt")),
         "scheduler.pt cannot be read"),
        (variant("nan-lr", lambda c: _edit_scheduler(c, base_lrs=[math.nan])),
         "scheduler.pt: base_lrs must hold one finite learning rate >= 0 per param group"),
        (variant("negative-lr", lambda c: _edit_scheduler(c, _last_lr=[-1.0])),
         "scheduler.pt: _last_lr must hold"),
        (variant("two-groups", lambda c: _edit_scheduler(c, base_lrs=[1e-3, 1e-3])),
         "base_lrs must hold one finite learning rate >= 0 per param group .1."),
        (variant("plateau-state", lambda c: torch.save(
            torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(
                [torch.zeros(1, requires_grad=True)], lr=2e-3)).state_dict(),
            c / "scheduler.pt")),
         "scheduler.pt does not load into this run's LambdaLR .lr_scheduler_type='constant'"),
        (variant("truncated-rng", lambda c: _truncate(c / "rng_state.pth")),
         "rng_state.pth cannot be read"),
        (variant("wrong-rng", lambda c: torch.save({"python": 1, "numpy": 2, "cpu": 3},
                                                   c / "rng_state.pth")),
         "rng_state.pth is not an RNG state"),
        (variant("garbage-state", lambda c: (c / "trainer_state.json").write_text("{oops")),
         "trainer_state.json cannot be read"),
        (variant("truncated-weights", lambda c: _truncate(c / "model.safetensors")),
         "model.safetensors cannot be read"),
        (variant("other-model", lambda c: _other_model_weights(c)),
         "model.safetensors holds .* with shape .* not a checkpoint of this model"),
        # each passed the checks, then failed in the stock loader or the first step with the
        # model (a sparse or meta tensor of the right shape: all tensors before it) or the ZO
        # optimizer (a float global step, a str last_epoch) already changed
        (variant("sparse-weight", lambda c: _bin_weights(c, lambda t: t.to_sparse())),
         "pytorch_model.bin holds .* as a torch.sparse_coo tensor"),
        (variant("meta-weight", lambda c: _bin_weights(c, lambda t: t.to("meta"))),
         "pytorch_model.bin holds .* as a meta tensor"),
        (variant("float-step", lambda c: _edit_state(c, global_step=3.0)),
         "trainer_state.json global_step must be an integer >= 0, got 3.0"),
        (variant("str-epoch", lambda c: _edit_scheduler(c, last_epoch="x")),
         "scheduler.pt does not load into this run's LambdaLR"),
    ]
    for checkpoint, match in cases:
        model = llama(seed=99)
        before = snapshot(model)
        resumed = trainer(model, checkpoint.parent, **options)
        with pytest.raises(ValueError, match=re.escape(f"={str(checkpoint)!r}") + ".*" + match):
            resumed.train(resume_from_checkpoint=str(checkpoint))
        assert_same(snapshot(model), before, f"after the refused resume ({match})")
        assert resumed.zo_optimizer.zo_state["step"] == 0

    # an option the saved state refuses (zo_n_spsa) is refused before the weights are loaded too
    model = llama(seed=99)
    before = snapshot(model)
    with pytest.raises(ValueError, match="checkpoint-3'.*n_spsa"):
        trainer(model, tmp_path / "run", zo_n_spsa=2, **options).train(
            resume_from_checkpoint=str(saved))
    assert_same(snapshot(model), before, "after the resume refused for zo_n_spsa")

    # refused by the stock Trainer after the checks: the ZO optimizer was left at the
    # checkpoint's state (its step, seed, lr) while the Trainer counted from 0
    no_weights = variant("no-weights", lambda c: (c / "model.safetensors").unlink())
    resumed = trainer(llama(seed=99), no_weights.parent, **options)
    before_state = resumed.zo_optimizer.state_dict()
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
        resumed.train(resume_from_checkpoint=str(no_weights))
    assert_states_equal(resumed.zo_optimizer.state_dict(), before_state)

    only_model = tmp_path / "only-model"
    trainer(llama(), only_model, save_only_model=True, **options).train()
    with pytest.raises(ValueError, match="has no optimizer.pt .saved with save_only_model"):
        trainer(llama(seed=99), only_model, save_only_model=True, **options).train(
            resume_from_checkpoint=True)  # the last checkpoint, checkpoint-6


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_scheduler(checkpoint: Path, **values) -> None:
    state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    state.update(values)
    torch.save(state, checkpoint / "scheduler.pt")


def _bin_weights(checkpoint: Path, change) -> None:
    """model.safetensors as a pytorch_model.bin with its last tensor changed by `change`."""
    from safetensors.torch import load_file

    weights = dict(load_file(checkpoint / "model.safetensors"))
    last = sorted(weights)[-1]
    weights[last] = change(weights[last])
    (checkpoint / "model.safetensors").unlink()
    torch.save(weights, checkpoint / "pytorch_model.bin")


def _edit_state(checkpoint: Path, **values) -> None:
    import json

    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(values)
    path.write_text(json.dumps(state))


def _other_model_weights(checkpoint: Path) -> None:
    """The weights of a model with the same names and a wider MLP (the stock loader copied the
    tensors before the first mismatch, then raised)."""
    torch.manual_seed(5)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ))
    (checkpoint / "model.safetensors").unlink()
    wide.save_pretrained(str(checkpoint))


def test_resume_reads_the_weights_formats_the_trainer_loads(tmp_path):
    """The checks read what the stock loader reads: torch's legacy (non-zip) pytorch_model.bin
    (which cannot be memory-mapped) and sharded safetensors; both resume to the uninterrupted
    run's weights."""
    import shutil

    options = dict(save_strategy="steps", save_steps=3, max_steps=6)
    trainer(llama(), tmp_path / "run", **options).train()
    reference = llama(seed=99)
    trainer(reference, tmp_path / "ref", **options).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    final = snapshot(reference)
    saved = tmp_path / "run" / "checkpoint-3"

    def legacy_bin(c):
        weights = transformers.LlamaForCausalLM.from_pretrained(str(c)).state_dict()
        (c / "model.safetensors").unlink()
        torch.save(weights, c / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    def sharded(c):
        model = transformers.LlamaForCausalLM.from_pretrained(str(c))
        (c / "model.safetensors").unlink()
        model.save_pretrained(str(c), max_shard_size="2KB")
        assert (c / "model.safetensors.index.json").is_file()

    for name, edit in (("legacy-bin", legacy_bin), ("sharded", sharded)):
        checkpoint = tmp_path / name / "checkpoint-3"
        shutil.copytree(saved, checkpoint)
        edit(checkpoint)
        model = llama(seed=99)
        trainer(model, checkpoint.parent, **options).train(resume_from_checkpoint=str(checkpoint))
        assert_same(snapshot(model), final, f"resumed from the {name} checkpoint")


def test_a_second_train_needs_a_new_trainer(tmp_path):
    """train() again without a checkpoint: the Trainer counts global steps from 0 while the ZO
    optimizer continues, so every checkpoint of the second run was unresumable. Refused; a
    resume of the first run's checkpoint still works on the same trainer."""
    options = dict(save_strategy="steps", save_steps=3, max_steps=6)
    run = trainer(llama(), tmp_path, **options)
    run.train()
    with pytest.raises(ValueError, match="train.. without resume_from_checkpoint on a ZOTrainer "
                                         "whose ZO optimizer is at step 6"):
        run.train()
    run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert run.zo_optimizer.zo_state["step"] == 6


@pytest.mark.skipif("enable_jit_checkpoint" not in {
    f.name for f in dataclasses.fields(transformers.TrainingArguments)},
    reason="transformers without JIT checkpoints (before 5.x)")
def test_jit_checkpoints_are_refused(tmp_path):
    """Its SIGTERM checkpoint lands inside training_step, after the ZO update: unresumable."""
    with pytest.raises(ValueError, match="enable_jit_checkpoint is not supported"):
        config(tmp_path, enable_jit_checkpoint=True)


# -- PseuZO's causal-LM split on transformers' models ---------------------------------------------

def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    options.update(extra)
    return cls(config_cls(**options)).eval()


def test_pseuzo_split_loss_is_the_models_own_loss():
    """LLaMA and GPT-2, with padding and packed position_ids (which the split dropped): the
    split's loss is the model's loss on the same batch."""
    from zokernels.integrations import lm_inputs, pseuzo_causal_lm
    from zokernels.integrations.causal_lm import check_causal_lm_split

    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    positions = torch.arange(SEQ).remainder(SEQ // 2).expand(2, SEQ)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=SEQ,
        initializer_range=0.5)).eval()
    # large weights: the positions change the loss visibly (checked below)
    big = _tiny(transformers.LlamaForCausalLM, transformers.LlamaConfig, initializer_range=0.5)
    for model in (big, gpt2):
        for batch in ({"input_ids": ids, "attention_mask": mask},
                      {"input_ids": ids, "position_ids": positions}):
            forward, loss_fn = pseuzo_causal_lm(model, batch)
            with torch.no_grad():
                split = loss_fn(forward())
                own = model(**lm_inputs(batch)).loss
            torch.testing.assert_close(split, own, rtol=1e-6, atol=1e-6)
            check_causal_lm_split(model, batch)
        # position_ids change the loss: had they been dropped, the comparison would fail
        with torch.no_grad():
            assert not torch.allclose(model(**lm_inputs({"input_ids": ids})).loss,
                                      model(**lm_inputs({"input_ids": ids,
                                                         "position_ids": positions})).loss,
                                      rtol=1e-3)


def test_pseuzo_split_refuses_models_whose_loss_it_is_not():
    """Logit transforms after the head (Gemma2's softcapping, Cohere's logit_scale, Granite's
    logits_scaling) and non-causal LMs (BERT's MLM head has a transform, its labels are not
    shifted) are refused; an unknown transform is caught by check_causal_lm_split."""
    from zokernels.integrations import pseuzo_causal_lm, pseuzo_parameters
    from zokernels.integrations.causal_lm import check_causal_lm_split

    batch = {"input_ids": torch.randint(0, VOCAB, (2, SEQ))}
    refused = [
        (_tiny(transformers.Gemma2ForCausalLM, transformers.Gemma2Config, head_dim=8,
               final_logit_softcapping=1.0), ValueError, "final_logit_softcapping=1.0"),
        (_tiny(transformers.CohereForCausalLM, transformers.CohereConfig, logit_scale=0.0625),
         ValueError, "logit_scale=0.0625"),
        (_tiny(transformers.GraniteForCausalLM, transformers.GraniteConfig, logits_scaling=8.0),
         ValueError, "logits_scaling=8.0"),
        (transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2)), TypeError, "needs a causal LM .*BertForMaskedLM"),
    ]
    for model, error, match in refused:
        with pytest.raises(error, match=match):
            pseuzo_causal_lm(model, batch)
        with pytest.raises(error, match=match):
            pseuzo_parameters(model)
    # the identity values of those settings are not transforms
    granite = _tiny(transformers.GraniteForCausalLM, transformers.GraniteConfig,
                    logits_scaling=1.0)
    check_causal_lm_split(granite, batch)

    class Scaled(transformers.LlamaForCausalLM):  # a transform no config attribute names
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out
    torch.manual_seed(0)
    scaled = Scaled(llama().config).eval()
    pseuzo_causal_lm(scaled, batch)  # structurally a causal LM
    with pytest.raises(ValueError, match="check_causal_lm_split: Scaled's logits differ"):
        check_causal_lm_split(scaled, batch)


def test_pseuzo_trainer_refuses_a_model_with_an_unknown_logit_transform(tmp_path):
    """ZOTrainer checks the split against the model's logits on the first batch, before the
    first step: nothing is trained."""
    class Halved(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):  # the Trainer's columns
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            out.logits = out.logits / 2
            return out
    torch.manual_seed(0)
    model = Halved(llama().config)
    before = snapshot(model)
    run = trainer(model, tmp_path, zo_optimizer="pseuzo", pseuzo_window=2)
    with pytest.raises(ValueError, match="Halved's logits differ"):
        run.train()
    assert_same(snapshot(model), before, "after the refused PseuZO run")
    assert run.zo_optimizer.zo_state["step"] == 0
    from zokernels.integrations import finetune  # the same check, on its first batch
    with pytest.raises(ValueError, match="Halved's logits differ"):
        finetune(model, [{"input_ids": Tokens().ids[:2]}], optimizer="pseuzo", progress=False)
    assert_same(snapshot(model), before, "after the refused finetune")


def package_env() -> dict[str, str]:
    """The environment of a child process that imports the zokernels under test."""
    package_parent = str(Path(zokernels.__file__).resolve().parents[1])
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))


def test_integrations_import_transformers_only_for_the_trainer():
    code = ("import sys; import zokernels.integrations as zi; "
            "from zokernels.integrations import *; "
            "assert 'transformers' not in sys.modules; zi.ZOConfig; "
            "assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], env=package_env(), check=True, timeout=300)


# -- two processes under torchrun -----------------------------------------------------------------

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import transformers
    sys.path.insert(0, sys.argv[2])
    from test_trainer import Tokens, llama
    from zokernels.integrations import ZOConfig, ZOTrainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    counts = {"all_reduce": 0, "other": 0}
    for op in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "barrier", "reduce"):
        def counted(*a, _original=getattr(dist, op), _op=op, **k):
            counts["all_reduce" if _op == "all_reduce" else "other"] += 1
            return _original(*a, **k)
        setattr(dist, op, counted)

    class Count(transformers.TrainerCallback):
        """Collectives from each step's begin to its end (logging comes after the end)."""
        def __init__(self, per_step):
            self.per_step = per_step
        def on_step_begin(self, *a, **k):
            self.before = dict(counts)
        def on_step_end(self, *a, **k):
            self.per_step.append({o: counts[o] - self.before[o] for o in counts})

    results = {}
    for name in ("mezo", "pseuzo"):
        args = ZOConfig(output_dir=out, zo_optimizer=name, learning_rate=2e-3, max_steps=4,
                        per_device_train_batch_size=4, report_to="none", use_cpu=True,
                        disable_tqdm=True, save_strategy="no", logging_steps=2, seed=3,
                        ddp_backend="gloo", ddp_timeout=600)
        rank = int(os.environ["RANK"])
        # ranks start from different weights: the trainer broadcasts rank 0's
        trainer = ZOTrainer(model=llama(seed=rank), args=args, train_dataset=Tokens())
        per_step = []
        trainer.add_callback(Count(per_step))
        trainer.train()
        model = trainer.model
        results[name] = {
            "per_step": per_step,
            "is_ddp": isinstance(trainer.model_wrapped,
                                 torch.nn.parallel.DistributedDataParallel),
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
            "params": {n: p.detach().float().view(-1).tolist()
                       for n, p in model.named_parameters()}}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(results, f)
''')


def test_two_processes_under_torchrun_stay_bit_identical(tmp_path):
    """torchrun --nproc-per-node 2 (gloo on CPU): the model is not wrapped in DDP, every step
    issues exactly one collective (the optimizer's all-reduce of the losses), the ranks log the
    same losses and end with bit-identical weights although they started from different ones,
    and MeZO's weights equal one process's on the concatenated batches up to rounding."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path), str(TESTS)],
        cwd=tmp_path, env=package_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("mezo", "pseuzo"):
        a, b = ranks[0][name], ranks[1][name]
        assert not a["is_ddp"] and not b["is_ddp"]
        assert a["per_step"] == b["per_step"] == [{"all_reduce": 1, "other": 0}] * 4, name
        assert a["losses"] == b["losses"] and len(a["losses"]) == 2
        assert a["params"] == b["params"], f"{name}: replicas differ"
        start = snapshot(llama(seed=0))
        assert any(a["params"][n] != start[n].view(-1).tolist() for n in start), name
    # one process on the concatenated batches (2 x 4 sequences per step, the same order): the
    # same updates up to the rounding of a mean of two means
    one = trainer(llama(seed=0), tmp_path / "one", zo_optimizer="mezo", max_steps=4,
                  per_device_train_batch_size=8)
    one.train()
    for n, p in one.model.named_parameters():
        torch.testing.assert_close(torch.tensor(ranks[0]["mezo"]["params"][n]),
                                   p.detach().view(-1), rtol=0, atol=1e-5)
