"""Per-step seeds and layer choices (zokernels._seeds, below the trajectory layer that derives
seeds too; re-exported here for the optimizers)."""

from .._seeds import MASK64, choose_layers, step_seed

__all__ = ["MASK64", "choose_layers", "step_seed"]
