"""Per-step seeds and layer choices: pure functions of (base seed, step), no global RNG.

step_seed hashes (base seed, step, index) with BLAKE2b (8 bytes, little-endian): stable across
Python versions, platforms and processes, so a resumed or replayed run draws the same noise.
choose_layers runs a Fisher-Yates shuffle driven by SplitMix64 from the step seed.
"""

from __future__ import annotations

import hashlib

MASK64 = (1 << 64) - 1


def step_seed(base_seed: int, step: int, index: int = 0, *, purpose: str = "z") -> int:
    """The seed in [0, 2^64) of perturbation `index` of step `step` (purpose separates streams
    such as the noise "z" and the layer choice "layers"). Plain ints only: the seed is a hash of
    their decimal text, which a tensor or numpy integer would change."""
    for name, value in (("base_seed", base_seed), ("step", step), ("index", index)):
        if type(value) is not int:
            raise TypeError(f"step_seed: {name} must be an int, got {type(value).__name__}")
    text = f"zokernels:{purpose}:{base_seed}:{step}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def choose_layers(seed: int, num_layers: int, k: int) -> list[int]:
    """k distinct layer indices out of range(num_layers), uniformly without replacement, sorted."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot choose {k} of {num_layers} layers")
    order = list(range(num_layers))
    state = seed & MASK64
    for i in range(k):  # partial Fisher-Yates: the first k slots are a uniform k-subset
        state, r = _splitmix64(state)
        j = i + r % (num_layers - i)
        order[i], order[j] = order[j], order[i]
    return sorted(order[:k])
