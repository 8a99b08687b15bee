"""Forward passes over layout batches (`jaxalign.data.layout`): rows of several branches
that share a prompt, written once ([prompt | chosen | rejected]) or one row per branch.

Every preference objective reads its sequences through these two functions, in either
layout, so the shared layout and the unshared one compute the same numbers by the same code:
`branch_logps` (DPO and its variants, ORPO / SimPO, KTO, the eval stage's DPO rewards) and
`branch_scores` (reward models, the eval stage's pair scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.config import ModelConfig
from jaxalign.losses.preference import sequence_logps
from jaxalign.losses.xent import head_logprobs
from jaxalign.models import functional, heads


def layout_hidden(cfg: ModelConfig, params, batch: dict, *, dropout_key=None,
                  use_lora: bool = True) -> jax.Array:
    """(B, S * L, D) final hidden states of each item's S rows of L slots, flattened per item
    (the slots `logp_index` counts)."""
    B, S, L = batch["tokens"].shape
    flat = lambda k: batch[k].reshape(B * S, L)
    # One row per branch (S > 1) needs no branch mask: each row is one ordinary sequence.
    branch = flat("branch_ids") if S == 1 else None
    _, hidden_RLD, _ = functional.apply(cfg, params, flat("tokens"), positions_BT=flat("positions"),
                                        segment_ids_BT=flat("segment_ids"), return_logits=False,
                                        dropout_key=dropout_key, use_lora=use_lora,
                                        branch_ids_BT=branch)
    return hidden_RLD.reshape(B, S * L, hidden_RLD.shape[-1])


def branch_masks(batch: dict, branches: int) -> jax.Array:
    """(B, M, G) float: 1 where gathered position m carries branch g + 1's loss."""
    ids_G = jnp.arange(1, branches + 1, dtype=jnp.int32)
    return (batch["logp_branch"][..., None] == ids_G).astype(jnp.float32)


def branch_token_logps(cfg: ModelConfig, params, batch: dict, *, chunk: int, dropout_key=None,
                       use_lora: bool = True) -> jax.Array:
    """(B, M) log p(logp_target) at the gathered loss positions. The hidden states of those
    positions are gathered before the LM head, so the head (the vocab matmul, its softmax
    and its gradient) never runs over the prompt or padding."""
    hidden_BND = layout_hidden(cfg, params, batch, dropout_key=dropout_key, use_lora=use_lora)
    hidden_BMD = jnp.take_along_axis(hidden_BND, batch["logp_index"][..., None], axis=1)
    head, head_is_VD = functional.lm_head(cfg, params)
    M = hidden_BMD.shape[1]
    logp_BM, _ = head_logprobs(hidden_BMD, head, batch["logp_target"], head_is_VD=head_is_VD,
                               chunk=min(chunk or M, M), softcap=cfg.final_logit_softcap)
    return logp_BM


def branch_logps(cfg: ModelConfig, params, batch: dict, *, branches: int, average: bool,
                 chunk: int, dropout_key=None, use_lora: bool = True) -> jax.Array:
    """(B, G) sequence log-probs of each branch over its loss tokens: the sum, or the mean
    when `average` (`losses.preference.sequence_logps`)."""
    logp_BM = branch_token_logps(cfg, params, batch, chunk=chunk, dropout_key=dropout_key,
                                 use_lora=use_lora)
    mask_BGM = branch_masks(batch, branches).swapaxes(1, 2)
    return sequence_logps(logp_BM[:, None, :], mask_BGM, average=average)


def branch_counts(batch: dict, branches: int) -> jax.Array:
    """(B, G) loss tokens of each branch."""
    return branch_masks(batch, branches).sum(axis=1)


def branch_scores(cfg: ModelConfig, params, batch: dict, *, branches: int, dropout_key=None,
                  use_lora: bool = True) -> jax.Array:
    """(B, G) fp32 reward-model scores of each branch: the score head on the token that
    `heads.scored_token_index` picks in the branch's own row (the prompt and the branch)."""
    hidden_BND = layout_hidden(cfg, params, batch, dropout_key=dropout_key, use_lora=use_lora)
    B, N = hidden_BND.shape[:2]
    tokens_BN = batch["tokens"].reshape(B, N)
    seg_BN = batch["segment_ids"].reshape(B, N)
    branch_BN = batch["branch_ids"].reshape(B, N)
    idx = [heads.scored_token_index(tokens_BN, jnp.where((branch_BN == 0) | (branch_BN == g),
                                                         seg_BN, 0), cfg.pad_token_id)
           for g in range(1, branches + 1)]
    last_BGD = jnp.take_along_axis(hidden_BND, jnp.stack(idx, axis=1)[..., None], axis=1)
    scores_BGL = heads.project(params, last_BGD)
    return scores_BGL[..., 0] if cfg.num_labels == 1 else scores_BGL
