"""Integer codes of the ``zokernels._C`` API (docs/backends.md)."""

import torch

from ..._contract import integer_rounding, normals_version

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DIST_CODES = {"gaussian": 0, "rademacher": 1, "uniform": 2}
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}
# contract 3's integer stochastic rounding (csrc/rounding.h, integer_stochastic_round_bits)
INTEGER_STOCHASTIC_CODE = 2


def native_contract(rounding: str, contract: int) -> dict:
    """The _C arguments a contract version selects: ``rounding`` (contract 3 turns "stochastic"
    into the integer rounding's code) and ``contract`` (the gaussian normals, 1 or 2)."""
    code = ROUNDING_CODES[rounding]
    if code == ROUNDING_CODES["stochastic"] and integer_rounding(contract):
        code = INTEGER_STOCHASTIC_CODE
    return {"rounding": code, "contract": normals_version(contract)}
