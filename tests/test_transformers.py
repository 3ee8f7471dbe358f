"""zokernels on transformers models built from tiny configs (random weights, nothing downloaded)
and on PEFT LoRA adapters. Skipped where transformers / peft are not installed (the test extra
installs both)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zokernels.integrations import find_transformer_layers, pseuzo_causal_lm  # noqa: E402
from zokernels.optim import LeZO, MeZO, PseuZO, TeZO  # noqa: E402
from zokernels.space import ParameterSpace, canonical_name  # noqa: E402

from helpers import assert_bits_equal  # noqa: E402

VOCAB = 96


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


@pytest.mark.parametrize("name", ["lezo", "pseuzo"])
def test_finetune_in_one_call(name, capsys):
    from zokernels.integrations import finetune

    model, data = opt_model(), batch()
    with torch.no_grad():
        before = float(model(**data).loss)
    # PseuZO's window (default 14 pairs, beta 0.9) sums up to ~7.7 past directions: smaller lr
    lr = 3e-3 if name == "lezo" else 3e-4
    opt, losses = finetune(model, [data] * 30, optimizer=name, lr=lr, seed=1, log_every=10)
    assert len(losses) == 30 and opt.zo_state["step"] == 30
    with torch.no_grad():
        assert float(model(**data).loss) < before
    assert f"[{name}] step 30" in capsys.readouterr().err
    with pytest.raises(ValueError, match="optimizer must be one of"):
        finetune(model, [data], optimizer="sgd")
