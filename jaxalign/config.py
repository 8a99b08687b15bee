"""Frozen, validated configuration objects, one per concern.

Each config checks itself on construction, so a bad value fails where it is written,
with the offending key in the message.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")


class JaxalignError(ValueError):
    """Bad input that we can name: a file, row, tensor, key or mesh size. The CLI prints it
    as one line instead of a traceback."""


class ConfigError(JaxalignError):
    """A configuration value is missing, unknown or out of range."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder plus how we run it.

    The first group mirrors the Hugging Face `LlamaConfig` fields we support; the second
    (dtypes, layer scanning, remat) only changes how the same numbers are computed.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: Literal["default", "linear", "llama3"] = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Scanned layers compile in constant time; unrolled layers ran a train step 2x faster
    # on a 2-core CPU (DESIGN.md section 5). Same parameter layout either way.
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim"):
            _require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"model.num_heads ({self.num_heads}) must be a multiple of "
                 f"model.num_kv_heads ({self.num_kv_heads})")
        _require(self.rope_type in ROPE_TYPES,
                 f"model.rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        _require(self.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}")
        _require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
        _require(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}")

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> "ModelConfig":
        """Reads a Hugging Face `config.json` dict (transformers 4 or 5 layout).

        Anything we would have to approximate is refused with the field that caused it.
        """
        model_type = hf.get("model_type")
        _require(model_type == "llama",
                 f"config.json: model_type {model_type!r} is not supported (only 'llama')")
        act = hf.get("hidden_act", "silu")
        _require(act == "silu", f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            _require(key in hf, f"config.json: required field {key!r} is missing")

        # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta`
        # plus an optional `rope_scaling` dict. Accept both.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ROPE_TYPES,
                 f"config.json: rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if rope_type in ("linear", "llama3"):
            _require("factor" in rope, f"config.json: rope type {rope_type!r} needs 'factor'")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _require(key in rope, f"config.json: llama3 rope scaling needs {key!r}")

        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            **runtime,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh shape. One axis may be -1: it takes whatever devices are left."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.shape
        _require(all(s == -1 or s >= 1 for s in sizes),
                 f"mesh sizes must be >= 1 or -1, got data={self.data} fsdp={self.fsdp} "
                 f"tensor={self.tensor}")
        _require(sum(s == -1 for s in sizes) <= 1,
                 f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} "
                 f"tensor={self.tensor}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)
