"""Token-level cross-entropy and log-probabilities: pure functions of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target_t | prefix) for every position, in fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return picked_BT - lse_BT


def masked_xent(logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array):
    """Mean negative log-likelihood over the masked tokens.

    Returns (loss, metrics); metrics['weight'] is the number of tokens averaged over, which
    the train step uses to weight micro-batches so that accumulation equals one big batch.
    """
    mask_BT = loss_mask_BT.astype(jnp.float32)
    nll_BT = -token_logprobs(logits_BTV, targets_BT)
    tokens = mask_BT.sum()
    loss = (nll_BT * mask_BT).sum() / jnp.maximum(tokens, 1.0)
    correct = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    accuracy = (correct * mask_BT).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "token_accuracy": accuracy, "weight": tokens}
