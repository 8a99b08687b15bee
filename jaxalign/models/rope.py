"""Rotary position embeddings as transformers computes them (rotate-half convention), with
linear or llama3 frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies (H/2,), with linear or llama3 scaling as transformers applies it."""
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1 context extension).
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_ctx = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    angles_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTnH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTnH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTnH[..., half:], x_BTnH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :].astype(x_BTnH.dtype), sin_BTH[:, :, None, :].astype(x_BTnH.dtype)
    return x_BTnH * cos + rotated * sin
