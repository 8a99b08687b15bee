"""What a model family declares, and the Llama rows the others reuse.

A family is data: the HF `model_type`s and architectures it reads, the config.json fields it
refuses by name, the block flags it sets on `ModelConfig` (the Llama block runs every family
here; a flag that is off costs no op), and its conversion rows. A row names an HF key (with
`{i}` for the layer index), our param path and a transform applied forwards on import and
backwards on export, so one table serves both directions and shape validation.

Shape letters as in models/llama.py: D hidden, N heads, K kv heads, H head_dim, F mlp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")   # the MLP gate's activation (Gemma: GeGLU)
Cfg = Any   # a ModelConfig (not imported: config reads the families, not the reverse)
HF = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF array -> our array (`fwd`) and back (`inv`); both pure reshapes / transposes."""
    fwd: Callable[[np.ndarray, Cfg], np.ndarray]
    inv: Callable[[np.ndarray, Cfg], np.ndarray]


IDENTITY = Transform(lambda x, c: x, lambda x, c: x)
TRANSPOSE = Transform(lambda x, c: x.T, lambda x, c: x.T)
# nn.Linear stores (out, in); ours is (in, heads, head_dim) for q/k/v ...
Q_PROJ = Transform(lambda x, c: x.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
                   lambda x, c: x.reshape(c.hidden_size, -1).T)
KV_PROJ = Transform(lambda x, c: x.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
                    lambda x, c: x.reshape(c.hidden_size, -1).T)
# ... and (heads, head_dim, out) for o.
O_PROJ = Transform(lambda x, c: x.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
                   lambda x, c: x.reshape(-1, c.hidden_size).T)
Q_BIAS = Transform(lambda x, c: x.reshape(c.num_heads, c.head_dim), lambda x, c: x.reshape(-1))
KV_BIAS = Transform(lambda x, c: x.reshape(c.num_kv_heads, c.head_dim), lambda x, c: x.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Row:
    """One HF tensor <-> one of our params."""
    hf_key: str                  # '{i}' = layer index
    path: tuple[str, ...]        # our param path; per-layer rows live under 'layers'
    transform: Transform
    when: Callable[[Cfg], bool] = lambda c: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return (self.path,)

    def to_ours(self, x: np.ndarray, cfg: Cfg) -> tuple[np.ndarray, ...]:
        return (self.transform.fwd(x, cfg),)

    def to_hf(self, parts: tuple[np.ndarray, ...], cfg: Cfg) -> np.ndarray:
        return self.transform.inv(parts[0], cfg)


@dataclasses.dataclass(frozen=True)
class FusedRow:
    """One HF nn.Linear weight holding several of ours stacked on its output axis (Phi-3's
    qkv_proj, gate_up_proj): split on import, concatenated on export, each part through its
    own 1:1 transform. `rows(cfg)` gives each part's number of output rows."""
    hf_key: str
    parts: tuple[tuple[tuple[str, ...], Transform, Callable[[Cfg], int]], ...]
    when: Callable[[Cfg], bool] = lambda c: True

    per_layer = Row.per_layer

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(p for p, _, _ in self.parts)

    def to_ours(self, x: np.ndarray, cfg: Cfg) -> tuple[np.ndarray, ...]:
        bounds = np.cumsum([rows(cfg) for _, _, rows in self.parts])[:-1]
        return tuple(t.fwd(piece, cfg) for (_, t, _), piece in zip(self.parts, np.split(x, bounds)))

    def to_hf(self, parts: tuple[np.ndarray, ...], cfg: Cfg) -> np.ndarray:
        return np.concatenate([t.inv(a, cfg) for (_, t, _), a in zip(self.parts, parts)], axis=0)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A config.json field this family does not implement: refused in one line naming it."""
    field: str
    refused: Callable[[HF], bool]
    why: str


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    causal_lm: tuple[str, ...]      # HF architectures read as a causal LM; the first is written
    classifier: str                 # HF sequence-classification architecture (reward models)
    rows: tuple[Row | FusedRow, ...]
    flags: Callable[[HF], dict[str, Any]] = lambda hf: {}   # ModelConfig fields it sets
    refusals: tuple[Refusal, ...] = ()
    # config.json fields special to the family, for an export built from a ModelConfig alone
    config_keys: Callable[[Cfg], dict[str, Any]] = lambda cfg: {}
    # HF module names a user may give as LoRA targets -> ours (Phi-3's fused projections;
    # a PEFT export joins their adapters back, convert/peft.py)
    lora_aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.causal_lm + (self.classifier,)

    def active_rows(self, cfg: Cfg) -> list[Row | FusedRow]:
        return [r for r in self.rows if r.when(cfg)]


_L = "model.layers.{i}."
# The Llama block's rows; other families take them and change a few.
EMBED_AND_HEADS: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", ("embed",), IDENTITY),
    Row("model.norm.weight", ("final_norm", "scale"), IDENTITY),
    Row("lm_head.weight", ("lm_head",), TRANSPOSE,
        lambda c: c.num_labels == 0 and not c.tie_word_embeddings),
    Row("score.weight", ("score",), TRANSPOSE, lambda c: c.num_labels > 0),
    Row(_L + "input_layernorm.weight", ("layers", "attn_norm", "scale"), IDENTITY),
    Row(_L + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), IDENTITY),
)
QKV: tuple[Row, ...] = (
    Row(_L + "self_attn.q_proj.weight", ("layers", "attn", "q"), Q_PROJ),
    Row(_L + "self_attn.k_proj.weight", ("layers", "attn", "k"), KV_PROJ),
    Row(_L + "self_attn.v_proj.weight", ("layers", "attn", "v"), KV_PROJ),
)
O: tuple[Row, ...] = (Row(_L + "self_attn.o_proj.weight", ("layers", "attn", "o"), O_PROJ),)
# Biases on q, k, v: with `attention_bias` (all four, Llama) or `qkv_bias` (Qwen2: not o).
BIASES: tuple[Row, ...] = (
    Row(_L + "self_attn.q_proj.bias", ("layers", "attn", "q_bias"), Q_BIAS,
        lambda c: c.attention_bias or c.qkv_bias),
    Row(_L + "self_attn.k_proj.bias", ("layers", "attn", "k_bias"), KV_BIAS,
        lambda c: c.attention_bias or c.qkv_bias),
    Row(_L + "self_attn.v_proj.bias", ("layers", "attn", "v_bias"), KV_BIAS,
        lambda c: c.attention_bias or c.qkv_bias),
    Row(_L + "self_attn.o_proj.bias", ("layers", "attn", "o_bias"), IDENTITY, lambda c: c.attention_bias),
)
GATE_UP: tuple[Row, ...] = (
    Row(_L + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), TRANSPOSE),
    Row(_L + "mlp.up_proj.weight", ("layers", "mlp", "up"), TRANSPOSE),
)
DOWN: tuple[Row, ...] = (
    Row(_L + "mlp.down_proj.weight", ("layers", "mlp", "down"), TRANSPOSE),
    Row(_L + "mlp.gate_proj.bias", ("layers", "mlp", "gate_bias"), IDENTITY, lambda c: c.mlp_bias),
    Row(_L + "mlp.up_proj.bias", ("layers", "mlp", "up_bias"), IDENTITY, lambda c: c.mlp_bias),
    Row(_L + "mlp.down_proj.bias", ("layers", "mlp", "down_bias"), IDENTITY, lambda c: c.mlp_bias),
)
LLAMA_ROWS = EMBED_AND_HEADS + QKV + O + BIASES + GATE_UP + DOWN


def true(hf: HF, key: str) -> bool:
    return bool(hf.get(key))


def window(hf: HF) -> dict[str, Any]:
    """`sliding_window` as the Mistral / Phi-3 blocks use it: on every layer, or null."""
    w = hf.get("sliding_window")
    return {"sliding_window": None if w is None else int(w)}
