"""LeZO (Wang et al. 2024, arXiv 2410.09823): layer-wise sparse SPSA on fused kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._contract import DEFAULT_CONTRACT
from ..space import NO_DECAY_DEFAULT
from ._seeds import choose_layers
from .mezo import MeZO


class LeZO(MeZO):
    """MeZO that perturbs and updates only `n_active` of the `layers` blocks per step.

    Each step draws its subset uniformly without replacement from the step's seed (purpose
    "layers"); the same subset is used for +eps, -eps, the restore and the update. Parameters in
    no layer (embeddings, final norm, head) are perturbed every step. Unselected layers are not
    touched at all: no launch, no memory traffic, bit-identical.

    Args (besides MeZO's):
        layers: the sparsifiable blocks, each an nn.Module or a list of parameter names / tensors;
            zokernels.integrations.find_transformer_layers(model) finds them for common models.
        n_active: blocks perturbed per step; or
        n_dropped: blocks skipped per step (n_active = len(layers) - n_dropped). Give one.

    Every MeZO option works unchanged (probe="virtual" included: only the selected layers' reads
    are perturbed), with the step's layer subset applied to each pass:
    n_spsa (all seeds of a step share the subset), process_group (the subset is a function of
    (seed, step), so every rank draws the same one without communication; one all-reduce of
    2 * n_spsa floats per step) and perturbation_parallel (pairs of ranks evaluate the two sides
    of each seed on the same micro-batch, see MeZO).
    """

    algorithm = "lezo"

    def __init__(self, params: Any, layers: Sequence[Any], lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, dist: str = "gaussian", *,
                 n_active: int | None = None, n_dropped: int | None = None, n_spsa: int = 1,
                 exact_restore: bool = True, backend: str = "auto", rounding: str = "nearest",
                 process_group: Any = None, no_decay: Sequence[str] = NO_DECAY_DEFAULT,
                 record_trajectory: bool = True, perturbation_parallel: bool = False,
                 contract: int = DEFAULT_CONTRACT, probe: str = "virtual") -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError("layers must be a non-empty list of blocks (modules or lists of "
                             "parameter names / tensors)")
        if (n_active is None) == (n_dropped is None):
            raise ValueError("give exactly one of n_active and n_dropped")
        count = n_active if n_active is not None else n_dropped
        name = "n_active" if n_active is not None else "n_dropped"
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(layers):
            raise ValueError(f"{name} must be an integer in [0, {len(layers)}], got {count!r}")
        self.num_layers = len(layers)
        self.n_active = n_active if n_active is not None else len(layers) - n_dropped
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, dist=dist,
                         n_spsa=n_spsa, exact_restore=exact_restore, backend=backend,
                         rounding=rounding, process_group=process_group, no_decay=no_decay,
                         record_trajectory=record_trajectory,
                         perturbation_parallel=perturbation_parallel, layers=layers,
                         contract=contract, probe=probe)

    # the records name their blocks: a resume may choose another number of them per step
    _RESUME_FREE_META = MeZO._RESUME_FREE_META | {"n_active"}

    def _trajectory_meta(self) -> dict[str, Any]:
        meta = super()._trajectory_meta()
        meta["n_active"] = self.n_active
        for group, space in zip(meta["groups"], self.spaces):
            group["layers"] = [[space.names[j] for j in space.layer_members(layer)]
                               for layer in range(space.num_layers)]
        return meta

    def _step_layers(self, step: int) -> tuple[list | None, list[int] | None]:
        chosen = choose_layers(self.seed_for(step, purpose="layers"), self.num_layers,
                               self.n_active)
        return [chosen] * len(self.spaces), chosen
