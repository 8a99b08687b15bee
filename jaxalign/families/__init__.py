"""The model families jaxalign reads and writes: one table, read by config reading
(`ModelConfig.from_hf`), conversion and export (`convert.hf`), LoRA targets and `jaxalign plan`.

Adding a family: one module here declaring its `Family` (model_types, architectures, refused
fields, block flags, rows), one row in `FAMILIES`, and its parity test in
tests/test_families.py (see docs/families.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxalign.errors import ConfigError
from jaxalign.families.base import HIDDEN_ACTS, ROPE_TYPES, Family, Refusal, true
from jaxalign.families.gemma import GEMMA2, GEMMA3
from jaxalign.families.llama import LLAMA
from jaxalign.families.mistral import MISTRAL
from jaxalign.families.phi3 import PHI3
from jaxalign.families.qwen import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3,
                                                         GEMMA2, GEMMA3)}
_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
_BY_ARCH = {a: f for f in FAMILIES.values() for a in f.architectures}

# Refused in every family: what the Llama block does not compute.
COMMON_REFUSALS = (
    Refusal("num_local_experts", lambda hf: true(hf, "num_local_experts"), "mixture-of-experts "
            "layers are not implemented"),
    Refusal("num_experts", lambda hf: true(hf, "num_experts"), "mixture-of-experts layers are "
            "not implemented"),
)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model.family {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def of_config(hf: Mapping[str, Any]) -> Family:
    """The family of a config.json: by model_type, which its architectures must agree with."""
    model_type = hf.get("model_type")
    if model_type not in _BY_TYPE:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported (supported: "
                          f"{', '.join(sorted(_BY_TYPE))})")
    family = _BY_TYPE[model_type]
    archs = list(hf.get("architectures") or [])
    if len(archs) > 1 or any(a not in family.architectures for a in archs):
        other = {_BY_ARCH[a].name for a in archs if a in _BY_ARCH} - {family.name}
        if other:
            raise ConfigError(f"config.json: model_type {model_type!r} does not match "
                              f"architectures {archs} (a {sorted(other)[0]} model)")
        raise ConfigError(f"config.json: architectures {archs} is not supported; expected one of "
                          f"{list(family.architectures)}")
    return family


def num_labels(hf: Mapping[str, Any]) -> int:
    """0 for a causal LM; the label count of a <Family>ForSequenceClassification.

    transformers 5 writes `id2label` (not `num_labels`); where both are present, `num_labels`
    wins, as in PretrainedConfig. With neither, transformers' default is 2 labels.
    """
    family = of_config(hf)
    if list(hf.get("architectures") or []) != [family.classifier]:
        return 0
    if hf.get("num_labels") is not None:
        n = int(hf["num_labels"])
    elif hf.get("id2label"):
        n = len(hf["id2label"])
    else:
        n = 2
    if n < 1:
        raise ConfigError(f"config.json: {family.classifier} with {n} labels")
    return n


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """config.json -> the ModelConfig fields it determines (architecture only, no runtime).

    Anything we would have to approximate is refused with the field that caused it."""
    family = of_config(hf)
    # Gemma writes `hidden_activation` (its `hidden_act` is null or an older name).
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    require(act in HIDDEN_ACTS, f"config.json: hidden_act {act!r} is not supported (one of "
             f"{HIDDEN_ACTS})")
    for r in COMMON_REFUSALS + family.refusals:
        require(not r.refused(hf), f"config.json: {r.field}: not supported for {family.name} "
                 f"({r.why})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        require(key in hf, f"config.json: required field {key!r} is missing")

    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta`
    # plus an optional `rope_scaling` dict. Accept both; where both are present,
    # `rope_scaling` wins, as in transformers (convert_rope_params_to_dict).
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if "full_attention" in rope:   # Gemma 3: one per layer kind; the sliding one is the family's
        rope = dict(rope["full_attention"])
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type in ROPE_TYPES,
             f"config.json: rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    if rope_type in ("linear", "llama3"):
        require("factor" in rope, f"config.json: rope type {rope_type!r} needs 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            require(key in rope, f"config.json: llama3 rope scaling needs {key!r}")

    heads = hf["num_attention_heads"]
    fields = dict(
        family=family.name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
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
        hidden_act=act,
        num_labels=num_labels(hf),
    )
    fields.update(family.flags(hf))   # may override a Llama default (Gemma ties its head)
    return fields


def lora_targets(family: str, targets: tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target names as the user wrote them (HF module names of this family) -> ours."""
    aliases = get(family).lora_aliases
    out: list[str] = []
    for t in targets:
        for name in aliases.get(t, (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)
