"""The RL objectives table: each algorithm is one row of properties and pure functions.

The driver, the roles and the config read a row's properties, never its name:

  needs_value      a value head / critic is trained beside the policy (PPO)
  kl_in_reward     KL(policy || reference) is taken off the reward with coefficient
                   ppo.kl_coef (adaptive with ppo.kl_target), estimator ppo.kl_kind; False:
                   grpo.beta x the k3 estimator is added to the loss instead, as TRL's GRPO
  min_generations  completions per prompt it needs (a group to compare within)
  advantage_fn     `jaxalign.losses.ppo` advantage function: (scores_B, **arrays and
                   settings) -> (advantages_BN, returns_BN)
  policy_loss_fn   the clipped surrogate on the advantages

A new objective is a pure advantage (or loss) function in `jaxalign.losses` and one row here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxalign.losses import ppo as L
from jaxalign.models import lora
from jaxalign.train.rl.rollout import Models, policy_forward, values


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    needs_value: bool
    kl_in_reward: bool
    min_generations: int
    advantage_fn: Callable
    policy_loss_fn: Callable = L.policy_loss


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    # GAE over a value head / critic; the KL penalty on every token of the reward.
    Objective("ppo", needs_value=True, kl_in_reward=True, min_generations=1,
              advantage_fn=L.gae_token_advantages),
    # The score normalised within its prompt's group; k3 KL in the loss (TRL's GRPOTrainer).
    Objective("grpo", needs_value=False, kl_in_reward=False, min_generations=2,
              advantage_fn=L.group_sequence_advantages),
    # Leave-one-out baseline over each prompt's group; the sequence KL off the score (TRL's
    # RLOOTrainer: ppo.kl_coef is its beta, ppo.kl_kind k1 its estimator).
    Objective("rloo", needs_value=False, kl_in_reward=True, min_generations=2,
              advantage_fn=L.rloo_sequence_advantages),
)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """An objective with its static settings: hashable, part of the compile cache key."""
    objective: Objective
    temperature: float
    logits_chunk: int
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    ent_coef: float
    gamma: float
    lam: float
    whiten_advantages: bool
    kl_kind: str
    kl_loss_coef: float
    group_size: int
    scale_rewards: bool
    layout_group: int = 1   # the update forwards' layout: 1 per row, G grouped (`groups.py`)
    reuse_old_logp: bool = False   # old log-probs from the first update's forward (`reuses`)

    @classmethod
    def of(cls, cfg, layout_group: int = 1) -> "Settings":
        """From an `RLConfig`."""
        obj, p = cfg.objective, cfg.ppo
        return cls(objective=obj, temperature=float(cfg.rollout.temperature),
                   logits_chunk=cfg.train.logits_chunk, clip_eps=p.clip_eps,
                   value_clip_eps=p.value_clip_eps, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                   gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
                   kl_kind=p.kl_kind if obj.kl_in_reward else "k3", kl_loss_coef=cfg.grpo.beta,
                   group_size=cfg.rollout.num_generations, scale_rewards=cfg.grpo.scale_rewards,
                   layout_group=layout_group, reuse_old_logp=reuses(cfg))


def reuses(cfg) -> bool:
    """Whether the rollout skips its own policy forward and the update's first step supplies
    the old log-probs. Exact when that step sees the rollout's params on every row: one
    minibatch per epoch (the first optimizer step covers the whole rollout), and nothing
    before the update needs them (no KL in the reward, no value head on the policy trunk).
    TRL's GRPO does the same at num_iterations=1 (old = the current log-probs, detached)."""
    obj = cfg.objective
    return (cfg.ppo.reuse_old_logp and cfg.ppo.minibatches == 1 and not obj.kl_in_reward
            and not obj.needs_value)


def _masked_mean(x_BN, mask_BN):
    return (x_BN * mask_BN).sum() / jnp.maximum(mask_BN.sum(), 1.0)


def advantages(s: Settings, exp: dict, scores_B: jax.Array, kl_coef: jax.Array) -> dict:
    """Advantages and returns of a scored rollout, plus the KL figures. Pure; jit with `s`
    static. `kl_coef` is traced, so the adaptive controller never recompiles."""
    mask_BN = exp["mask_BN"].astype(jnp.float32)
    # Without old log-probs yet (`reuses`), the KL figures come from the first update step.
    kl_BN = None if s.reuse_old_logp else \
        L.kl_penalty(exp["old_logp_BN"], exp["ref_logp_BN"], s.kl_kind) * mask_BN
    adv_BN, ret_BN = s.objective.advantage_fn(
        scores_B, mask_BN=mask_BN, values_BN=exp["values_BN"], kl_BN=kl_BN, kl_coef=kl_coef,
        lengths_B=exp["lengths_B"], gamma=s.gamma, lam=s.lam,
        whiten_advantages=s.whiten_advantages, group_size=s.group_size,
        scale_rewards=s.scale_rewards)
    out = {"advantages_BN": adv_BN, "returns_BN": ret_BN}
    if kl_BN is not None:
        out.update(kl_figures(kl_BN, mask_BN))
    if s.objective.needs_value:
        out["explained_variance"] = L.explained_variance(exp["values_BN"], ret_BN, mask_BN)
    return out


def kl_figures(kl_BN, mask_BN) -> dict:
    """The logged KL: per sequence (summed over its tokens, averaged over rows) and per token."""
    return {"kl": kl_BN.sum(1).mean(), "kl_token": _masked_mean(kl_BN, mask_BN)}


def first_forward(s: Settings, batch: dict, picked_R, rows: dict, sampler_logp_BN) -> tuple:
    """After the first update step of a rollout (`reuses`): its forward's per-row log-probs and
    entropies (`rows`, in the order of the minibatch rows `picked_R`, every row once) become the
    batch's old log-probs for the later epochs, and the figures the rollout would have logged
    from a forward of its own: the KL to the reference, the entropy, the sampler's log-prob
    gap. Pure; jit it with `s` static."""
    mask_BN = batch["mask_BN"].astype(jnp.float32)
    logp_BN = jnp.zeros_like(batch["old_logp_BN"]).at[picked_R].set(rows["logp_BN"]) * mask_BN
    ent_BN = jnp.zeros_like(logp_BN).at[picked_R].set(rows["entropy_BN"])
    kl_BN = L.kl_penalty(logp_BN, batch["ref_logp_BN"], s.kl_kind) * mask_BN
    gap_BN = jnp.abs(sampler_logp_BN[:, :logp_BN.shape[1]] - logp_BN) * mask_BN
    figures = {**kl_figures(kl_BN, mask_BN), "entropy": _masked_mean(ent_BN, mask_BN),
               "logprob_gap": gap_BN.max()}
    return ({**batch, "old_logp_BN": logp_BN,
             "fresh_old_B": jnp.zeros_like(batch["fresh_old_B"])}, figures)


# The update's batch: per-row arrays, rows group-major; the loss lays them out
# (`groups.layout`), so a minibatch of whole groups can run grouped. fresh_old_B: 1 on rows
# whose old log-probs are this step's own forward (`reuses`), 0 where old_logp_BN holds them.
TRAIN_KEYS = ("prompt_BP", "prompt_mask_BP", "response_BN", "mask_BN", "old_logp_BN",
              "fresh_old_B", "ref_logp_BN", "values_BN", "advantages_BN", "returns_BN")


def make_loss_fn(models: Models, s: Settings):
    """loss_fn(trainable, frozen, batch, rng) for the shared train step. Dropout stays off:
    the ratio must be 1 before the first update (the old log-probs had none)."""
    obj = s.objective

    def loss_fn(trainable, frozen, batch, rng):
        del rng
        policy = lora.combine(trainable["policy"], frozen["policy"])
        mask_BN = batch["mask_BN"].astype(jnp.float32)
        # A 0 entropy coefficient: the entropy is a metric, kept out of the backward pass.
        logp_BN, ent_BN, hidden_BND = policy_forward(models.policy, policy, batch,
                                                     temperature=s.temperature,
                                                     chunk=s.logits_chunk, group=s.layout_group,
                                                     entropy_grad=s.ent_coef != 0)
        # The first step after a rollout that skipped its own forward (`reuses`): the params
        # are the rollout's, so this forward is the old one and the ratio is 1.
        sg = jax.lax.stop_gradient
        old_BN = jnp.where(batch["fresh_old_B"][:, None] > 0, sg(logp_BN), batch["old_logp_BN"])
        loss, metrics = obj.policy_loss_fn(logp_BN, old_BN, batch["advantages_BN"],
                                           mask_BN, clip_eps=s.clip_eps)
        entropy = _masked_mean(ent_BN, mask_BN)
        if s.ent_coef != 0:
            loss = loss - s.ent_coef * entropy
        metrics = dict(metrics, entropy=sg(entropy))
        if s.reuse_old_logp:
            metrics["rows"] = {"logp_BN": sg(logp_BN), "entropy_BN": sg(ent_BN)}
        if obj.needs_value:
            v_BN = values(models, trainable, frozen, batch, hidden_BND, s.layout_group)
            vloss, vmetrics = L.value_loss(v_BN, batch["values_BN"], batch["returns_BN"], mask_BN,
                                           clip_eps=s.value_clip_eps)
            loss = loss + s.vf_coef * vloss
            metrics.update(vmetrics)
        if not obj.kl_in_reward:
            kl = _masked_mean(L.kl_penalty(logp_BN, batch["ref_logp_BN"], s.kl_kind), mask_BN)
            loss = loss + s.kl_loss_coef * kl
            metrics["kl_loss"] = jax.lax.stop_gradient(kl)
        metrics["weight"] = mask_BN.sum()
        return loss, metrics
    return loss_fn
