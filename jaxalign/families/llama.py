"""Llama (and SmolLM2, TinyLlama, ...): the common block every other family here flags."""

from jaxalign.families.base import LLAMA_ROWS, Family

LLAMA = Family(
    name="llama", model_types=("llama",),
    # the second: early HF conversions
    causal_lm=("LlamaForCausalLM", "LLaMAForCausalLM"), classifier="LlamaForSequenceClassification",
    rows=LLAMA_ROWS,
)
