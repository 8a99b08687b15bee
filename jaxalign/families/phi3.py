"""Phi-3 (mini / medium, 4k context): the Llama block with fused `qkv_proj` and `gate_up_proj`
tensors (split on import, fused on export) and a sliding window on every layer."""

from jaxalign.families.base import (
    EMBED_AND_HEADS, KV_PROJ, O, Q_PROJ, TRANSPOSE, Family, FusedRow, Refusal, Row, window)

_L = "model.layers.{i}."


def _rope(hf):
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


PHI3 = Family(
    name="phi3", model_types=("phi3",),
    causal_lm=("Phi3ForCausalLM",), classifier="Phi3ForSequenceClassification",
    rows=EMBED_AND_HEADS + O + (
        FusedRow(_L + "self_attn.qkv_proj.weight", (
            (("layers", "attn", "q"), Q_PROJ, lambda c: c.num_heads * c.head_dim),
            (("layers", "attn", "k"), KV_PROJ, lambda c: c.num_kv_heads * c.head_dim),
            (("layers", "attn", "v"), KV_PROJ, lambda c: c.num_kv_heads * c.head_dim))),
        FusedRow(_L + "mlp.gate_up_proj.weight", (
            (("layers", "mlp", "gate"), TRANSPOSE, lambda c: c.intermediate_size),
            (("layers", "mlp", "up"), TRANSPOSE, lambda c: c.intermediate_size))),
        Row(_L + "mlp.down_proj.weight", ("layers", "mlp", "down"), TRANSPOSE),
    ),
    flags=window,
    refusals=(
        # Phi-3-*-128k and Phi-3.5: two RoPE tables switched by length.
        Refusal("rope_scaling", lambda hf: _rope(hf).get("rope_type", _rope(hf).get("type"))
                in ("longrope", "su"), "longrope / su RoPE scaling is not implemented"),
        Refusal("partial_rotary_factor", lambda hf: float(_rope(hf).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0,
            "partial RoPE is not implemented"),
        Refusal("attention_bias", lambda hf: bool(hf.get("attention_bias")), "not implemented"),
    ),
    config_keys=lambda c: {"sliding_window": c.sliding_window},
    lora_aliases={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
)
