"""Chunked LM-head log-probs equal the full-logits ones, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import xent
from jaxalign.losses.xent import head_logprobs, head_masked_xent, masked_xent, token_logprobs


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("keep_probs", [True, False], ids=["keep-softmax", "recompute-logits"])
@pytest.mark.parametrize("head_is_VD", [True, False])
@pytest.mark.parametrize("chunk", [4, 5, 64])  # divides T, does not, larger than T
def test_chunked_equals_full(head_is_VD, chunk, keep_probs, monkeypatch):
    """Both backward passes of the chunked head: reusing the forward's softmax (custom VJP)
    and recomputing each chunk's logits (remat), against autodiff of the full logits."""
    monkeypatch.setattr(xent, "KEEP_PROBS_BYTES", 1 << 30 if keep_probs else 0)
    B, T, D, V = 3, 12, 16, 40
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(k[0], (B, T, D))
    head = 0.5 * jax.random.normal(k[1], (V, D) if head_is_VD else (D, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.int32)

    def full(h, w):
        logits = jnp.einsum("btd,vd->btv" if head_is_VD else "btd,dv->btv", h, w)
        return masked_xent(logits, targets, mask)

    def chunked(h, w):
        return head_masked_xent(h, w, targets, mask, head_is_VD=head_is_VD, chunk=chunk)

    (l_full, m_full), g_full = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
    (l_chunk, m_chunk), g_chunk = jax.jit(
        jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, head)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
    for key in ("token_accuracy", "weight"):
        np.testing.assert_allclose(m_chunk[key], m_full[key], rtol=1e-6)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    logits = jnp.einsum("btd,vd->btv" if head_is_VD else "btd,dv->btv", hidden, head)
    logp, correct = head_logprobs(hidden, head, targets, head_is_VD=head_is_VD, chunk=chunk)
    np.testing.assert_allclose(logp, token_logprobs(logits, targets), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == targets)
