"""Integer codes of the ``zokernels._C`` API (docs/backends.md)."""

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DIST_CODES = {"gaussian": 0, "rademacher": 1, "uniform": 2}
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}
