"""ZOTrainer and ZOConfig: zeroth-order fine-tuning inside transformers.Trainer.

ZOConfig is transformers.TrainingArguments plus the zokernels optimizer's options (zo_*, lezo_*,
tezo_*, pseuzo_*), each validated when the config is built. ZOTrainer is a transformers.Trainer
whose training_step runs one step of a zokernels optimizer (MeZO, LeZO, TeZO or PseuZO) on the
batch in place of forward + backward: no gradient, no .backward(), no optimizer memory beyond the
ZO state. Everything else is the stock Trainer: data loading, the learning-rate schedule (it
writes the lr of the ZO optimizer's param groups), max_steps, logging, evaluation, checkpoints
and resume_from_checkpoint.

Resume. The checkpoint must hold optimizer.pt and scheduler.pt, the ZO step counter saved in
optimizer.pt must equal trainer_state.json's global step (one ZO step per global step), and the
saved ZO state must load into this run's optimizer; otherwise ValueError naming the checkpoint
(a save_only_model=True checkpoint cannot be resumed). zo_eps, zo_seed, zo_dist, weight_decay
and the learning rate (with the scheduler's state) are taken from the checkpoint whatever this
ZOConfig says; a changed zo_optimizer, zo_n_spsa, zo_rounding, lezo_layers, tezo_rank,
tezo_variant, tezo_update, pseuzo_beta or pseuzo_decay_per_entry is refused; zo_probe,
zo_exact_restore, lezo_n_active and pseuzo_window apply as this ZOConfig sets them. The stock
Trainer loads the model's weights first, then the optimizer, the scheduler and the RNG states:
ZOTrainer reads and checks all of them before (trainer_state.json, the weights files' tensor
shapes, scheduler.pt's learning rates, the RNG states), so a refused resume leaves the model
and the optimizer as they were. train() again on the same trainer without a checkpoint is
refused: build a new ZOTrainer for a new run. enable_jit_checkpoint (transformers 5.x) is
refused: its checkpoint would be written inside a step.

Importing this module imports transformers (zokernels.integrations imports it lazily).
Tested with transformers 4.46.3 and 5.25. The overridden hooks exist in both with compatible
signatures, which the overrides accept in either form: training_step(model, inputs,
num_items_in_batch=None), create_optimizer(model=None) (5.x may pass the model), log(logs,
*args) (5.x adds start_time), create_accelerator_and_postprocess(); `processing_class` (4.46+)
and every other Trainer argument pass through unchanged. The private overrides:
_load_rng_state lets transformers 4.46 read its own rng_state.pth under torch >= 2.6;
_load_optimizer_and_scheduler(checkpoint) checks the ZO step it loaded.
"""

import itertools
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import torch
import transformers

from .._contract import PERTURB_DISTS, ROUNDINGS
from .._validate import FLOAT32_MAX, as_int, is_finite_number
from ..optim import ZOOptimizer
from ..optim.tezo import FACTOR_CACHE as TEZO_FACTOR_CACHE
from ..optim.tezo import UPDATES as TEZO_UPDATES
from ..optim.tezo import VARIANTS as TEZO_VARIANTS
from ..trajectory import MAX_SEEDS_PER_STEP
from .causal_lm import check_causal_lm_split, pseuzo_causal_lm
from .finetune import OPTIMIZERS, _build, merged_at_exit, trainable_blocks

# The options of one algorithm; setting one for another algorithm is refused (it would be ignored).
ALGORITHM_OPTIONS = {"lezo": ("lezo_n_active", "lezo_layers"),
                     "tezo": ("tezo_rank", "tezo_variant", "tezo_update", "tezo_factor_cache"),
                     "pseuzo": ("pseuzo_window", "pseuzo_beta", "pseuzo_beta_cycle",
                                "pseuzo_decay_per_entry")}


def _integer(value: Any, name: str, low: int, *, optional: bool = False) -> Optional[int]:
    """`value` as a Python int (the optimizers refuse numpy integers), or ValueError."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, "
                         f"got {value!r}")
    return int(value)


def _choice(value: Any, name: str, choices: Any) -> str:
    """`value` as a Python str, or ValueError (also for an unhashable value such as a list)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def _number_or_name(value: Any) -> Any:
    """pseuzo_beta as given: a numeric string (the command line's) becomes a float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return str(value)
    return value


def _check_accumulation(args: Any) -> None:
    """ValueError if accelerator_config asks for gradient accumulation (Trainer.__init__ would
    set gradient_accumulation_steps from it, after ZOConfig refused that option)."""
    config = getattr(args, "accelerator_config", None)
    kwargs = getattr(config, "gradient_accumulation_kwargs", None) or {}
    if isinstance(kwargs, dict) and kwargs.get("num_steps", 1) != 1:
        raise ValueError(
            f"accelerator_config's gradient_accumulation_kwargs num_steps must be 1 for "
            f"ZOTrainer, got {kwargs['num_steps']!r}: ZO has no gradient to accumulate; raise "
            "per_device_train_batch_size (forward memory only) or zo_n_spsa instead")


@dataclass
class ZOConfig(transformers.TrainingArguments):
    """transformers.TrainingArguments for ZOTrainer, with the zokernels optimizer's options.

    Used from TrainingArguments: learning_rate (the ZO lr; default here 1e-6, MeZO's),
    lr_scheduler_type (default here "constant", as MeZO's runs) and warmup, weight_decay (decoupled,
    fused into the update, not on names containing bias / layer_norm / layernorm: the zokernels
    rule), max_steps, num_train_epochs, per_device_train_batch_size, logging / eval / save
    strategies and steps, seed (of the data order; also zo_seed's default). Not used: optim,
    optim_args and the adam_* options (the ZO optimizer replaces the Trainer's).

    Refused (ValueError naming the option): gradient_accumulation_steps > 1, also when set
    through accelerator_config's gradient_accumulation_kwargs num_steps (ZO has no gradient
    to accumulate: use a larger per_device_train_batch_size, which costs forward memory only,
    or zo_n_spsa for more directions per step), max_grad_norm > 0 (nothing to clip; default
    here 0), fp16 / bf16 mixed precision (load the model in torch.bfloat16 instead: ZO keeps no
    fp32 master weights; mixed precision from the environment, ACCELERATE_MIXED_PRECISION or
    `accelerate launch --mixed_precision`, is refused by ZOTrainer once its accelerator
    exists), deepspeed and fsdp (ZO data parallelism needs no sharded gradients; see
    ZOTrainer), label_smoothing_factor with zo_optimizer="pseuzo" (its loss is the split's
    plain cross-entropy). average_tokens_across_devices defaults to False here: each rank's loss is
    the mean over its own micro-batch and the optimizer averages the ranks.

    ZO options:
        zo_optimizer: "mezo", "lezo", "tezo" or "pseuzo".
        zo_eps: perturbation scale (> 0).
        zo_seed: base seed of the noise (steps draw BLAKE2b(seed, step, k)); None: `seed`.
        zo_n_spsa: probes (seeds) per step (MeZO / LeZO / TeZO).
        zo_dist: "gaussian" or "rademacher".
        zo_exact_restore: keep undo logs so every restore and update is exact (default True).
        zo_probe: "virtual" (default: the probes write no weight, docs/dense-probes.md; TeZO:
            its low-rank virtual probes) or "inplace".
        zo_rounding: of the update, "nearest" or "stochastic" (for bf16 / fp16 weights).
        lezo_n_active: blocks perturbed per step (default: a quarter of them, at least 1).
        lezo_layers: None (the blocks of find_transformer_layers(model) that hold a trainable
            parameter, looked up through PEFT / DDP wrappers) or names of submodules as
            model.named_modules() gives them; a ModuleList name stands for its children.
        tezo_rank, tezo_variant: TeZO's rank and "sgd" / "momentum" / "adam".
        tezo_update: "inplace" (default) or "deferred" (needs zo_probe="virtual"): the virtual
            weights' updates are accumulated in r-vectors and merged into the model when it is
            observed (its state_dict for a checkpoint, an evaluation forward) and when train()
            returns or raises (docs/tezo.md, "Deferred updates").
        tezo_factor_cache: the virtual probes' factor cache, a fraction of the parameters'
            bytes (default 0.04; 0 draws the factors in every hook call; the same results).
        pseuzo_window: window length; pseuzo_beta: a number in [0, 1] or "reference" (PseuZO's
            reference schedule on the trainer's epoch clock); from the command line a numeric
            string becomes a float. Passed to PseuZO(beta=...).
        Validated numbers and strings are stored as Python int / float / str (numpy scalars
        are accepted and converted).
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "ZO learning rate."})
    lr_scheduler_type: Union[transformers.SchedulerType, str] = field(
        default="constant", metadata={"help": "Learning-rate schedule of the ZO optimizer."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Must be 0: ZO has no gradient."})
    average_tokens_across_devices: bool = field(
        default=False, metadata={"help": "Each rank's loss is its own micro-batch mean."})
    zo_optimizer: str = field(default="mezo",
                              metadata={"help": "mezo, lezo, tezo or pseuzo."})
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale."})
    zo_seed: Optional[int] = field(default=None,
                                   metadata={"help": "Noise base seed (default: seed)."})
    zo_n_spsa: int = field(default=1, metadata={"help": "Probes per step (mezo, lezo, tezo)."})
    zo_dist: str = field(default="gaussian", metadata={"help": "gaussian or rademacher."})
    zo_exact_restore: bool = field(default=True, metadata={"help": "Undo logs (exact restore)."})
    zo_probe: str = field(default="virtual",
                          metadata={"help": "virtual or inplace probes (mezo, lezo, tezo)."})
    zo_rounding: str = field(default="nearest",
                             metadata={"help": "Update rounding: nearest or stochastic."})
    lezo_n_active: Optional[int] = field(default=None, metadata={"help": "LeZO blocks per step."})
    lezo_layers: Optional[list[str]] = field(
        default=None, metadata={"help": "LeZO blocks: submodule names (default: discovered)."})
    tezo_rank: int = field(default=8, metadata={"help": "TeZO rank."})
    tezo_variant: str = field(default="sgd", metadata={"help": "TeZO: sgd, momentum or adam."})
    tezo_update: str = field(default="inplace",
                             metadata={"help": "TeZO update: inplace or deferred (merged when "
                                               "the model is observed)."})
    tezo_factor_cache: float = field(
        default=TEZO_FACTOR_CACHE,
        metadata={"help": "TeZO factor cache, a fraction of the parameters' bytes (0: none)."})
    pseuzo_window: int = field(default=14, metadata={"help": "PseuZO window length."})
    # typed str for the command line (HfArgumentParser reads Union[float, str] as float and
    # refuses "reference"); a float is accepted too, a numeric string becomes one
    pseuzo_beta: str = field(
        default=0.9, metadata={"help": "PseuZO beta: a number in [0, 1] or 'reference'."})
    pseuzo_beta_cycle: Optional[int] = field(
        default=None, metadata={"help": "pseuzo_beta='reference': epochs per beta cycle "
                                        "(default: num_train_epochs // 2, as the reference)."})
    pseuzo_decay_per_entry: bool = field(
        default=False, metadata={"help": "PseuZO: weight decay once per window entry (the "
                                         "reference's rule)."})

    def __post_init__(self) -> None:
        self._check_zo_options()
        super().__post_init__()
        # TrainingArguments has parsed accelerator_config now; Trainer.__init__ would turn its
        # num_steps into gradient_accumulation_steps
        _check_accumulation(self)

    def _check_zo_options(self) -> None:
        """ValueError naming the first bad option; runs before TrainingArguments' own setup.
        Validated values are normalized to Python's types (numpy integers and floats, numpy
        strings, a numeric pseuzo_beta string from the command line)."""
        self.zo_optimizer = _choice(self.zo_optimizer, "zo_optimizer", OPTIMIZERS)
        if not is_finite_number(self.zo_eps) or not 0 < self.zo_eps <= FLOAT32_MAX:
            raise ValueError(f"zo_eps must be a number in (0, {FLOAT32_MAX:.6g}] (the kernels "
                             f"compute in float32), got {self.zo_eps!r}")
        self.zo_eps = float(self.zo_eps)
        self.zo_seed = _integer(self.zo_seed, "zo_seed", 0, optional=True)
        if self.zo_seed is not None and self.zo_seed >= 1 << 64:
            raise ValueError(f"zo_seed must be below 2^64, got {self.zo_seed}")
        self.zo_n_spsa = _integer(self.zo_n_spsa, "zo_n_spsa", 1)
        if self.zo_n_spsa > MAX_SEEDS_PER_STEP:
            raise ValueError(f"zo_n_spsa must be at most {MAX_SEEDS_PER_STEP} (seeds one step "
                             f"records), got {self.zo_n_spsa}")
        if self.zo_n_spsa != 1 and self.zo_optimizer not in ("mezo", "lezo", "tezo"):
            raise ValueError(f"zo_n_spsa applies to zo_optimizer 'mezo', 'lezo' and 'tezo', not "
                             f"{self.zo_optimizer!r}")
        self.zo_dist = _choice(self.zo_dist, "zo_dist", PERTURB_DISTS)
        if not isinstance(self.zo_exact_restore, bool):
            raise ValueError(f"zo_exact_restore must be a bool, got {self.zo_exact_restore!r}")
        self.zo_rounding = _choice(self.zo_rounding, "zo_rounding", ROUNDINGS)
        self.zo_probe = _choice(self.zo_probe, "zo_probe", ("virtual", "inplace"))
        self.pseuzo_beta = _number_or_name(self.pseuzo_beta)
        defaults = {f.name: f.default for f in fields(ZOConfig)}
        for algorithm, options in ALGORITHM_OPTIONS.items():
            for option in options:
                if algorithm != self.zo_optimizer and getattr(self, option) != defaults[option]:
                    raise ValueError(f"{option} applies to zo_optimizer={algorithm!r}, not "
                                     f"{self.zo_optimizer!r}")
        self.lezo_n_active = _integer(self.lezo_n_active, "lezo_n_active", 0, optional=True)
        layers = self.lezo_layers
        if layers is not None and (isinstance(layers, str) or not isinstance(layers, (list, tuple))
                                   or not layers
                                   or not all(isinstance(n, str) and n for n in layers)):
            raise ValueError("lezo_layers must be None or a non-empty list of submodule names, "
                             f"got {layers!r}")
        if layers is not None:
            self.lezo_layers = [str(n) for n in layers]
        self.tezo_rank = _integer(self.tezo_rank, "tezo_rank", 1)
        self.tezo_variant = _choice(self.tezo_variant, "tezo_variant", TEZO_VARIANTS)
        self.tezo_update = _choice(self.tezo_update, "tezo_update", TEZO_UPDATES)
        if self.tezo_update == "deferred" and self.zo_probe != "virtual":
            raise ValueError("tezo_update='deferred' needs zo_probe='virtual' (the deferred part "
                             f"of a weight is evaluated by the virtual probes), got zo_probe="
                             f"{self.zo_probe!r}")
        cache = self.tezo_factor_cache
        if not is_finite_number(cache) or not 0 <= cache <= 1:
            raise ValueError(f"tezo_factor_cache must be a number in [0, 1] (a fraction of the "
                             f"parameters' bytes), got {cache!r}")
        self.tezo_factor_cache = float(cache)
        self.pseuzo_window = _integer(self.pseuzo_window, "pseuzo_window", 1)
        if self.pseuzo_window > MAX_SEEDS_PER_STEP:
            raise ValueError(f"pseuzo_window must be at most {MAX_SEEDS_PER_STEP} (seeds one "
                             f"step applies), got {self.pseuzo_window}")
        self.pseuzo_beta_cycle = _integer(self.pseuzo_beta_cycle, "pseuzo_beta_cycle", 1,
                                          optional=True)
        if self.pseuzo_beta_cycle is not None and self.pseuzo_beta != "reference":
            raise ValueError("pseuzo_beta_cycle applies to pseuzo_beta='reference' only, got "
                             f"pseuzo_beta={self.pseuzo_beta!r}")
        if not isinstance(self.pseuzo_decay_per_entry, bool):
            raise ValueError(f"pseuzo_decay_per_entry must be a bool, got "
                             f"{self.pseuzo_decay_per_entry!r}")
        beta = self.pseuzo_beta
        if isinstance(beta, str):
            if beta != "reference":
                raise ValueError(f"pseuzo_beta must be a number in [0, 1] or 'reference' (the "
                                 f"reference's schedule), got {beta!r}")
        elif not is_finite_number(beta) or not 0 <= beta <= 1:
            raise ValueError(f"pseuzo_beta must be a number in [0, 1] or 'reference' (the "
                             f"reference's schedule), got {beta!r}")
        else:
            self.pseuzo_beta = float(beta)
        if self.zo_optimizer == "pseuzo" and self.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor must be 0 with zo_optimizer='pseuzo', got "
                             f"{self.label_smoothing_factor!r}: PseuZO's loss is the plain "
                             "shifted cross-entropy of pseuzo_causal_lm, not compute_loss")
        # the TrainingArguments that have no ZO meaning
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps must be 1 for ZOTrainer, got "
                f"{self.gradient_accumulation_steps}: ZO has no gradient to accumulate; raise "
                "per_device_train_batch_size (forward memory only) or zo_n_spsa instead")
        if self.max_grad_norm:
            raise ValueError(f"max_grad_norm must be 0 for ZOTrainer (no gradient to clip), got "
                             f"{self.max_grad_norm!r}")
        if self.fp16 or self.bf16:
            raise ValueError("fp16 / bf16 mixed precision is not supported by ZOTrainer: load the "
                             "model in torch.bfloat16 (ZO keeps no fp32 master weights), and "
                             "consider zo_rounding='stochastic'")
        if self.neftune_noise_alpha is not None:
            raise ValueError(f"neftune_noise_alpha must be None for ZOTrainer, got "
                             f"{self.neftune_noise_alpha!r}: NEFTune's noise acts in training "
                             "mode only, and the ZO steps run the model in eval mode (both "
                             "forwards of a step must see one function)")
        if getattr(self, "enable_jit_checkpoint", False):  # transformers 5.x
            raise ValueError("enable_jit_checkpoint is not supported by ZOTrainer: its SIGTERM "
                             "checkpoint is written inside a step, after the ZO update and "
                             "before the Trainer counts it, so it could not be resumed; use "
                             "save_steps for regular checkpoints")
        if self.deepspeed or self.fsdp:
            raise ValueError("deepspeed / fsdp are not supported by ZOTrainer: under torchrun or "
                             "accelerate it runs data parallel through the optimizer's process "
                             "group (one all-reduce of a few floats per step)")


def _process_group() -> Any:
    """The world group under torchrun / accelerate with more than one process, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _numpy_safe_globals() -> Any:
    """torch.serialization.safe_globals for the numpy objects of a pickled numpy RNG state."""
    import numpy as np

    core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core
    return torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                             type(np.dtype(np.uint32))])


def _read(path: str, where: str) -> Any:
    """torch.load(path, weights_only=True) on the CPU, or ValueError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{where}: its {os.path.basename(path)} cannot be read "
                         f"({type(exc).__name__}: {exc})") from exc


def _check_scheduler_state(state: Any, what: str, groups: Optional[int]) -> None:
    """A scheduler state_dict whose learning rates (base_lrs, _last_lr, min_lrs) are one finite
    number >= 0 per param group, or ValueError: the scheduler writes them into the ZO
    optimizer's groups, which refuse them there, after the model's weights were loaded."""
    if not isinstance(state, dict):
        raise ValueError(f"{what} is not a scheduler's state_dict (a {type(state).__name__})")
    for key in ("base_lrs", "_last_lr", "min_lrs"):
        if key not in state:
            continue
        values = state[key]
        if (not isinstance(values, (list, tuple))
                or (groups is not None and len(values) != groups)
                or not all(is_finite_number(v) and v >= 0 for v in values)):
            raise ValueError(f"{what}: {key} must hold one finite learning rate >= 0 per param "
                             f"group ({groups if groups is not None else 'any number of'}), "
                             f"got {values!r}")


# The weights files of a full checkpoint (transformers' names), in the order the stock loader
# looks for them: a single file (safetensors first), else a sharded index (safetensors first).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def _check_weight_files(model: torch.nn.Module, checkpoint: str, where: str) -> None:
    """ValueError unless the checkpoint's weights file(s) can be read and every tensor in them
    that the model's state_dict names has the model's shape: the stock loader copies tensor by
    tensor and raises at the first size mismatch, with the ones before it already written. A
    checkpoint of adapters only (PEFT) has no such file and is left to the stock loader."""
    import json

    found = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(checkpoint, name))]
    if not found:
        return
    name = found[0]
    paths = [os.path.join(checkpoint, name)]
    if name.endswith(".index.json"):
        try:
            with open(paths[0], encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(checkpoint, str(shard)) for shard in shards]
        except Exception as exc:
            raise ValueError(f"{where}: its {name} cannot be read "
                             f"({type(exc).__name__}: {exc})") from exc
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for path in paths:
        for key, (shape, unfit) in _saved_shapes(path, where).items():
            if key not in expected:
                continue
            if expected[key] != shape:
                raise ValueError(f"{where}: its {os.path.basename(path)} holds {key} with shape "
                                 f"{list(shape)}, the model's is {list(expected[key])}: not a "
                                 "checkpoint of this model")
            if unfit:
                raise ValueError(f"{where}: its {os.path.basename(path)} holds {key} as {unfit}, "
                                 "which cannot be loaded into the model's tensor (the stock "
                                 "loader would fail there, the tensors before it written)")


def _unfit(t: torch.Tensor) -> str:
    """Why a saved tensor cannot be copied into a real dense parameter or buffer ("" if it can):
    sparse or other layouts, meta (no data), quantized, complex (the copy drops the imaginary
    part)."""
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if t.is_meta:
        return "a meta tensor (no data)"
    if t.is_quantized or t.is_complex():
        return f"a {t.dtype} tensor"
    return ""


def _saved_shapes(path: str, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, `_unfit` reason or "") of a weights file, read from its header
    (safetensors: dense real or integer tensors) or mapped (torch), or ValueError naming the
    file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {name: (tuple(f.get_slice(name).get_shape()), "") for name in f.keys()}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file of torch's legacy (non-zip) format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a dict of tensors")
        return {str(k): (tuple(v.shape), _unfit(v)) for k, v in state.items()
                if isinstance(v, torch.Tensor)}
    except Exception as exc:
        raise ValueError(f"{where}: its {os.path.basename(path)} cannot be read "
                         f"({type(exc).__name__}: {exc})") from exc


def _broadcast_module_state(model: torch.nn.Module, group: Any) -> None:
    """Every parameter and buffer from rank 0, once (what DDP does when it wraps a model): the
    replicas start identical, and the identical seeded updates keep them so."""
    import torch.distributed as dist

    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    with torch.no_grad():
        for tensor in tensors.values():
            dist.broadcast(tensor.data, src=0, group=group)


class _TrainerOptimizer(torch.optim.Optimizer):
    """What the Trainer holds as its optimizer. The ZO step runs in ZOTrainer.training_step (it
    needs the batch); the Trainer's optimizer.step() afterwards has nothing left to do.
    param_groups, state_dict and load_state_dict are the ZO optimizer's: the lr scheduler writes
    the ZO lr, checkpoints hold the ZO state. Like accelerate's wrapper, it does not call
    Optimizer.__init__ (it holds no state of its own)."""

    def __init__(self, zo: ZOOptimizer) -> None:  # pylint: disable=super-init-not-called
        self.zo = zo

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.zo.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.zo.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.zo.defaults

    @property
    def state(self) -> Any:
        return self.zo.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise RuntimeError("ZOTrainer steps its ZO optimizer in training_step; "
                               "optimizer.step() takes no closure here")

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.zo.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The ZO state; its algorithm tensors (PseuZO's window, TeZO's moments) go to the device
        of the parameters (the Trainer loads checkpoints onto the CPU)."""
        params = [p for group in self.zo.param_groups for p in group["params"]]
        if params and isinstance(state_dict, dict) and isinstance(state_dict.get("extra"), dict):
            device = params[0].device
            state_dict = dict(state_dict, extra=_to_device(state_dict["extra"], device))
        self.zo.load_state_dict(state_dict)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class _StepClock(transformers.TrainerCallback):
    """(time, global step) at train begin (after a resume's state is loaded) and at each log."""

    def __init__(self) -> None:
        self.mark: Optional[tuple[float, int]] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = (time.perf_counter(), state.global_step)


class ZOTrainer(transformers.Trainer):
    """transformers.Trainer that fine-tunes with a zokernels ZO optimizer instead of backprop.

    ZOTrainer(model=..., args=ZOConfig(...), train_dataset=..., eval_dataset=...,
    data_collator=..., processing_class=...): the installed Trainer's arguments, by name or
    position. `args` must be a ZOConfig; `optimizers` must be left out (the ZO optimizer and
    the scheduler are built from args). The optimizer is built, and its options
    checked against the model (LeZO's layers, PseuZO's split), when the trainer is built;
    `trainer.zo_optimizer` is it.

    Each training step is one `zo_optimizer.step` on the batch, with the model in eval mode
    (dropout off: the probes of a step must see one function):
    - MeZO / LeZO / TeZO minimize `self.compute_loss(model, batch)` (the model's loss from the
      batch's labels, as the stock Trainer; override compute_loss for another loss), called
      2 * n_spsa times under torch.no_grad; the step's loss is the optimizer's (MeZO's: at
      theta + eps z).
    - PseuZO uses pseuzo_causal_lm's split of a causal LM (hidden state before the LM head;
      head + shifted cross-entropy; labels default to input_ids with padding ignored) and trains
      pseuzo_parameters(model): an LM head not tied to the input embeddings stays unchanged.
      Models whose loss that is not are refused: not a causal LM, or a logit transform after
      the head (Gemma2's softcapping, Cohere's logit_scale, Granite's logits_scaling; others
      by comparing the split's logits with the model's on the first batch).
    Trained: the parameters that require grad (a PEFT LoRA model: its adapters only). LeZO's
    blocks come from find_transformer_layers through the PEFT wrapper unless lezo_layers names
    them.

    TeZO with tezo_update="deferred" writes its virtual weights only when they are merged: a
    checkpoint (the model's state_dict) or an evaluation forward merges them, and so does the end
    of train() (returning or raising).

    Logs add, to each training log: steps_per_second (since the previous log), zo_skipped_steps
    (steps skipped for a non-finite loss, weights restored exactly) and zo_undo_overflows; there
    is no grad_norm. Checkpoints (save_steps / save_strategy) hold the model, the ZO optimizer's
    state_dict (step counter, undo-log sizing, TeZO's moments, PseuZO's window, the
    trajectory), the scheduler and the RNG states; train(resume_from_checkpoint=...) continues
    bit for bit (CPU, fp32 and bf16, every optimizer: tests/test_trainer.py), after the checks
    of the module docstring ("Resume"), made before any weight is loaded.

    Multi-process (torchrun, accelerate launch): the model is not wrapped in
    DistributedDataParallel (accelerate prepares it with evaluation_mode=True: no gradient
    buckets, no buffer broadcasts per forward); the optimizer gets the world process group,
    each rank evaluates its own micro-batch, and the losses are averaged in one all-reduce per
    step, so every rank applies the same update. The model's parameters and buffers are
    broadcast from rank 0 once, when the optimizer is built (as DDP does when it wraps a model),
    so the replicas start, and stay, bit-identical.
    """

    def __init__(self, model: Any = None, args: Optional[ZOConfig] = None, *positional: Any,
                 **kwargs: Any) -> None:
        if not isinstance(args, ZOConfig):
            raise TypeError(f"args must be a ZOConfig (TrainingArguments with the ZO options), "
                            f"got {type(args).__name__}")
        optimizers = kwargs.get("optimizers", (None, None))
        if tuple(optimizers) != (None, None) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("optimizers / optimizer_cls_and_kwargs: ZOTrainer builds its ZO "
                             "optimizer and scheduler from args (zo_*, learning_rate, "
                             "lr_scheduler_type); override create_scheduler for another schedule")
        self.zo_optimizer: Optional[ZOOptimizer] = None
        self._clock = _StepClock()
        self._split_checked = False
        self._resume_step: Optional[int] = None
        super().__init__(model, args, *positional, **kwargs)
        if args.zo_optimizer == "pseuzo" and (
                getattr(self, "compute_loss_func", None) is not None
                or type(self).compute_loss is not transformers.Trainer.compute_loss):
            raise ValueError("compute_loss_func / an overridden compute_loss is not used with "
                             "zo_optimizer='pseuzo': its loss is the shifted cross-entropy of "
                             "pseuzo_causal_lm's split (head + loss on the hidden state); use "
                             "another zo_optimizer for a custom loss")
        self.add_callback(self._clock)
        if self.model is not None:
            self.create_optimizer()  # checks the options against the model before any work

    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator, whose prepare_model never wraps the model in DDP: ZO computes
        no gradient, so a DDP wrapper would only allocate gradient buckets and broadcast the
        buffers before every forward. accelerate's evaluation mode places the model (and applies
        torch.compile when configured) without it.

        Refused here (ValueError), as ZOConfig refuses them: gradient accumulation that reaches
        the Trainer other than through gradient_accumulation_steps, and mixed precision from
        wherever the accelerator takes it (fp16 / bf16, the ACCELERATE_MIXED_PRECISION
        environment variable, `accelerate launch --mixed_precision`): its autocast would run
        the probes' forwards in half precision."""
        _check_accumulation(self.args)  # before the stock hook copies num_steps into args
        super().create_accelerator_and_postprocess()
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps must be 1 for ZOTrainer, got "
                             f"{self.args.gradient_accumulation_steps} after the Trainer's "
                             "setup: ZO has no gradient to accumulate")
        precision = str(self.accelerator.mixed_precision)
        if precision != "no":
            raise ValueError(
                f"mixed precision is not supported by ZOTrainer, but the accelerator's "
                f"mixed_precision is {precision!r} (from fp16 / bf16, the "
                "ACCELERATE_MIXED_PRECISION environment variable or `accelerate launch "
                "--mixed_precision`): unset it (mixed_precision 'no') and load the model in "
                "torch.bfloat16 instead (ZO keeps no fp32 master weights)")
        prepare_model = self.accelerator.prepare_model

        def prepare_without_ddp(model: torch.nn.Module, *a: Any, **k: Any) -> torch.nn.Module:
            k["evaluation_mode"] = True
            return prepare_model(model, *a, **k)
        self.accelerator.prepare_model = prepare_without_ddp

    # -- optimizer ----------------------------------------------------------------------------
    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The ZO optimizer over self.model (built once; again after model_init), held by the
        Trainer through a view whose step() is empty (the step runs in training_step)."""
        if self.optimizer is None:
            self.zo_optimizer = self._build_zo_optimizer(self.model)
            self.optimizer = _TrainerOptimizer(self.zo_optimizer)
        return self.optimizer

    def _build_zo_optimizer(self, model: torch.nn.Module) -> ZOOptimizer:
        args = self.args
        name = args.zo_optimizer
        group = _process_group()
        kwargs: dict[str, Any] = dict(
            lr=args.learning_rate, eps=args.zo_eps, weight_decay=args.weight_decay,
            seed=args.seed if args.zo_seed is None else args.zo_seed, dist=args.zo_dist,
            exact_restore=args.zo_exact_restore, rounding=args.zo_rounding,
            process_group=group, probe=args.zo_probe)
        if name in ("mezo", "lezo", "tezo"):
            kwargs["n_spsa"] = args.zo_n_spsa
        if name == "lezo":
            layers = (trainable_blocks(model, "ZOTrainer(zo_optimizer='lezo')", "lezo_layers")
                      if args.lezo_layers is None else self._named_blocks(model))
            n_active = (max(1, len(layers) // 4) if args.lezo_n_active is None
                        else args.lezo_n_active)
            if n_active > len(layers):
                raise ValueError(f"lezo_n_active = {n_active} exceeds the {len(layers)} LeZO "
                                 "blocks")
            kwargs.update(layers=layers, n_active=n_active)
        elif name == "tezo":
            kwargs.update(rank=args.tezo_rank, variant=args.tezo_variant,
                          update=args.tezo_update, factor_cache=args.tezo_factor_cache)
        elif name == "pseuzo":
            kwargs.update(window=args.pseuzo_window, beta=args.pseuzo_beta,
                          decay_per_entry=args.pseuzo_decay_per_entry)
            if args.pseuzo_beta == "reference":  # cycles of epochs, as PseuZO's reference trainer
                kwargs.update(beta_cycle=args.pseuzo_beta_cycle
                              or max(1, int(args.num_train_epochs) // 2),
                              beta_epoch_steps=self._steps_per_epoch())
        optimizer = _build(model, name, kwargs, where="ZOTrainer")
        if group is not None:
            _broadcast_module_state(model, group)
        return optimizer

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (one per batch: no gradient accumulation), for the epoch
        clock of PseuZO's reference beta schedule."""
        try:
            steps = len(self.get_train_dataloader())
        except TypeError:  # an iterable dataset has no length
            raise ValueError("pseuzo_beta='reference' counts epochs: it needs a train dataset "
                             "with a length") from None
        return max(1, steps)

    def _named_blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """args.lezo_layers resolved to modules (a ModuleList stands for its children)."""
        blocks: list[torch.nn.Module] = []
        for name in self.args.lezo_layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"lezo_layers: {name!r} is not a submodule of the model (names "
                                 "as model.named_modules() gives them)") from None
            blocks.extend(module if isinstance(module, torch.nn.ModuleList) else [module])
        return blocks

    # -- the step -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The stock train(); then, returning or raising, TeZO's pending deferred updates
        (tezo_update="deferred") are merged, so the model holds its weights afterwards (as after
        finetune()). Checkpoints and evaluations in between merge through the model's hooks.

        A resume_from_checkpoint is checked first, before the Trainer loads anything into the
        model or the optimizer (_check_checkpoint): a refused resume leaves both as they were.
        A second train() without one is refused (ValueError): the Trainer would count global
        steps from 0 again while the ZO optimizer continues its own count."""
        self._resume_step = None
        self._split_checked = False  # model_init may give another model
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if checkpoint is not None and checkpoint is not False:
            self._resume_step = self._check_checkpoint(str(checkpoint))
        elif (getattr(self, "model_init", None) is None and self.zo_optimizer is not None
              and self.zo_optimizer.zo_state["step"] != 0):
            # the stock Trainer keeps its optimizer and counts global steps from 0 again: the
            # run's checkpoints would hold another ZO step than theirs (unresumable)
            raise ValueError(
                f"train() without resume_from_checkpoint on a ZOTrainer whose ZO optimizer is at "
                f"step {self.zo_optimizer.zo_state['step']} (train() ran before): build a new "
                "ZOTrainer for a new run (the model keeps its weights), or resume from one of "
                "this run's checkpoints")
        with merged_at_exit(lambda: self.zo_optimizer):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """One ZO step on `inputs`; returns its loss (detached). num_items_in_batch (transformers
        >= 4.46) is not used: each probe's loss is the batch mean."""
        model.eval()
        inputs = self._prepare_inputs(inputs)
        if self.args.zo_optimizer == "pseuzo":
            unwrapped = self.accelerator.unwrap_model(model)
            if not self._split_checked:  # once: the split's logits against the model's own
                check_causal_lm_split(unwrapped, inputs)
                self._split_checked = True
            loss = self.zo_optimizer.step(*pseuzo_causal_lm(unwrapped, inputs))
        else:
            def closure() -> torch.Tensor:
                with self.compute_loss_context_manager():
                    # a copy: compute_loss may pop the labels, and the closure runs 2+ times
                    return self.compute_loss(model, dict(inputs))
            loss = self.zo_optimizer.step(closure)
        return loss.detach().to(self.args.device)

    # -- checkpoints ------------------------------------------------------------------------------
    def _check_checkpoint(self, checkpoint: str) -> int:
        """The ZO step a resume from `checkpoint` continues at, or ValueError naming it. Every
        file the stock Trainer will load is read and checked here, before it loads the first
        (the model's weights, then the optimizer, the scheduler and the RNG states: a file
        refused after the weights were loaded would leave the model changed):
        - optimizer.pt and scheduler.pt must exist (the stock Trainer would silently restart the
          ZO optimizer at step 0, reusing the seeds of steps already taken, and the schedule);
        - the saved ZO state must validate against this run's optimizer (its options), without
          being adopted yet, and its step counter must equal trainer_state.json's global step
          (one ZO step per global step: the files are of one checkpoint);
        - scheduler.pt must hold one finite lr >= 0 per param group (base_lrs, _last_lr,
          min_lrs) and load into a scheduler of this run's lr_scheduler_type; the RNG state
          file (when present) must hold states Python, numpy and torch accept;
        - the weights files (model.safetensors, pytorch_model.bin, or their sharded indexes)
          must be readable and hold this model's shape for every tensor name both have."""
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

        where = f"resume_from_checkpoint={checkpoint!r}"
        for name in (OPTIMIZER_NAME, SCHEDULER_NAME):
            if not os.path.isfile(os.path.join(checkpoint, name)):
                raise ValueError(
                    f"{where}: the checkpoint has no {name} (saved with save_only_model=True, "
                    "or removed): ZOTrainer cannot resume without the ZO optimizer's state (its "
                    "step counter seeds the noise) and the scheduler's; resume from a full "
                    "checkpoint, or load the weights into the model and start a new run")
        state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
        try:
            global_step = (transformers.TrainerState.load_from_json(state_file).global_step
                           if os.path.isfile(state_file) else 0)  # as the stock Trainer reads it
        except Exception as exc:
            raise ValueError(f"{where}: its {TRAINER_STATE_NAME} cannot be read "
                             f"({type(exc).__name__}: {exc})") from exc
        _integer(global_step, f"{where}: its {TRAINER_STATE_NAME} global_step", 0)
        saved = _read(os.path.join(checkpoint, OPTIMIZER_NAME), where)
        zo_state = saved.get("zo_state") if isinstance(saved, dict) else None
        step = zo_state.get("step") if isinstance(zo_state, dict) else None
        try:
            step = as_int(step, "step")  # a one-element integer tensor: the number it holds
        except TypeError:
            pass  # not an integer: refused below
        if not isinstance(step, int) or step != global_step:
            raise ValueError(
                f"{where}: its {OPTIMIZER_NAME} holds ZO step {step!r} but its "
                f"{TRAINER_STATE_NAME} global step {global_step} (one ZO step per global "
                f"step): the files are not of one checkpoint, or {OPTIMIZER_NAME} is not a "
                "zokernels optimizer's state")
        if self.zo_optimizer is not None:
            # its options against this run's, validated only: the Trainer loads it later
            try:
                self.zo_optimizer.check_state_dict(saved)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        groups = None if self.zo_optimizer is None else len(self.zo_optimizer.param_groups)
        scheduler_state = _read(os.path.join(checkpoint, SCHEDULER_NAME), where)
        _check_scheduler_state(scheduler_state, f"{where}: its {SCHEDULER_NAME}", groups)
        self._check_scheduler_class(scheduler_state, f"{where}: its {SCHEDULER_NAME}")
        self._check_rng_file(checkpoint, where)
        if self.model is not None:
            _check_weight_files(self.accelerator.unwrap_model(self.model), checkpoint, where)
        return global_step

    def _check_scheduler_class(self, state: dict, what: str) -> None:
        """ValueError unless `state` loads into a scheduler of the kind this run builds (a
        throwaway one, as the stock create_scheduler builds it, over a throwaway optimizer with
        the ZO optimizer's groups): a state of another class (a reduce_lr_on_plateau checkpoint
        resumed with lr_scheduler_type='linear') failed in the stock loader after the weights
        and the ZO state were loaded. Skipped when create_scheduler is overridden."""
        import copy

        if (self.zo_optimizer is None
                or type(self).create_scheduler is not transformers.Trainer.create_scheduler):
            return
        steps = self.args.max_steps if self.args.max_steps > 0 else 1  # only a state is loaded
        stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)],
                                     "lr": group["lr"]}
                                    for group in self.zo_optimizer.param_groups])
        try:
            scheduler = transformers.get_scheduler(
                self.args.lr_scheduler_type, optimizer=stand_in,
                num_warmup_steps=self.args.get_warmup_steps(steps), num_training_steps=steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        except Exception:
            return  # the run cannot build it either: the stock Trainer raises, before loading
        try:
            scheduler.load_state_dict(copy.deepcopy(state))
            # and steps: load_state_dict takes any values (a str last_epoch failed at the
            # Trainer's first step, after a ZO step had been applied); ReduceLROnPlateau steps
            # on a metric the Trainer passes after an evaluation, its state checked above
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                    scheduler.step()
                lrs = scheduler.get_last_lr()
                if not all(is_finite_number(lr) for lr in lrs):
                    raise ValueError(f"its learning rates after a step are {lrs}")
        except Exception as exc:
            kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
            raise ValueError(f"{what} does not load into this run's {type(scheduler).__name__} "
                             f"(lr_scheduler_type={kind!r}; {type(exc).__name__}: {exc}): "
                             "resume with the checkpoint's lr_scheduler_type") from exc

    def _check_rng_file(self, checkpoint: str, where: str) -> None:
        """The RNG state file the stock Trainer will read (rng_state.pth, or rng_state_{rank}.pth
        with several processes), if present: readable, and its Python, numpy and CPU torch
        states accepted by throwaway generators (the stock loader sets the global ones)."""
        import random

        import numpy as np

        name = ("rng_state.pth" if self.args.world_size <= 1
                else f"rng_state_{self.args.process_index}.pth")
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return  # the stock Trainer warns and goes on
        with _numpy_safe_globals():
            state = _read(path, where)
        try:
            if not isinstance(state, dict):
                raise TypeError(f"a {type(state).__name__}, not a dict")
            random.Random().setstate(state["python"])
            np.random.RandomState().set_state(state["numpy"])
            torch.Generator().set_state(state["cpu"])
        except Exception as exc:
            raise ValueError(f"{where}: its {name} is not an RNG state the Trainer can restore "
                             f"({type(exc).__name__}: {exc})") from exc

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """The stock loading, then a check that it did load the state _check_checkpoint read
        (a ZO optimizer left at another step would reuse or skip seeds)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        expected = self._resume_step
        if checkpoint is not None and expected is not None:
            step = self.zo_optimizer.zo_state["step"]
            if step != expected:
                raise RuntimeError(f"resume_from_checkpoint={checkpoint!r}: the ZO optimizer is "
                                   f"at step {step} after loading, not {expected}")

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        """The stock method with numpy's array types allowed in torch.load: transformers 4.46
        loads rng_state.pth with torch.load's default, which torch >= 2.6 made weights_only, and
        the file holds numpy's RNG state (its resume fails without this; later releases allow
        the types themselves, and the allowance is then harmless)."""
        with _numpy_safe_globals():
            super()._load_rng_state(checkpoint)

    # -- logging ----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs get steps_per_second, zo_skipped_steps and zo_undo_overflows."""
        if "loss" in logs and self.zo_optimizer is not None:
            logs.pop("grad_norm", None)  # the Trainer's norm of gradients that do not exist
            now, step = time.perf_counter(), self.state.global_step
            if self._clock.mark is not None:
                then, before = self._clock.mark
                if step > before and now > then:
                    logs["steps_per_second"] = round((step - before) / (now - then), 3)
            self._clock.mark = (now, step)
            logs["zo_skipped_steps"] = self.zo_optimizer.zo_state["skipped_steps"]
            logs["zo_undo_overflows"] = self.zo_optimizer.zo_state["undo_overflows"]
        super().log(logs, *args, **kwargs)
