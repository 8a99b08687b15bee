"""Optimizer and learning-rate schedule from config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxalign.config import OptimConfig
from jaxalign.precision import path_name


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant / linear / cosine decay to lr * min_lr_ratio."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (same state, same result to an ulp) as one multiply by a
    scalar, from the norm the train step has already taken when it passes `grad_norm`.

    optax divides every element by the norm; XLA counts a division as expensive and will not
    repeat it in each of its consumers (Adam's two moments), so the clipped gradients were
    written out and read back, and the norm inside the optimizer was a second pass over them."""
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state
    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def decay_mask(params) -> dict:
    """Weight decay on matrices only: not on norm scales or biases (named, since stacked
    layers make a norm scale 2-D)."""
    def keep(path, _):
        name = path_name(path)
        return not ("norm" in name or name.endswith("bias"))
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
