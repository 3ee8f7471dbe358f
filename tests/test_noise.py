"""zokernels.noise: cross-backend agreement, invariance, and the distribution of z."""

import math

import pytest
import torch

import zokernels
from zokernels.backends.torch.noise import contract_values

from helpers import assert_bits_equal, assert_close, interpreted

GAUSSIAN_V1_ATOL = 1e-5  # contract v1: libm differences in log/sin/cos (docs/noise-contract.md)
SEEDS = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 + 3, 2 ** 64 - 1]


def _sizes(backend, device):
    return [1, 3, 127, 1023, 4097] if interpreted(backend, device) else [1, 3, 1023, 4097, 100_003]


@pytest.mark.parametrize("dist, contract", [("uniform", 2), ("rademacher", 2), ("gaussian", 2),
                                            ("gaussian", 1), ("uniform", 1), ("rademacher", 1)])
def test_matches_reference(fast_case, dist, contract):
    """Bit for bit, except contract v1's gaussians (within 1e-5)."""
    backend, device = fast_case
    for seed in SEEDS:
        for numel in _sizes(backend, device):
            for key, offset in [(0, 0), (7, 5), (2 ** 32 - 1, 130)]:
                expected = zokernels.noise(numel, seed, key, offset=offset, dist=dist,
                                           backend="torch", contract=contract)
                got = zokernels.noise(numel, seed, key, offset=offset, dist=dist, device=device,
                                      backend=backend, contract=contract)
                assert got.dtype == torch.float32 and got.device.type == device
                what = (f"{backend} {dist} contract={contract} seed={seed} key={key} "
                        f"offset={offset} numel={numel}")
                if dist == "gaussian" and contract == 1:
                    assert_close(got, expected, atol=GAUSSIAN_V1_ATOL, what=what)
                else:
                    assert_bits_equal(got.cpu(), expected, what)


def test_contract_versions():
    """v2 is the default; v1 still gives the normals of before v2 (values pinned from the torch
    reference of that release); rademacher and uniform do not depend on the version; anything
    but 1 or 2 is refused, naming the argument."""
    v1 = zokernels.noise(6, 2 ** 64 - 1, 2 ** 32 - 1, offset=2 ** 40 + 3, backend="torch",
                         contract=1)
    pinned = ["0x1.576e04p-2", "0x1.14495ap-6", "0x1.26584ep-1", "0x1.66c00ap-5", "0x1.5e1cccp+0",
              "0x1.541940p-1"]
    assert_bits_equal(v1, torch.tensor([float.fromhex(h) for h in pinned]), "v1 pinned values")
    assert_bits_equal(zokernels.noise(6, 0, backend="torch", contract=1),
                      torch.tensor([float.fromhex(h) for h in [
                          "0x1.7d59a2p-5", "0x1.57099cp-1", "0x1.18c74ap-2", "-0x1.186de0p+0",
                          "-0x1.8dae9ep-2", "-0x1.2fbf8ep+1"]]), "v1 pinned values, seed 0")
    assert_bits_equal(zokernels.noise(1000, 3), zokernels.noise(1000, 3, contract=2), "default")
    assert not torch.equal(zokernels.noise(1000, 3, contract=1), zokernels.noise(1000, 3))
    for dist in ("rademacher", "uniform"):
        assert_bits_equal(zokernels.noise(1000, 3, dist=dist, contract=1),
                          zokernels.noise(1000, 3, dist=dist, contract=2), dist)
    # contract 3 differs from 2 only in stochastic rounding: the same noise on every backend
    for backend in zokernels.available_backends():
        for dist in ("gaussian", "rademacher", "uniform"):
            assert_bits_equal(zokernels.noise(1000, 3, dist=dist, contract=3, backend=backend),
                              zokernels.noise(1000, 3, dist=dist, contract=2, backend=backend),
                              f"{backend} {dist} contract 3")
    for bad in (0, 4, "2", 2.0, True, None):
        with pytest.raises(ValueError, match="contract"):
            zokernels.noise(4, 1, contract=bad)
        with pytest.raises(ValueError, match="contract"):
            zokernels.perturb_(torch.zeros(4), 1, 1.0, contract=bad)


@pytest.mark.parametrize("dist", ["uniform", "rademacher", "gaussian"])
def test_offsets_beyond_2_pow_32(any_case, dist):
    backend, device = any_case
    offset = 2 ** 32 + 2 ** 20 + 61  # high counter word non-zero, not aligned to 4 or 128
    got = zokernels.noise(300, 99, 4, offset=offset, dist=dist, device=device, backend=backend).cpu()
    # Independent route: whole Philox blocks from the reference, then sliced.
    expected = contract_values(99, 4, offset, 300, dist, "cpu")
    assert_bits_equal(got, expected, f"{backend} {dist}")
    # The same elements seen from a window that starts earlier.
    wider = zokernels.noise(400, 99, 4, offset=offset - 100, dist=dist, device=device,
                            backend=backend).cpu()
    assert_bits_equal(wider[100:], got, f"{backend} {dist}: window invariance")
    # The high half of the block index matters: offset - 2^32 gives different values.
    low = zokernels.noise(300, 99, 4, offset=offset - 2 ** 32, dist=dist, device=device,
                          backend=backend).cpu()
    assert not torch.equal(low, got)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_chunking_invariance(any_case, dist):
    """Any split of an index range into pieces yields the same z."""
    backend, device = any_case
    total = 1000 if interpreted(backend, device) else 50_000
    whole = zokernels.noise(total, 5, 3, dist=dist, device=device, backend=backend).cpu()
    cuts = [0, 1, 4, 5, 127, 128, 129, 333, total]
    pieces = [zokernels.noise(b - a, 5, 3, offset=a, dist=dist, device=device, backend=backend).cpu()
              for a, b in zip(cuts, cuts[1:])]
    assert_bits_equal(torch.cat(pieces), whole, f"{backend} {dist} chunked")


def test_uniforms_match_triton_formula():
    """Uniform conversion on edge words, computed independently in float64 then rounded."""
    from zokernels.backends.torch.noise import words_to_uniform

    words = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 12345678, 3_000_000_000])
    as_int32 = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    folded = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)
    expected = folded.to(torch.float32) * scale
    got = words_to_uniform(words)
    assert_bits_equal(got, expected, "uniforms")
    assert got.max() < 1.0 and got.min() >= 0.0


@pytest.mark.parametrize("contract", [2, 1])
def test_gaussian_distribution(contract):
    """>= 1M draws: mean, variance, symmetry, tails and the Box-Muller bound."""
    n = 1 << 21
    z = zokernels.noise(n, 20261123, 11, dist="gaussian", contract=contract).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    kurtosis = (z ** 4).mean().item()
    assert abs(kurtosis - 3) < 5 * math.sqrt(96 / n)
    for threshold, tail in [(1.0, 0.31731), (2.0, 0.04550), (3.0, 0.0026998), (4.0, 6.334e-5)]:
        observed = (z.abs() > threshold).double().mean().item()
        assert abs(observed - tail) < 5 * math.sqrt(tail / n) + 1 / n, (threshold, observed, tail)
    assert abs((z > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    smallest_u = 1e-7 if contract == 1 else 2.0 ** -33
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(smallest_u)) + 1e-5
    # Each of the 4 lanes of a Philox call is itself standard normal.
    lanes = z.view(-1, 4)
    for lane in range(4):
        assert abs(lanes[:, lane].var().item() - 1) < 5 * math.sqrt(2 / (n // 4))
    # n0/n1 of one Box-Muller pair are uncorrelated.
    correlation = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert abs(correlation) < 5 / math.sqrt(n // 4)


def test_rademacher_distribution():
    n = 1 << 21
    z = zokernels.noise(n, 7, 2, dist="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    z = z.double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    # Neighbours, the 32 bits of one word and the 4 words of a call are uncorrelated.
    for lag in (1, 31, 32, 127, 128):
        assert abs((z[:-lag] * z[lag:]).mean().item()) < 5 / math.sqrt(n), lag
    # No bit position is biased.
    per_bit = z.view(-1, 128).mean(dim=0)
    assert per_bit.abs().max().item() < 6 / math.sqrt(n / 128)


@pytest.mark.parametrize("dist, contract", [("rademacher", 2), ("gaussian", 2), ("gaussian", 1)])
def test_streams_are_independent(dist, contract):
    """Different seeds, keys, and the rounding stream give uncorrelated values."""
    n = 1 << 18
    base = zokernels.noise(n, 1, 0, dist=dist, contract=contract).double()
    others = [zokernels.noise(n, 2, 0, dist=dist, contract=contract),
              zokernels.noise(n, 1, 1, dist=dist, contract=contract),
              zokernels.noise(n, 2 ** 32 + 1, 0, dist=dist, contract=contract)]
    for other in others:
        assert abs((base * other.double()).mean().item()) < 5 / math.sqrt(n)
    rounding = contract_values(1, 0, 0, n, "uniform", "cpu", stream=1).double()
    noise_uniform = zokernels.noise(n, 1, 0, dist="uniform").double()
    assert abs(((rounding - 0.5) * (noise_uniform - 0.5)).mean().item()) < 5 / 12 / math.sqrt(n)
