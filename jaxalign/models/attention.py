"""Causal self-attention over whole sequences (training and scoring forwards; the cached
decode stays in `llama`), written out for the CPU with its own flash-style backward pass.

Shape suffixes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K query heads per
kv head, H head_dim, R = T x G rows of one kv head's queries; t, s a block's queries and keys,
r = t x G its rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxalign.precision import materialize, matmul_precision, row_major, row_major_dots

# Block plan by sequence length (`plan`). Short rows (up to _ONE_KEY_BLOCK_MAX tokens): four
# query blocks of at least _MIN_QUERY_BLOCK, each scored against the keys up to its own end in
# one piece, the form the CPU ran fastest at 8 x 256 (a 256-token row skips 3/8 of the scores,
# no running-max rescaling). Longer rows: square blocks of _LONG_BLOCK queries x keys, at most
# _MAX_BLOCKS per axis (then larger blocks), with an online softmax over each query block's
# key blocks, so memory holds one block's scores at a time and the backward keeps O(T).
_QUERY_BLOCKS = 4
_MIN_QUERY_BLOCK = 64
_ONE_KEY_BLOCK_MAX = 512
_LONG_BLOCK = 512
_MAX_BLOCKS = 16
# The masked scores' value before the max: finite, so that a row whose keys so far are all
# masked gives exp(0) (then zeroed by the mask) instead of exp(nan).
_MASKED = -1e30

class Plan(NamedTuple):
    """blocks: ((query block [a, e), its key blocks ((c, d), ...)), ...); loop: the key blocks
    before each query block's diagonal one run in a lax.fori_loop (square blocks only)."""
    blocks: tuple[tuple[tuple[int, int], tuple[tuple[int, int], ...]], ...]
    loop: bool


def plan(T: int, query_block: int | None = None, key_block: int | None = None,
         loop: bool | None = None) -> Plan:
    """The blocks of a T-token row: every key block ends at or before its query block's end
    (the causal promise: later keys are masked), so blocks wholly above the diagonal are never
    computed. `query_block` / `key_block` override the sizes the length picks (tests; a
    key_block >= T scores each query block against [0, e) at once). Long rows (square blocks)
    loop over the key blocks below the diagonal: unrolled, XLA's CPU schedule kept about a
    hundred score blocks alive at once (2 GiB for one 2 x 4096 layer); a loop holds one."""
    if query_block is None:
        if T < 2 * _MIN_QUERY_BLOCK:
            query_block, key_block = T, T
        elif T <= _ONE_KEY_BLOCK_MAX:
            query_block, key_block = max(_MIN_QUERY_BLOCK, -(-T // _QUERY_BLOCKS)), T
        else:
            query_block = max(_LONG_BLOCK, -(-T // _MAX_BLOCKS))
    key_block = key_block or query_block
    out = []
    for a in range(0, T, query_block):
        e = min(a + query_block, T)
        out.append(((a, e), tuple((c, min(c + key_block, e)) for c in range(0, e, key_block))))
    if loop is None:
        loop = T > _ONE_KEY_BLOCK_MAX and key_block == query_block
    if loop and key_block != query_block:
        raise ValueError(f"a looped plan needs square blocks, got {query_block} x {key_block}")
    return Plan(tuple(out), loop)


def _rows(x_BTNH, K: int):
    """(B, T, N, H) -> (B, K, T*G, H): each kv head's queries as rows, token-major, so a
    block of tokens is a contiguous block of rows."""
    B, T, N, H = x_BTNH.shape
    return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * (N // K), H)


def _unrows(x_BKRH, T: int):
    B, K, R, H = x_BKRH.shape
    G = R // T
    return x_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, H)


def _key_block(x_BKSH, c, n):
    """Keys [c, c + n) of (B, K, S, H); c may be traced (the loop)."""
    return jax.lax.dynamic_slice_in_dim(x_BKSH, c, n, axis=2)


def _scores(q_BKrH, k_BKSH, mask_BTS, a, e, c, n, scale, kw):
    """Masked scores (B, K, t, G, n) fp32 of queries [a, e) against keys [c, c + n), and the
    mask, broadcastable to them."""
    B, K = q_BKrH.shape[:2]
    s_BKrs = jnp.einsum("bkrh,bksh->bkrs", q_BKrH, _key_block(k_BKSH, c, n), **kw)
    msk = jax.lax.dynamic_slice_in_dim(mask_BTS[:, a:e], c, n, axis=2)[:, None, :, None, :]
    return jnp.where(msk, s_BKrs.reshape(B, K, e - a, -1, n) * scale, _MASKED), msk


def _fwd_block(carry, q_b, k_BKSH, v_BKSH, mask_BTS, a, e, c, n, dt, scale, kw):
    """One key block of the online softmax: (running max, sum, sum of p v) updated."""
    m_BKtG1, l_BKtG1, acc_BKrH = carry
    B, K = q_b.shape[:2]
    s_BKtGs, msk = _scores(q_b, k_BKSH, mask_BTS, a, e, c, n, scale, kw)
    m_new = jnp.maximum(m_BKtG1, jnp.max(s_BKtGs, axis=-1, keepdims=True))
    # Zeroed where masked: a row whose keys so far are all masked has m = _MASKED.
    p_BKtGs = jnp.where(msk, jnp.exp(s_BKtGs - m_new), 0.0)
    pv_BKrH = jnp.einsum("bkrs,bksh->bkrh", p_BKtGs.reshape(B, K, -1, n).astype(dt),
                         _key_block(v_BKSH, c, n), **kw)
    alpha_BKtG1 = jnp.exp(m_BKtG1 - m_new)   # rescales what the earlier key blocks summed
    return (m_new, alpha_BKtG1 * l_BKtG1 + jnp.sum(p_BKtGs, axis=-1, keepdims=True),
            alpha_BKtG1.reshape(B, K, -1, 1) * acc_BKrH + pv_BKrH)


def _looped(plan_: Plan, keys, step, carry):
    """In a looped plan, runs `step` over the query block's full-size key blocks (all but a
    ragged diagonal one) in one lax.fori_loop, so one block's scores are alive at a time.
    -> (carry, the key blocks left to unroll)."""
    n = keys[0][1] - keys[0][0]
    full = sum(d - c == n for c, d in keys)
    if not plan_.loop or full < 2:
        return carry, keys
    return jax.lax.fori_loop(0, full, lambda j, cr: step(cr, c=j * n, n=n), carry), keys[full:]


def _short(plan_: Plan) -> bool:
    """One key block per query block, no loop: the scores of a row are computed in one piece,
    and keeping its probabilities for the backward (O(T^2), small for such rows) is cheaper
    than recomputing q k^T and exp there: at 8 x 256 the recomputing backward made a SmolLM2
    layer's attention about 1.5x slower."""
    return not plan_.loop and all(len(keys) == 1 for _, keys in plan_.blocks)


def _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale, keep_probs=False):
    """-> out (B, T, N, H) in dt, lse (B, K, R) fp32 (+inf where a row has no visible key),
    and with `keep_probs` (short plans) (the row-major q, k, v, each query block's
    probabilities (B, K, r, e) in dt), else None."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    kw = dict(precision=matmul_precision(dt), preferred_element_type=jnp.float32)
    # row_major: in bf16 on CPU, the transposed heads are copied out once so that every
    # product below runs in the fast bf16 kernel (jaxalign.precision.row_major_dots).
    q_BKRH = row_major(_rows(q_BTNH, K))
    k_BKSH = row_major(k_BSKH.transpose(0, 2, 1, 3))
    v_BKSH = row_major(v_BSKH.transpose(0, 2, 1, 3))
    outs, lses, probs = [], [], []
    for (a, e), keys in plan_.blocks:
        q_b = q_BKRH[:, :, a * G:e * G]
        if keep_probs:   # one key block [0, e): the softmax in one piece, probabilities kept
            s_BKtGs, msk = _scores(q_b, k_BKSH, mask_BTS, a, e, 0, e, scale, kw)
            m_BKtG1 = jnp.max(s_BKtGs, axis=-1, keepdims=True)
            p_BKtGs = jnp.where(msk, jnp.exp(s_BKtGs - m_BKtG1), 0.0)
            l_BKtG1 = jnp.sum(p_BKtGs, axis=-1, keepdims=True)
            seen = l_BKtG1 > 0
            p_BKrs = (p_BKtGs / jnp.where(seen, l_BKtG1, 1.0)).reshape(B, K, -1, e).astype(dt)
            probs.append(p_BKrs)
            outs.append(jnp.einsum("bkrs,bksh->bkrh", p_BKrs, v_BKSH[:, :, :e], **kw).astype(dt))
            lses.append(jnp.where(seen, m_BKtG1 + jnp.log(jnp.where(seen, l_BKtG1, 1.0)),
                                  jnp.inf).reshape(B, K, -1))
            continue
        carry = (jnp.full((B, K, e - a, G, 1), _MASKED, jnp.float32),
                 jnp.zeros((B, K, e - a, G, 1), jnp.float32),
                 jnp.zeros((B, K, (e - a) * G, H), jnp.float32))
        step = functools.partial(_fwd_block, q_b=q_b, k_BKSH=k_BKSH, v_BKSH=v_BKSH,
                                 mask_BTS=mask_BTS, a=a, e=e, dt=dt, scale=scale, kw=kw)
        carry, keys = _looped(plan_, keys, step, carry)
        for c, d in keys:
            carry = step(carry, c=c, n=d - c)
        m_BKtG1, l_BKtG1, acc_BKrH = carry
        seen = l_BKtG1 > 0
        # A row with no visible key (padding) gets a zero output and, through lse = +inf,
        # zero probabilities in the backward.
        outs.append((acc_BKrH / jnp.where(seen, l_BKtG1, 1.0).reshape(B, K, -1, 1)).astype(dt))
        lses.append(jnp.where(seen, m_BKtG1 + jnp.log(jnp.where(seen, l_BKtG1, 1.0)),
                              jnp.inf).reshape(B, K, -1))
    cat = lambda xs: jnp.concatenate(xs, axis=2) if len(xs) > 1 else xs[0]
    kept = (q_BKRH, k_BKSH, v_BKSH, tuple(probs)) if keep_probs else None
    return _unrows(cat(outs), T), cat(lses), kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale):
    """softmax(q k^T * scale masked) v (scale 1/sqrt(H), or Gemma's query_pre_attn_scalar)
    for self-attention over whole sequences (no cache), grouped-query without repeating kv
    heads, block by block (`plan(T)`), flash-style.

    The heads are laid out as (batch, kv head, rows = token x group, head_dim) once, so every
    product is one batched matmul over contiguous rows. The forward keeps a running max and
    sum per query row over its key blocks and saves only the output and the log-sum-exp; the
    backward recomputes each block's probabilities from q, k and the log-sum-exp, and takes
    the softmax gradient from rowsum(dout * out) (the flash-attention identity). Memory kept
    for the backward is O(T), not O(T^2).

    `mask_BTS` (True: visible) may be any mask that is causal: keys later than the query are
    masked, so blocks wholly above the diagonal are skipped; every computed block applies its
    slice of the mask (segments, padding, branches, windows). A row with no visible key gives
    zeros (and zero gradients)."""
    return _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale)[0]


def _attention_vjp_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale):
    out_BTNH, lse_BKR, kept = _attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale,
                                             keep_probs=_short(plan_))
    # Named for the remat policy "attn": it keeps the output and log-sum-exp (O(T)) instead of
    # running this forward again; q, k, v come back from the projections it also keeps. Short
    # plans also keep their probabilities (and the row-major heads), which the backward reuses.
    out_BTNH = checkpoint_name(out_BTNH, "attn")
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, out_BTNH, checkpoint_name(lse_BKR, "attn"),
                      mask_BTS, checkpoint_name(kept, "attn"))


def _key_grad(x_BKRS, y_BKRH, kw):
    """sum over rows r of x[r, s] y[r, h], (B, K, S, H): a block's key or value gradient."""
    if not row_major_dots(y_BKRH.dtype):
        return jnp.einsum("bkrs,bkrh->bksh", x_BKRS, y_BKRH, **kw)
    # x^T y contracts x's leading axis, which the CPU's bf16 kernel does not take: (y^T x)^T,
    # with y^T (rows x head_dim, the small operand) and the product copied out row-major.
    t_BKHS = jnp.einsum("bkhr,bkrs->bkhs", materialize(y_BKRH.swapaxes(2, 3)), x_BKRS, **kw)
    return materialize(t_BKHS).swapaxes(2, 3)


def _bwd_block(carry, q_b, do_b, lse_BKtG1, d_b, k_BKSH, v_BKSH, mask_BTS, a, e, c, n, dt,
               scale, kw):
    """One key block of the backward: its probabilities recomputed from the log-sum-exp,
    its share of dq (this query block's, (B, K, r, H)) and of dk, dv ((B, K, S, H)) added."""
    dq_BKrH, dk_BKSH, dv_BKSH = carry
    B, K = q_b.shape[:2]
    s_BKtGs, _ = _scores(q_b, k_BKSH, mask_BTS, a, e, c, n, scale, kw)
    # exp(_MASKED - lse) is 0 for every row with a visible key; lse = +inf otherwise.
    p_BKrs = jnp.exp(s_BKtGs - lse_BKtG1).reshape(B, K, -1, n)
    dv_c = _key_grad(p_BKrs.astype(dt), do_b, kw)
    dp_BKrs = jnp.einsum("bkrh,bksh->bkrs", do_b, _key_block(v_BKSH, c, n), **kw)
    ds_BKrs = (p_BKrs * (dp_BKrs - d_b) * scale).astype(dt)
    dq_BKrH = dq_BKrH + jnp.einsum("bkrs,bksh->bkrh", ds_BKrs, _key_block(k_BKSH, c, n), **kw)
    dk_c = _key_grad(ds_BKrs, q_b, kw)

    def add(acc, x):
        return jax.lax.dynamic_update_slice_in_dim(acc, _key_block(acc, c, n) + x, c, axis=2)
    return dq_BKrH, add(dk_BKSH, dk_c), add(dv_BKSH, dv_c)


def _attention_vjp_bwd(plan_, dt, scale, saved, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, out_BTNH, lse_BKR, mask_BTS, kept = saved
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    G = N // K
    kw = dict(precision=matmul_precision(dt), preferred_element_type=jnp.float32)
    if kept is not None:
        q_BKRH, k_BKSH, v_BKSH, probs = kept
    else:
        q_BKRH = row_major(_rows(q_BTNH, K))
        k_BKSH = row_major(k_BSKH.transpose(0, 2, 1, 3))
        v_BKSH = row_major(v_BSKH.transpose(0, 2, 1, 3))
    do_BKRH = row_major(_rows(dout_BTNH.astype(dt), K))
    # The softmax backward's per-row term sum_s p * dp equals rowsum(dout * out).
    d_BKR1 = jnp.sum(do_BKRH.astype(jnp.float32) * _rows(out_BTNH, K).astype(jnp.float32), -1,
                     keepdims=True)
    dq = []
    dk_BKSH = dv_BKSH = jnp.zeros((B, K, S, H), jnp.float32)
    for i, ((a, e), keys) in enumerate(plan_.blocks):
        rows = slice(a * G, e * G)
        if kept is not None:   # the forward's probabilities over keys [0, e)
            p_BKrs, do_b = probs[i], do_BKRH[:, :, rows]
            dv_c = _key_grad(p_BKrs, do_b, kw)
            dp_BKrs = jnp.einsum("bkrh,bksh->bkrs", do_b, v_BKSH[:, :, :e], **kw)
            ds_BKrs = (p_BKrs.astype(jnp.float32) * (dp_BKrs - d_BKR1[:, :, rows])
                       * scale).astype(dt)
            dq.append(jnp.einsum("bkrs,bksh->bkrh", ds_BKrs, k_BKSH[:, :, :e], **kw))
            dk_c = _key_grad(ds_BKrs, q_BKRH[:, :, rows], kw)
            pad = ((0, 0), (0, 0), (0, S - e), (0, 0))
            dk_BKSH, dv_BKSH = dk_BKSH + jnp.pad(dk_c, pad), dv_BKSH + jnp.pad(dv_c, pad)
            continue
        step = functools.partial(
            _bwd_block, q_b=q_BKRH[:, :, rows], do_b=do_BKRH[:, :, rows],
            lse_BKtG1=lse_BKR[:, :, rows].reshape(B, K, e - a, G, 1), d_b=d_BKR1[:, :, rows],
            k_BKSH=k_BKSH, v_BKSH=v_BKSH, mask_BTS=mask_BTS, a=a, e=e, dt=dt, scale=scale, kw=kw)
        carry = (jnp.zeros((B, K, (e - a) * G, H), jnp.float32), dk_BKSH, dv_BKSH)
        carry, keys = _looped(plan_, keys, step, carry)
        for c, d in keys:
            carry = step(carry, c=c, n=d - c)
        dq_BKrH, dk_BKSH, dv_BKSH = carry
        dq.append(dq_BKrH)
    dq_BKRH = jnp.concatenate(dq, axis=2) if len(dq) > 1 else dq[0]
    mask_ct = np.zeros(mask_BTS.shape, jax.dtypes.float0)
    return (_unrows(dq_BKRH, T).astype(dt), dk_BKSH.transpose(0, 2, 1, 3).astype(dt),
            dv_BKSH.transpose(0, 2, 1, 3).astype(dt), mask_ct)


causal_attention.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)
