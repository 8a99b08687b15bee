"""Qwen2 / Qwen2.5 (biases on q, k, v but not o) and Qwen3 (per-head RMSNorm on queries and
keys before RoPE, head_dim independent of the hidden size)."""

from jaxalign.families.base import IDENTITY, LLAMA_ROWS, Family, Refusal, Row, true

_L = "model.layers.{i}."
# transformers turns the window on for layers >= max_window_layers only; the released
# checkpoints ship use_sliding_window false.
_NO_WINDOW = Refusal("use_sliding_window", lambda hf: true(hf, "use_sliding_window"),
                     "Qwen's per-layer sliding window is not implemented")

QWEN2 = Family(
    name="qwen2", model_types=("qwen2",),
    causal_lm=("Qwen2ForCausalLM",), classifier="Qwen2ForSequenceClassification",
    rows=LLAMA_ROWS, flags=lambda hf: {"qkv_bias": True}, refusals=(_NO_WINDOW,),
)

QWEN3 = Family(
    name="qwen3", model_types=("qwen3",),
    causal_lm=("Qwen3ForCausalLM",), classifier="Qwen3ForSequenceClassification",
    rows=LLAMA_ROWS + (
        Row(_L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), IDENTITY),
        Row(_L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), IDENTITY),
    ),
    flags=lambda hf: {"qk_norm": True}, refusals=(_NO_WINDOW,),
)
