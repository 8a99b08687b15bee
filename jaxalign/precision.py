"""Matmul precision and soft-capping, shared by the model and the losses (which must not import the model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for fp32 operands, the backend's default otherwise.

    GPUs otherwise run fp32 dots as TF32 (XLA's default), which put SmolLM2-shaped logits
    1.5e-2 away from transformers' fp32 on an H200; on CPU both give the same code."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention-logit and final-logit soft-capping); x itself
    when `cap` is None, adding no op."""
    return x if cap is None else cap * jnp.tanh(x / cap)
