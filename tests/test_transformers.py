"""zokernels on transformers models built from tiny configs (random weights, nothing downloaded)
and on PEFT LoRA adapters. Skipped where transformers / peft are not installed (the test extra
installs both)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zokernels.integrations import (  # noqa: E402
    finetune,
    find_transformer_layers,
    pseuzo_causal_lm,
    pseuzo_parameters,
)
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO  # noqa: E402
from zokernels.space import ParameterSpace, canonical_name  # noqa: E402

from helpers import assert_bits_equal  # noqa: E402

VOCAB = 96


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: with 2 threads on a busy 2-core machine each small matmul waits on
    the other thread (measured: 5 ms per linear, 20x the single-threaded time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def opt_model(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                    ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                    max_position_embeddings=64)
    return transformers.OPTForCausalLM(config).to(dtype).eval()


def llama_model(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def batch():
    """A tiny language-modelling task: a short phrase repeated, so the loss can drop quickly."""
    g = torch.Generator().manual_seed(1)
    phrase = torch.randint(0, VOCAB, (4,), generator=g)
    ids = phrase.repeat(4).unsqueeze(0).repeat(4, 1)
    return {"input_ids": ids, "labels": ids}


def optimizer(name, model, lr):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    common = dict(lr=lr, eps=1e-3, seed=3)
    if name == "mezo":
        return MeZO(named, **common)
    if name == "lezo":
        return LeZO(named, layers=find_transformer_layers(model), n_active=1, **common)
    if name == "tezo":
        return TeZO(named, rank=4, **common)
    return PseuZO(named, window=6, beta=0.5, **common)


def train(name, model, opt, data, steps):
    for _ in range(steps):
        if name == "pseuzo":
            opt.step(*pseuzo_causal_lm(model, data))
        else:
            opt.step(lambda: model(**data).loss)


def mezo_lowers_loss_and_keeps_frozen(model, data, *, lr, seed):
    """30 MeZO steps over the parameters that require grad: the loss drops, every frozen
    parameter stays bit-identical. Returns the optimizer."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = MeZO(model.named_parameters(), lr=lr, eps=1e-3, seed=seed)
    with torch.no_grad():
        before = float(model(**data).loss)
    train("mezo", model, opt, data, 30)
    with torch.no_grad():
        assert float(model(**data).loss) < before
    for name, p in model.named_parameters():
        if name in frozen:
            assert_bits_equal(p.detach(), frozen[name], what=name)
    return opt


@pytest.mark.parametrize("build", [opt_model, llama_model], ids=["opt", "llama"])
@pytest.mark.parametrize("name", ["mezo", "lezo", "tezo", "pseuzo"])
def test_every_optimizer_reduces_the_loss(build, name):
    model, data = build(), batch()
    with torch.no_grad():
        before = float(model(**data).loss)
    opt = optimizer(name, model, lr=3e-3)
    train(name, model, opt, data, 30)
    with torch.no_grad():
        after = float(model(**data).loss)
    assert after < before - 0.02, f"{name}: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("build,stack", [(opt_model, lambda m: m.model.decoder.layers),
                                         (llama_model, lambda m: m.model.layers)],
                         ids=["opt", "llama"])
def test_discovered_layers_are_the_decoder_blocks(build, stack):
    model = build()
    assert find_transformer_layers(model) == list(stack(model))


def gpt2_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                     n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def bert_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


STACKS = {"opt": (opt_model, lambda m: m.model.decoder.layers, ["q_proj", "v_proj"]),
          "llama": (llama_model, lambda m: m.model.layers, ["q_proj", "v_proj"]),
          "gpt2": (gpt2_model, lambda m: m.transformer.h, ["c_attn"]),
          "bert": (bert_model, lambda m: m.encoder.layer, ["query", "value"])}


@pytest.mark.parametrize("kind", list(STACKS))
def test_discovered_layers_are_the_blocks_also_through_lora(kind):
    peft = pytest.importorskip("peft")
    build, stack, targets = STACKS[kind]
    model = build()
    blocks = list(stack(model))
    assert find_transformer_layers(model) == blocks
    wrapped = peft.get_peft_model(model, peft.LoraConfig(  # GPT-2's Conv1D stores W transposed
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=(kind == "gpt2")))
    assert find_transformer_layers(wrapped) == blocks  # the same block objects, adapters inside
    # LeZO over the adapters only: every block owns its adapters, nothing is left outside
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    opt = LeZO(named, layers=find_transformer_layers(wrapped), n_active=1, lr=1e-3, seed=0)
    space = opt.spaces[0]
    assert space.num_layers == len(blocks)
    assert space.layer_members(space.num_layers) == []
    for layer, block in enumerate(blocks):
        members = {space.names[j] for j in space.layer_members(layer)}
        expected = {n for n, p in named if any(p is q for q in block.parameters())}
        assert members == expected and len(members) == 2 * len(targets)


def test_lezo_through_lora_moves_only_the_selected_blocks_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(opt_model(), peft.LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    opt, losses = finetune(model, [unlabelled()], optimizer="lezo", lr=1e-2, seed=3,
                           n_active=1, progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    (record,) = list(opt.trajectory.records())
    (chosen,) = record[4]
    assert moved and all(f"layers.{chosen}." in n and "lora_" in n for n in moved), moved


def test_pseuzo_split_gives_the_model_loss():
    model, data = llama_model(), batch()
    forward, loss_fn = pseuzo_causal_lm(model, data)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(forward()), model(**data).loss)


def test_bf16_model_with_frozen_parameters_interleaved():
    model, data = opt_model(torch.bfloat16), batch()
    for name, p in model.named_parameters():
        if "layers.1." in name or "embed_positions" in name:
            p.requires_grad_(False)
    mezo_lowers_loss_and_keeps_frozen(model, data, lr=3e-3, seed=2)


def test_lora_adapters_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(opt_model(), peft.LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "v_proj"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    opt = mezo_lowers_loss_and_keeps_frozen(model, batch(), lr=1e-2, seed=4)
    # PEFT's wrapper prefix does not change the noise keys
    plain = ParameterSpace([(canonical_name(n), p) for n, p in trainable])
    assert plain.keys == opt.spaces[0].keys


# 1e-3: 3e-3 overshoots full-parameter MeZO / TeZO on the LLaMA config for some seeds. PseuZO's
# window (default 14 pairs, beta 0.9) sums up to ~7.7 past directions: smaller lr
FINETUNE_LR = {"mezo": 1e-3, "lezo": 1e-3, "tezo": 1e-3, "pseuzo": 3e-4}
OPTIMIZERS = list(FINETUNE_LR)


def unlabelled():
    """batch() without labels: finetune must default them to input_ids."""
    return {"input_ids": batch()["input_ids"]}


def model_loss(model, data):
    with torch.no_grad():
        return float(model(**data).loss)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def modes(model):
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("build", [opt_model, llama_model], ids=["opt", "llama"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finetune_reduces_the_loss_without_labels(build, name, capsys):
    model, data = build(), batch()
    before = model_loss(model, data)
    opt, losses = finetune(model, [unlabelled()] * 30, optimizer=name, lr=FINETUNE_LR[name],
                           seed=1, log_every=10)
    assert len(losses) == 30 and opt.zo_state["step"] == 30
    assert all(math.isfinite(loss) for loss in losses)
    after = model_loss(model, data)
    assert after < before - 0.02, f"{name}: {before:.4f} -> {after:.4f}"
    assert f"[{name}] step 30" in capsys.readouterr().err


def freeze_interleaved(model):
    """Freeze a middle block, the k projections of every block and the position embeddings:
    frozen tensors between trainable ones, in every parameter group's order."""
    for name, p in model.named_parameters():
        if "layers.1." in name or "k_proj" in name or "embed_positions" in name:
            p.requires_grad_(False)


@pytest.mark.parametrize("build,dtype", [(opt_model, torch.bfloat16), (llama_model, torch.bfloat16),
                                         (llama_model, torch.float16)],
                         ids=["opt-bf16", "llama-bf16", "llama-fp16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finetune_low_precision_with_frozen_parameters(build, dtype, name):
    model = build(dtype)
    freeze_interleaved(model)
    before = snapshot(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    opt, losses = finetune(model, [unlabelled()] * 4, optimizer=name, lr=FINETUNE_LR[name],
                           seed=2, progress=False)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    changed = set()
    for n, p in model.named_parameters():
        assert p.dtype == dtype and bool(torch.isfinite(p).all()), n
        if n in frozen:
            assert_bits_equal(p.detach(), before[n], what=n)
        elif not torch.equal(p.detach(), before[n]):
            changed.add(n)
    assert changed, "no trainable parameter moved"
    assert math.isfinite(model_loss(model, unlabelled() | {"labels": batch()["labels"]}))


def test_finetune_restores_every_module_mode_on_return_and_on_error():
    model = opt_model().train()
    model.model.decoder.layers[1].eval()  # a mixed state must come back as it was
    expected = modes(model)
    seen = []

    def batches(bad_last):
        for _ in range(2):
            seen.append(model.training or any(m.training for m in model.modules()))
            yield unlabelled()
        if bad_last:
            yield {"input_ids": torch.zeros(1, 4)}  # float ids: refused before the step

    finetune(model, batches(False), optimizer="mezo", lr=1e-3, progress=False)
    assert modes(model) == expected
    with pytest.raises(TypeError, match=r"batches\[2\]\['input_ids'\]"):
        finetune(model, batches(True), optimizer="mezo", lr=1e-3, progress=False)
    assert modes(model) == expected
    assert seen == [False] * 4  # every step ran in eval mode (no dropout)


def test_finetune_refuses_an_optimizer_over_another_model():
    model, other = opt_model(), opt_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="none of model's parameters"):
        finetune(model, [unlabelled()], optimizer=MeZO(other.parameters(), lr=1e-3),
                 progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class NoLoss(torch.nn.Module):
    """A causal LM that ignores its labels: its output has no loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


def test_finetune_restores_the_mode_and_weights_when_the_model_raises():
    model = NoLoss(opt_model()).train()
    expected, before = modes(model), snapshot(model)
    with pytest.raises(ValueError, match="no loss"):  # raised inside the step, after +eps
        finetune(model, [unlabelled()], optimizer="mezo", lr=1e-3, progress=False)
    assert modes(model) == expected
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach(), before[n], what=n)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(steps=True), TypeError, "steps"), (dict(steps=2.0), TypeError, "steps"),
    (dict(steps=0), ValueError, "steps"), (dict(log_every=False), TypeError, "log_every"),
    (dict(log_every="10"), TypeError, "log_every"), (dict(log_every=0), ValueError, "log_every"),
    (dict(progress=1), TypeError, "progress"),
    (dict(optimizer="sgd"), ValueError, "optimizer must be one of"),
    (dict(optimizer=object()), TypeError, "optimizer"),
])
def test_finetune_validates_its_arguments_before_writing(kwargs, error, match):
    model = opt_model()
    before, expected = snapshot(model), modes(model)
    with pytest.raises(error, match=match):
        finetune(model, [unlabelled()] * 2, **{"optimizer": "mezo", "lr": 1e-3, **kwargs})
    assert modes(model) == expected
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach(), before[n], what=n)


def test_finetune_names_bad_batches_before_writing():
    """batches that are not iterable (was: 'NoneType' object is not iterable), and an
    attention_mask of another shape than input_ids when labels default to input_ids (was a
    bare RuntimeError from masked_fill, or, broadcastable, the padding of other positions)."""
    model = opt_model()
    before = snapshot(model)
    with pytest.raises(TypeError, match="batches must be an iterable of dicts"):
        finetune(model, None, optimizer="mezo", lr=1e-3, progress=False)
    batch = unlabelled()
    ones = torch.ones_like(batch["input_ids"])
    for mask in (ones[:, :-1], ones[:1]):
        with pytest.raises(ValueError, match=r"batches\[0\]\['attention_mask'\] must have "
                                             r"input_ids' shape"):
            finetune(model, [{**batch, "attention_mask": mask}], optimizer="mezo", lr=1e-3,
                     progress=False)
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach(), before[n], what=n)


def test_pseuzo_parameters_leave_out_an_untied_head_only():
    llama = llama_model()  # tie_word_embeddings=False
    names = [n for n, _ in pseuzo_parameters(llama)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert names == [n for n, p in llama.named_parameters() if n != "lm_head.weight"]
    opt = opt_model()  # tied: the head's weight is the input embedding and stays
    assert opt.lm_head.weight is opt.get_input_embeddings().weight
    assert [n for n, _ in pseuzo_parameters(opt)] == [n for n, _ in opt.named_parameters()]
    opt.model.decoder.layers[0].fc1.weight.requires_grad_(False)
    assert "model.decoder.layers.0.fc1.weight" not in dict(pseuzo_parameters(opt))


def test_finetune_pseuzo_leaves_an_untied_head_untouched():
    model = llama_model()
    before = snapshot(model)
    opt, _ = finetune(model, [unlabelled()] * 3, optimizer="pseuzo", lr=3e-4, seed=5,
                      progress=False)
    assert all(p is not model.lm_head.weight for g in opt.param_groups for p in g["params"])
    assert_bits_equal(model.lm_head.weight.detach(), before["lm_head.weight"])
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_finetune_pseuzo_through_a_lora_wrapper():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama_model(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in pseuzo_parameters(model)] == adapters
    forward, loss_fn = pseuzo_causal_lm(model, unlabelled())
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(forward()), model(**batch()).loss)
    before = snapshot(model)
    _, losses = finetune(model, [unlabelled()] * 3, optimizer="pseuzo", lr=1e-3, seed=6,
                         progress=False)
    assert all(math.isfinite(loss) for loss in losses)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= set(adapters)


@pytest.mark.parametrize("config", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_pseuzo_refuses_prompt_learning_adapters(config):
    """Prompt / prefix tuning acts in the PEFT wrapper's forward, which PseuZO's split does not
    run: o did not depend on the trained prompt, every coefficient was 0 and training silently
    did nothing. Refused by the split and by pseuzo_parameters."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama_model(), getattr(peft, config)(task_type="CAUSAL_LM",
                                                                     num_virtual_tokens=3))
    for call in (lambda: pseuzo_parameters(model), lambda: pseuzo_causal_lm(model, unlabelled())):
        with pytest.raises(ValueError, match="PEFT prompt / prefix tuning"):
            call()


def test_lora_adapters_with_virtual_probes_equal_the_inplace_run():
    """PEFT's adapters are read through F.linear: MeZO's default virtual probes keep all of them
    virtual (no log) and step bit for bit as the exact in-place probes do."""
    peft = pytest.importorskip("peft")

    def build():
        torch.manual_seed(0)
        return peft.get_peft_model(opt_model(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    inplace, virtual, data = build(), build(), batch()
    with torch.no_grad():
        for p, q in zip(inplace.parameters(), virtual.parameters()):
            q.copy_(p)
    opts = [MeZO([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2,
                 eps=1e-3, probe=probe) for model, probe in ((inplace, "inplace"),
                                                            (virtual, "virtual"))]
    for _ in range(3):
        losses = [opt.step(lambda m=model: m(**data).loss)
                  for opt, model in zip(opts, (inplace, virtual))]
        assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(p, q) for p, q in zip(inplace.parameters(), virtual.parameters()))
    assert opts[1].dense_probe_status == "virtual (12 of 12 parameters)"
    assert opts[1].undo_log_bytes == 0


def test_finetune_draws_no_batch_past_its_steps():
    """finetune(steps=N) drew batch N and dropped it: training in chunks over one iterator
    skipped a batch per call."""
    model = opt_model()
    drawn = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield unlabelled()
    it = batches()
    for _ in range(2):
        _, losses = finetune(model, it, optimizer="mezo", lr=1e-3, steps=2, progress=False)
        assert len(losses) == 2
    assert drawn == [0, 1, 2, 3]
