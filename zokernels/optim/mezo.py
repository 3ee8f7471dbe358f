"""MeZO (Malladi et al. 2023): ZO-SGD with two forward passes per seed, on fused kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..space import NO_DECAY_DEFAULT, ParameterSpace
from ..trajectory import MAX_SEEDS_PER_STEP
from .base import Closure, ZOOptimizer, check_common_hyper

_PAIRS_UNSHARDED = ("perturbation_parallel does not work with sharded parameters: the two ranks "
                    "of a pair would hold one model perturbed two ways")


class MeZO(ZOOptimizer):
    """Memory-efficient zeroth-order SGD.

    Per step, for each of n_spsa seeds s (from (seed, step), the global RNG is untouched):

        l+ = f(theta + eps z_s),  l- = f(theta - eps z_s),  g_s = (l+ - l-) / (2 eps)
        theta = (1 - lr wd) theta - (lr / n_spsa) sum_s g_s z_s       (decay: decayable params)

    Passes over the weights per step (n_spsa = 1): with virtual probes (the default) the update
    only; the +eps and -eps values are drawn inside the forward's reads (docs/dense-probes.md).
    In place: +eps, -eps (recovering theta from +eps), and the update fused with the restore:
    three instead of MeZO's four, each ONE launch per (device, dtype) and param group; with
    exact_restore (default), the elements recovery cannot give back are kept in selector logs,
    so the update starts from the exact unperturbed weights (docs/undo-log.md). Either way a
    closure that raises leaves the weights bit-identical.

    Args:
        params: iterable of tensors, of (name, tensor) pairs (recommended: model.named_parameters();
            noise keys come from names, see ParameterSpace), or param groups (dicts with "params"
            and any of lr / eps / weight_decay). Frozen nn.Parameters are skipped.
        lr: learning rate (torch.optim.lr_scheduler schedulers work on param_groups' lr).
        eps: perturbation scale; with per-group eps, g is computed per group as
            (l+ - l-) / (2 eps_g).
        weight_decay: decoupled as in MeZO's trainer, theta *= 1 - lr wd, fused into the update,
            not applied to parameters whose name contains one of `no_decay`.
        seed: base seed; step t's seeds are BLAKE2b(seed, t, k) (zokernels.optim._seeds).
        dist: "gaussian" (MeZO) or "rademacher".
        n_spsa: seeds per step (averaged estimate).
        exact_restore: keep selector logs for the parameters probed in place (about 3.7% of
            bf16, 2.4% of fp32 parameter bytes at eps 1e-3; see undo_log_bytes). False: no log,
            recovery-quality restores in place (a few % of elements one ulp off per step in
            bf16). Virtual probes need neither: they write nothing (`probe`).
        backend: "auto", "triton", "cpu" or "torch".
        rounding: of the update, "nearest" or "stochastic" (bf16/fp16: keeps updates below half
            an ulp in expectation; its bits come from stream 1 of the step's first seed).
        record_trajectory: keep opt.trajectory (a few bytes per step).
        process_group: data parallel (torch.distributed): each rank evaluates the closure on its
            own micro-batch; all n_spsa probes run first, then the 2 * n_spsa losses are
            averaged over the ranks in ONE all-reduce (8 * n_spsa bytes) and checked for
            finiteness once (a non-finite loss of any seed on any rank skips the whole step on
            every rank, weights restored exactly); every rank applies the identical seeded
            update (replicas stay bit-identical). The returned loss is the mean.
        perturbation_parallel: with a process group of an even number of ranks, pair the ranks
            (2i, 2i + 1): the even one evaluates f(theta + eps z), the odd one f(theta - eps z),
            on the SAME micro-batch (give both ranks of a pair the same data), and one
            all-reduce of 8 * n_spsa bytes hands every rank both losses of every seed. Each
            rank then runs one forward per seed instead of two, and (n_spsa = 1) two passes
            instead of three: about half the step latency, for twice the devices per
            micro-batch. Needs exact_restore (the pair restores from
            different perturbations: the undo logs make both exact; an undo-log overflow, warned
            and counted in zo_state["undo_overflows"], can leave the pair a few ulps apart).
            Not with sharded parameters (a pair would hold one model perturbed two ways).
        probe: "inplace" writes theta +- eps z into the weights for each forward (restored
            exactly with the logs of exact_restore). "virtual" writes nothing: every torch
            function the forward calls on a parameter gets the perturbed values, drawn on the
            fly by the same kernels (F.linear a chunk of rows at a time, F.embedding only the
            selected rows; zokernels.dense_probe), so there is nothing to restore and no log;
            extra memory is one chunk (about 1% of the parameters, reported in
            extra_memory_bytes). The first probe checks it: it runs in place and virtually,
            and the virtual path is kept only if both losses are equal bit for bit (the step,
            its loss and the trajectory are then exactly the in-place ones); otherwise it warns
            and stays in place (dense_probe_status says which and why). Parameters that are
            sharded, not read in the forward, or read whole by other functions while larger
            than the chunk stay in place. The first step calls the closure once more (LeZO:
            twice: its check also runs every layer in place).

    step(closure) returns the loss at theta + eps z of the first seed, as MeZO does.
    """

    algorithm = "mezo"

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, dist: str = "gaussian", *,
                 n_spsa: int = 1, exact_restore: bool = True, backend: str = "auto",
                 rounding: str = "nearest", process_group: Any = None,
                 no_decay: Sequence[str] = NO_DECAY_DEFAULT, record_trajectory: bool = True,
                 perturbation_parallel: bool = False, probe: str = "virtual",
                 **kwargs: Any) -> None:
        check_common_hyper(lr, eps, weight_decay)
        if (isinstance(n_spsa, bool) or not isinstance(n_spsa, int)
                or not 1 <= n_spsa <= MAX_SEEDS_PER_STEP):
            raise ValueError(f"n_spsa must be an integer in [1, {MAX_SEEDS_PER_STEP}], "
                             f"got {n_spsa!r}")
        self.n_spsa = n_spsa
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         dist=dist, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group,
                         no_decay=no_decay, record_trajectory=record_trajectory,
                         dense_probe=probe, **kwargs)
        self.perturbation_parallel = bool(perturbation_parallel)
        if self.perturbation_parallel:
            if not self.exact_restore:
                raise ValueError("perturbation_parallel needs exact_restore=True: the two ranks "
                                 "of a pair restore from different perturbations, and only the "
                                 "undo logs make both end on the same bits")
            self._sign = self._pair_sign()

    def _pair_sign(self) -> float:
        """+1 on the even rank of a pair (evaluates theta + eps z), -1 on the odd one."""
        import torch.distributed as dist

        if self.process_group is None:
            raise ValueError("perturbation_parallel needs a process_group (an even number of "
                             "ranks, paired (2i, 2i + 1))")
        if self._has_shards():
            raise ValueError(_PAIRS_UNSHARDED)
        world = dist.get_world_size(self.process_group)
        if world % 2:
            raise ValueError(f"perturbation_parallel needs an even number of ranks, got {world}")
        return 1.0 if dist.get_rank(self.process_group) % 2 == 0 else -1.0

    def _check_added_space(self, space: ParameterSpace) -> None:
        if self.perturbation_parallel and space.sharded:
            raise ValueError(_PAIRS_UNSHARDED)
        super()._check_added_space(space)

    def _has_shards(self) -> bool:
        return any(space.sharded for space in self.spaces)

    def _seeds_per_step(self) -> tuple[int, int]:
        return self.n_spsa, self.n_spsa

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()
        meta["n_spsa"] = self.n_spsa
        return meta

    # LeZO overrides: the layers this step perturbs (None: all).
    def _step_layers(self, step: int) -> tuple[list | None, list[int] | None]:
        """(per-group layer selections for the passes, the chosen layer indices) or (None, None)."""
        return None, None

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step; `closure()` evaluates the loss (called 2 * n_spsa times, under no_grad)."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        return self._guarded(lambda: self._step(closure))

    def _probe_noise(self, step: int, k: int) -> Any:
        """What probe k of step `step` perturbs with: its seed (TeZO: with its taus)."""
        return self.seed_for(step, k)

    def _probe(self, closure: Closure, seed: Any, eps: list[float],
               layers: list | None) -> torch.Tensor:
        """This rank's [f(theta + eps z), f(theta - eps z)] for one seed (float32, shape [2]),
        not yet averaged over the ranks. With perturbation_parallel the rank evaluates its own
        side only and puts 0 in the other slot (the reduction sums the pair). Leaves a
        perturbation held for the next restore or the update to recover from."""
        if self.perturbation_parallel:
            coefs = [self._sign * e for e in eps]
            self._perturb_held(seed, coefs, layers, 0)
            loss = self._probe_eval(closure, seed, coefs)
            zero = torch.zeros_like(loss)
            return torch.stack([loss, zero] if self._sign > 0 else [zero, loss])
        return torch.stack(self._probe_two_point(closure, seed, eps, layers))

    def _reduce_losses(self, local: torch.Tensor) -> torch.Tensor:
        """The [n_spsa, 2] losses averaged over the ranks in ONE all-reduce of 2 * n_spsa
        floats (perturbation_parallel: each pair's two slots are filled by its two ranks, so
        the world sum times 2 / world is the mean over the pairs)."""
        reduced = self._all_reduce_mean(local)
        return reduced * 2 if self.perturbation_parallel else reduced

    def _step(self, closure: Closure) -> torch.Tensor:
        # the whole groups (cached per storage): a parameter made to share memory with another
        # after the virtual / in-place split (param.data = other.data) is refused here, before
        # anything is written, as it is without the split
        self._check_parameters()
        step = self.zo_state["step"]
        layers, chosen = self._step_layers(step)
        eps = [group["eps"] for group in self.param_groups]
        seeds = [self._probe_noise(step, k) for k in range(self.n_spsa)]
        local = []
        for k, seed in enumerate(seeds):
            if k > 0:
                self._check_logs()  # count an overflow of the earlier seed's logs
                self._restore()  # exact theta before the next seed's probe
            local.append(self._probe(closure, seed, eps, layers))
        # one collective and one host synchronization per step, whatever n_spsa
        losses = self._reduce_losses(torch.stack(local))  # [n_spsa, 2]: (l+, l-) per seed
        return self._finish_step(step, seeds, losses, layers, chosen)

    def _finish_step(self, step: int, seeds: list[Any], losses: torch.Tensor,
                     layers: list | None, chosen: list[int] | None) -> torch.Tensor:
        """The estimate from the reduced losses, the finiteness check (one host sync), the
        update (or a skip) and the trajectory record; returns the first seed's l+."""
        first_loss = losses[0, 0]
        grads = (losses[:, 0] - losses[:, 1]) / 2  # per group: divided by eps_g below
        coefs = [-(group["lr"] / self.n_spsa) * (grads / group["eps"])
                 for group in self.param_groups]
        # finite losses can still overflow float32 in their difference: such a step is skipped
        finite, zero = self._finite_and_zero([losses, *coefs], coefs)
        self._check_logs()
        if not finite:
            self._skip(losses.reshape(-1), step)
            return first_loss
        # the earlier seeds were restored exactly: only the last one is held
        self._commit_step(step, seeds, coefs, layers, chosen=chosen, zero_groups=zero)
        return first_loss
