"""Philox4x32-10 known answers (Random123 kat_vectors) on every backend."""

import pytest
import torch

from zokernels._dispatch import implementation

from helpers import ALL_BACKEND_CASES

KNOWN_ANSWERS = [
    # (counter, key (k0, k1), words)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("case", ALL_BACKEND_CASES, ids=[f"{b}-{d}" for b, d in ALL_BACKEND_CASES])
def test_known_answers(case):
    backend, device = case
    philox = implementation(backend, "philox")
    for counter, (k0, k1), words in KNOWN_ANSWERS:
        seed = k0 | (k1 << 32)
        counters = [torch.tensor([c], dtype=torch.int64, device=device) for c in counter]
        got = tuple(int(w.item()) for w in philox(seed, *counters))
        assert got == words, f"{backend}: counter {counter} key {(k0, k1)} -> " \
                             f"{[hex(w) for w in got]}, expected {[hex(w) for w in words]}"


@pytest.mark.parametrize("case", ALL_BACKEND_CASES[1:], ids=[f"{b}-{d}" for b, d in ALL_BACKEND_CASES[1:]])
def test_words_match_reference_on_random_counters(case):
    backend, device = case
    generator = torch.Generator().manual_seed(0)
    counters = [torch.randint(0, 2 ** 32, (300,), generator=generator, dtype=torch.int64) for _ in range(4)]
    for seed in (0, 1, 2 ** 31, 2 ** 32 + 7, 2 ** 63 + 12345, 2 ** 64 - 1):
        expected = implementation("torch", "philox")(seed, *counters)
        got = implementation(backend, "philox")(seed, *[c.to(device) for c in counters])
        for word, (g, e) in enumerate(zip(got, expected)):
            assert torch.equal(g.cpu(), e), f"{backend}: seed {seed} word {word} differs"
