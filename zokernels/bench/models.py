"""Models for the step benchmark: a built-in decoder-only transformer (OPT-like names and shapes),
or transformers' OPT / LLaMA built from a config with random weights when transformers is
installed. Nothing is downloaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_len: int = 2048


# Shapes of the built-in decoder; "opt-125m" matches OPT-125m's parameter shapes (tied head).
PRESETS = {
    "tiny": DecoderConfig(vocab=512, d_model=64, n_layers=4, n_heads=4, d_ff=256, max_len=256),
    "small": DecoderConfig(vocab=8192, d_model=256, n_layers=6, n_heads=8, d_ff=1024,
                           max_len=512),
    "opt-125m": DecoderConfig(vocab=50272, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "opt-1.3b": DecoderConfig(vocab=50272, d_model=2048, n_layers=24, n_heads=32, d_ff=8192),
}
# transformers models from their configs (random init): OPT-125m, a tiny Llama, and a BERT of
# MiniLM-L12-H384's shape (12 layers, hidden 384, BERT's vocabulary) with its tied MLM head;
# their (vocabulary, positions), known before a model is built
HF_SIZES = {"hf-opt-125m": (50272, 2048), "hf-llama-tiny": (4096, 2048),
            "hf-bert-minilm": (30522, 512)}
HF_MODELS = tuple(HF_SIZES)


def parameter_count(name: str) -> int | None:
    """Parameters of a built-in decoder, counted on the meta device (no memory); None for the
    transformers models (at most OPT-125m's 125M parameters)."""
    if name not in PRESETS:
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(PRESETS[name]).parameters())


def vocab_and_positions(name: str) -> tuple[int, int]:
    """(vocabulary size, longest sequence) of a step-benchmark model, without building it."""
    if name in PRESETS:
        return PRESETS[name].vocab, PRESETS[name].max_len
    return HF_SIZES[name]


class DecoderLayer(nn.Module):
    """Pre-LayerNorm block with OPT's parameter names (self_attn.{q,k,v,out}_proj, fc1, fc2)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = nn.ModuleDict({name: nn.Linear(d, d)
                                        for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.self_attn_layer_norm(h)

        def heads(name: str) -> torch.Tensor:
            projected = self.self_attn[name](x)
            return projected.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            heads("q_proj"), heads("k_proj"), heads("v_proj"), is_causal=True)
        h = h + self.self_attn["out_proj"](attended.transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(nn.functional.relu(self.fc1(self.final_layer_norm(h))))


class Decoder(nn.Module):
    """Token + position embeddings, the blocks, a final LayerNorm, a head tied to the embedding."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.d_model)
        self.embed_positions = nn.Embedding(config.max_len, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        # tied as in OPT / GPT-2: an nn.Linear sharing the embedding's weight
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False, device="meta")
        self.lm_head.weight = self.embed_tokens.weight

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden state before the head (PseuZO's output o)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed_tokens(ids) + self.embed_positions(positions)
        for layer in self.layers:
            h = layer(h)
        return self.final_layer_norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (float32)."""
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1))


@dataclass
class BenchModel:
    """A model with the three views the optimizers need."""

    name: str
    module: nn.Module
    blocks: list[nn.Module]               # LeZO's layers
    features: "callable"                  # ids -> hidden state (PseuZO's o)
    head_loss: "callable"                 # (hidden, ids) -> loss
    vocab: int

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head_loss(self.features(ids), ids)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _hf_model(name: str) -> BenchModel:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model {name!r} needs transformers (pip install transformers)") from None
    vocab, positions = HF_SIZES[name]
    if name == "hf-opt-125m":
        config = transformers.OPTConfig(vocab_size=vocab, max_position_embeddings=positions,
                                        hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                                        num_attention_heads=12, word_embed_proj_dim=768)
        model = transformers.OPTForCausalLM(config)
        stack, blocks = model.model.decoder, list(model.model.decoder.layers)
    elif name == "hf-bert-minilm":
        config = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=positions,
                                         hidden_size=384, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=1536)
        model = transformers.BertForMaskedLM(config)
        bert = model.bert

        def features(ids: torch.Tensor) -> torch.Tensor:
            return bert(input_ids=ids).last_hidden_state

        def head_loss(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            # the MLM head (its decoder tied to the word embeddings) predicting the next token
            return lm_loss(model.cls(h), ids)

        return BenchModel(name, model, list(bert.encoder.layer), features, head_loss,
                          config.vocab_size)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=positions,
                                          hidden_size=256, intermediate_size=688,
                                          num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(config)
        stack, blocks = model.model, list(model.model.layers)

    def features(ids: torch.Tensor) -> torch.Tensor:
        return stack(input_ids=ids).last_hidden_state

    def head_loss(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return lm_loss(model.lm_head(h), ids)

    return BenchModel(name, model, blocks, features, head_loss, config.vocab_size)


def build_model(name: str, dtype: torch.dtype, device: str, seed: int = 0) -> BenchModel:
    """A model with random weights (fixed seed), in eval mode, in dtype on device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in PRESETS:
            module = Decoder(PRESETS[name])
            model = BenchModel(name, module, list(module.layers), module.features,
                               lambda h, ids: lm_loss(module.head(h), ids),
                               PRESETS[name].vocab)
        elif name in HF_MODELS:
            model = _hf_model(name)
        else:
            raise ValueError(f"unknown model {name!r}; choose from "
                             f"{', '.join(list(PRESETS) + list(HF_MODELS))}")
    model.module.to(device=device, dtype=dtype).eval()
    return model


def synthetic_batch(model: BenchModel, batch: int, seq: int, device: str,
                    seed: int = 0) -> torch.Tensor:
    """Token ids with a learnable pattern (a repeated random phrase), on device."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, model.vocab, (max(2, seq // 4),), generator=g)
    ids = phrase.repeat(math.ceil(seq / phrase.numel()))[:seq]
    offsets = torch.randint(0, phrase.numel(), (batch,), generator=g)
    rows = [torch.roll(ids, -int(o)) for o in offsets]
    return torch.stack(rows).to(device)
