"""Llama-family decoder in Flax NNX, written to be used functionally.

The module holds only `nnx.Param` leaves, each born with logical axis names
(see `jaxalign.sharding.RULES`). RoPE tables and the KV cache are computed or passed
in, never stored. Weight layouts follow the Hugging Face tensors up to a transpose /
head reshape, and RoPE uses HF's rotate-half convention, so converted weights need no
permutation.

Shape suffixes: B batch, T query length, S key length, D hidden, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim, F mlp hidden, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ConfigError, ModelConfig
from jaxalign.models import attention
from jaxalign.models.projection import project
from jaxalign.models.rope import apply_rope, rope_inv_freq, rope_tables  # noqa: F401 (re-exported)
from jaxalign.precision import decode_cast, matmul_precision, residual_dtype, saveable, soft_cap
from jaxalign.sharding import constrain

Cache = dict[str, jax.Array]  # {'k': LBSKH, 'v': LBSKH, 'valid': BS bool, 'end': int32 scalar}

_INIT_STD = 0.02


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def score_init_std(hidden_size: int) -> float:
    """Init std of a fresh score head: 1/sqrt(D+1), as OpenAI's lm-human-preferences reward
    head and TRL's value heads (HF itself uses initializer_range, 0.02). Not zeros: the
    trunk's gradient is proportional to the head, so a zero head would leave the first step
    training the head alone, and initial rewards would carry no signal to compare."""
    return 1.0 / math.sqrt(hidden_size + 1)


def _param(rngs: nnx.Rngs | None, shape, names, dtype, kind: str = "normal",
           std: float = _INIT_STD) -> nnx.Param:
    if kind == "ones":
        value = jnp.ones(shape, dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names))


def _dot(eq: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    # bf16 matmuls on CPU only run at full speed with an fp32 accumulator
    # (docs/architecture.md, CPU facts); on fp32 inputs this is a plain dot.
    return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), precision=matmul_precision(dtype),
                      preferred_element_type=jnp.float32).astype(dtype)


def attention_impl(cfg: ModelConfig, dtype, decoding: bool) -> str:
    """Resolves `cfg.attention`: cuDNN flash attention needs a GPU and 16-bit operands."""
    if decoding or cfg.attention == "xla" or cfg.attn_logit_softcap is not None:
        return "xla"
    fits = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if cfg.attention == "cudnn" and not fits:
        raise ConfigError(f"model.attention: cudnn needs a GPU and dtype bfloat16 (backend "
                          f"{jax.default_backend()}, dtype {jnp.dtype(dtype).name}); use auto or xla")
    return "cudnn" if fits else "xla"


# ----------------------------------------------------------------------------- LoRA

class LoRA(nnx.Module):
    """Low-rank update x -> scale * dropout(x) @ a @ b of one projection (PEFT's definition).

    `a` starts uniform(+-1/sqrt(fan_in)) like PEFT's kaiming init and `b` at zero, so a
    fresh adapter leaves the model unchanged.
    """

    def __init__(self, cfg: ModelConfig, in_shape, out_shape, in_names, out_names, rngs: nnx.Rngs):
        r, pd = cfg.lora_rank, _dtype(cfg.param_dtype)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (*in_shape, r), jnp.float32, -bound, bound)
        self.a = nnx.Param(a.astype(pd), out_sharding=(*in_names, "lora_rank"))
        self.b = nnx.Param(jnp.zeros((r, *out_shape), pd), out_sharding=("lora_rank", *out_names))
        self.scale = cfg.lora_alpha / r
        self.dropout = cfg.lora_dropout

    def __call__(self, x, key):
        dt = x.dtype
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dt)
        # Both products as the base projections run: `dt` operands, fp32 accumulation, and a
        # backward of plain 2-D dots in the forms the CPU's bf16 kernel takes (a tensordot left
        # to autodiff transposes its operands, which on CPU upcasts those dots to fp32). The
        # rank-r x @ a is saved by the remat policies that save projections; the full-width
        # (x @ a) @ b is cheap to recompute, so it is not tagged and costs no saved memory.
        xa = project(x, self.a[...], self.a.ndim - 1, dt)
        return (self.scale * project(xa, self.b[...], 1, dt, name=None)).astype(dt)


def _maybe_lora(cfg, target, in_shape, out_shape, in_names, out_names, rngs):
    return LoRA(cfg, in_shape, out_shape, in_names, out_names, rngs) if cfg.lora_on(target) else None


def _adapt(y, lora: LoRA | None, x, key, salt: int, use_lora: bool):
    if lora is None or not use_lora:
        return y
    return y + lora(x, None if key is None else jax.random.fold_in(key, salt))


# ----------------------------------------------------------------------------- layers

class RMSNorm(nnx.Module):
    """`plus_one` (Gemma): the weight is stored as w and scales by (1 + w), multiplied in fp32
    before the cast back, as transformers' Gemma2RMSNorm does (Llama casts first)."""

    def __init__(self, dim: int, eps: float, param_dtype, plus_one: bool = False):
        self.eps, self.plus_one = eps, plus_one
        self.scale = _param(None, (dim,), ("vector",), param_dtype, "zeros" if plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


def attn_scale(cfg: ModelConfig) -> float:
    return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


ACTIVATIONS: dict[str, Callable] = {"silu": jax.nn.silu,
                                    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def _xla_attention(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, mask_BTS, dt):
    """Grouped-query attention without materialising repeated kv heads (the cached decode)."""
    B, T = q_BTNH.shape[:2]
    q_BTKGH = q_BTNH.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, precision=matmul_precision(dt),
                              preferred_element_type=jnp.float32) * attn_scale(cfg)
    scores_BKGTS = soft_cap(scores_BKGTS, cfg.attn_logit_softcap)
    # `where`, not an additive bias: a fully masked (padding) row stays finite.
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dt)
    out_BTKGH = _dot("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH, dt)
    return out_BTKGH.reshape(B, T, cfg.num_heads, cfg.head_dim)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = _dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd)
        self.q_lora = _maybe_lora(cfg, "q_proj", (D,), (N, H), ("embed",), ("heads", "head_dim"), rngs)
        self.k_lora = _maybe_lora(cfg, "k_proj", (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs)
        self.v_lora = _maybe_lora(cfg, "v_proj", (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs)
        self.o_lora = _maybe_lora(cfg, "o_proj", (N, H), (D,), ("heads", "head_dim"), ("embed",), rngs)
        if cfg.attention_bias or cfg.qkv_bias:
            self.q_bias = _param(None, (N, H), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(None, (K, H), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(None, (K, H), ("kv_heads", "head_dim"), pd, "zeros")
        if cfg.attention_bias:
            self.o_bias = _param(None, (D,), ("vector",), pd, "zeros")
        if cfg.qk_norm:   # Qwen3, Gemma 3: over each head's H features, before RoPE
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, pd, cfg.gemma_block)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, pd, cfg.gemma_block)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_cache=None, cache_end=None,
                 key=None, use_lora=True):
        """Returns the attention output and the updated (k, v) cache of this layer, if any."""
        cfg, dt = self.cfg, x_BTD.dtype
        B, T, _ = x_BTD.shape
        q_BTNH = _adapt(project(x_BTD, self.q[...], 1, dt), self.q_lora, x_BTD, key, 0, use_lora)
        k_BTKH = _adapt(project(x_BTD, self.k[...], 1, dt), self.k_lora, x_BTD, key, 1, use_lora)
        v_BTKH = _adapt(project(x_BTD, self.v[...], 1, dt), self.v_lora, x_BTD, key, 2, use_lora)
        if cfg.attention_bias or cfg.qkv_bias:
            q_BTNH += self.q_bias[...].astype(dt)
            k_BTKH += self.k_bias[...].astype(dt)
            v_BTKH += self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH = constrain(apply_rope(q_BTNH, cos_BTH, sin_BTH), ("batch", "seq", "heads", None))
        k_BTKH = constrain(apply_rope(k_BTKH, cos_BTH, sin_BTH), ("batch", "seq", "kv_heads", None))
        v_BTKH = constrain(v_BTKH, ("batch", "seq", "kv_heads", None))

        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_end, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
            k_BSKH, v_BSKH, new_cache = k_cache.astype(dt), v_cache.astype(dt), (k_cache, v_cache)
        else:
            k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None

        if attention_impl(cfg, dt, kv_cache is not None) == "cudnn":
            # Fused flash attention: the (T, S) scores never reach memory. The boolean mask
            # becomes a large negative bias; fully masked (padding) rows stay finite. The mask
            # is causal by construction, so is_causal changes no value (mask & causal = mask)
            # and lets cuDNN skip the tiles above the diagonal (not yet run on a GPU here).
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=attn_scale(cfg),
                is_causal=True, implementation="cudnn")
        elif kv_cache is None and cfg.attn_logit_softcap is None:
            out_BTNH = attention.causal_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS,
                                                  attention.plan(T), jnp.dtype(dt),
                                                  attn_scale(cfg))
        else:
            out_BTNH = _xla_attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask_BTS, dt)
        out_BTD = _adapt(project(out_BTNH, self.o[...], 2, dt), self.o_lora, out_BTNH,
                         key, 3, use_lora)
        if cfg.attention_bias:
            out_BTD += self.o_bias[...].astype(dt)
        return out_BTD, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pd = cfg.hidden_size, cfg.intermediate_size, _dtype(cfg.param_dtype)
        self.bias, self.act = cfg.mlp_bias, ACTIVATIONS[cfg.hidden_act]
        self.gate = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down = _param(rngs, (F, D), ("mlp", "embed"), pd)
        self.gate_lora = _maybe_lora(cfg, "gate_proj", (D,), (F,), ("embed",), ("mlp",), rngs)
        self.up_lora = _maybe_lora(cfg, "up_proj", (D,), (F,), ("embed",), ("mlp",), rngs)
        self.down_lora = _maybe_lora(cfg, "down_proj", (F,), (D,), ("mlp",), ("embed",), rngs)
        if cfg.mlp_bias:
            self.gate_bias = _param(None, (F,), ("mlp",), pd, "zeros")
            self.up_bias = _param(None, (F,), ("mlp",), pd, "zeros")
            self.down_bias = _param(None, (D,), ("vector",), pd, "zeros")

    def __call__(self, x_BTD, key=None, use_lora=True):
        dt = x_BTD.dtype
        gate_BTF = _adapt(project(x_BTD, self.gate[...], 1, dt), self.gate_lora, x_BTD, key, 4, use_lora)
        up_BTF = _adapt(project(x_BTD, self.up[...], 1, dt), self.up_lora, x_BTD, key, 5, use_lora)
        if self.bias:
            gate_BTF += self.gate_bias[...].astype(dt)
            up_BTF += self.up_bias[...].astype(dt)
        h_BTF = constrain(self.act(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
        out_BTD = _adapt(project(h_BTF, self.down[...], 1, dt), self.down_lora, h_BTF, key, 6, use_lora)
        if self.bias:
            out_BTD += self.down_bias[...].astype(dt)
        return out_BTD


class Block(nnx.Module):
    """Pre-norm residual block; Gemma's (`gemma_block`) also norms each branch's output
    (post_attention_layernorm, post_feedforward_layernorm) before the residual add."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd, D, eps, g = _dtype(cfg.param_dtype), cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_block
        self.attn_norm = RMSNorm(D, eps, pd, g)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(D, eps, pd, g)
        self.mlp = MLP(cfg, rngs)
        self.post_norms, self.dt = g, _dtype(cfg.dtype)   # dt: the branches' compute dtype
        if g:
            self.post_attn_norm = RMSNorm(D, eps, pd, g)
            self.post_mlp_norm = RMSNorm(D, eps, pd, g)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_cache=None, cache_end=None,
                 key=None, use_lora=True):
        h_BTD = self.attn_norm(x_BTD).astype(self.dt)   # x may be wider: `residual_dtype`
        attn_BTD, kv_cache = self.attn(h_BTD, cos_BTH, sin_BTH, mask_BTS,
                                       kv_cache, cache_end, key, use_lora)
        if self.post_norms:
            attn_BTD = self.post_attn_norm(attn_BTD)
        x_BTD = x_BTD + attn_BTD
        mlp_BTD = self.mlp(self.mlp_norm(x_BTD).astype(self.dt), key, use_lora)
        if self.post_norms:
            mlp_BTD = self.post_mlp_norm(mlp_BTD)
        x_BTD = x_BTD + mlp_BTD
        return constrain(x_BTD, ("batch", "seq", None)), kv_cache


_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names("proj", "layer_in"),
    "attn": jax.checkpoint_policies.save_only_these_names("proj", "attn", "layer_in"),
}


class Llama(nnx.Module):
    """Token ids in, logits (fp32) and final hidden states out.

    With `cfg.num_labels > 0` it is a sequence classifier / reward model: no LM head, a
    `score` weight (D, num_labels) instead, and no vocab logits; the caller pools the hidden
    states (`jaxalign.models.heads.score`).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)

        # Layers are created stacked (leading 'layers' axis) so that scan and the
        # converter both see one array per weight kind.
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.layers = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cfg.gemma_block)
        if cfg.num_labels > 0:
            # Split over fsdp like every weight's model dimension; the label axis is tiny.
            self.score = _param(rngs, (cfg.hidden_size, cfg.num_labels), ("embed", None), pd,
                                std=score_init_std(cfg.hidden_size))
        elif not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 cache: Cache | None = None, *, return_logits: bool = True,
                 dropout_key: jax.Array | None = None, use_lora: bool = True,
                 layer_params: tuple | None = None, branch_ids_BT: jax.Array | None = None):
        """Forward pass.

        segment_ids_BT: 0 marks padding; tokens attend causally only within their own
        segment (packing). branch_ids_BT (no cache): shared-prefix rows such as
        [prompt | chosen | rejected]; a token of branch b > 0 attends to the earlier tokens of
        its segment's branch 0 (the shared prompt) and of branch b only, so each branch sees
        exactly what it would see in a row of its own (give it positions that continue from
        the prompt). With a cache, the T new tokens are written at `cache['end']` and
        attend to every valid earlier slot. `dropout_key` turns on LoRA dropout (training);
        `use_lora=False` runs the base model with the adapters switched off.
        Returns (logits_BTV fp32 or None, hidden_BTD after the final norm, new cache or None).
        A classifier (num_labels > 0) has no vocab logits: call it with return_logits=False.
        `layer_params`: one param tree per layer (`unstack_layers`), run as a Python loop in
        place of the stacked `self.layers`; the cache's k / v are then tuples of layers too.
        """
        cfg = self.cfg
        if return_logits and cfg.num_labels > 0:
            raise ConfigError(f"this model is a sequence classifier (num_labels={cfg.num_labels}) "
                             "with no LM head: call it with return_logits=False and pool the "
                             "hidden states (jaxalign.models.heads.score)")
        dt = _dtype(cfg.dtype)
        B, T = tokens_BT.shape
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0)
        if cfg.gemma_block:   # times sqrt(D) in the embedding's dtype, as transformers
            x_BTD = x_BTD * jnp.asarray(cfg.hidden_size ** 0.5, x_BTD.dtype)
        # fp32 residual from the embedding rounded as decode reads it (`precision.decode_cast`)
        x_BTD = constrain(x_BTD.astype(dt).astype(residual_dtype(dt)), ("batch", "seq", None))
        cos_BTH, sin_BTH = rope_tables(cfg, positions_BT)

        if cache is None:
            q_idx, k_idx = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
            same_segment = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
            mask_BTS = (k_idx <= q_idx)[None] & same_segment & (segment_ids_BT[:, None, :] > 0)
            if branch_ids_BT is not None:
                visible_BTS = ((branch_ids_BT[:, None, :] == 0)
                               | (branch_ids_BT[:, :, None] == branch_ids_BT[:, None, :]))
                mask_BTS = mask_BTS & visible_BTS
            # The window counts positions, not slots: a branch's positions continue from the
            # prompt across the other branches' tokens. Within one segment of an ordinary row
            # the two are the same.
            dist_BTS = positions_BT[:, :, None] - positions_BT[:, None, :]
            end, kv = None, None
        else:
            end = cache["end"]
            valid_BS = jax.lax.dynamic_update_slice(cache["valid"], segment_ids_BT > 0, (0, end))
            S = valid_BS.shape[1]
            # Slots are positions shifted by each row's left padding, so slot distance is
            # position distance (the window below).
            q_idx, k_idx = end + jnp.arange(T)[:, None], jnp.arange(S)[None, :]
            mask_BTS = (k_idx <= q_idx)[None] & valid_BS[:, None, :]
            dist_BTS = (q_idx - k_idx)[None]
            kv = (cache["k"], cache["v"])
        # Attention inputs (cos, sin, mask) per layer kind: one kind unless some layers are
        # windowed and others not (Gemma's layer_types), each layer then picks its own.
        kinds, kind_L = layer_kinds(cfg, positions_BT, (cos_BTH, sin_BTH, mask_BTS), dist_BTS)

        if layer_params is not None:
            x_BTD, kv = self._loop_layers(layer_params, x_BTD, kinds, kind_L, kv, end,
                                          dropout_key, use_lora)
        else:
            x_BTD, kv = self._run_layers(x_BTD, kinds, kind_L, kv, end, dropout_key, use_lora)
        hidden_BTD = self.final_norm(x_BTD).astype(dt)
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "valid": valid_BS, "end": end + T}
        if not return_logits:
            return None, hidden_BTD, new_cache
        if cfg.tie_word_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, self.embed[...].astype(dt),
                                    precision=matmul_precision(dt), preferred_element_type=jnp.float32)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head[...].astype(dt),
                                    precision=matmul_precision(dt), preferred_element_type=jnp.float32)
        # Gemma 2's final soft-cap; the chunked head losses apply the same (losses.xent).
        logits_BTV = soft_cap(logits_BTV, cfg.final_logit_softcap)
        return constrain(logits_BTV, ("batch", "seq", "vocab")), hidden_BTD, new_cache

    def _run_layers(self, x_BTD, kinds, kind_L, kv, end, key, use_lora):
        cfg = self.cfg
        block_def, stacked = nnx.split(self.layers)
        keys = None if key is None else jax.random.split(key, cfg.num_layers)

        def body(x_BTD, layer):
            params, layer_kv, layer_key, kind = layer
            # The layer's input, kept for the backward anyway (`saveable`: bf16 as 16-bit
            # integers on CPU, whose scan otherwise upcasts the stacked copy every layer).
            x_BTD = saveable(x_BTD, "layer_in")
            inputs = kinds[0] if kind is None else jax.tree.map(
                lambda full, window: jnp.where(kind, window, full), *kinds)
            return nnx.merge(block_def, params)(x_BTD, *inputs, layer_kv, end, layer_key, use_lora)

        # Short rows without a cache run unrolled, no remat (`cfg.unroll_up_to`, CPU bf16).
        short = kv is None and 0 < x_BTD.shape[1] <= cfg.unroll_up_to
        policy = None if short else _REMAT_POLICIES.get(cfg.remat)
        if policy is not None:   # (in a scan prevent_cse would only block fusion)
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        # "Unrolled" is the same scan, fully unrolled: one program per layer, while XLA still
        # builds each stacked gradient with one concatenate (a Python loop over a[i] slices
        # padded and summed a full-size gradient per layer: ~30% of a SmolLM2 step).
        kind_L = None if kind_L is None else jnp.asarray(kind_L)
        return jax.lax.scan(body, x_BTD, (stacked, kv, keys, kind_L),
                            unroll=short or not cfg.scan_layers)

    def _loop_layers(self, layer_params, x_BTD, kinds, kind_L, kv, end, key, use_lora):
        """The layers as a Python loop over separate per-layer arrays (decoding).

        Inside a scan (or an unrolled scan) each layer's weights are sliced out of the stacked
        arrays, and XLA's CPU backend copies every slice before the matmul reads it: on a
        memory-bound decode step that doubles the weight traffic. Separate arrays are read
        in place. The KV cache is per layer too, so each step updates it in place."""
        block_def = nnx.graphdef(self.layers)
        keys = [None] * len(layer_params) if key is None else jax.random.split(key, len(layer_params))
        new_k, new_v = [], []
        for i, params in enumerate(layer_params):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            inputs = kinds[0 if kind_L is None else int(kind_L[i])]
            x_BTD, layer_kv = nnx.merge(block_def, params)(x_BTD, *inputs, layer_kv, end, keys[i],
                                                           use_lora)
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        return x_BTD, (None if kv is None else (tuple(new_k), tuple(new_v)))


def layer_kinds(cfg: ModelConfig, positions_BT, full, dist_BTS):
    """-> (kinds, kind_L): the (cos, sin, mask) of each layer kind and which kind each layer
    is (None: every layer the first). `full` is the causal kind; the window keeps keys with
    q - k < sliding_window (transformers' kv > q - window; `dist_BTS` = q - k); Gemma 3's sliding layers also
    rotate by their own RoPE base (`rope_local_theta`)."""
    sliding = [t == "sliding_attention" for t in (cfg.layer_types or ["sliding_attention"])]
    if not any(sliding) or (cfg.sliding_window is None and cfg.rope_local_theta is None):
        return (full,), None
    cos, sin, mask_BTS = full
    if cfg.rope_local_theta is not None:
        cos, sin = rope_tables(cfg.replace(rope_theta=cfg.rope_local_theta, rope_type="default"),
                               positions_BT)
    if cfg.sliding_window is not None:
        mask_BTS = mask_BTS & (dist_BTS < cfg.sliding_window)
    local = (cos, sin, mask_BTS)
    if all(sliding):
        return (local,), None
    return (full, local), tuple(sliding)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None,
               per_layer: bool = False) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_len` tokens: k / v stacked over layers
    (L, B, S, K, H), or with `per_layer` a tuple of L (B, S, K, H) arrays (`layer_params`)."""
    dt = _dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
    else:
        k = v = jnp.zeros((cfg.num_layers, *shape), dt)
    return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), bool),
            "end": jnp.zeros((), jnp.int32)}


def per_layer(stacked: dict, dtype=None) -> tuple[dict, ...]:
    """Stacked layer params (leading L axis) -> one tree per layer, optionally cast to `dtype`
    (bfloat16 decoding halves the bytes each decode step reads)."""
    leaves, treedef = jax.tree.flatten(stacked)
    return tuple(jax.tree.unflatten(treedef, [decode_cast(a[i], dtype) for a in leaves])
                 for i in range(leaves[0].shape[0]))


CACHE_NAMES: dict[str, Any] = {
    "k": ("layers", "batch", "seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "seq", "kv_heads", "head_dim"),
    "valid": ("batch", "seq"),
    "end": (),
}
