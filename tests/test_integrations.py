"""Layer discovery and the PseuZO causal-LM split, on modules shaped like transformers' models
(built here: no transformers needed, nothing downloaded)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from zokernels.integrations import (
    causal_lm_loss,
    find_transformer_layers,
    lm_inputs,
    pseuzo_causal_lm,
    pseuzo_parameters,
)
from zokernels.optim import PseuZO


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return h + self.mlp(torch.tanh(self.attn(self.norm(h))))


def _stack(n: int = 3, d: int = 8) -> nn.ModuleList:
    return nn.ModuleList(Block(d) for _ in range(n))


def opt_like():  # OPTForCausalLM: model.decoder.layers
    m = nn.Module()
    m.model = nn.Module()
    m.model.decoder = nn.Module()
    m.model.decoder.embed_tokens = nn.Embedding(50, 8)
    m.model.decoder.layers = _stack()
    m.lm_head = nn.Linear(8, 50, bias=False)
    return m, m.model.decoder.layers


def llama_like():  # LlamaForCausalLM: model.layers, plus a small rotary / norm list elsewhere
    m = nn.Module()
    m.model = nn.Module()
    m.model.embed_tokens = nn.Embedding(50, 8)
    m.model.layers = _stack(4)
    m.model.norms = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])  # a decoy list
    return m, m.model.layers


def gpt2_like():  # GPT2LMHeadModel: transformer.h
    m = nn.Module()
    m.transformer = nn.Module()
    m.transformer.wte = nn.Embedding(50, 8)
    m.transformer.h = _stack(2)
    return m, m.transformer.h


def bert_like():  # BertModel: encoder.layer
    m = nn.Module()
    m.embeddings = nn.Embedding(50, 8)
    m.encoder = nn.Module()
    m.encoder.layer = _stack(5)
    return m, m.encoder.layer


@pytest.mark.parametrize("build", [opt_like, llama_like, gpt2_like, bert_like])
def test_find_transformer_layers_by_structure(build):
    model, blocks = build()
    assert find_transformer_layers(model) == list(blocks)


def test_find_transformer_layers_through_a_wrapper():
    model, blocks = opt_like()
    wrapper = nn.Module()
    wrapper.module = model  # DDP-style
    assert find_transformer_layers(wrapper) == list(blocks)


class TinyCausalLM(nn.Module):
    """get_output_embeddings / base_model / last_hidden_state as transformers has them."""

    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, d)
        self.model.layers = _stack(2, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

        def base(input_ids, attention_mask=None):
            h = self.model.embed(input_ids)
            for layer in self.model.layers:
                h = layer(h)
            return types.SimpleNamespace(last_hidden_state=h)
        self._base = base

    @property
    def base_model(self):
        return self._base

    def get_output_embeddings(self):
        return self.lm_head


def test_pseuzo_causal_lm_split_matches_the_full_loss_and_trains():
    torch.manual_seed(0)
    model = TinyCausalLM()
    ids = torch.randint(0, 40, (4, 12))
    ids[:, 1::2] = ids[:, 0::2] % 7  # a learnable pattern
    labels = ids.clone()
    labels[:, :3] = -100
    forward, loss_fn = pseuzo_causal_lm(model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        full = causal_lm_loss(model.lm_head(model.base_model(ids).last_hidden_state), labels)
        assert torch.equal(loss_fn(forward()), full)
    opt = PseuZO(model.named_parameters(), lr=2e-3, eps=1e-3, seed=1, window=4, beta=0.5)
    first = float(opt.step(forward, loss_fn))
    for _ in range(60):
        last = float(opt.step(forward, loss_fn))
    assert last < first


def test_pseuzo_causal_lm_passes_every_input_but_the_labels_to_the_base():
    """position_ids (packed sequences) and other model inputs reach the base model as the full
    model passes them (they were dropped: only input_ids / attention_mask went through)."""
    model = TinyCausalLM()
    seen = {}
    base = model._base
    model._base = lambda **kwargs: seen.update(kwargs) or base(kwargs["input_ids"])
    ids = torch.randint(0, 40, (2, 6))
    positions = torch.arange(6).remainder(3).expand(2, 6)
    forward, _ = pseuzo_causal_lm(model, {"input_ids": ids, "position_ids": positions,
                                          "token_type_ids": torch.zeros_like(ids)})
    forward()
    assert sorted(seen) == ["input_ids", "position_ids", "token_type_ids"]
    assert seen["position_ids"] is positions


def test_pseuzo_causal_lm_refuses_other_models():
    with pytest.raises(TypeError, match="get_output_embeddings"):
        pseuzo_causal_lm(nn.Linear(3, 3), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})


def test_lm_inputs_default_labels_ignore_padding_and_keep_given_labels():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    inputs = lm_inputs(batch)
    assert torch.equal(inputs["labels"], torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]]))
    assert "labels" not in batch  # the caller's batch is not modified
    assert torch.equal(lm_inputs({"input_ids": ids})["labels"], ids)
    given = torch.full_like(ids, 3)
    assert lm_inputs({"input_ids": ids, "labels": given})["labels"] is given
    for bad, error, match in [([1, 2], TypeError, "batch must be a mapping"),
                              ({"attention_mask": mask}, ValueError, "input_ids"),
                              ({"input_ids": ids.float()}, TypeError, "integer tensor"),
                              ({"input_ids": [[1, 2]]}, TypeError, "integer tensor")]:
        with pytest.raises(error, match=match):
            lm_inputs(bad)


def test_pseuzo_parameters_drop_an_untied_head_and_keep_a_tied_one():
    model = TinyCausalLM()
    assert [n for n, _ in pseuzo_parameters(model)] == [
        n for n, _ in model.named_parameters() if n != "lm_head.weight"]
    model.lm_head.weight = model.model.embed.weight  # tied: the head weight is the embedding
    names = [n for n, _ in pseuzo_parameters(model)]
    assert "model.embed.weight" in names
    assert len(names) == len(list(model.parameters()))
    with pytest.raises(TypeError, match="pseuzo_parameters"):
        pseuzo_parameters(nn.Linear(3, 3))
