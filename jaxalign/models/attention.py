"""Causal self-attention over whole sequences (training and scoring forwards; the cached
decode stays in `llama`), written out for the CPU with its own backward pass.

Shape suffixes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K query heads per
kv head, H head_dim, R = T x G rows of one kv head's queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxalign.precision import materialize, matmul_precision, row_major, row_major_dots

# Query blocks of the causal attention over a whole sequence (`causal_attention`): each block
# of queries is scored against the keys up to its own end only, skipping the masked upper
# triangle. Four blocks of a 256-token row skip 3/8 of the scores.
_QUERY_BLOCKS = 4
_MIN_QUERY_BLOCK = 64
# The masked scores' value: finite, so a fully masked (padding) row stays finite (uniform).
_MASKED = -1e30


def query_blocks(T: int) -> tuple[tuple[int, int], ...]:
    if T < 2 * _MIN_QUERY_BLOCK:
        return ((0, T),)
    size = max(_MIN_QUERY_BLOCK, -(-T // _QUERY_BLOCKS))
    return tuple((a, min(a + size, T)) for a in range(0, T, size))


def _rows(x_BTNH, K: int):
    """(B, T, N, H) -> (B, K, T*G, H): each kv head's queries as rows, token-major, so a
    block of tokens is a contiguous block of rows."""
    B, T, N, H = x_BTNH.shape
    return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (N // K), H)


def _unrows(x_BKRH, T: int):
    B, K, R, H = x_BKRH.shape
    G = R // T
    return x_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, H)


def _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks, dt, scale):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    kw = dict(precision=matmul_precision(dt), preferred_element_type=jnp.float32)
    # row_major: in bf16 on CPU, the transposed heads are copied out once so that every
    # product below runs in the fast bf16 kernel (jaxalign.precision.row_major_dots).
    q_BKRH = row_major(_rows(q_BTNH, K))
    k_BKSH = row_major(k_BSKH.transpose(0, 2, 1, 3))
    v_BKSH = row_major(v_BSKH.transpose(0, 2, 1, 3))
    outs, probs = [], []
    for a, e in blocks:
        s_BKRS = jnp.einsum("bkrh,bksh->bkrs", q_BKRH[:, :, a * G:e * G], k_BKSH[:, :, :e], **kw)
        s_BKtGS = s_BKRS.reshape(B, K, e - a, G, e) * scale
        s_BKtGS = jnp.where(mask_BTS[:, None, a:e, None, :e], s_BKtGS, _MASKED)
        m = jnp.max(s_BKtGS, axis=-1, keepdims=True)
        p_BKtGS = jnp.exp(s_BKtGS - m)
        p_BKtGS = p_BKtGS / jnp.sum(p_BKtGS, axis=-1, keepdims=True)
        p_BKRS = p_BKtGS.reshape(B, K, (e - a) * G, e).astype(dt)
        probs.append(p_BKRS)
        outs.append(jnp.einsum("bkrs,bksh->bkrh", p_BKRS, v_BKSH[:, :, :e], **kw).astype(dt))
    o_BKRH = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return _unrows(o_BKRH, T), (q_BKRH, k_BKSH, v_BKSH, o_BKRH, tuple(probs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks, dt, scale):
    """softmax(q k^T * scale masked) v (scale 1/sqrt(H), or Gemma's query_pre_attn_scalar)
    for self-attention over whole sequences (no cache),
    grouped-query without repeating kv heads, query block by query block (`query_blocks`).

    Forward and backward are written out for the CPU: the heads are laid out as
    (batch, kv head, rows = token x group, head_dim) once, so every product is one batched
    matmul over contiguous rows; the backward reuses the forward's probabilities and takes
    the softmax gradient from rowsum(dout * out), the flash-attention identity, instead of a
    second pass over the scores. On the SmolLM2 layer (8 x 256 tokens) forward + backward took
    21 ms against 35 ms for autodiff of the plain form. `mask_BTS` must be causal (every
    block's later keys masked); a fully masked row attends uniformly and stays finite."""
    return _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks, dt, scale)[0]


def _attention_vjp_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks, dt, scale):
    out, res = _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks, dt, scale)
    # Named for the remat policy "attn", which keeps them instead of running this again.
    return checkpoint_name(out, "attn"), (checkpoint_name(res, "attn"), mask_BTS)


def _key_grad(x_BKRS, y_BKRH, kw):
    """sum over rows r of x[r, s] y[r, h], (B, K, S, H): a block's key or value gradient."""
    if not row_major_dots(y_BKRH.dtype):
        return jnp.einsum("bkrs,bkrh->bksh", x_BKRS, y_BKRH, **kw)
    # x^T y contracts x's leading axis, which the CPU's bf16 kernel does not take: (y^T x)^T,
    # with y^T (rows x head_dim, the small operand) and the product copied out row-major.
    t_BKHS = jnp.einsum("bkhr,bkrs->bkhs", materialize(y_BKRH.swapaxes(2, 3)), x_BKRS, **kw)
    return materialize(t_BKHS).swapaxes(2, 3)


def _attention_vjp_bwd(blocks, dt, scale, saved, dout_BTNH):
    (q_BKRH, k_BKSH, v_BKSH, o_BKRH, probs), mask_BTS = saved
    B, T, N, H = dout_BTNH.shape
    K = k_BKSH.shape[1]
    G = N // K
    kw = dict(precision=matmul_precision(dt), preferred_element_type=jnp.float32)
    do_BKRH = row_major(_rows(dout_BTNH.astype(dt), K))
    # The softmax backward's per-row term sum_s p * dp equals rowsum(dout * out).
    d_BKR1 = jnp.sum(do_BKRH.astype(jnp.float32) * o_BKRH.astype(jnp.float32), -1, keepdims=True)
    dq, dk_BKSH, dv_BKSH = [], None, None
    S = k_BKSH.shape[2]

    def add(acc, x_BKeH, e):   # a block's key gradient, over keys [0, e), into the (S) sum
        x_BKSH = jnp.pad(x_BKeH, ((0, 0), (0, 0), (0, S - e), (0, 0)))
        return x_BKSH if acc is None else acc + x_BKSH

    for (a, e), p_BKRS in zip(blocks, probs):
        do_b = do_BKRH[:, :, a * G:e * G]
        dv_BKSH = add(dv_BKSH, _key_grad(p_BKRS, do_b, kw), e)
        dp_BKRS = jnp.einsum("bkrh,bksh->bkrs", do_b, v_BKSH[:, :, :e], **kw)
        ds_BKRS = (p_BKRS.astype(jnp.float32) * (dp_BKRS - d_BKR1[:, :, a * G:e * G])
                   * scale).astype(dt)
        dq.append(jnp.einsum("bkrs,bksh->bkrh", ds_BKRS, k_BKSH[:, :, :e], **kw))
        dk_BKSH = add(dk_BKSH, _key_grad(ds_BKRS, q_BKRH[:, :, a * G:e * G], kw), e)
    dq_BKRH = jnp.concatenate(dq, axis=2) if len(dq) > 1 else dq[0]
    mask_ct = np.zeros(mask_BTS.shape, jax.dtypes.float0)
    return (_unrows(dq_BKRH, T).astype(dt), dk_BKSH.transpose(0, 2, 1, 3).astype(dt),
            dv_BKSH.transpose(0, 2, 1, 3).astype(dt), mask_ct)


causal_attention.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)
