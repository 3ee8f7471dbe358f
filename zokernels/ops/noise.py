"""zokernels.noise: the contract's z for a range of elements, as a tensor."""

from __future__ import annotations

import torch

from .._contract import DEFAULT_CONTRACT, NOISE_DISTS, SEED_LIMIT, as_contract
from .._dispatch import implementation, resolve_backend
from .._validate import as_choice, as_device, as_int, as_key, as_seed, check_range


def noise(numel: int, seed: int, key: int = 0, *, offset: int = 0, dist: str = "gaussian",
          device: torch.device | str | None = None, backend: str = "auto",
          contract: int = DEFAULT_CONTRACT) -> torch.Tensor:
    """z(seed, key, i) for i = offset .. offset + numel - 1, as a new float32 tensor [numel].

    dist: "gaussian" (N(0, 1) by Box-Muller, one Philox call per 4 elements), "rademacher"
    (+-1, one Philox call per 128 elements) or "uniform" (the uniforms in [0, 1) that feed
    contract 1's gaussian; contracts 2 and 3 draw theirs from the words directly). These are exactly the values `perturb_` adds for a tensor with this key, so
    `noise(t.numel(), s, key).view_as(t)` materializes what `perturb_` applies without storing it.
    contract: the version of the noise contract (docs/noise-contract.md): 3 (default) and 2 give
    the v2 normals, a fixed float32 Box-Muller, bit-identical on every backend (they differ only
    in stochastic rounding); 1, the normals of zokernels before v2 (Triton's
    pair_uniform_to_normal; backends agree within 1e-5), to replay old recordings. Rademacher and uniform
    values do not depend on it.
    Writes 4 bytes per element. Tested across backends against the torch reference: words,
    uniforms, rademacher and v2 gaussians bit-identical, v1 gaussians within 1e-5.
    """
    numel = check_range(as_int(numel, "numel"), 0, SEED_LIMIT, "numel")
    if numel >= 1 << 63:  # the contract's indices go to 2^64, a tensor's size is an int64
        raise ValueError(f"numel must be below 2^63 (one tensor of it is made), got {numel}")
    seed = as_seed(seed, "seed")
    key = as_key(key, "key")
    offset = check_range(as_int(offset, "offset"), 0, SEED_LIMIT, "offset")
    if offset + numel > SEED_LIMIT:
        raise ValueError("offset + numel must not exceed 2^64 (the contract's element index range)")
    dist = as_choice(dist, NOISE_DISTS, "dist")
    contract = as_contract(contract)
    device = torch.device("cpu") if device is None else as_device(device, "device")
    chosen = resolve_backend(backend, device)
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    return implementation(chosen, "noise")(numel, seed, key, offset, dist, device, contract=contract)
