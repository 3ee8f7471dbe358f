"""patch_mezo_trainer on a trainer written like MeZO's large_models/trainer.py."""

from __future__ import annotations

import types

import pytest
import torch

from zokernels.compat import patch_mezo_trainer, unpatch_mezo_trainer

from helpers import assert_bits_equal


class MeZOStyleTrainer:
    """The attributes and methods MeZO's trainer has, with its torch.normal loops."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, weight_decay: float) -> None:
        self.model = model
        self.args = types.SimpleNamespace(zo_eps=eps, weight_decay=weight_decay)
        self.lr = lr
        self.named_parameters_to_optim = []
        self.zo_random_seed = 0
        self.projected_grad = 0.0
        self.scheduler_steps = 0
        self.lr_scheduler = types.SimpleNamespace(step=self._count_scheduler_step)
        self.rng = torch.Generator().manual_seed(0)

    def _count_scheduler_step(self) -> None:
        self.scheduler_steps += 1

    def _get_learning_rate(self) -> float:
        return self.lr

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(random_seed if random_seed is not None else self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.args.zo_eps

    def zo_update(self, model):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self._get_learning_rate() * (
                    self.projected_grad * z + self.args.weight_decay * param.data)
            else:
                param.data = param.data - self._get_learning_rate() * (self.projected_grad * z)
        self.lr_scheduler.step()

    def zo_step(self, loss_fn):
        self.named_parameters_to_optim = [(n, p) for n, p in self.model.named_parameters()
                                          if p.requires_grad]
        self.zo_random_seed = int(torch.randint(0, 1_000_000_000, (1,), generator=self.rng))
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = loss_fn()
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = loss_fn()
        self.projected_grad = float((loss1 - loss2) / (2 * self.args.zo_eps))
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1


def _task():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g) + 0.5
    return x, y


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 2)).to(dtype)


def _train(trainer: MeZOStyleTrainer, steps: int) -> float:
    x, y = _task()
    dtype = next(trainer.model.parameters()).dtype

    def loss_fn():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(trainer.model(x.to(dtype)).float(), y)

    for _ in range(steps):
        trainer.zo_step(loss_fn)
        trainer.zo_update(trainer.model)
    return float(loss_fn())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_restore_is_exact(dtype):
    trainer = patch_mezo_trainer(MeZOStyleTrainer(_model(dtype), 1e-3, 1e-3, 0.0))
    trainer.named_parameters_to_optim = list(trainer.model.named_parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for seed in (3, 2**40 + 7):
        trainer.zo_random_seed = seed
        trainer.zo_perturb_parameters(scaling_factor=1)
        assert not torch.equal(next(trainer.model.parameters()), before[0])
        trainer.zo_perturb_parameters(scaling_factor=-2)
        trainer.zo_perturb_parameters(scaling_factor=1)
        for p, b in zip(trainer.model.parameters(), before):
            assert_bits_equal(p.detach(), b, what="after +1, -2, +1")


def test_weight_decay_rule_by_name():
    trainer = patch_mezo_trainer(MeZOStyleTrainer(_model(), lr=0.1, eps=1e-3, weight_decay=0.5))
    trainer.named_parameters_to_optim = list(trainer.model.named_parameters())
    trainer.projected_grad = 0.0  # only the decay acts
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.zo_update(trainer.model)
    for name, p in trainer.model.named_parameters():
        if "bias" in name:
            assert_bits_equal(p.detach(), before[name], what=name)
        else:
            torch.testing.assert_close(p.detach(), before[name] * 0.95)
    assert trainer.scheduler_steps == 1


@pytest.mark.parametrize("fuse", [False, True])
def test_patched_learns_at_least_as_well(fuse):
    """Averaged over 3 seeds, the patched trainer's final loss is within 10% of the original's
    or lower (the noise streams differ, the algorithm does not)."""
    original, patched = [], []
    for seed in range(3):
        t = MeZOStyleTrainer(_model(), lr=2e-2, eps=1e-3, weight_decay=0.0)
        t.rng.manual_seed(seed)
        original.append(_train(t, 150))
        t = patch_mezo_trainer(MeZOStyleTrainer(_model(), lr=2e-2, eps=1e-3, weight_decay=0.0),
                               fuse_restore_update=fuse)
        t.rng.manual_seed(seed)
        patched.append(_train(t, 150))
    x, y = _task()
    with torch.no_grad():
        start = float(torch.nn.functional.mse_loss(_model()(x), y))
    assert sum(original) / 3 < 0.5 * start
    assert sum(patched) / 3 <= 1.1 * sum(original) / 3, (patched, original)


def test_fused_restore_update_equals_unfused():
    results = []
    for fuse in (False, True):
        t = patch_mezo_trainer(MeZOStyleTrainer(_model(torch.bfloat16), 2e-2, 1e-3, 0.1),
                               fuse_restore_update=fuse)
        _train(t, 5)
        results.append([p.detach().clone() for p in t.model.parameters()])
    for a, b in zip(*results):
        assert_bits_equal(a, b, what="fused vs unfused restore + update")


def test_unpatch_restores_the_original_methods_and_a_pending_restore():
    trainer = MeZOStyleTrainer(_model(), 1e-3, 1e-3, 0.0)
    original = trainer.zo_perturb_parameters
    patch_mezo_trainer(trainer, fuse_restore_update=True)
    assert trainer.zo_perturb_parameters != original
    trainer.named_parameters_to_optim = list(trainer.model.named_parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.zo_random_seed = 11
    trainer.zo_perturb_parameters(scaling_factor=1)
    trainer.zo_perturb_parameters(scaling_factor=-2)
    trainer.zo_perturb_parameters(scaling_factor=1)  # deferred
    unpatch_mezo_trainer(trainer)
    for p, b in zip(trainer.model.parameters(), before):
        assert_bits_equal(p.detach(), b, what="after unpatch")
    assert trainer.zo_perturb_parameters.__func__ is MeZOStyleTrainer.zo_perturb_parameters
    assert "zo_update" not in trainer.__dict__
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_mezo_trainer(trainer)


def test_patch_refuses_non_trainers_and_double_patching():
    with pytest.raises(TypeError, match="zo_perturb_parameters"):
        patch_mezo_trainer(object())
    trainer = patch_mezo_trainer(MeZOStyleTrainer(_model(), 1e-3, 1e-3, 0.0))
    with pytest.raises(RuntimeError, match="already patched"):
        patch_mezo_trainer(trainer)
