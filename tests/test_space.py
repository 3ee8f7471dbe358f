"""ParameterSpace: stable keys, layer selection, weight-decay mask, same results as perturb_."""

import math

import pytest
import torch

import zokernels
from helpers import ALL_BACKEND_CASES, assert_bits_equal
from zokernels.lowrank_space import LowRankSpace, split_by_rank
from zokernels.space import ParameterSpace, canonical_name, keys_from_names


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.layer_norm = torch.nn.LayerNorm(width)


class TinyModel(torch.nn.Module):
    def __init__(self, width: int = 12, depth: int = 3):
        super().__init__()
        self.embed = torch.nn.Embedding(20, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 5, bias=False)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_canonical_names_drop_wrappers():
    assert canonical_name("module._orig_mod.blocks.0.fc.weight") == "blocks.0.fc.weight"
    assert canonical_name("base_model.model.model.layers.1.q_proj.lora_A.default.weight") == \
        "model.layers.1.q_proj.lora_A.default.weight"
    assert canonical_name("_fsdp_wrapped_module.embed.weight") == "embed.weight"


def test_keys_survive_wrappers_and_freezing():
    torch.manual_seed(0)
    model = TinyModel()
    plain = ParameterSpace(model)
    wrapped = ParameterSpace([(f"module.{n}", p) for n, p in model.named_parameters()])
    assert plain.keys == wrapped.keys
    model.blocks[0].fc.weight.requires_grad_(False)
    frozen = ParameterSpace(model)
    by_name = dict(zip(plain.names, plain.keys))
    assert all(by_name[n] == k for n, k in zip(frozen.names, frozen.keys))
    assert len(frozen) == len(plain) - 1


def test_key_collisions_are_resolved_deterministically(monkeypatch):
    import zokernels.space as space

    monkeypatch.setattr(space, "key_from_name", lambda name: len(name))  # force collisions
    names = ["b.w", "a.w", "c.bias"]  # "a.w" and "b.w" collide
    keys = dict(zip(names, space.keys_from_names(names)))
    assert len(set(keys.values())) == 3
    assert keys["a.w"] == 3 and keys["b.w"] != 3  # sorted order: "a.w" keeps its digest
    reordered = ["c.bias", "a.w", "b.w"]
    assert dict(zip(reordered, space.keys_from_names(reordered))) == keys
    assert keys_from_names(["x"]) == keys_from_names(["x"])  # real digest: stable


@pytest.mark.parametrize("case", ALL_BACKEND_CASES, ids=[f"{b}-{d}" for b, d in ALL_BACKEND_CASES])
def test_matches_perturb_with_the_same_keys(case):
    backend, device = case
    torch.manual_seed(1)
    model = TinyModel().to(device)
    space = ParameterSpace(model, backend=backend)
    copies = [p.detach().clone() for p in model.parameters()]
    space.update([3, 4], [1e-2, -2e-2], decay=0.9)
    decays = [0.9 if space.decayable[j] else 1.0 for j in range(len(space))]
    zokernels.perturb_(copies, [3, 4], [1e-2, -2e-2], keys=space.keys, decay=decays, backend=backend)
    for name, p, c in zip(space.names, model.parameters(), copies):
        assert_bits_equal(p.detach(), c, name)


def test_weight_decay_rule_by_name():
    model = TinyModel()
    space = ParameterSpace(model)
    exempt = {n for n, d in zip(space.names, space.decayable) if not d}
    assert exempt == {n for n in space.names if "bias" in n or "layer_norm" in n}
    before = _snapshot(model)
    space.update(1, 0.0, decay=0.5)
    for name, p in model.named_parameters():
        expected = before[name] if name in exempt else before[name] * 0.5
        assert_bits_equal(p.detach(), expected, name)


def test_layers_leave_unselected_blocks_untouched():
    torch.manual_seed(2)
    model = TinyModel(depth=4)
    space = ParameterSpace(model, layers=list(model.blocks))
    assert space.num_layers == 4
    before = _snapshot(model)
    space.perturb(9, 1e-2, layers=[1, 3])
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        in_block = name.startswith("blocks.")
        selected = name.startswith("blocks.1.") or name.startswith("blocks.3.")
        assert changed == (selected or not in_block), name
    # The selected blocks get the same noise as a full pass: keys do not depend on the selection.
    reference = TinyModel(depth=4)
    reference.load_state_dict({n: t for n, t in before.items()})
    ParameterSpace(reference).perturb(9, 1e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith("blocks.1.") or not name.startswith("blocks."):
            assert_bits_equal(p.detach(), q.detach(), name)


def test_layers_by_name_and_errors():
    model = TinyModel(depth=2)
    space = ParameterSpace(model, layers=[["blocks.0.fc.weight", "blocks.0.fc.bias"],
                                          ["module.blocks.1.fc.weight"]])
    assert space.indices([1]) == sorted(
        [j for j, n in enumerate(space.names) if n == "blocks.1.fc.weight" or
         not n.startswith(("blocks.0.fc", "blocks.1.fc.weight"))])
    before = _snapshot(model)
    for bad, error in [([2], ValueError), ([0, 0], ValueError), (["0"], TypeError), ([True], TypeError)]:
        with pytest.raises(error, match="layers"):
            space.perturb(1, 1.0, layers=bad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="not registered"):
        ParameterSpace(model, layers=[["blocks.9.fc.weight"]])
    with pytest.raises(ValueError, match="layers\\[0\\] and layers\\[1\\]"):
        ParameterSpace(model, layers=[["blocks.0.fc.weight"], ["blocks.0.fc.weight"]])


def test_registration_refuses_bad_parameters():
    w = torch.randn(10)
    with pytest.raises(ValueError, match="share memory"):
        ParameterSpace([w, w[2:5]])
    with pytest.raises(TypeError, match="params"):
        ParameterSpace([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="keys"):
        ParameterSpace([torch.randn(2), torch.randn(3)], keys=[1, 1])
    with pytest.raises(ValueError, match="mixes"):
        ParameterSpace([("a", torch.randn(2)), torch.randn(3)])


def test_scalar_errors_leave_parameters_untouched():
    model = TinyModel()
    space = ParameterSpace(model)
    before = _snapshot(model)
    for kwargs in (dict(seeds=-1, scales=1.0), dict(seeds=[1, 2], scales=[1.0]),
                   dict(seeds=1, scales=float("nan")), dict(seeds=1, scales=1.0, dist="x"),
                   dict(seeds=1, scales=1.0, weight_decay_factor=float("inf"))):
        with pytest.raises((ValueError, TypeError)):
            space.apply(**kwargs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_storage_changes_after_registration_are_picked_up():
    """model.to(dtype) swaps every parameter's storage: the space must not reuse stale groups."""
    torch.manual_seed(3)
    model = TinyModel()
    space = ParameterSpace(model)
    model.to(torch.bfloat16)
    expected = [p.detach().clone() for p in model.parameters()]
    zokernels.perturb_(expected, 5, 1e-2, keys=space.keys)
    space.perturb(5, 1e-2)
    for name, p, e in zip(space.names, model.parameters(), expected):
        assert p.dtype == torch.bfloat16
        assert_bits_equal(p.detach(), e, name)


def test_scalar_tensor_aliasing_a_parameter_is_refused():
    model = TinyModel()
    space = ParameterSpace(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="shares memory"):
        space.perturb(1, model.head.weight[0, :1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lowrank_space_over_a_space_takes_its_keys_and_decay_rule():
    """The one low-rank front door: LowRankSpace over a space's 2-D parameters writes what
    lowrank_perturb_ writes with the space's keys and MeZO's no-decay rule; the 1-D ones are
    not touched; a bad argument changes nothing."""
    gen = torch.Generator().manual_seed(8)
    params = [("a.weight", torch.randn(6, 5, generator=gen)),
              ("a.bias", torch.randn(6, generator=gen)),
              ("b.layer_norm_proj", torch.randn(4, 3, generator=gen))]
    space = ParameterSpace(params, backend="torch")
    two_d, rest = split_by_rank(space)
    assert (two_d, rest) == ([0, 2], [1])
    state = LowRankSpace([space.names[j] for j in two_d], [space.params[j] for j in two_d],
                         [space.keys[j] for j in two_d], [space.decayable[j] for j in two_d],
                         rank=2, seed=3, backend="torch")
    tau = torch.randn(state.offsets[-1], generator=gen)
    expected = [params[0][1].clone(), params[2][1].clone()]
    bias = params[1][1].clone()
    norm = torch.tensor(1 / math.sqrt(2), dtype=torch.float32)  # Z's 1/sqrt(r), elementwise
    zokernels.lowrank_perturb_(expected, state.us, state.vs, [t * norm for t in state.split(tau)],
                               scale=0.1, decay=[0.9, 1.0], keys=[space.keys[0], space.keys[2]],
                               backend="torch")
    state.apply(tau, 0.1, 0.9, "torch")
    assert_bits_equal(params[0][1], expected[0])
    assert_bits_equal(params[2][1], expected[1])  # no decay: its name has layer_norm
    assert_bits_equal(params[1][1], bias)  # 1-D: untouched
    before = [params[0][1].clone(), params[2][1].clone()]
    with pytest.raises(ValueError, match="taus"):
        state.apply(tau[:3], 0.1, 0.9, "torch")  # the second weight's tau is short
    assert_bits_equal(params[0][1], before[0])
    assert_bits_equal(params[2][1], before[1])


def test_a_shrunk_storage_at_the_same_address_is_seen():
    """p.data = p.data[:k] keeps the address: the space must notice the size (cached launch lists
    would otherwise write past the new end)."""
    full = torch.zeros(8)
    p = torch.nn.Parameter(full)  # shares full's storage
    space = ParameterSpace([("p", p)], backend="cpu")
    space.apply(1, 1.0)
    p.data = full[:4]  # same address, half the size
    tail = full[4:].clone()
    space.apply(2, 1.0)
    assert_bits_equal(full[4:], tail)  # nothing written past the parameter's new end


# -- plans cached per layer selection (LeZO) ---------------------------------------------------

def _layered(depth: int = 6, seed: int = 4):
    torch.manual_seed(seed)
    model = TinyModel(depth=depth)
    return model, ParameterSpace(model, layers=list(model.blocks), backend="cpu")


def _same_plan(a, b):
    (plan_a, flags_a), (plan_b, flags_b) = a, b
    assert torch.equal(flags_a, flags_b)
    assert len(plan_a) == len(plan_b)
    for ga, gb in zip(plan_a, plan_b):
        assert (ga.backend, ga.device, ga.keys, ga.indices, ga.index_maps) == \
            (gb.backend, gb.device, gb.keys, gb.indices, gb.index_maps)
        assert len(ga.tensors) == len(gb.tensors)
        assert all(x is y for x, y in zip(ga.tensors, gb.tensors))


def test_a_selection_plan_is_cached_and_equals_the_plan_built_from_scratch():
    model, space = _layered()
    for selection in ([1, 3], [0], [], [5, 0, 2], list(range(6))):
        _same_plan(space._selection_plan(selection), space._plan(selection))
    first = space._selection_plan([3, 1])
    assert space._selection_plan([1, 3]) is first  # the same selection in another order
    space.perturb(1, 1e-2, layers=[1, 3])
    space.perturb(1, -1e-2, layers=[3, 1], applied=1e-2)
    assert space._selection_plan([1, 3]) is first
    # the cpu backend keeps its per-tensor launch lists in the cached plan's groups
    assert all("cpu" in group.cache for group in first[0])


def test_cached_selections_give_the_bits_of_an_uncached_space():
    model, space = _layered()
    reference = TinyModel(depth=6)
    reference.load_state_dict(model.state_dict())
    rng = __import__("random").Random(5)
    selections = [rng.sample(range(6), 2) for _ in range(12)]
    selections += selections[:4]  # hits after evictions too
    for step, selection in enumerate(selections):
        for seed, scale, applied in ((step, 1e-2, None), (step, -1e-2, 1e-2),
                                     (step, -3e-3, -1e-2)):
            space.perturb(seed, scale, layers=selection, applied=applied)
            fresh = ParameterSpace(reference, layers=list(reference.blocks), backend="cpu")
            fresh.apply(seed, scale, layers=selection, applied=applied)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_bits_equal(p.detach(), q.detach(), name)


def test_the_plan_cache_is_bounded_and_keeps_the_most_recently_used():
    from zokernels.space import PLAN_CACHE_SIZE

    model, space = _layered(depth=6)
    selections = [[a, b] for a in range(6) for b in range(a + 1, 6)]  # 15 > PLAN_CACHE_SIZE
    assert len(selections) > PLAN_CACHE_SIZE
    kept = space._selection_plan(selections[0])
    for selection in selections[1:]:
        space.perturb(0, 0.0, layers=selection)
        assert space._selection_plan(selections[0]) is kept  # a hit: moved to the newest end
        assert len(space._plan_cache) <= PLAN_CACHE_SIZE
    assert len(space._plan_cache) == PLAN_CACHE_SIZE
    assert (0, 1) in space._plan_cache and (0, 2) not in space._plan_cache  # evicted first


def test_a_cached_selection_is_still_validated():
    model, space = _layered(depth=3)
    space.perturb(1, 1e-2, layers=[0, 1])
    before = _snapshot(model)
    for bad, error in [([True, 1], TypeError), ([1, 0, 1], ValueError), ([0, 3], ValueError)]:
        with pytest.raises(error, match="layers"):
            space.perturb(1, 1e-2, layers=bad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cached_selection_plans_are_dropped_when_a_storage_changes():
    torch.manual_seed(6)
    model = TinyModel(depth=4)
    space = ParameterSpace(model, layers=list(model.blocks))
    space.perturb(1, 1e-2, layers=[0, 2])
    stale = space._selection_plan([0, 2])
    model.to(torch.bfloat16)
    expected = [p.detach().clone() for p in model.parameters()]
    chosen = space.indices([0, 2])
    zokernels.perturb_([expected[j] for j in chosen], 5, 1e-2,
                       keys=[space.keys[j] for j in chosen])
    space.perturb(5, 1e-2, layers=[2, 0])
    fresh = space._selection_plan([0, 2])
    assert fresh is not stale and all(t.dtype == torch.bfloat16 for g in fresh[0] for t in g.tensors)
    for (name, p), reference in zip(model.named_parameters(), expected):
        assert_bits_equal(p.detach(), reference, name)  # unselected blocks: untouched
    # one parameter replaced (param.data = ...): its new storage is what the plan writes
    weight = model.blocks[0].fc.weight
    weight.data = torch.zeros_like(weight)
    space.perturb(7, 1.0, layers=[0])
    assert not torch.equal(weight.detach(), torch.zeros_like(weight))
    assert any(t is weight for g in space._selection_plan([0])[0] for t in g.tensors)
