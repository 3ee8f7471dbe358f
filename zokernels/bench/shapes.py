"""Parameter shapes of common LLMs, built from their configs (nothing is downloaded).

Each table is a list of (name, shape) in the order of the model's `named_parameters()`; tied
weights (OPT's lm_head) appear once, as in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DecoderConfig:
    family: str  # "opt" or "llama"
    hidden: int
    layers: int
    ffn: int
    vocab: int
    kv_hidden: int | None = None  # grouped-query attention width (LLaMA-3)
    max_positions: int = 2048


CONFIGS = {
    "opt-125m": DecoderConfig("opt", 768, 12, 3072, 50272),
    "opt-1.3b": DecoderConfig("opt", 2048, 24, 8192, 50272),
    "opt-2.7b": DecoderConfig("opt", 2560, 32, 10240, 50272),
    "opt-6.7b": DecoderConfig("opt", 4096, 32, 16384, 50272),
    "opt-13b": DecoderConfig("opt", 5120, 40, 20480, 50272),
    "opt-30b": DecoderConfig("opt", 7168, 48, 28672, 50272),
    "opt-66b": DecoderConfig("opt", 9216, 64, 36864, 50272),
    "llama-2-7b": DecoderConfig("llama", 4096, 32, 11008, 32000),
    "llama-3-8b": DecoderConfig("llama", 4096, 32, 14336, 128256, kv_hidden=1024),
}
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")  # peft's default for OPT and LLaMA


def _opt(c: DecoderConfig) -> list[tuple[str, Shape]]:
    d, f = c.hidden, c.ffn
    shapes = [("decoder.embed_tokens.weight", (c.vocab, d)),
              ("decoder.embed_positions.weight", (c.max_positions + 2, d))]
    for i in range(c.layers):
        p = f"decoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes += [(f"{p}self_attn.{proj}.weight", (d, d)), (f"{p}self_attn.{proj}.bias", (d,))]
        shapes += [(f"{p}self_attn_layer_norm.weight", (d,)), (f"{p}self_attn_layer_norm.bias", (d,)),
                   (f"{p}fc1.weight", (f, d)), (f"{p}fc1.bias", (f,)),
                   (f"{p}fc2.weight", (d, f)), (f"{p}fc2.bias", (d,)),
                   (f"{p}final_layer_norm.weight", (d,)), (f"{p}final_layer_norm.bias", (d,))]
    shapes += [("decoder.final_layer_norm.weight", (d,)), ("decoder.final_layer_norm.bias", (d,))]
    return shapes


def _llama(c: DecoderConfig) -> list[tuple[str, Shape]]:
    d, f, kv = c.hidden, c.ffn, c.kv_hidden or c.hidden
    shapes = [("model.embed_tokens.weight", (c.vocab, d))]
    for i in range(c.layers):
        p = f"model.layers.{i}."
        shapes += [(f"{p}self_attn.q_proj.weight", (d, d)), (f"{p}self_attn.k_proj.weight", (kv, d)),
                   (f"{p}self_attn.v_proj.weight", (kv, d)), (f"{p}self_attn.o_proj.weight", (d, d)),
                   (f"{p}mlp.gate_proj.weight", (f, d)), (f"{p}mlp.up_proj.weight", (f, d)),
                   (f"{p}mlp.down_proj.weight", (d, f)),
                   (f"{p}input_layernorm.weight", (d,)), (f"{p}post_attention_layernorm.weight", (d,))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (c.vocab, d))]
    return shapes


def _lora(base: list[tuple[str, Shape]], rank: int) -> list[tuple[str, Shape]]:
    """LoRA A (r x in) and B (out x r) for every targeted projection weight."""
    shapes = []
    for name, shape in base:
        if len(shape) == 2 and any(f".{t}." in name for t in LORA_TARGETS):
            out_features, in_features = shape
            stem = name[: -len(".weight")]
            shapes += [(f"{stem}.lora_A.weight", (rank, in_features)),
                       (f"{stem}.lora_B.weight", (out_features, rank))]
    return shapes


def model_shapes(name: str) -> list[tuple[str, Shape]]:
    """(parameter name, shape) for a model name, or its LoRA adapters with a `-lora` suffix."""
    base_name = name[: -len("-lora")] if name.endswith("-lora") else name
    if base_name not in CONFIGS:
        raise ValueError(f"unknown shape set {name!r}; known: {', '.join(shape_set_names())}")
    config = CONFIGS[base_name]
    shapes = _opt(config) if config.family == "opt" else _llama(config)
    return _lora(shapes, LORA_RANK) if name.endswith("-lora") else shapes


def shape_set_names() -> list[str]:
    return list(CONFIGS) + [f"{name}-lora" for name in CONFIGS]


def numel(shapes: list[tuple[str, Shape]]) -> int:
    total = 0
    for _, shape in shapes:
        count = 1
        for size in shape:
            count *= size
        total += count
    return total
