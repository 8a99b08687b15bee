"""Mistral: the Llama block, with `sliding_window` (null in v0.2+/v0.3) as a window on every
layer's attention (training, prefill and decode)."""

from jaxalign.families.base import LLAMA_ROWS, Family, window

MISTRAL = Family(
    name="mistral", model_types=("mistral",),
    causal_lm=("MistralForCausalLM",), classifier="MistralForSequenceClassification",
    rows=LLAMA_ROWS, flags=window,
    config_keys=lambda c: {"sliding_window": c.sliding_window},
)
