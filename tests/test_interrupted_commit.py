"""A step's commit (its update passes, trajectory record and step counter) is all or nothing.

A Ctrl-C (SIGINT) that arrives while the update writes the weights is held until the commit is
over: the step completes, then KeyboardInterrupt is raised, and the run resumes as if it had not
been interrupted. Before, the interrupt left targets perturbed or the weights updated under a step
counter that said otherwise. A pass that fails outright (out of memory) restores the targets it
did not reach and says which ones kept the update."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest
import torch

from helpers import MixedDtypeNet, assert_bits_equal, assert_same, assert_states_equal, snapshot
from zokernels import held as held_module
from zokernels import space as space_module
from zokernels import lowrank_space as lowrank_module
from zokernels import _signals
from zokernels._signals import interrupts_deferred
from zokernels.optim import tezo as tezo_module
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO


def send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_deferred_sigint_arrives_after_the_section():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            send_sigint()
            done.append("body")
            with interrupts_deferred():  # nested: part of the outer section
                done.append("inner")
            done.append("after inner")
    assert done == ["body", "inner", "after inner"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_sigint_calls_the_installed_handler_once_after():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_deferred():
            send_sigint()
            send_sigint()  # a handler of the user's is never run inside (it may save state)
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_sigint_interrupts_at_once():
    """Pressing Ctrl-C twice stops a section that takes too long (the state it protects is
    then the user's to repair); nested sections are part of the outermost."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            with interrupts_deferred():
                send_sigint()
                done.append("first held")
                send_sigint()
                done.append("not reached")
    assert done == ["first held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sections_outside_the_main_thread_run_plainly():
    seen = []

    def body():
        with interrupts_deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


Net = MixedDtypeNet  # several kernel calls and targets per update
X = torch.linspace(-1, 1, 12).reshape(2, 6)
NAMES = ["mezo", "mezo-inplace", "lezo", "tezo", "tezo-inplace", "tezo-deferred", "pseuzo"]


def make(name: str, net: Net):
    common = dict(lr=1e-2, eps=1e-3, seed=7)
    if name.startswith("mezo"):
        return MeZO(net.named_parameters(), probe="inplace" if name == "mezo-inplace"
                    else "virtual", **common)
    if name == "lezo":
        return LeZO(net.named_parameters(), layers=[net.first, net.second], n_active=1, **common)
    if name.startswith("tezo"):
        extra = {"tezo-inplace": {"probe": "inplace"}, "tezo-deferred": {"update": "deferred"}}
        return TeZO(net.named_parameters(), rank=2, **extra.get(name, {}), **common)
    return PseuZO(net.named_parameters(), window=3, **common)


def take_step(name: str, opt, net: Net):
    if name == "pseuzo":
        return opt.step(lambda: net(X), lambda out: out.pow(2).mean())
    return opt.step(lambda: net(X).pow(2).mean())


def interrupt_inside_updates(monkeypatch, action) -> list:
    """Run `action` at the first kernel pass of every HeldPerturbation.update from now on
    (dense and low-rank passes alike); returns the list of passes it ran at."""
    state = {"updating": False}
    fired = []
    update = held_module.HeldPerturbation.update

    def updating(self, *args, **kwargs):
        state["updating"] = True
        try:
            return update(self, *args, **kwargs)
        finally:
            state["updating"] = False

    def hooked(original, name):
        def call(*args, **kwargs):
            if state["updating"]:
                state["updating"] = False  # once per update
                fired.append(name)
                action()
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(held_module.HeldPerturbation, "update", updating)
    monkeypatch.setattr(space_module, "run_perturb", hooked(space_module.run_perturb, "dense"))
    monkeypatch.setattr(lowrank_module, "lowrank_perturb_",
                        hooked(lowrank_module.lowrank_perturb_, "lowrank"))
    return fired


@pytest.mark.parametrize("name", NAMES)
def test_sigint_during_the_update_completes_the_step_first(name, monkeypatch):
    reference, net = Net(), Net()
    ref_opt, opt = make(name, reference), make(name, net)
    for _ in range(2):
        take_step(name, ref_opt, reference)
        take_step(name, opt, net)
    take_step(name, ref_opt, reference)
    fired = interrupt_inside_updates(monkeypatch, send_sigint)
    with pytest.raises(KeyboardInterrupt):
        take_step(name, opt, net)
    monkeypatch.undo()
    assert fired, "the update made no kernel pass"
    assert opt.zo_state["step"] == ref_opt.zo_state["step"] == 3
    if name == "tezo-deferred":
        opt.merge()
        ref_opt.merge()
    assert_same(snapshot(net), snapshot(reference), f"{name}: interrupted step")
    assert_states_equal(opt.state_dict(), ref_opt.state_dict())
    take_step(name, ref_opt, reference)  # and the run goes on as if never interrupted
    take_step(name, opt, net)
    assert_same(snapshot(net), snapshot(reference), f"{name}: the step after")


def two_target_run():
    """MeZO in place with two parameter groups (one target each) after one step: (net, opt,
    its weights now, the weights an uninterrupted second step gives)."""
    def build(net):
        return MeZO([{"params": list(net.first.named_parameters(prefix="first"))},
                     {"params": list(net.second.named_parameters(prefix="second"))}],
                    lr=1e-2, eps=1e-3, seed=7, probe="inplace")

    reference, net = Net(), Net()
    ref_opt, opt = build(reference), build(net)
    take_step("mezo", ref_opt, reference)
    take_step("mezo", opt, net)
    take_step("mezo", ref_opt, reference)
    return net, opt, snapshot(net), snapshot(reference)


def assert_first_updated_second_restored(net, before, updated) -> None:
    after = snapshot(net)
    for prefix, expected, what in (("first", updated, "updated"), ("second", before, "restored")):
        assert_same({n: t for n, t in after.items() if n.startswith(prefix)},
                    {n: t for n, t in expected.items() if n.startswith(prefix)}, what)


def failing_step_notes(monkeypatch, opt, net, write, error_type) -> str:
    """A MeZO step whose DenseTarget.write is `write`, raising `error_type`: its notes."""
    monkeypatch.setattr(held_module.DenseTarget, "write", write)
    with pytest.raises(error_type) as error:
        take_step("mezo", opt, net)
    monkeypatch.undo()
    return "\n".join(getattr(error.value, "__notes__", []))


def test_a_failing_update_pass_restores_the_targets_it_did_not_reach(monkeypatch):
    """MeZO with two parameter groups (one target each): the second group's pass fails before
    writing. The first group keeps its update, the second is back at its exact theta, and the
    error says so; nothing is left perturbed."""
    net, opt, before, updated = two_target_run()

    class OutOfMemory(RuntimeError):
        pass

    write = held_module.DenseTarget.write
    calls = []

    def failing_second_update(self, move, held=None, **kwargs):
        if "decay" in kwargs:
            calls.append(self)
            if len(calls) == 2:
                raise OutOfMemory("out of memory")
        return write(self, move, held, **kwargs)

    notes = failing_step_notes(monkeypatch, opt, net, failing_second_update, OutOfMemory)
    assert "failed at target 1 of 2: targets [0, 1) keep the update" in notes
    assert_first_updated_second_restored(net, before, updated)
    assert not opt.held.active and opt.zo_state["step"] == 1


@pytest.mark.parametrize("name", ["tezo", "tezo-inplace"])
def test_tezo_interrupted_before_its_update_keeps_its_moments(name, monkeypatch):
    """The tau-space update advances the moments before the step's one host synchronization;
    an interrupt there (or a warning raised as an error) puts them back with the weights."""
    net = Net()
    opt = TeZO(net.named_parameters(), rank=2, lr=1e-2, eps=1e-3, seed=7, variant="adam",
               probe="inplace" if name == "tezo-inplace" else "virtual")
    take_step(name, opt, net)
    before, state = snapshot(net), opt.state_dict()

    def interrupted(*values):
        raise KeyboardInterrupt

    monkeypatch.setattr(opt, "_finite_and_zero", interrupted)  # the step's host sync
    with pytest.raises(KeyboardInterrupt):
        take_step(name, opt, net)
    monkeypatch.undo()
    assert_same(snapshot(net), before, f"{name}: weights")
    after = opt.state_dict()
    for key in ("zo_state", "trajectory"):
        assert_states_equal(after[key], state[key], key)
    for key, value in state["extra"].items():  # the moments (the logs' sizing saw the probes)
        if "undo_logs" not in key:
            assert_states_equal(after["extra"][key], value, key)


def test_sigint_during_a_deferred_merge_merges_every_weight_once(monkeypatch):
    """TeZO's deferred updates are merged run by run, each run's pending vector reset once it is
    written: an interrupt between the two would merge that run again later."""
    reference, net = Net(), Net()
    ref_opt, opt = make("tezo-deferred", reference), make("tezo-deferred", net)
    for _ in range(2):
        take_step("tezo-deferred", ref_opt, reference)
        take_step("tezo-deferred", opt, net)
    ref_opt.merge()
    original = lowrank_module.lowrank_perturb_
    fired = []

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        if not fired:  # right after a run is written, before its pending vector is reset
            fired.append(1)
            send_sigint()

    monkeypatch.setattr(lowrank_module, "lowrank_perturb_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.merge()
    monkeypatch.undo()
    assert fired
    opt.merge()  # nothing left pending: a second merge writes nothing
    assert_same(snapshot(net), snapshot(reference), "merged once")


def test_sigint_during_a_skipped_step_still_counts_it(monkeypatch):
    """A non-finite step is restored, counted in skipped_steps and passed by the step counter
    together: an interrupt in the restore used to leave skipped_steps ahead of the counter,
    which a checkpoint then refuses to load."""
    net = Net()
    opt = make("mezo-inplace", net)
    before = snapshot(net)
    restore = held_module.HeldPerturbation._restore_targets

    def interrupted(self, *args, **kwargs):
        send_sigint()
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(held_module.HeldPerturbation, "_restore_targets", interrupted)
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(KeyboardInterrupt):
        opt.step(lambda: net(X).pow(2).mean() * float("nan"))
    monkeypatch.undo()
    assert_same(snapshot(net), before, "skipped step")
    assert opt.zo_state["step"] == opt.zo_state["skipped_steps"] == 1
    opt.load_state_dict(opt.state_dict())


def test_sigint_as_a_restore_begins_leaves_the_weights_restorable(monkeypatch):
    """The restore between two seeds (n_spsa = 2, in place) marks the weights exact inside its
    held section: a signal that arrives as the section is entered finds them still marked as
    perturbed, and the step's own restore gives theta back."""
    net = Net()
    opt = MeZO(net.named_parameters(), lr=1e-2, eps=1e-3, seed=7, probe="inplace", n_spsa=2)
    before = snapshot(net)
    real = held_module.interrupts_deferred
    calls = []

    def arriving_first(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "restore" and not calls:
            calls.append(1)
            send_sigint()
        return real(*args, **kwargs)

    monkeypatch.setattr(held_module, "interrupts_deferred", arriving_first)
    with pytest.raises(KeyboardInterrupt):
        take_step("mezo", opt, net)
    monkeypatch.undo()
    assert calls and not opt.held.active
    assert_same(snapshot(net), before, "interrupted between seeds")


def interrupt_after_first_pass(monkeypatch) -> list:
    """SIGINT right after the first dense kernel pass returns (before its caller records what it
    wrote); returns the list it fires into."""
    fired = []
    original = space_module.run_perturb

    def run(*args, **kwargs):
        original(*args, **kwargs)
        if not fired and not kwargs.get("count_only"):  # (a log's sizing pass writes nothing)
            fired.append(1)
            send_sigint()

    monkeypatch.setattr(space_module, "run_perturb", run)
    return fired


@pytest.mark.parametrize("name", ["mezo-inplace", "tezo-inplace"])
def test_sigint_right_after_an_inplace_probe_pass_restores_exactly(name, monkeypatch):
    """The +eps pass and the record that the weights hold it go together: an interrupt right
    after the pass used to leave it unrecorded, so the step's restore skipped it."""
    net = Net()
    opt = make(name, net)
    take_step(name, opt, net)
    before = snapshot(net)
    fired = interrupt_after_first_pass(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        take_step(name, opt, net)
    monkeypatch.undo()
    assert fired and not opt.held.active
    assert_same(snapshot(net), before, f"{name}: interrupted after its first pass")


def test_sigint_in_the_mezo_trainer_patch_keeps_its_state_true(monkeypatch):
    """The patch's moves (zokernels.compat) record what the weights hold in the same held
    section: interrupted right after the +1 pass, the -1 move that follows returns to theta."""
    from test_compat import MeZOStyleTrainer, _model
    from zokernels.compat import patch_mezo_trainer

    trainer = patch_mezo_trainer(MeZOStyleTrainer(_model(torch.bfloat16), 1e-3, 1e-3, 0.0))
    trainer.named_parameters_to_optim = list(trainer.model.named_parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.zo_random_seed = 3
    fired = interrupt_after_first_pass(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trainer.zo_perturb_parameters(scaling_factor=1)
    monkeypatch.undo()
    assert fired
    trainer.zo_perturb_parameters(scaling_factor=-1)
    for p, b in zip(trainer.model.parameters(), before):
        assert_bits_equal(p.detach(), b, what="back at theta")


@pytest.mark.parametrize("name", ["tezo", "tezo-inplace"])
def test_sigint_as_tezo_commits_keeps_moments_and_weights(name, monkeypatch):
    """TeZO's section opens before its tau-space update advances the moments: a signal that
    arrives as it opens finds the moments and the weights as they were before the step."""
    net = Net()
    opt = TeZO(net.named_parameters(), rank=2, lr=1e-2, eps=1e-3, seed=7, variant="adam",
               probe="inplace" if name == "tezo-inplace" else "virtual")
    take_step(name, opt, net)
    before, state = snapshot(net), opt.state_dict()
    real = tezo_module.interrupts_deferred
    calls = []

    def arriving_first(*args, **kwargs):
        if not calls:
            calls.append(1)
            send_sigint()
        return real(*args, **kwargs)

    monkeypatch.setattr(tezo_module, "interrupts_deferred", arriving_first)
    with pytest.raises(KeyboardInterrupt):
        take_step(name, opt, net)
    monkeypatch.undo()
    assert calls and _signals._depth == 0
    assert_same(snapshot(net), before, f"{name}: weights")
    for key in ("momentum", "second"):
        assert_states_equal(opt.state_dict()["extra"][key], state["extra"][key], key)


@pytest.mark.parametrize("fuse", [True, False])
def test_sigint_in_the_patched_zo_update_keeps_the_run_exact(fuse, monkeypatch):
    """Interrupted inside the patched zo_update's pass, the update completes with what the patch
    records of it (a deferred restore carried out, the seeds held), and the run goes on as if
    it had not been interrupted."""
    from test_compat import MeZOStyleTrainer, _model, _task
    from zokernels.compat import patch_mezo_trainer

    x, y = _task()

    def build():
        trainer = patch_mezo_trainer(MeZOStyleTrainer(_model(torch.bfloat16), 1e-3, 1e-3, 0.0),
                                     fuse_restore_update=fuse)
        loss = lambda: torch.nn.functional.mse_loss(
            trainer.model(x.to(torch.bfloat16)).float(), y)
        return trainer, loss

    (reference, ref_loss), (trainer, loss) = build(), build()
    for _ in range(2):
        reference.zo_step(ref_loss)
        reference.zo_update(reference.model)
    trainer.zo_step(loss)
    fired = interrupt_inside_updates(monkeypatch, send_sigint)
    with pytest.raises(KeyboardInterrupt):
        trainer.zo_update(trainer.model)
    monkeypatch.undo()
    assert fired
    trainer.lr_scheduler.step()  # what the interrupt skipped of the trainer's own zo_update
    trainer.zo_step(loss)
    trainer.zo_update(trainer.model)
    for p, q in zip(trainer.model.parameters(), reference.model.parameters()):
        assert_bits_equal(p.detach(), q.detach(), what="after an interrupted zo_update")


def test_a_second_sigint_inside_an_update_stops_it_and_says_where(monkeypatch):
    """Two presses while the first of two targets' update passes returns: the second raises at
    once. The first target keeps its update, the second is restored, the note says so, and
    no section is left open."""
    net, opt, before, updated = two_target_run()
    write = held_module.DenseTarget.write
    pressed = []

    def pressed_twice(self, move, held=None, **kwargs):
        write(self, move, held, **kwargs)
        if "decay" in kwargs and not pressed:
            pressed.append(1)
            send_sigint()
            send_sigint()

    notes = failing_step_notes(monkeypatch, opt, net, pressed_twice, KeyboardInterrupt)
    assert "stopped by a second Ctrl-C at target 0 of 2" in notes
    assert_first_updated_second_restored(net, before, updated)
    assert _signals._depth == 0 and not opt.held.active
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_as_a_section_closes_leaves_no_section_open(monkeypatch):
    """A SIGINT landing right after the section puts the handler back raises there; the next
    section still holds signals."""
    real_signal = signal.signal
    sent = []

    def swap(signum, handler):
        result = real_signal(signum, handler)
        if handler is signal.default_int_handler and not sent:
            sent.append(1)
            send_sigint()
        return result

    monkeypatch.setattr(_signals.signal, "signal", swap)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            pass
    monkeypatch.undo()
    assert sent and _signals._depth == 0
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            send_sigint()
            held_back = True
    assert held_back
