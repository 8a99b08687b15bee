"""The train state and the pure, jitted train / eval steps shared by every algorithm.

An algorithm supplies only `loss_fn(params, frozen, batch, rng) -> (loss, metrics)` with
`metrics['weight']` (tokens, pairs, ... that `loss` averages over). The step does the rest:
micro-batch accumulation weighted by that count (so k micro-batches equal one k-times
larger batch), clipping and the optimizer, and a non-finite guard.

A loss may also return `metrics['rows']`: a dict of per-row arrays (leading axis the micro
batch's rows), stop-gradient. They are not averaged: the step hands them back in the
batch's row order under the same key (the RL update keeps the first step's log-probs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.precision import round_params

# Folded into a step's key for the stochastic rounding's seed (micro-batch keys fold 0..A-1).
_ROUNDING_SALT = 0x5EED

# rng is None in evaluation (dropout off).
LossFn = Callable[[Any, Any, dict, "jax.Array | None"], tuple[jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer steps taken
    params: Any            # trainable params only (LoRA: just the adapters)
    opt_state: Any
    rng: jax.Array         # raw uint32 key; per-step keys are folded in from `step`


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def state_shardings(optimizer: optax.GradientTransformation, params, param_shardings,
                    replicated) -> TrainState:
    """Shardings of the TrainState for `params` (arrays or ShapeDtypeStructs): every
    per-parameter leaf of the optimizer state (Adam's moments) takes its parameter's sharding,
    everything else (step, counts, rng) is replicated.

    Stated explicitly because the moments are `zeros_like(params)`: with no data dependence on
    the params, a jitted `init` without out_shardings leaves them replicated on every device
    (three full copies of the model per device under fsdp instead of three shards)."""
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, opt_abstract, param_shardings,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_sh, rng=replicated)


def micro_batches(batch: dict, grad_accum: int) -> dict:
    """(B, ...) -> (A, B/A, ...). Micro-batch k takes rows k, k+A, k+2A, ... so that every
    data-parallel shard contributes to every micro-batch (no device idles)."""
    def split(x):
        b = x.shape[0] // grad_accum
        return x.reshape(b, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _weighted_sums(loss_fn: LossFn, params, frozen, batch, rng, grad_accum: int):
    """Sum over micro-batches of (weight * loss, weight * metric, weight * grad)."""
    def weighted(p, mb, key):
        loss, metrics = loss_fn(p, frozen, mb, key)
        return loss * metrics["weight"], metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def body(carry, xs):
        mb, k = xs
        (wloss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, k))
        rows = metrics.pop("rows", {})
        w = metrics["weight"]
        sums = {name: v * w for name, v in metrics.items() if name != "weight"}
        sums["weight"] = w
        carry = jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype), carry, (wloss, sums, grads))
        return carry, rows

    mbs = micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], mbs)
    (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, params, first, rng)
    # Gradients are summed in fp32 whatever the params' dtype (bf16 params: model.param_dtype).
    zero = lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32))
    init = (jnp.zeros((), jnp.float32),
            {name: jnp.zeros((), jnp.float32) for name in metric_shapes if name != "rows"},
            jax.tree.map(zero, grad_shapes))
    (wloss, sums, grads), rows = jax.lax.scan(body, init, (mbs, jnp.arange(grad_accum)))
    # (A, B/A, ...) back to the batch's rows: the inverse of `micro_batches`' striding.
    rows = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), rows)
    return wloss, sums, grads, rows


def _seen(params, rng, round_weights: bool):
    """The params as the forward reads them: under bf16 compute over fp32 params
    (`precision.rounds_stochastically`) each weight stochastically rounded to a bf16 value,
    fresh bits each step. The gradient taken at these values is applied to the fp32 params
    (a straight-through rounding): the forward sees every update on average, where rounding
    to nearest hid those below half a bf16 step (a 50-step SmolLM2 SFT ended 3.2% above fp32's
    held-out loss that way, 0.5% rounded stochastically; scripts/bf16_vs_fp32.py)."""
    if not round_weights:
        return params
    seed = jax.random.bits(jax.random.fold_in(rng, _ROUNDING_SALT), (), jnp.uint32)
    return round_params(params, seed)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1,
                    round_weights: bool = False):
    """Pure step: (state, frozen, batch) -> (state, metrics). Jit it with `jit_train_step`.
    `round_weights`: the forward reads the trainable weights stochastically rounded (`_seen`)."""
    optimizer = optax.with_extra_args_support(optimizer)   # takes the step's `grad_norm`

    def step(state: TrainState, frozen, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        wloss, sums, grads, rows = _weighted_sums(
            loss_fn, _seen(state.params, rng, round_weights), frozen, batch, rng, grad_accum)
        weight = jnp.maximum(sums["weight"], 1e-9)
        loss = wloss / weight
        # The gradient is the weighted sum times 1 / weight, applied inside the update where
        # it fuses into Adam's moment updates: scaled out here, the gradients would be written
        # out again as the `cond`'s operand (a pass over every gradient per step). The norm is
        # taken once, here, and handed to the clipping (`optim.clip_by_global_norm`).
        inv_weight = 1.0 / weight
        grad_norm = optax.tree.norm(grads) * inv_weight
        # A non-finite loss or gradient leaves params and optimizer state untouched; the
        # loop decides whether to stop or skip (the inputs are donated, so it can't undo).
        # `cond` rather than a `where` over both trees: the update runs only when it is
        # used, and XLA need not keep a second copy of the params and Adam moments alive.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            grads, opt_state, params = operands
            # Back to each parameter's own dtype: the optimizer state and both branches of the
            # `cond` keep the params' dtypes (bf16 grads divided by the fp32 weight would
            # otherwise come out fp32 and turn bf16 Adam moments into fp32 ones in one branch).
            grads = jax.tree.map(lambda g, p: (g * inv_weight).astype(p.dtype), grads, params)
            updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(ok, update, lambda ops: (ops[2], ops[1]),
                                         (grads, state.opt_state, state.params))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=state.rng)
        metrics = {name: v / weight for name, v in sums.items() if name != "weight"}
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       weight=sums["weight"], finite=ok.astype(jnp.float32),
                       state_finite=all_finite((params, opt_state)).astype(jnp.float32))
        if rows:
            metrics["rows"] = rows
        return new_state, metrics
    return step


def _nan_if_any_not_finite(x: jax.Array) -> jax.Array:
    """An fp32 scalar: 0 when every element of x is finite, else NaN (inf * 0 and NaN * 0 are
    NaN, and neither sum can overflow).

    On CPU an fp32 array of 2 or more axes goes through a product with a (last axis, 4) matrix
    of zeros: XLA runs a matrix product on all cores, where it runs a reduction (or a
    matrix-vector product, which it rewrites into one) on one. SmolLM2's params and Adam
    moments: 0.10 s against 0.17 s. No reshape (0.08 s): merging a sharded axis into its
    neighbour would make XLA reshard the leaf."""
    if x.ndim >= 2 and x.dtype == jnp.float32 and jax.default_backend() == "cpu":
        return jnp.sum(jnp.dot(x, jnp.zeros((x.shape[-1], 4), x.dtype),
                               precision=jax.lax.Precision.HIGHEST))
    return jnp.sum(x * 0, dtype=jnp.float32)


def all_finite(tree) -> jax.Array:
    """One boolean: every float leaf of `tree` is finite. The update can make the state
    non-finite from a finite loss and gradient (Adam with b2 = 1: 0 / 0 in its bias
    correction), so the loop checks what it would save, not only what it computed from.
    Checked after the update, not before accepting it: keeping the old state alive for a
    select would double the resident params and moments; the loop stops instead."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    # One fused pass per leaf (`_nan_if_any_not_finite`), where isfinite(x).all() wrote and
    # then reduced a boolean array (~8% of a bf16 SmolLM2 step's op time on CPU).
    return jnp.isfinite(jnp.stack([_nan_if_any_not_finite(x) for x in leaves]).sum()) \
        if leaves else jnp.bool_(True)


def jit_train_step(step_fn, state_shardings, frozen_shardings, batch_shardings):
    # The state is donated: params and optimizer moments are updated in place, which
    # halves peak memory and avoids a fresh allocation per step.
    return jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_eval_step(loss_fn: LossFn, round_weights: bool = False):
    """(params, frozen, batch) -> {'loss_sum', 'weight', ...sums}; the caller divides.
    `round_weights`: the weights are read as the train step reads them (`_seen`), with one
    fixed seed, so that an evaluation measures the fp32 params the run trains, not their
    rounding to nearest (which hides a short run's updates)."""
    def step(params, frozen, batch):
        params = _seen(params, jax.random.PRNGKey(0), round_weights)
        loss, metrics = loss_fn(params, frozen, batch, None)  # rng None: no dropout
        metrics.pop("rows", None)
        w = metrics["weight"]
        out = {f"{k}_sum": v * w for k, v in metrics.items() if k != "weight"}
        out["weight"] = w
        return out
    return jax.jit(step)
