"""Token-level cross-entropy and log-probabilities: pure functions of arrays.

Two entry points compute the same numbers: from full logits (`token_logprobs`), or from
the final hidden states and the LM-head weight (`head_logprobs`), which walks the sequence
in chunks and never holds the (B, T, V) logits: for a 49k vocabulary that tensor (and its
gradient) is the largest activation of a small model's train step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.precision import (dot_nt, dot_tn, materialize, matmul_precision, row_major,
                                row_major_dots, soft_cap)
from jaxalign.sharding import constrain


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target_t | prefix) for every position, in fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return picked_BT - lse_BT


def _chunk_logits(hidden_BCD, head, head_is_VD: bool):
    w = head.astype(hidden_BCD.dtype)
    # A chunk sliced out of the scan's stacked (transposed) hidden states: copied row-major
    # for the bf16 kernel on CPU (jaxalign.precision.row_major_dots), unchanged otherwise.
    hidden_BCD = row_major(hidden_BCD)
    eq = "bcd,vd->bcv" if head_is_VD else "bcd,dv->bcv"
    logits_BCV = jnp.einsum(eq, hidden_BCD, w, precision=matmul_precision(w.dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_BCV, ("batch", None, "vocab"))


def _logits_stats(logits_BCV, targets_BC):
    """(log p(target), target is the argmax, logsumexp) of a chunk's logits."""
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    # Ties count as correct, as a plain argmax comparison would for the first maximum.
    correct_BC = picked_BC >= jnp.max(logits_BCV, axis=-1)
    return picked_BC - lse_BC, correct_BC, lse_BC


def _chunk_stats(hidden_BCD, head, targets_BC, head_is_VD: bool, softcap=None):
    """(log p(target), target is the argmax) for one chunk of positions."""
    logits_BCV = head_logits(hidden_BCD, head, head_is_VD=head_is_VD, softcap=softcap)
    return _logits_stats(logits_BCV, targets_BC)[:2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_stats_keep_probs(hidden_BCD, head, targets_BC, head_is_VD: bool):
    """`_chunk_stats` whose backward pass reuses the forward's softmax instead of computing
    the chunk's logits again: the gradient of log p(target) w.r.t. the logits is
    onehot(target) - softmax, so the backward costs the two matmuls of the head's gradients
    and no third one (and no second exp over the vocabulary), for (B, C, V) fp32 of memory."""
    return _chunk_stats(hidden_BCD, head, targets_BC, head_is_VD)


def _keep_probs_fwd(hidden_BCD, head, targets_BC, head_is_VD):
    logits_BCV = _chunk_logits(hidden_BCD, head, head_is_VD)
    # One exp over the chunk's (B, C, V) logits, for the log-sum-exp and the kept softmax
    # both: logsumexp and then exp(logits - lse) took two (two fused passes at ~11% of a bf16
    # SmolLM2 step's CPU op time). A non-finite logit gives a NaN loss either way.
    max_BC = jnp.max(logits_BCV, axis=-1)
    exp_BCV = jnp.exp(logits_BCV - max_BC[..., None])
    sum_BC = jnp.sum(exp_BCV, axis=-1)
    picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    logp_BC = picked_BC - max_BC - jnp.log(sum_BC)
    probs_BCV = exp_BCV / sum_BC[..., None]
    return (logp_BC, picked_BC >= max_BC), (hidden_BCD, head, targets_BC, probs_BCV)


def _head_grads(head_is_VD, hidden_BCD, head, targets_BC, probs_BCV, g_BC):
    """Cotangents of (hidden, head, targets) from the chunk's softmax and d loss / d log p."""
    V = probs_BCV.shape[-1]
    onehot_BCV = jax.nn.one_hot(targets_BC, V, dtype=jnp.float32)
    dlogits_BCV = constrain(g_BC[..., None] * (onehot_BCV - probs_BCV), ("batch", None, "vocab"))
    dt = hidden_BCD.dtype
    w = head.astype(dt)
    kw = dict(precision=matmul_precision(dt), preferred_element_type=jnp.float32)
    d = dlogits_BCV.astype(dt)
    B, C, D = hidden_BCD.shape
    if row_major_dots(dt):
        # bf16 on CPU: the forms its fast kernel runs (jaxalign.precision.row_major_dots);
        # `head_logprobs` has turned a tied (V, D) head into (D, V) for this.
        assert not head_is_VD
        dh_BCD = dot_nt(d.reshape(B * C, V), w, **kw).reshape(B, C, D)
        dw = dot_tn(hidden_BCD.reshape(B * C, D), d.reshape(B * C, V), **kw)
    else:
        # The head's gradient as h^T d, (D, V) with the tokens contracted: the other order
        # made XLA's CPU backend transpose the whole (tokens, V) block first.
        dw_DV = jnp.einsum("bcd,bcv->dv", hidden_BCD, d, **kw)
        if head_is_VD:
            dh_BCD = jnp.einsum("bcv,vd->bcd", d, w, **kw)
            dw = dw_DV.T
        else:
            dh_BCD = jnp.einsum("bcv,dv->bcd", d, w, **kw)
            dw = dw_DV
    targets_ct = np.zeros(targets_BC.shape, jax.dtypes.float0)
    return dh_BCD.astype(dt), dw.astype(head.dtype), targets_ct


def _keep_probs_bwd(head_is_VD, res, cts):
    hidden_BCD, head, targets_BC, probs_BCV = res
    return _head_grads(head_is_VD, hidden_BCD, head, targets_BC, probs_BCV, cts[0])


_chunk_stats_keep_probs.defvjp(_keep_probs_fwd, _keep_probs_bwd)

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_stats_recompute(hidden_BCD, head, targets_BC, head_is_VD: bool):
    """`_chunk_stats` whose backward pass computes the chunk's logits again (it keeps only its
    inputs) and takes the gradient in `_head_grads`' forms: what autodiff of the head matmul
    would produce contracts the tokens of a transposed operand, which bf16 on CPU cannot run."""
    return _chunk_stats(hidden_BCD, head, targets_BC, head_is_VD)


def _recompute_fwd(hidden_BCD, head, targets_BC, head_is_VD):
    return _chunk_stats(hidden_BCD, head, targets_BC, head_is_VD), (hidden_BCD, head, targets_BC)


def _recompute_bwd(head_is_VD, res, cts):
    hidden_BCD, head, targets_BC = res
    logits_BCV = _chunk_logits(hidden_BCD, head, head_is_VD)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    return _head_grads(head_is_VD, hidden_BCD, head, targets_BC, probs_BCV, cts[0])


_chunk_stats_recompute.defvjp(_recompute_fwd, _recompute_bwd)

# Largest softmax (B, T, V fp32) the head losses keep for their backward pass instead of
# recomputing the logits (`_chunk_stats_keep_probs`): SmolLM2's 8 x 256 step keeps 384 MiB
# and saves one of its four LM-head matmuls (0.6 s of a 12 s CPU step); bigger batches fall
# back to recomputing, whose peak holds one chunk.
KEEP_PROBS_BYTES = 1 << 30


def scan_chunks(hidden_BTD: jax.Array, targets_BT: jax.Array, chunk: int, stats_fn,
                remat: bool = True, unroll: bool = False):
    """Applies `stats_fn(hidden_BCD, targets_BC) -> tuple of (B, C) arrays` to the sequence
    `chunk` positions at a time and returns the tuple as (B, T) arrays. Each chunk runs under
    `jax.checkpoint`: its (B, chunk, V) logits are rematerialised in the backward pass instead
    of stored, so peak memory holds one such block instead of (B, T, V). `remat=False` when
    `stats_fn` keeps what its backward needs itself (a custom VJP); `unroll` when what it
    keeps is the whole (B, T, V) anyway: the chunks' outputs are then concatenated, where a
    scan first fills its stacked buffers with zeros (0.4 GiB of softmax for SmolLM2's 8 x 256
    step, ~1% of its CPU op time) and then updates them one chunk at a time."""
    B, T, D = hidden_BTD.shape
    chunk = max(1, min(chunk or T, T))
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    # (n, B, chunk, ...): scan over chunks.
    h_nBCD = hidden_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
    t_nBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)

    def body(_, xs):
        return None, stats_fn(*xs)

    if remat:
        body = jax.checkpoint(body)

    _, outs = jax.lax.scan(body, None, (h_nBCD, t_nBC), unroll=unroll)
    return tuple(x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T] for x in outs)


def head_logprobs(hidden_BTD: jax.Array, head: jax.Array, targets_BT: jax.Array, *,
                  head_is_VD: bool, chunk: int = 128,
                  softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """log p(target_t) (fp32) and whether the target is the argmax, for every position,
    from the final hidden states and the LM-head weight ((V, D) when tied to the embedding,
    else (D, V)), `chunk` positions at a time (`scan_chunks`). The backward pass reuses the
    forward's softmax when the whole (B, T, V) of it fits in `KEEP_PROBS_BYTES`, else it
    computes each chunk's logits again (one more head matmul).

    `softcap` (the model's `final_logit_softcap`, Gemma 2): the logits are capped here exactly
    as the model's own forward caps them (`Llama.__call__`), so SFT, DPO, RL scoring and
    generation all see the same capped distribution; the backward is then autodiff's.
    """
    B, T, _ = hidden_BTD.shape
    V = head.shape[0] if head_is_VD else head.shape[1]
    if row_major_dots(hidden_BTD.dtype):
        if head_is_VD:
            # bf16 on CPU: a tied (V, D) head read as (D, V), copied once per step outside the
            # chunk loop, so that every head product is one the fast bf16 kernel runs; cast
            # first, so the transposing copy moves bf16, not fp32 (LoRA SFT step 2.33 -> 2.24 s).
            head, head_is_VD = materialize(head.astype(hidden_BTD.dtype).T), False
        if softcap is None and B * T * V * 4 > KEEP_PROBS_BYTES:
            return scan_chunks(hidden_BTD, targets_BT, chunk,
                               lambda h, t: _chunk_stats_recompute(h, head, t, head_is_VD),
                               remat=False)
    if softcap is None and B * T * V * 4 <= KEEP_PROBS_BYTES:
        return scan_chunks(hidden_BTD, targets_BT, chunk,
                           lambda h, t: _chunk_stats_keep_probs(h, head, t, head_is_VD),
                           remat=False, unroll=True)
    return scan_chunks(hidden_BTD, targets_BT, chunk,
                       lambda h, t: _chunk_stats(h, head, t, head_is_VD, softcap))


def _masked_mean_metrics(logp_BT, correct_BT, loss_mask_BT):
    mask_BT = loss_mask_BT.astype(jnp.float32)
    tokens = mask_BT.sum()
    denom = jnp.maximum(tokens, 1.0)
    loss = -(logp_BT * mask_BT).sum() / denom
    accuracy = (correct_BT.astype(jnp.float32) * mask_BT).sum() / denom
    return loss, {"loss": loss, "token_accuracy": accuracy, "weight": tokens}


def masked_xent(logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array):
    """Mean negative log-likelihood over the masked tokens.

    Returns (loss, metrics); metrics['weight'] is the number of tokens averaged over, which
    the train step uses to weight micro-batches so that accumulation equals one big batch.
    """
    logp_BT = token_logprobs(logits_BTV, targets_BT)
    correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return _masked_mean_metrics(logp_BT, correct_BT, loss_mask_BT)


def head_masked_xent(hidden_BTD: jax.Array, head: jax.Array, targets_BT: jax.Array,
                     loss_mask_BT: jax.Array, *, head_is_VD: bool, chunk: int = 128,
                     softcap: float | None = None):
    """`masked_xent` from hidden states + head weight, without the (B, T, V) logits."""
    logp_BT, correct_BT = head_logprobs(hidden_BTD, head, targets_BT, head_is_VD=head_is_VD,
                                        chunk=chunk, softcap=softcap)
    return _masked_mean_metrics(logp_BT, correct_BT, loss_mask_BT)


def head_logits(hidden_BCD: jax.Array, head: jax.Array, *, head_is_VD: bool,
                softcap: float | None = None) -> jax.Array:
    """The LM head on (a chunk of) hidden states: fp32 (B, C, V) logits, constrained to the
    vocab sharding and soft-capped where the model caps them (`softcap`). The one head matmul
    of every log-prob path (SFT, DPO / KTO, eval here; the RL rollout's scoring, which adds its
    temperature and entropy), so that a change to the head reaches all of them."""
    return soft_cap(_chunk_logits(hidden_BCD, head, head_is_VD), softcap)
