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
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch

FORMAT_VERSION = 1
_REPLAYERS: dict[str, Any] = {}


def register_replayer(algorithm: str, replayer: Any) -> None:
    """`replayer(trajectory, spaces, backend)` rebuilds the weights for `algorithm` (algorithms
    whose updates are not plain seeded sums, e.g. TeZO's low-rank moments)."""
    _REPLAYERS[algorithm] = replayer


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
        one-element tensors. Tensors are not read here (no host synchronization)."""
        seeds = [int(s) for s in seeds]
        if len(decays) != len(coefs):
            raise ValueError(f"record: {len(coefs)} coefficient groups but {len(decays)} decays")
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
                values = [float(c) for c in group]
                if len(values) != len(seeds):
                    raise ValueError(f"record: coefs[{g}] must hold {len(seeds)} coefficients "
                                     f"(one per seed), got {len(values)}")
                row.append(values)
        for name, value in extra.items():
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"record: {name} must be a number or a one-element tensor, "
                                 f"got shape {tuple(value.shape)}")
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
            self._decays.append([float(d) for d in decays])
        self._layers.append(None if layers is None else [int(x) for x in layers])
        for name, value in extra.items():
            column = self._extra.setdefault(name, [])
            column.append(None)
            if isinstance(value, torch.Tensor):
                self._defer(column, len(column) - 1, value.reshape(1), scalar=True)
            else:
                column[-1] = float(value)
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
    def _seeds_derived(self) -> bool:
        from .optim._seeds import step_seed

        base = self.meta.get("base_seed")
        if base is None or self.meta.get("derived_seeds") is False:
            return False
        return all(seed == step_seed(base, step, k)
                   for step, seeds in zip(self._steps, self._seeds)
                   for k, seed in enumerate(seeds))

    def state_dict(self) -> dict[str, Any]:
        """The saved format (module docstring); meta is copied."""
        self._flush()
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
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported trajectory format version {state.get('version')!r}")
        from .optim._seeds import step_seed

        self = cls(state["algorithm"], copy.deepcopy(state["meta"]))
        steps = state["step"].tolist()
        counts = state["n_seeds"].tolist()
        coefs = state["coefs"].tolist()
        decays = state["decays"].tolist()
        n_layers = state["n_layers"].tolist()
        layers = state["layers"].tolist()
        seeds = None if state["seeds"] is None else [s & ((1 << 64) - 1)
                                                     for s in state["seeds"].tolist()]
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
        self._extra = {k: v.tolist() for k, v in state.get("extra", {}).items()}
        return self

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors a save writes (the file adds a few KB of container)."""
        state = self.state_dict()
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += list(state["extra"].values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- replay ---------------------------------------------------------------------------------
    def spaces_for(self, params: Any, backend: str = "auto"):
        """ParameterSpaces over `params` matching the recorded param groups.

        Recorded names are matched to the given ones through canonical_name (wrapper components
        such as `module.` dropped), so a run recorded on a DDP-wrapped model replays on the bare
        model and vice versa. The spaces carry the recorded names and keys. ValueError: a
        recorded parameter missing or of another size, or a canonical name shared by two given
        parameters (ambiguous)."""
        from .space import ParameterSpace, canonical_name

        if isinstance(params, torch.nn.Module):
            named = list(params.named_parameters())
        else:
            named = list(params)
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
                                   backend=backend, no_decay=self.meta.get("no_decay", ()))
            spaces.append(space)
        return spaces

    def replay(self, params: Any, *, backend: str = "auto") -> None:
        """Apply every recorded update, in order, in place to `params` (the initial weights):
        an nn.Module or (name, tensor) pairs with the recorded names."""
        spaces = self.spaces_for(params, backend)
        replayer = _REPLAYERS.get(self.algorithm)
        if replayer is not None:
            replayer(self, spaces, backend)
            return
        dist, rounding = self.meta["dist"], self.meta.get("rounding", "nearest")
        for _, seeds, coefs, decays, layers in self.records():
            for g, space in enumerate(spaces):
                space.update(seeds, coefs[g], decay=decays[g], layers=layers, dist=dist,
                             rounding=rounding)
