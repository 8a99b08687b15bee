"""Gemma 2 and Gemma 3 (text: Gemma3ForCausalLM, model_type gemma3_text), read from
transformers' modeling_gemma2.py / modeling_gemma3.py.

Their block is the Llama block with `gemma_block` on ((1 + w) RMSNorms computed in fp32,
norms after attention and after the MLP as well, embeddings times sqrt(hidden)), GeGLU
(gelu tanh), the attention scale query_pre_attn_scalar**-0.5, and a sliding window on the
layers `layer_types` marks "sliding_attention". Gemma 2 soft-caps attention scores and final
logits; Gemma 3 norms q and k per head ((1 + w) as well) and rotates its sliding layers by
their own RoPE base (rope_parameters.sliding_attention / rope_local_base_freq).
"""

from jaxalign.families.base import (
    BIASES, DOWN, EMBED_AND_HEADS, GATE_UP, IDENTITY, O, QKV, Family, Refusal, Row, true)

_L = "model.layers.{i}."
# Llama's embedding, final norm, heads and input norm; then Gemma's own three norms per layer
# (its post_attention_layernorm normalises the attention output, not the MLP input).
_LLAMA_SHARED = tuple(r for r in EMBED_AND_HEADS if "post_attention_layernorm" not in r.hf_key)
_ROWS = _LLAMA_SHARED + (
    Row(_L + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), IDENTITY),
    Row(_L + "pre_feedforward_layernorm.weight", ("layers", "mlp_norm", "scale"), IDENTITY),
    Row(_L + "post_feedforward_layernorm.weight", ("layers", "post_mlp_norm", "scale"), IDENTITY),
) + QKV + O + BIASES + GATE_UP + DOWN
_QK_NORMS = (
    Row(_L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), IDENTITY),
    Row(_L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), IDENTITY),
)


def _layer_types(hf, pattern: int) -> tuple[str, ...]:
    """config.json's layer_types; older configs give a pattern instead (every `pattern`-th
    layer global, as transformers derives it)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    pattern = int(hf.get("sliding_window_pattern", pattern))
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(hf["num_hidden_layers"]))


def _cap(hf, key):
    return None if hf.get(key) is None else float(hf[key])


def _flags(hf, pattern: int):
    w = hf.get("sliding_window", 4096)
    return {"gemma_block": True, "layer_types": _layer_types(hf, pattern),
            # transformers' Gemma configs default to a tied head; released config.json omit it
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "sliding_window": None if w is None else int(w),
            "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
            "attn_logit_softcap": _cap(hf, "attn_logit_softcapping"),
            "final_logit_softcap": _cap(hf, "final_logit_softcapping")}


def _local_rope(hf) -> dict:
    return dict((hf.get("rope_parameters") or {}).get("sliding_attention") or {})


def _gemma3_flags(hf):
    theta = _local_rope(hf).get("rope_theta", hf.get("rope_local_base_freq") or 10000.0)
    return {**_flags(hf, 6), "qk_norm": True, "rope_local_theta": float(theta)}


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _keys(c) -> dict:
    return {"hidden_activation": c.hidden_act, "layer_types": list(c.layer_types),
            "sliding_window": c.sliding_window,
            # transformers' config class types it int
            "query_pre_attn_scalar": _int_if_whole(c.query_pre_attn_scalar),
            "attn_logit_softcapping": c.attn_logit_softcap,
            "final_logit_softcapping": c.final_logit_softcap}


def _gemma3_keys(c) -> dict:
    full = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type != "default":
        full["factor"] = c.rope_factor
    return {**_keys(c), "rope_parameters": {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}}}


GEMMA2 = Family(
    name="gemma2", model_types=("gemma2",),
    causal_lm=("Gemma2ForCausalLM",), classifier="Gemma2ForSequenceClassification",
    rows=_ROWS, flags=lambda hf: _flags(hf, 2), config_keys=_keys,
)

GEMMA3 = Family(
    name="gemma3", model_types=("gemma3_text",),
    causal_lm=("Gemma3ForCausalLM",), classifier="Gemma3TextForSequenceClassification",
    rows=_ROWS + _QK_NORMS, flags=_gemma3_flags, config_keys=_gemma3_keys,
    refusals=(
        Refusal("use_bidirectional_attention", lambda hf: true(hf, "use_bidirectional_attention"),
                "bidirectional attention (EmbeddingGemma) is not implemented"),
        Refusal("rope_parameters.sliding_attention",
                lambda hf: _local_rope(hf).get("rope_type", "default") != "default",
                "scaled RoPE on the sliding layers is not implemented"),
    ),
)
