"""Policy-gradient pieces (PPO, GRPO, RLOO): advantages, clipped losses, KL estimates. Pure
functions of arrays.

Token arrays are (B, T) over response tokens; mask_BT is 1 on real tokens and 0 on padding
(trailing 0s after EOS). Every loss returns (loss, metrics) with metrics['weight'] the
number of masked tokens, which the train step uses to weight micro-batches and metrics.
Math is fp32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KL_KINDS = ("k1", "k2", "k3", "abs")


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def _masked_mean(x_BT, mask_BT):
    return (x_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, *, gamma: float,
        lam: float):
    """Generalized advantage estimation, scanned backwards over time.

    delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t and A_t = delta_t + gamma lam m_{t+1} A_{t+1}:
    the next-step mask makes the value after the last real token 0 (the episode ends at EOS),
    as TRL's PPOTrainer did by zeroing values past the response. Returns (advantages, returns)
    with returns = A + V, both 0 where mask is 0.
    """
    rewards_BT, values_BT, mask_BT = _f32(rewards_BT, values_BT, mask_BT)
    # Shift left by one with a 0 past the end: the bootstrap after the final position is 0.
    next_values_BT = jnp.pad(values_BT[:, 1:], ((0, 0), (0, 1)))
    next_mask_BT = jnp.pad(mask_BT[:, 1:], ((0, 0), (0, 1)))
    deltas_BT = rewards_BT + gamma * next_values_BT * next_mask_BT - values_BT

    def step(next_adv_B, xs):
        delta_B, nmask_B = xs
        adv_B = delta_B + gamma * lam * nmask_B * next_adv_B
        return adv_B, adv_B

    # scan runs over the leading axis, so time goes first.
    _, adv_TB = jax.lax.scan(step, jnp.zeros_like(deltas_BT[:, 0]), (deltas_BT.T, next_mask_BT.T),
                             reverse=True)
    advantages_BT = adv_TB.T * mask_BT
    returns_BT = (advantages_BT + values_BT) * mask_BT
    return advantages_BT, returns_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over all masked tokens of the batch, as TRL's old masked_whiten.

    The variance is unbiased (times n/(n-1)); with a single token n-1 is taken as 1 rather
    than dividing by zero. shift_mean=False adds the mean back (used for rewards, whose
    sign carries meaning). Positions outside the mask are transformed too, not zeroed:
    callers mask them, as every loss here does.
    """
    x_BT, mask_BT = _f32(x_BT, mask_BT)
    n = mask_BT.sum()
    mean = _masked_mean(x_BT, mask_BT)
    var = _masked_mean((x_BT - mean) ** 2, mask_BT) * n / jnp.maximum(n - 1.0, 1.0)
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + eps)
    return out_BT if shift_mean else out_BT + mean


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_BT: jax.Array,
                mask_BT: jax.Array, *, clip_eps: float):
    """PPO clipped surrogate, a masked mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    The max (of losses) is the pessimistic bound: once the ratio has moved past the clip in
    the direction the advantage favours, the gradient stops. clipfrac counts tokens where
    the clipped term won; approx_kl is TRL's 0.5 (log r)^2.
    """
    logp_BT, old_logp_BT, advantages_BT, mask_BT = _f32(
        logp_BT, old_logp_BT, advantages_BT, mask_BT)
    log_ratio_BT = logp_BT - old_logp_BT
    ratio_BT = jnp.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = _masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
    sg = jax.lax.stop_gradient
    metrics = {
        "policy_loss": loss,
        "clipfrac": _masked_mean(sg(clipped_BT > unclipped_BT).astype(jnp.float32), mask_BT),
        "approx_kl": _masked_mean(sg(0.5 * log_ratio_BT ** 2), mask_BT),
        "ratio": _masked_mean(sg(ratio_BT), mask_BT),
        "weight": mask_BT.sum(),
    }
    return loss, metrics


def value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array,
               mask_BT: jax.Array, *, clip_eps: float):
    """Clipped value loss: 0.5 masked mean of max((v - R)^2, (v_clip - R)^2).

    v_clip = old + clip(v - old, -eps, eps) keeps the value head from jumping far from the
    values the advantages were computed with, mirroring the policy clip.
    """
    values_BT, old_values_BT, returns_BT, mask_BT = _f32(
        values_BT, old_values_BT, returns_BT, mask_BT)
    v_clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
    err_BT = (values_BT - returns_BT) ** 2
    err_clipped_BT = (v_clipped_BT - returns_BT) ** 2
    loss = 0.5 * _masked_mean(jnp.maximum(err_BT, err_clipped_BT), mask_BT)
    clipped = jax.lax.stop_gradient(err_clipped_BT > err_BT).astype(jnp.float32)
    metrics = {
        "value_loss": loss,
        "value_clipfrac": _masked_mean(clipped, mask_BT),
        "weight": mask_BT.sum(),
    }
    return loss, metrics


def kl_penalty(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, 2020).

    k1 = log pi/pi_ref is unbiased but high-variance and can be negative; k2 = 0.5 (k1)^2 is
    low-variance but biased; k3 = exp(-k1) - 1 + k1 is unbiased and never negative;
    abs = |k1|. kind is static.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: unknown kind={kind!r}; expected one of {KL_KINDS}")
    logp_BT, ref_logp_BT = _f32(logp_BT, ref_logp_BT)
    log_ratio_BT = logp_BT - ref_logp_BT
    if kind == "k1":
        return log_ratio_BT
    if kind == "k2":
        return 0.5 * log_ratio_BT ** 2
    if kind == "k3":
        return jnp.expm1(-log_ratio_BT) + log_ratio_BT  # expm1 stays exact near pi = pi_ref
    return jnp.abs(log_ratio_BT)


def group_advantages(rewards_N: jax.Array, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> jax.Array:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std + eps.

    Rows are grouped consecutively (prompt i owns rows i*G .. i*G+G-1). The std is unbiased,
    like torch's .std() that TRL's GRPOTrainer uses; scale=False (Dr. GRPO) only centres.
    """
    n = rewards_N.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_advantages: {n} rewards do not split into groups of "
                         f"group_size={group_size}")
    if scale and group_size < 2:
        raise ValueError(f"group_advantages: group_size={group_size} has no unbiased std; "
                         "use scale=False")
    r_GK = rewards_N.astype(jnp.float32).reshape(n // group_size, group_size)
    centred_GK = r_GK - r_GK.mean(axis=1, keepdims=True)
    if scale:
        centred_GK = centred_GK / (r_GK.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred_GK.reshape(n)


def leave_one_out_advantages(rewards_N: jax.Array, group_size: int) -> jax.Array:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics"): with k = group_size
    completions per prompt, each reward minus the mean of the other k - 1 rewards of its
    group, r_i - (sum_j r_j - r_i) / (k - 1). Rows are grouped consecutively, as in
    `group_advantages`. Equals k / (k - 1) times the reward minus the group mean."""
    n = rewards_N.shape[0]
    if group_size < 2 or n % group_size:
        raise ValueError(f"leave_one_out_advantages: {n} rewards do not split into groups of "
                         f"group_size={group_size} >= 2")
    r_GK = rewards_N.astype(jnp.float32).reshape(n // group_size, group_size)
    baseline_GK = (r_GK.sum(axis=1, keepdims=True) - r_GK) / (group_size - 1)
    return (r_GK - baseline_GK).reshape(n)


# Advantage functions of the RL objectives table (`jaxalign.train.rl.objectives`): one
# signature, scores_B plus keyword arrays and static settings; each reads what it needs.
# -> (advantages_BN, returns_BN), both 0 outside mask_BN.

def gae_token_advantages(scores_B, *, mask_BN, values_BN, kl_BN, kl_coef, lengths_B, gamma,
                         lam, whiten_advantages, **_):
    """PPO: per-token reward -kl_coef * KL with the score added on the last generated token,
    GAE over the critic's values, optionally whitened over the rollout's tokens."""
    B = mask_BN.shape[0]
    last_B = jnp.maximum(lengths_B - 1, 0)
    rewards_BN = (-kl_coef * kl_BN).at[jnp.arange(B), last_B].add(scores_B.astype(jnp.float32))
    adv_BN, ret_BN = gae(rewards_BN, values_BN, mask_BN, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv_BN = whiten(adv_BN, mask_BN) * mask_BN
    return adv_BN, ret_BN


def group_sequence_advantages(scores_B, *, mask_BN, group_size, scale_rewards, **_):
    """GRPO: each score normalised within its prompt's group, on every token; no returns."""
    adv_B = group_advantages(scores_B, group_size, scale=scale_rewards)
    return adv_B[:, None] * mask_BN, jnp.zeros_like(mask_BN)


def rloo_sequence_advantages(scores_B, *, mask_BN, kl_BN, kl_coef, group_size, **_):
    """RLOO as TRL 1.16's RLOOTrainer: the sequence KL (sum over its tokens) times kl_coef
    is taken off the score, then the leave-one-out baseline; every token gets the result."""
    rewards_B = scores_B.astype(jnp.float32) - kl_coef * (kl_BN * mask_BN).sum(axis=1)
    adv_B = leave_one_out_advantages(rewards_B, group_size)
    return adv_B[:, None] * mask_BN, jnp.zeros_like(mask_BN)


def adaptive_kl_update(coef: float, current_kl: float, n_steps: int, *, target: float,
                       horizon: float) -> float:
    """Next KL coefficient of the adaptive controller (Ziegler et al. 2019; TRL's old
    AdaptiveKLController).

    Proportional control: the coefficient grows when the measured KL is above target and
    shrinks below it, by at most 20% of n_steps/horizon per call. Host-side floats: the whole
    controller state is this one float, which the checkpoint stores.
    """
    error = float(np.clip(current_kl / target - 1.0, -0.2, 0.2))
    return float(coef) * (1.0 + error * n_steps / horizon)


def explained_variance(values_BT: jax.Array, returns_BT: jax.Array,
                       mask_BT: jax.Array) -> jax.Array:
    """1 - Var(R - V) / Var(R) over masked tokens: 1 is a perfect critic, <= 0 a useless one.

    NaN when the returns have zero variance (nothing to explain).
    """
    values_BT, returns_BT, mask_BT = _f32(values_BT, returns_BT, mask_BT)

    def var(x_BT):
        return _masked_mean((x_BT - _masked_mean(x_BT, mask_BT)) ** 2, mask_BT)

    var_R = var(returns_BT)
    safe_var_R = jnp.where(var_R > 0, var_R, 1.0)
    return jnp.where(var_R > 0, 1.0 - var(returns_BT - values_BT) / safe_var_R, jnp.nan)
