"""Does a trainer follow MeZO's `large_models/trainer.py` protocol? Read from the names its methods'
code objects reference (nested functions included); nothing is run.

MeZO's protocol: zo_step sets named_parameters_to_optim and zo_random_seed and moves the weights
only through zo_perturb_parameters (+1, -2, +1), computing projected_grad from the two losses;
zo_perturb_parameters and zo_update draw z with torch.manual_seed + torch.normal per parameter;
zo_update applies theta -= lr * (projected_grad * z + weight_decay * theta) and steps the
scheduler; no other method draws noise for the weights.
"""

from __future__ import annotations

import inspect
import types
from typing import Any


class MeZOProtocolError(RuntimeError):
    """The patched trainer does something patch_mezo_trainer cannot serve (found when patching,
    or while running); the message says what was found."""


# What MeZO's methods reference, plus names that change nothing (context managers, builtins,
# logging).
_BENIGN = frozenset({"no_grad", "inference_mode", "range", "len", "enumerate", "zip", "print",
                     "float", "int", "isinstance", "logger", "logging", "info", "debug",
                     "warning"})
_MEZO_PERTURB = frozenset({"torch", "manual_seed", "zo_random_seed", "named_parameters_to_optim",
                           "normal", "data", "size", "device", "dtype", "args", "zo_eps"})
_MEZO_UPDATE = (_MEZO_PERTURB - {"zo_eps"}) | {"_get_learning_rate", "projected_grad",
                                               "weight_decay", "lr_scheduler", "step"}
_UPDATE_USES = ("named_parameters_to_optim", "projected_grad")
# Random draws (torch / numpy spellings): a method using one draws noise. randint is also how
# MeZO's zo_step draws its seed (np.random.randint), so zo_step may use it.
_NOISE = frozenset({"normal", "normal_", "randn", "randn_like", "rand", "rand_like", "randint",
                    "randint_like", "bernoulli", "bernoulli_", "multinomial", "standard_normal"})
_STEP_WRITES = frozenset({"manual_seed", "optimizer", "grad", "data", "add_", "sub_", "copy_",
                          "mul_"})
PROTOCOL_METHODS = ("zo_perturb_parameters", "zo_update", "zo_step")


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _code(obj: Any) -> types.CodeType | None:
    func = getattr(obj, "__func__", obj)  # bound method, staticmethod, classmethod
    try:
        func = inspect.unwrap(func)  # decorators with functools.wraps (torch.no_grad())
    except ValueError:
        pass
    return getattr(func, "__code__", None)


def _own_methods(trainer: Any) -> dict[str, types.CodeType]:
    """The code of each method the trainer's classes define (the most derived definition), the
    transformers / torch base classes and object left out."""
    methods: dict[str, types.CodeType] = {}
    for cls in type(trainer).__mro__:
        if cls is object or cls.__module__.split(".")[0] in ("transformers", "torch"):
            continue
        for name, value in vars(cls).items():
            code = _code(value) if callable(getattr(value, "__func__", value)) else None
            if code is not None and name not in methods:
                methods[name] = code
    return methods


def protocol_findings(trainer: Any) -> list[str]:
    """What in the trainer's code departs from MeZO's protocol, one sentence each (empty: the
    trainer looks like MeZO's; tests/test_compat.py checks stand-ins written like MeZO's,
    ZO-Bench's and PseuZO's reference trainers, and MeZO variants). The methods are read as the trainer's class defines them:
    methods set on the instance (another wrapper's) are not inspected."""
    findings: list[str] = []
    methods = _own_methods(trainer)
    codes: dict[str, types.CodeType | None] = {}
    for name in PROTOCOL_METHODS:  # as the class defines them (not another wrapper's)
        attr = inspect.getattr_static(type(trainer), name, None)
        codes[name] = None if attr is None else _code(attr)
        if attr is not None and codes[name] is None:
            findings.append(f"{name} has no Python code to inspect ({type(attr).__name__})")
    # helpers that draw noise without touching the weights (PseuZO's Random_noise): calling
    # one is drawing noise
    helpers = {name for name, code in methods.items()
               if name not in PROTOCOL_METHODS and _names(code) & _NOISE
               and "named_parameters_to_optim" not in _names(code)}
    noise = _NOISE | helpers
    for name, allowed in (("zo_perturb_parameters", _MEZO_PERTURB), ("zo_update", _MEZO_UPDATE)):
        if codes[name] is None:
            continue
        used = _names(codes[name])
        extra = sorted(used - allowed - _BENIGN)
        if extra:
            findings.append(f"{name} references names MeZO's does not ({', '.join(extra)}): "
                            "semantics the patch would drop (masks, scaled or other noise, "
                            "momentum / window state, another learning rate)")
        if name == "zo_update" and not any(n in used for n in _UPDATE_USES):
            findings.append("zo_update does not update the weights (it never uses "
                            "named_parameters_to_optim or projected_grad): patched, it would add "
                            "an update the trainer does not make")
    if codes["zo_step"] is not None:
        writes = sorted(_names(codes["zo_step"]) & ((noise - {"randint"}) | _STEP_WRITES))
        if writes:
            findings.append(f"zo_step draws noise, steps an optimizer or writes the weights "
                            f"itself ({', '.join(writes)}): its z is not the patch's and its "
                            "update would come on top of zo_update's")
    others = sorted(name for name, code in methods.items()
                    if name not in PROTOCOL_METHODS
                    and "named_parameters_to_optim" in _names(code) and _names(code) & noise)
    if others:
        findings.append(f"other methods draw noise for named_parameters_to_optim "
                        f"({', '.join(others)}): the trainer perturbs or updates the weights in "
                        "code the patch never sees")
    return findings


def check_protocol(trainer: Any) -> None:
    """MeZOProtocolError listing the findings, if any."""
    findings = protocol_findings(trainer)
    if findings:
        lines = "\n".join(f"  - {f}" for f in findings)
        raise MeZOProtocolError(
            f"patch_mezo_trainer: {type(trainer).__qualname__} does not follow MeZO's "
            f"zo_step / zo_perturb_parameters / zo_update protocol, so the patch cannot serve "
            f"it:\n{lines}\nUse zokernels.optim (MeZO, LeZO, TeZO, PseuZO) or ParameterSpace "
            "for such trainers; check_protocol=False skips this check for a trainer known to "
            "follow the protocol (the run-time checks stay).")
