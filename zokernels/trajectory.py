"""Trajectory: what a ZO optimizer applied, step by step, to rebuild the fine-tuned weights.

A ZO update is a handful of scalars per step (seeds, coefficients, a decay factor, the chosen
layers), so a whole fine-tune fits in a few bytes per step: a 20,000-step MeZO run saves to
about 400 KB. `Trajectory.load(path).replay(params)` applies the recorded updates, in order, to
the initial weights, on any backend: replaying on the backend and device of the run gives the
run's weights bit for bit (the optimizers update from the exact unperturbed weights, see
docs/undo-log.md); another backend matches within float32 rounding of the noise (a few ulp per
step).

Format (torch.save of plain tensors, lists and numbers; loads with weights_only=True):
    version, algorithm, meta (base_seed, dist, groups: param_names / numel / keys, ...),
    step int64 [S], n_seeds int16 [S], seeds int64 [sum n_seeds] (uint64 bit patterns; absent
    when every seed is derived from (base_seed, step, k)), coefs float32 [sum n_seeds, G],
    decays float32 [S, G], n_layers int16 [S] (-1: all), layers int16 [sum n_layers],
    extra: per-algorithm float32 columns (e.g. TeZO's projected gradients).

Loading is bounded by the file (docs/threat-model.md): every field is checked before a record is
built (types, shapes, finite values, counter ranges), each step holds at most
MAX_SEEDS_PER_STEP seeds, and every tensor must hold its values in its own storage (a stride-0
view of a few bytes cannot declare millions of seeds), so the work of a load, derived seeds
included, grows with the file's size.
"""

from __future__ import annotations

import copy
import importlib
import math
import numbers
import os
import zipfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import torch

from ._contract import PERTURB_DISTS, ROUNDINGS, as_contract, saved_contract
from ._seeds import step_seed
from ._validate import (
    StorageBudget,
    as_int,
    as_key,
    as_seed,
    as_seed_list,
    check_addressable,
    check_nesting,
    check_numbers,
    fits_float32,
    float32_value,
)

FORMAT_VERSION = 1
# Seeds one step may hold (MeZO's n_spsa, PseuZO's window): the optimizers refuse more, and a
# loaded trajectory declaring more is refused (its seeds are derived on load).
MAX_SEEDS_PER_STEP = 1024
COUNTER_LIMIT = 1 << 63  # steps and counters are int64 in the saved format
LAYER_LIMIT = 1 << 15  # layer indices and counts are int16 in the saved format
_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# How each algorithm replays: "seeded" (every record is theta = decay * theta + sum_k c_k z_k:
# MeZO, LeZO, PseuZO) or the module of a dedicated replayer with its replay function and the
# function that checks what the replay reads (before anything is applied). Looked up by name when
# a replay needs it, so a replay never depends on what was imported before; an algorithm in
# neither this table nor register_replayer's is refused.
_BUILTIN_REPLAYERS: dict[str, str | tuple[str, str, str]] = {
    "mezo": "seeded", "lezo": "seeded", "pseuzo": "seeded",
    "tezo": ("zokernels.optim.tezo", "_replay_tezo", "_check_tezo_replay"),
}
# Extra columns a replay reads, per param group g: f"{prefix}{g}" (checked before replaying).
_REQUIRED_COLUMNS = {"tezo": ("grad", "lr")}
_REPLAYERS: dict[str, Any] = {}


def register_replayer(algorithm: str, replayer: Any) -> None:
    """`replayer(trajectory, spaces, backend)` rebuilds the weights for `algorithm`: for
    algorithms outside zokernels (the built-in ones are found by name, whatever was imported)."""
    if algorithm in _BUILTIN_REPLAYERS:
        raise ValueError(f"{algorithm!r} is a built-in algorithm; its replayer is fixed")
    _REPLAYERS[algorithm] = replayer


def _replayer(algorithm: str) -> tuple[Any, Any]:
    """(replayer, checker) of `algorithm` ((None, None): plain seeded updates); ValueError if
    unknown."""
    entry = _BUILTIN_REPLAYERS.get(algorithm)
    if entry == "seeded":
        return None, None
    if entry is not None:
        module = importlib.import_module(entry[0])
        return getattr(module, entry[1]), getattr(module, entry[2])
    if algorithm in _REPLAYERS:
        return _REPLAYERS[algorithm], None
    raise ValueError(f"cannot replay a trajectory of algorithm {algorithm!r}: not a zokernels "
                     f"algorithm ({sorted(_BUILTIN_REPLAYERS)}) nor one registered with "
                     "register_replayer")


def _as_int64_bits(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


class Trajectory:
    """The updates an optimizer applied; see the module docstring.

    record() accepts the coefficients (and decays, extra values) as device tensors and never
    synchronizes with the device: they are kept pending and moved to the host together, one
    transfer per device, every FLUSH_EVERY records and whenever the records are read
    (records(), extra, state_dict(), save(), nbytes)."""

    FLUSH_EVERY = 256

    def __init__(self, algorithm: str, meta: dict[str, Any]) -> None:
        self.algorithm = algorithm
        self.meta = meta
        self._steps: list[int] = []
        self._seeds: list[list[int]] = []
        self._coefs: list[list[Any]] = []  # [step][group] -> [k] floats (or a pending tensor)
        self._decays: list[Any] = []  # [step] -> [group] floats (or a pending tensor)
        self._layers: list[list[int] | None] = []
        self._extra: dict[str, list[Any]] = {}
        # (container, index, tensor, scalar): container[index] becomes the tensor's values
        self._pending: list[tuple[list, int, torch.Tensor, bool]] = []
        self._pending_records = 0

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def extra(self) -> dict[str, list[float]]:
        """Per-algorithm columns (e.g. TeZO's projected gradients): name -> one float per
        record."""
        self._flush()
        return self._extra

    def _defer(self, container: list, index: int, value: torch.Tensor, scalar: bool) -> None:
        # a private float32 copy on the value's device: no host sync, and the caller may reuse
        # or modify its tensor afterwards
        self._pending.append((container, index, value.detach().to(torch.float32).clone(), scalar))

    def record(self, step: int, seeds: Sequence[int], coefs: Sequence[Any], decays: Any,
               layers: Sequence[int] | None = None, **extra: Any) -> None:
        """One applied update: per param group g, theta = decays[g] * theta +
        sum_k coefs[g][k] * z(seeds[k]) over the selected layers (None: all).

        coefs: per group a 1-D tensor of len(seeds) (any device) or a sequence of numbers;
        decays: a 1-D tensor or a sequence of numbers, one per group; extra: numbers or
        one-element tensors. Tensors are not read here (no host synchronization); everything
        else is checked as a load checks it (ValueError), so that what is recorded saves and
        loads: a step in [0, 2^63) above the last one, seeds in [0, 2^64), numbers finite in
        float32, layer indices in [0, 2^15)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not (
                0 <= step < COUNTER_LIMIT):
            raise ValueError(f"record: step must be an integer in [0, 2^63), got {step!r}")
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"record: step {step} is not above the last recorded step "
                             f"{self._steps[-1]}")
        try:
            seeds = as_seed_list(list(seeds))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"record: {exc}") from None
        if not 1 <= len(seeds) <= MAX_SEEDS_PER_STEP:
            raise ValueError(f"record: {len(seeds)} seeds; a step holds 1 to "
                             f"{MAX_SEEDS_PER_STEP}")
        if isinstance(decays, torch.Tensor) and decays.dim() != 1:
            raise ValueError(f"record: decays must be a 1-D tensor (one decay per group), got "
                             f"shape {tuple(decays.shape)}")
        if not isinstance(decays, (torch.Tensor, list, tuple)):
            raise ValueError(f"record: decays must be a list or a 1-D tensor of one decay per "
                             f"group, got {type(decays).__name__}")
        if len(decays) != len(coefs):
            raise ValueError(f"record: {len(coefs)} coefficient groups but {len(decays)} decays")
        if self._steps and set(extra) != set(self._extra):
            raise ValueError(f"record: extra columns {sorted(extra)} differ from the earlier "
                             f"records' {sorted(self._extra)} (every record holds the same)")
        row: list[Any] = []
        deferred: list[tuple[int, torch.Tensor]] = []
        for g, group in enumerate(coefs):
            if isinstance(group, torch.Tensor):
                if group.dim() != 1 or group.numel() != len(seeds):
                    raise ValueError(f"record: coefs[{g}] must be a 1-D tensor of {len(seeds)} "
                                     f"(one per seed), got shape {tuple(group.shape)}")
                row.append(None)
                deferred.append((g, group))
            else:
                values = [_recorded_number(c, f"coefs[{g}][{k}]") for k, c in enumerate(group)]
                if len(values) != len(seeds):
                    raise ValueError(f"record: coefs[{g}] must hold {len(seeds)} coefficients "
                                     f"(one per seed), got {len(values)}")
                row.append(values)
        if not isinstance(decays, torch.Tensor):
            decays = [_recorded_number(d, f"decays[{g}]") for g, d in enumerate(decays)]
        for name, value in extra.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"record: {name} must be a number or a one-element tensor, "
                                     f"got shape {tuple(value.shape)}")
            else:
                extra[name] = _recorded_number(value, name)
        if layers is not None:
            try:
                layers = [as_int(x, "layers") for x in layers]
            except TypeError as exc:
                raise TypeError(f"record: {exc}") from None
            if any(not 0 <= x < LAYER_LIMIT for x in layers) or len(layers) >= LAYER_LIMIT:
                raise ValueError(f"record: layers must hold fewer than 2^15 indices in "
                                 f"[0, 2^15) (saved as int16), got {layers[:8]}...")
        for where, tensor in [(f"coefs[{g}]", t) for g, t in deferred] + (
                [("decays", decays)] if isinstance(decays, torch.Tensor) else []) + [
                (name, v) for name, v in extra.items() if isinstance(v, torch.Tensor)]:
            check_recordable_tensor(tensor, f"record: {where}")
        # validated: append
        self._steps.append(int(step))
        self._seeds.append(seeds)
        self._coefs.append(row)
        for g, tensor in deferred:
            self._defer(row, g, tensor, scalar=False)
        if isinstance(decays, torch.Tensor):
            self._decays.append(None)
            self._defer(self._decays, len(self._decays) - 1, decays.reshape(-1), scalar=False)
        else:
            self._decays.append(decays)
        self._layers.append(layers)
        for name, value in extra.items():
            column = self._extra.setdefault(name, [])
            column.append(None)
            if isinstance(value, torch.Tensor):
                self._defer(column, len(column) - 1, value.reshape(1), scalar=True)
            else:
                column[-1] = value
        if self._pending:
            self._pending_records += 1
            if self._pending_records >= self.FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        """Move the pending tensors to the host: one concatenation and one transfer per
        device."""
        if not self._pending:
            return
        by_device: dict[torch.device, list] = {}
        for entry in self._pending:
            by_device.setdefault(entry[2].device, []).append(entry)
        for entries in by_device.values():
            flat = torch.cat([tensor.reshape(-1) for _, _, tensor, _ in entries])
            values = flat.to("cpu").tolist()
            at = 0
            for container, index, tensor, scalar in entries:
                n = tensor.numel()
                container[index] = values[at] if scalar else values[at:at + n]
                at += n
        self._pending.clear()
        self._pending_records = 0

    def records(self):
        """(step, seeds, coefs per group, decays per group, layers) per recorded update, with
        Python floats."""
        self._flush()
        return zip(self._steps, self._seeds, self._coefs, self._decays, self._layers)

    # -- serialization --------------------------------------------------------------------------
    def last_step(self) -> int | None:
        """The step of the last record (None when empty)."""
        return self._steps[-1] if self._steps else None

    def _seeds_derived(self) -> bool:
        base = self.meta.get("base_seed")
        if type(base) is not int or self.meta.get("derived_seeds") is False:
            return False
        return all(seed == step_seed(base, step, k)
                   for step, seeds in zip(self._steps, self._seeds)
                   for k, seed in enumerate(seeds))

    def state_dict(self) -> dict[str, Any]:
        """The saved format (module docstring); meta is copied. ValueError naming the first
        record holding a value a load would refuse (a recorded tensor's values are read only
        here and by replay's check)."""
        self._flush()
        for i, (coefs, decays) in enumerate(zip(self._coefs, self._decays)):
            values = [(f"coefs[{g}][{k}]", c) for g, group in enumerate(coefs)
                      for k, c in enumerate(group)]
            values += [(f"decays[{g}]", d) for g, d in enumerate(decays)]
            values += [(name, column[i]) for name, column in self._extra.items()]
            bad = next(((name, v) for name, v in values if not fits_float32(v)), None)
            if bad is not None:
                raise ValueError(f"trajectory record {i} (step {self._steps[i]}) {bad[0]} is "
                                 f"{bad[1]!r}, not finite in float32: it cannot be saved")
        groups = len(self.meta.get("groups", [])) or (len(self._coefs[0]) if self._coefs else 1)
        derived = self._seeds_derived()
        flat_coefs = [[group[k] for group in coefs] for coefs, seeds in
                      zip(self._coefs, self._seeds) for k in range(len(seeds))]
        return {
            "version": FORMAT_VERSION,
            "algorithm": self.algorithm,
            "meta": copy.deepcopy(self.meta),
            "step": torch.tensor(self._steps, dtype=torch.int64),
            "n_seeds": torch.tensor([len(s) for s in self._seeds], dtype=torch.int16),
            "seeds": None if derived else torch.tensor(
                [_as_int64_bits(s) for seeds in self._seeds for s in seeds], dtype=torch.int64),
            "coefs": torch.tensor(flat_coefs, dtype=torch.float32).reshape(-1, groups),
            "decays": torch.tensor(self._decays, dtype=torch.float32).reshape(-1, groups),
            "n_layers": torch.tensor([-1 if l is None else len(l) for l in self._layers],
                                     dtype=torch.int16),
            "layers": torch.tensor([x for l in self._layers if l is not None for x in l],
                                   dtype=torch.int16),
            "extra": {k: torch.tensor(v, dtype=torch.float32) for k, v in self._extra.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Trajectory":
        """Parse a saved trajectory, checking all of it first (ValueError naming the field):
        see the module docstring for the bounds."""
        parsed = _checked_state(state)
        self = cls(parsed["algorithm"], copy.deepcopy(parsed["meta"]))
        if "base_seed" in self.meta:  # checked: kept as the int it reads (not a tensor's text)
            self.meta["base_seed"] = as_seed(self.meta["base_seed"], "base_seed")
        steps, counts = parsed["step"], parsed["n_seeds"]
        coefs, decays = parsed["coefs"], parsed["decays"]
        n_layers, layers, seeds = parsed["n_layers"], parsed["layers"], parsed["seeds"]
        at = at_layer = 0
        for i, step in enumerate(steps):
            k = counts[i]
            if seeds is None:
                step_seeds = [step_seed(self.meta["base_seed"], step, j) for j in range(k)]
            else:
                step_seeds = seeds[at:at + k]
            rows = coefs[at:at + k]
            per_group = [[row[g] for row in rows] for g in range(len(decays[i]))]
            chosen = None
            if n_layers[i] >= 0:
                chosen = layers[at_layer:at_layer + n_layers[i]]
                at_layer += n_layers[i]
            self._steps.append(step)
            self._seeds.append(step_seeds)
            self._coefs.append(per_group)
            self._decays.append(decays[i])
            self._layers.append(chosen)
            at += k
        self._extra = parsed["extra"]
        return self

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike | BinaryIO) -> "Trajectory":
        """A saved trajectory (a path or a seekable binary file), checked whole before use
        (ValueError; OSError when the file cannot be opened; TypeError for another object):
        torch.load does not test the CRC-32 of torch.save's zip members, so a damaged byte in
        a coefficient would replay other weights silently; the members are tested first, and
        a compressed member (torch.save writes none) is refused. What holds no checksums
        cannot be tested and loads as torch.load reads it: a file saved with
        torch.serialization.set_crc32_options(False), and one in torch's legacy (non-zip)
        format (_use_new_zipfile_serialization=False)."""
        if isinstance(path, (str, bytes, os.PathLike)):
            with open(path, "rb") as f:
                return cls._load_file(f, repr(os.fsdecode(path)))
        if not all(callable(getattr(path, name, None)) for name in ("read", "seek", "tell")):
            raise TypeError(f"Trajectory.load: path must be a path or a seekable binary file, "
                            f"got {type(path).__name__}")
        return cls._load_file(path, "")

    @classmethod
    def _load_file(cls, f: BinaryIO, name: str) -> "Trajectory":
        where = f"trajectory file {name}".rstrip()
        start = f.tell()
        # a zip as torch.load tells one (its first bytes; zipfile.is_zipfile looks for an end
        # record anywhere near the end, which a legacy file's data may contain)
        if f.read(4) == b"PK\x03\x04":
            f.seek(start)
            try:
                _check_members(f)
            except Exception as exc:  # zipfile, zlib, struct errors on a damaged file
                raise ValueError(f"{where} is damaged: {exc}") from exc
        f.seek(start)
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler's errors on a file it cannot read
            raise ValueError(f"{where} could not be read: {exc}") from exc
        return cls.from_state_dict(state)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors a save writes (the file adds a few KB of container)."""
        state = self.state_dict()
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += list(state["extra"].values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- replay ---------------------------------------------------------------------------------
    def _named_params(self, params: Any) -> list[tuple[str, torch.Tensor]]:
        """`params` as (name, tensor) pairs carrying the recorded names where they were given
        in the recorded order (plain tensors), else as given (a module, or pairs)."""
        groups = self.meta["groups"]
        recorded = [name for group in groups for name in group["param_names"]]
        named_run = all(group.get("named", True) for group in groups)
        if isinstance(params, torch.nn.Module):
            if not named_run:
                raise ValueError(
                    "replay: the run was recorded from unnamed tensors (e.g. "
                    "MeZO(model.parameters())), so a module's names cannot be matched; pass "
                    "list(model.parameters()) (the tensors in the order the optimizer got them)")
            return list(params.named_parameters())
        if isinstance(params, torch.Tensor) or not hasattr(params, "__iter__"):
            raise TypeError("replay: params must be a module, (name, tensor) pairs, or tensors "
                            f"in the recorded order, got {type(params).__name__}")
        items = list(params)
        pairs = [isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                 and isinstance(item[1], torch.Tensor) for item in items]
        if items and all(pairs):
            return items
        if any(pairs) or not all(isinstance(item, torch.Tensor) for item in items):
            raise TypeError("replay: params must be all (name, tensor) pairs or all tensors")
        # plain tensors: as the optimizer took them (frozen nn.Parameters skipped), in order
        tensors = [t for t in items
                   if not (isinstance(t, torch.nn.Parameter) and not t.requires_grad)]
        if len(tensors) != len(recorded):
            raise ValueError(f"replay: got {len(tensors)} trainable tensors, the run recorded "
                             f"{len(recorded)} (plain tensors are matched by position)")
        return list(zip(recorded, tensors))

    def spaces_for(self, params: Any, backend: str = "auto"):
        """ParameterSpaces over `params` matching the recorded param groups.

        params: what the optimizer accepted: an nn.Module or (name, tensor) pairs when the run
        recorded names, or the tensors themselves in the recorded order (frozen nn.Parameters
        skipped, as the optimizers do). Recorded names are matched to the given ones through
        canonical_name (wrapper components such as `module.` dropped), so a run recorded on a
        DDP-wrapped model replays on the bare model and vice versa. The spaces carry the
        recorded names and keys. ValueError: a recorded parameter missing or of another size,
        or a canonical name shared by two given parameters (ambiguous)."""
        from .space import ParameterSpace, canonical_name, check_disjoint_spaces

        named = self._named_params(params)
        by_canonical: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in named:
            by_canonical.setdefault(canonical_name(name), []).append((name, tensor))
        spaces = []
        for g, group in enumerate(self.meta["groups"]):
            tensors, missing = [], []
            for name in group["param_names"]:
                matches = by_canonical.get(canonical_name(name), [])
                if len(matches) > 1:
                    raise ValueError(f"replay: recorded parameter {name!r} matches "
                                     f"{[n for n, _ in matches]} (one canonical name)")
                if matches:
                    tensors.append(matches[0][1])
                else:
                    missing.append(name)
            if missing:
                raise ValueError(f"replay: params lack {len(missing)} recorded parameter(s) of "
                                 f"group {g}, e.g. {missing[0]!r}")
            for name, tensor, numel in zip(group["param_names"], tensors, group["numel"]):
                if tensor.numel() != numel:
                    raise ValueError(f"replay: {name} has {tensor.numel()} elements, the run had "
                                     f"{numel}")
            space = ParameterSpace(list(zip(group["param_names"], tensors)),
                                   layers=group.get("layers"), keys=group["keys"],
                                   backend=backend, no_decay=self.meta.get("no_decay", ()),
                                   contract=saved_contract(self.meta))
            spaces.append(space)
        check_disjoint_spaces(spaces)  # a replay writes every group: none may share memory
        return spaces

    def check_records(self, spaces: Sequence[Any], seeds_per_step: tuple[int, int] = (
            1, MAX_SEEDS_PER_STEP)) -> None:
        """Every record checked against the spaces it will be applied to, before any is
        (ValueError naming the record): seeds valid and between seeds_per_step's bounds, one
        finite coefficient per seed and one finite decay per param group, layer choices valid
        for the spaces, the extra columns the replay reads complete and finite. A replay never
        stops half-way on a bad record, nor a resume adopt one."""
        extra = self.extra
        low, high = seeds_per_step
        for i, (step, seeds, coefs, decays, layers) in enumerate(self.records()):
            where = f"trajectory record {i} (step {step})"
            try:
                seed_list = as_seed_list(seeds)
                if not low <= len(seed_list) <= high:
                    raise ValueError(f"{len(seed_list)} seeds, expected {low}"
                                     + ("" if low == high else f" to {high}"))
                if len(coefs) != len(spaces) or len(decays) != len(spaces):
                    raise ValueError(f"{len(coefs)} coefficient groups and {len(decays)} decays "
                                     f"for {len(spaces)} param groups")
                check_numbers(decays, len(spaces), "decays")
                for g, space in enumerate(spaces):
                    check_numbers(coefs[g], len(seed_list), f"coefs[{g}]")
                    if layers is not None:
                        space.indices(layers)
                for prefix in _REQUIRED_COLUMNS.get(self.algorithm, ()):
                    missing = [f"{prefix}{g}" for g in range(len(spaces))
                               if f"{prefix}{g}" not in extra]
                    if missing:
                        raise ValueError(f"the replay needs the extra columns {missing}")
                for name, column in extra.items():
                    if len(column) != len(self) or not math.isfinite(column[i]):
                        raise ValueError(f"extra column {name!r} has no finite value here")
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {exc}") from None

    def replay(self, params: Any, *, backend: str = "auto") -> None:
        """Apply every recorded update, in order, in place to `params` (the initial weights):
        an nn.Module or (name, tensor) pairs with the recorded names, or the tensors in the
        recorded order (see spaces_for). Everything is checked first (the parameters, the
        algorithm, every record): a refusal leaves `params` untouched."""
        replayer, check = _replayer(self.algorithm)
        spaces = self.spaces_for(params, backend)
        self.check_records(spaces)
        if check is not None:
            check(self, spaces)
        if replayer is not None:
            replayer(self, spaces, backend)
            return
        dist, rounding = meta_dist(self.meta), self.meta.get("rounding", "nearest")
        for _, seeds, coefs, decays, layers in self.records():
            for g, space in enumerate(spaces):
                if float32_value(decays[g]) == 1.0 and all(c == 0 for c in coefs[g]):
                    continue  # as the run: a pass adding only +-0 would turn -0.0 into +0.0
                space.update(seeds, coefs[g], decay=decays[g], layers=layers, dist=dist,
                             rounding=rounding)


# -- checks of a saved trajectory ------------------------------------------------------------------

def check_recordable_tensor(tensor: torch.Tensor, where: str) -> None:
    """A tensor record() keeps for its next flush: real (float or integer) values that a flush
    can read (dense, not meta), else ValueError naming it. Its values are checked finite when
    they are read (_flush: no host synchronization here)."""
    if (tensor.device.type == "meta" or tensor.layout != torch.strided or tensor.is_complex()
            or tensor.dtype == torch.bool):
        raise ValueError(f"{where} must be a dense real tensor with values, got {tensor.dtype} "
                         f"({tensor.layout}) on {tensor.device}")


def _recorded_number(value: Any, name: str) -> float:
    """A number record() keeps, as a float finite in float32 (the saved format's), else
    ValueError naming it."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"record: {name} must be a number, got {type(value).__name__}") from None
    if not fits_float32(number):
        raise ValueError(f"record: {name} must be finite in float32, got {value!r}")
    return number


def _field(state: dict[str, Any], name: str, dim: int, integer: bool, rows: int | None,
           width: int | None = None, *, budget: StorageBudget) -> list:
    """A tensor field as a list, checked: an integer (or float32) tensor of `dim` dims and `rows`
    rows (`width` columns), with real storage holding every value (no stride-0 expansion), and
    finite when floating."""
    t = state.get(name)
    where = f"trajectory {name}"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(t).__name__}")
    if t.device.type == "meta" or t.layout != torch.strided:  # a sparse one has no data_ptr
        raise ValueError(f"{where} must be a dense tensor with values, got {t.layout} on "
                         f"{t.device}")
    try:
        check_addressable(t, where)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if t.dtype not in (_INTEGER_DTYPES if integer else (torch.float32,)):
        raise ValueError(f"{where} must be {'an integer' if integer else 'a float32'} tensor, "
                         f"got {t.dtype}")
    shape = (rows,) if width is None else (rows, width)
    if t.dim() != dim or (rows is not None and tuple(t.shape) != shape):
        raise ValueError(f"{where} must have shape {shape}, got {tuple(t.shape)}")
    budget.charge(t, where)  # the values are in the file, each once
    if not integer and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where} must hold finite values")
    return t.tolist()


def _check_members(f: BinaryIO) -> None:
    """Read every member of the zip `f`: zipfile raises BadZipFile on a CRC-32 mismatch at the
    end of a member. A member whose recorded CRC is 0 is skipped: torch.save writes 0 when
    told not to compute them (torch.serialization.set_crc32_options(False)), and an empty
    member's is 0."""
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            # torch.save stores its members: a compressed one was made by hand, and would read
            # up to ~1000x the file's size (the load's work is bounded by the file's size)
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {info.filename!r} is compressed (torch.save stores "
                                 "its members uncompressed)")
            if info.CRC == 0:
                continue
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass


def _strings(value: Any) -> bool:
    """Whether value is a list (or tuple) of strings."""
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def meta_dist(meta: dict[str, Any]) -> Any:
    """The noise distribution a trajectory's meta records (gaussian where it names none): the
    one reading of the field, for the load's check and every replay."""
    return meta.get("dist", "gaussian")


def _checked_meta(meta: Any, seeds_saved: bool) -> int:
    """The meta fields a load and a replay read; returns the number of param groups."""
    if not isinstance(meta, dict):
        raise ValueError(f"trajectory meta must be a dict, got {type(meta).__name__}")
    if "base_seed" in meta or not seeds_saved:
        try:
            as_seed(meta.get("base_seed"), "base_seed")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"trajectory meta {exc}") from None
    if meta_dist(meta) not in PERTURB_DISTS:
        raise ValueError(f"trajectory meta dist must be one of {list(PERTURB_DISTS)}, got "
                         f"{meta.get('dist')!r}")
    if meta.get("rounding", "nearest") not in ROUNDINGS:
        raise ValueError(f"trajectory meta rounding must be one of {list(ROUNDINGS)}, got "
                         f"{meta.get('rounding')!r}")
    as_contract(saved_contract(meta), "trajectory meta contract")  # absent: v1 (before versions)
    if not _strings(meta.get("no_decay", [])):  # a string would be read letter by letter
        raise ValueError(f"trajectory meta no_decay must be a list of name substrings, got "
                         f"{meta.get('no_decay')!r}")
    groups = meta.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ValueError("trajectory meta groups must be a non-empty list (one per param group)")
    seen: set[str] = set()
    for g, group in enumerate(groups):
        where = f"trajectory meta groups[{g}]"
        if not isinstance(group, dict):
            raise ValueError(f"{where} must be a dict")
        names, numels, keys = (group.get(k) for k in ("param_names", "numel", "keys"))
        if not _strings(names):
            raise ValueError(f"{where} param_names must be a list of strings")
        # a name in two groups (or twice in one) names no parameter of a run; refused as it is
        # met, so that groups sharing one list (a file of a few KB) cost no more than it holds
        for name in names:
            if name in seen:
                raise ValueError(f"{where} param_names repeats {name!r}: a parameter belongs "
                                 "to one group")
            seen.add(name)
        if not isinstance(group.get("named", True), bool):
            raise ValueError(f"{where} named must be a bool, got {group.get('named')!r}")
        layers = group.get("layers")
        if layers is not None and not (isinstance(layers, (list, tuple))
                                       and all(_strings(layer) for layer in layers)):
            raise ValueError(f"{where} layers must be a list of lists of parameter names")
        for field, values in (("numel", numels), ("keys", keys)):
            if not isinstance(values, list) or len(values) != len(names):
                raise ValueError(f"{where} {field} must be a list of {len(names)} integers")
        if any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < COUNTER_LIMIT
               for n in numels):
            raise ValueError(f"{where} numel must hold integers in [0, 2^63)")
        try:
            [as_key(k, "key") for k in keys]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} keys: {exc}") from None
    return len(groups)


def _checked_state(state: Any) -> dict[str, Any]:
    """Every field of a saved trajectory checked, before any record is built; the tensors as
    lists. ValueError naming the field."""
    if not isinstance(state, dict):
        raise ValueError(f"a trajectory state must be a dict, got {type(state).__name__}")
    check_nesting(state, "trajectory")  # before anything walks or copies it (meta: deepcopy)
    version = state.get("version")
    if type(version) is not int or version != FORMAT_VERSION:  # (a tensor's == is elementwise)
        raise ValueError(f"unsupported trajectory format version {state.get('version')!r}")
    if not isinstance(state.get("algorithm"), str):
        raise ValueError("trajectory algorithm must be a string")
    groups = _checked_meta(state.get("meta"), state.get("seeds") is not None)
    budget = StorageBudget()
    steps = _field(state, "step", 1, True, None, budget=budget)
    count = len(steps)
    if any(not 0 <= b < COUNTER_LIMIT for b in steps) or any(
            a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError("trajectory step must hold increasing steps in [0, 2^63)")
    counts = _field(state, "n_seeds", 1, True, count, budget=budget)
    if any(not 1 <= k <= MAX_SEEDS_PER_STEP for k in counts):
        raise ValueError(f"trajectory n_seeds must be in [1, {MAX_SEEDS_PER_STEP}] per step")
    total = sum(counts)
    seeds = None
    if state.get("seeds") is not None:
        seeds = [s & ((1 << 64) - 1)
                 for s in _field(state, "seeds", 1, True, total, budget=budget)]
    coefs = _field(state, "coefs", 2, False, total, groups, budget=budget)
    decays = _field(state, "decays", 2, False, count, groups, budget=budget)
    n_layers = _field(state, "n_layers", 1, True, count, budget=budget)
    if any(not -1 <= n < LAYER_LIMIT for n in n_layers):  # what record() takes and save writes
        raise ValueError("trajectory n_layers must be -1 (all layers) or a count below 2^15")
    layers = _field(state, "layers", 1, True, sum(n for n in n_layers if n > 0), budget=budget)
    if any(not 0 <= x < LAYER_LIMIT for x in layers):
        raise ValueError("trajectory layers must hold layer indices in [0, 2^15)")
    extra = state.get("extra", {})
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ValueError("trajectory extra must be a dict of named columns")
    columns = {name: _field(extra, name, 1, False, count, budget=budget) for name in extra}
    return {"algorithm": state["algorithm"], "meta": state["meta"], "step": steps,
            "n_seeds": counts, "seeds": seeds, "coefs": coefs, "decays": decays,
            "n_layers": n_layers, "layers": layers, "extra": columns}
