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


def _rotate_half(x: jax.Array) -> jax.Array:
    """(a, b) -> (-b, a) over the halves of the last axis: a quarter turn, whose transpose is
    minus itself."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _per_head(table_BTH: jax.Array, dtype) -> jax.Array:
    return table_BTH[:, :, None, :].astype(dtype)


@jax.custom_vjp
def apply_rope(x_BTnH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """x rotated by the position's angles (HF's rotate-half convention), in x's dtype."""
    dt = x_BTnH.dtype
    return x_BTnH * _per_head(cos_BTH, dt) + _rotate_half(x_BTnH) * _per_head(sin_BTH, dt)


def _rope_fwd(x_BTnH, cos_BTH, sin_BTH):
    return apply_rope(x_BTnH, cos_BTH, sin_BTH), (cos_BTH, sin_BTH)


def _rope_bwd(tables, dy_BTnH):
    # x -> x * cos + R(x) * sin is linear in x: dx = dy * cos + R^T(dy * sin), with R^T = -R,
    # a pass of the forward's form. Autodiff's transpose of the halves' concatenation is two
    # pads and a sum that XLA's CPU backend ran at 13x the forward's time (a 30-layer bf16
    # SmolLM2 step: 0.25 s of RoPE backward against 0.02 s forward). The tables come from
    # integer positions: nothing upstream of them trains.
    cos_BTH, sin_BTH = tables
    dt = dy_BTnH.dtype
    return dy_BTnH * _per_head(cos_BTH, dt) - _rotate_half(dy_BTnH * _per_head(sin_BTH, dt)), None, None


apply_rope.defvjp(_rope_fwd, _rope_bwd)
