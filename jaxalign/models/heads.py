"""Score heads: reward models (and, later, PPO value heads) on the Llama trunk.

A classifier is the same Llama with `cfg.num_labels > 0`: its params hold `score`
(D, num_labels) in place of `lm_head` (HF LlamaForSequenceClassification's `score.weight`,
transposed), and it computes no vocab logits. A sequence's score is the head applied to
the final hidden state of its rightmost real token whose id is not `cfg.pad_token_id`
(`scored_token_index`: transformers' rule, so that an exported reward model scores the
same token there).

Shape suffixes as in llama.py, plus L = num_labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign.config import ConfigError, ModelConfig
from jaxalign.models import functional
from jaxalign.models.llama import matmul_precision, score_init_std

Params = functional.Params


def scored_token_index(tokens_BT: jax.Array, segment_ids_BT: jax.Array,
                       pad_token_id: int | None) -> jax.Array:
    """Index of the token a classifier scores: each row's rightmost real token (segment id
    > 0) whose id is not `pad_token_id`.

    On inputs padded with the pad id this is exactly transformers' rule in
    LlamaForSequenceClassification ("the rightmost token != pad_token_id", left or right
    padding), which TRL's reward trainer inherits; TRL's RL `get_reward` (the token before
    the first pad of the response) picks the same one. So with pad == eos a row ending in
    eos is scored at the token before its eos(s), in training, eval and RL alike. The mask
    keeps padding filled with any other id out too. A row with no such token gives 0, as
    in transformers; with no pad id (transformers then takes the last position, batches of
    one only) it is the last real token.
    """
    keep_BT = segment_ids_BT > 0
    if pad_token_id is not None:
        keep_BT = keep_BT & (tokens_BT != pad_token_id)
    T = tokens_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens_BT.shape)
    return jnp.max(jnp.where(keep_BT, idx_BT, 0), axis=1)


def project(params: Params, hidden_xD: jax.Array) -> jax.Array:
    """hidden (..., D) -> scores (..., L) in fp32: the score head on any leading shape
    (pooled for rewards, per token for values). Inputs stay in the compute dtype with an
    fp32 accumulator, as every matmul of the model (docs/architecture.md, CPU facts)."""
    w_DL = params["score"]
    return jnp.einsum("...d,dl->...l", hidden_xD, w_DL.astype(hidden_xD.dtype),
                      precision=matmul_precision(hidden_xD.dtype), preferred_element_type=jnp.float32)


def score(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, segment_ids_BT: jax.Array,
          positions_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None,
          use_lora: bool = True) -> jax.Array:
    """Sequence scores of a classifier (num_labels > 0): fp32 (B,) for num_labels == 1
    (rewards), (B, L) otherwise. Pure; jit it with `cfg` static.

    segment_ids_BT: > 0 at real tokens, 0 at padding (either side); one sequence per row.
    positions default to 0, 1, ... from each row's first real token. The scored token:
    `scored_token_index` with `cfg.pad_token_id`.
    """
    if cfg.num_labels == 0:
        raise ConfigError("score() needs a model with a score head (model.num_labels > 0); "
                          "turn a causal LM into one with heads.add_score_head")
    _, hidden_BTD, _ = functional.apply(cfg, params, tokens_BT, positions_BT=positions_BT,
                                        segment_ids_BT=segment_ids_BT, return_logits=False,
                                        dropout_key=dropout_key, use_lora=use_lora)
    idx_B = scored_token_index(tokens_BT, segment_ids_BT, cfg.pad_token_id)
    last_BD = jnp.take_along_axis(hidden_BTD, idx_B[:, None, None], axis=1)[:, 0]
    scores_BL = project(params, last_BD)
    return scores_BL[:, 0] if cfg.num_labels == 1 else scores_BL


def add_score_head(cfg: ModelConfig, params: Params, num_labels: int = 1,
                   mesh: Mesh | None = None, seed: int = 0) -> tuple[ModelConfig, Params]:
    """Causal LM -> classifier / reward model: drops `lm_head` (a tied embedding stays, it is
    the input embedding) and adds a fresh `score` ~ normal(0, 1/sqrt(D+1)) (see
    `llama.score_init_std` for why not zeros), created directly on its sharding.

    A model that already has `num_labels` labels comes back unchanged. LoRA adapters, if
    any, are kept.
    """
    if num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1 for a score head, got {num_labels}")
    if cfg.num_labels == num_labels:
        return cfg, params
    if cfg.num_labels > 0:
        raise ConfigError(f"the model already has a score head with {cfg.num_labels} label(s); "
                          f"refusing to replace it by one with {num_labels}")
    new_cfg = cfg.replace(num_labels=num_labels)
    target = functional.abstract_params(new_cfg)["score"]
    out_sh = functional.param_shardings(new_cfg, mesh)["score"] if mesh is not None else None
    std = score_init_std(cfg.hidden_size)

    def make():
        w = std * jax.random.normal(jax.random.key(seed), target.shape, jnp.float32)
        return w.astype(target.dtype)

    new_params = {k: v for k, v in params.items() if k != "lm_head"}
    new_params["score"] = jax.jit(make, out_shardings=out_sh)()
    return new_cfg, new_params
