"""The one place that splits and merges NNX graphs.

Everything outside this module sees a model as (ModelConfig, params), where params is
a plain nested dict of arrays: easy to jit, shard, donate, checkpoint and convert.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding
from jaxalign.config import ConfigError, ModelConfig
from jaxalign.models import llama
from jaxalign.models.llama import Cache, Llama
from jaxalign.precision import decode_cast

Params = dict[str, Any]


@functools.lru_cache(maxsize=None)
def _split(cfg: ModelConfig):
    # eval_shape: no memory, no RNG work. Eager sharding off: shardings are decided by
    # jaxalign.sharding from the names, not by flax at construction time. An empty abstract
    # mesh hides any mesh the caller has set, under which flax would try to resolve the
    # logical names ('vocab', 'embed', ...) as mesh axes.
    with nnx.use_eager_sharding(False), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        abstract = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    shapes = nnx.to_pure_dict(state)
    return graphdef, shapes, nnx.to_pure_dict(names)


def abstract_params(cfg: ModelConfig) -> Params:
    """Tree of `jax.ShapeDtypeStruct` with the exact structure of the params."""
    return _split(cfg)[1]


def param_names(cfg: ModelConfig) -> Params:
    """Tree of logical axis-name tuples, one per parameter."""
    return _split(cfg)[2]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    return sharding.tree_shardings(abstract_params(cfg), param_names(cfg), mesh)


def init_params(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> Params:
    """Random parameters (normal(0.02) weights, unit norms), created directly on their shards."""
    def make():
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(seed))))
    out = param_shardings(cfg, mesh) if mesh is not None else None
    return jax.jit(make, out_shardings=out)()


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each new segment (packing) and after left padding."""
    T = segment_ids_BT.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
        axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def apply(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *,
          positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
          cache: Cache | None = None, return_logits: bool = True,
          dropout_key: jax.Array | None = None, use_lora: bool = True,
          branch_ids_BT: jax.Array | None = None):
    """Pure forward pass: (logits_BTV fp32 | None, hidden_BTD, cache | None).

    segment_ids default to all ones (no padding); positions default to restarting at
    each segment, which also gives left-padded rows positions 0.. at their first token.
    branch_ids_BT: shared-prefix rows (`Llama.__call__`); pass their positions explicitly.
    """
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    if positions_BT is None:
        positions_BT = positions_from_segments(segment_ids_BT)
    layer_params = None
    if isinstance(params["layers"], tuple):
        # Decode layout (`unstack_layers`): the model is merged around the first layer's tree
        # only to give it a structure; the layers run from `layer_params`.
        layer_params = params["layers"]
        params = {**params, "layers": layer_params[0]}
    model = nnx.merge(_split(cfg)[0], params)
    return model(tokens_BT, positions_BT, segment_ids_BT, cache, return_logits=return_logits,
                 dropout_key=dropout_key, use_lora=use_lora, layer_params=layer_params,
                 branch_ids_BT=branch_ids_BT)


def unstack_layers(cfg: ModelConfig, params: Params, dtype: str | None = None) -> Params:
    """The params in decode layout: `params['layers']` becomes a tuple of per-layer trees
    (read in place by each decode step, see `Llama._loop_layers`), optionally cast to `dtype`
    together with the other weights. `apply` takes either layout."""
    if isinstance(params["layers"], tuple):
        return params
    out = {k: jax.tree.map(lambda a: decode_cast(a, dtype), v)
           for k, v in params.items() if k != "layers"}
    out["layers"] = llama.per_layer(params["layers"], dtype)
    return out


def lm_head(cfg: ModelConfig, params: Params) -> tuple[jax.Array, bool]:
    """The LM-head weight and whether it is laid out (V, D) (tied to the embedding) or (D, V),
    for losses that compute log-probs from hidden states chunk by chunk."""
    if cfg.num_labels > 0:
        raise ConfigError(f"a classifier (num_labels={cfg.num_labels}) has no LM head")
    # Gathered over fsdp once, here: the chunked losses read the head in a loop, and XLA does
    # not hoist a loop-invariant all-gather out of it (`jaxalign plan` showed the 8B head
    # gathered twice per chunk, 125 GiB per step on fsdp=64). Its gradient is then summed
    # locally over the chunks and reduced once. Vocab stays split over `tensor`.
    if cfg.tie_word_embeddings:
        return sharding.constrain(params["embed"], ("vocab", None)), True
    return sharding.constrain(params["lm_head"], (None, "vocab")), False


def check_positions(cfg: ModelConfig, length: int, what: str) -> None:
    """A sequence of `length` tokens (`what` names the keys that make it) must fit the
    model's position range: past max_position_embeddings RoPE runs on positions the model
    never saw (and a llama3-scaled model's frequencies were fitted up to it), which trains
    or generates silently wrong."""
    if length > cfg.max_position_embeddings:
        raise ConfigError(f"{what} = {length} tokens exceeds the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings}, config.json); lower it")
