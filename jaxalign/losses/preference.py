"""Pairwise preference losses (reward model, DPO family): pure functions of arrays.

Inputs are per-pair scalars (B,): reward-model scores, or sequence log-probabilities of the
chosen and rejected responses. Every loss returns (loss, metrics) with metrics['weight'] the
number of pairs, which the train step uses to weight micro-batches and average metrics.
Metric names follow TRL's so that logs can be compared side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """One DPO variant: its per-pair loss of the log-ratio margin h, and what it accepts."""
    per_pair: Callable[[jax.Array, float, float], jax.Array]   # (h_B, beta, ls) -> (B,)
    label_smoothing: bool        # takes a label-noise rate ls in [0, 0.5); else ls must be 0
    average: bool = False        # its default sequence log-prob is the per-token mean


# A table, so that a loss type without a row is refused instead of falling into another's branch.
DPO_LOSSES: dict[str, PairLoss] = {
    # DPO eq. 7; ls > 0 is conservative DPO
    "sigmoid": PairLoss(lambda h_B, beta, ls: (-(1 - ls) * jax.nn.log_sigmoid(beta * h_B)
                                               - ls * jax.nn.log_sigmoid(-beta * h_B)), True),
    # IPO eq. 17 (beta is the paper's tau), on per-token means as TRL runs it
    "ipo": PairLoss(lambda h_B, beta, ls: (h_B - 1.0 / (2.0 * beta)) ** 2, False, average=True),
    # SLiC
    "hinge": PairLoss(lambda h_B, beta, ls: jax.nn.relu(1.0 - beta * h_B), False),
    # unbiased under label noise of rate ls, hence the (1 - 2 ls) division
    "robust": PairLoss(lambda h_B, beta, ls: (-(1 - ls) * jax.nn.log_sigmoid(beta * h_B)
                                              + ls * jax.nn.log_sigmoid(-beta * h_B))
                       / (1 - 2 * ls), True),
}
DPO_LOSS_TYPES = tuple(DPO_LOSSES)
# Objectives on the policy alone (no reference model), on length-normalised log-probs.
POLICY_ONLY_LOSS_TYPES = ("orpo", "simpo")


def _mean_fn(like_B: jax.Array, pair_mask_B: jax.Array | None):
    """(mean over real pairs, number of real pairs). pair_mask_B marks real pairs (1) and
    the fillers that pad a last eval batch (0); None: every pair is real."""
    if pair_mask_B is None:
        return (lambda x_B: x_B.mean()), jnp.asarray(like_B.shape[0], jnp.float32)
    w_B = pair_mask_B.astype(jnp.float32)
    n = w_B.sum()
    return (lambda x_B: (x_B * w_B).sum() / jnp.maximum(n, 1.0)), n


def sequence_logps(token_logps_BT: jax.Array, mask_BT: jax.Array,
                   average: bool = False) -> jax.Array:
    """Per-sequence log-probability: the sum (or mean) of token log-probs over masked tokens.

    DPO's theory uses sums (log pi(y|x) of the whole response). IPO as TRL runs it uses the
    per-token mean, which keeps beta comparable across response lengths; pass average=True
    for all four inputs of `dpo_loss` to get that. A row with no masked token gives 0.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    total_B = (token_logps_BT.astype(jnp.float32) * mask_BT).sum(axis=-1)
    if not average:
        return total_B
    return total_B / jnp.maximum(mask_BT.sum(axis=-1), 1.0)


def bradley_terry(chosen_B: jax.Array, rejected_B: jax.Array, *, margin_B: jax.Array | None = None,
                  center_coef: float = 0.0, pair_mask_B: jax.Array | None = None):
    """Reward-model loss: -log sigmoid(r_c - r_r - margin), plus optional reward centering.

    The centering term coef * mean((r_c + r_r)^2) (Eisenstein et al. 2023, TRL's
    `center_rewards_coefficient`) pins the otherwise free offset of the rewards near zero.
    log_sigmoid keeps large negative differences finite. pair_mask_B (optional) excludes
    filler pairs from every mean and from metrics['weight'].
    """
    r_c = chosen_B.astype(jnp.float32)
    r_r = rejected_B.astype(jnp.float32)
    mean, n = _mean_fn(r_c, pair_mask_B)
    diff_B = r_c - r_r
    shifted_B = diff_B if margin_B is None else diff_B - margin_B.astype(jnp.float32)
    loss = mean(-jax.nn.log_sigmoid(shifted_B))
    if center_coef:
        loss = loss + center_coef * mean((r_c + r_r) ** 2)
    metrics = {
        "loss": loss,
        "accuracy": mean((diff_B > 0).astype(jnp.float32)),  # ties count as wrong
        "reward_chosen": mean(r_c),
        "reward_rejected": mean(r_r),
        "margin": mean(diff_B),
        "weight": n,
    }
    return loss, metrics


def _check_dpo_args(beta, loss_type, label_smoothing) -> None:
    # Plain Python checks: these are static arguments, so a bad value fails at trace time
    # with a message, rather than training on a silently different objective.
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type={loss_type!r}; "
                         f"expected one of {DPO_LOSS_TYPES}")
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"dpo_loss: beta={beta!r} must be > 0")
    if DPO_LOSSES[loss_type].label_smoothing:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} must be in [0, 0.5) "
                             f"for loss_type={loss_type!r}")
    elif label_smoothing != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} has no effect with "
                         f"loss_type={loss_type!r}; set it to 0")


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
             ref_rejected_B: jax.Array, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reference_free: bool = False,
             pair_mask_B: jax.Array | None = None):
    """DPO and its pairwise variants on sequence log-probs (see `sequence_logps`).

    With h = (pc - pr) - (rc - rr), the log-ratio margin of chosen over rejected:
      sigmoid: -(1-ls) log s(b h) - ls log s(-b h)    DPO eq. 7; ls > 0 is conservative DPO
      ipo:     (h - 1/(2b))^2                         IPO eq. 17 (b is the paper's tau)
      hinge:   relu(1 - b h)                          SLiC
      robust:  (-(1-ls) log s(b h) + ls log s(-b h)) / (1 - 2 ls)   Chowdhury et al. 2024
    IPO is defined on whatever the caller passes: TRL feeds it per-token means, not sums
    (`sequence_logps(..., average=True)`); the rewards/* metrics then are means too.
    reference_free drops the reference terms (the reference is a uniform policy).
    pair_mask_B (optional) excludes filler pairs from every mean and from metrics['weight'].
    beta, loss_type and label_smoothing are static Python values, checked here.
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    pc = policy_chosen_B.astype(jnp.float32)
    pr = policy_rejected_B.astype(jnp.float32)
    mean, n = _mean_fn(pc, pair_mask_B)
    if reference_free:
        rc = jnp.zeros_like(pc)
        rr = jnp.zeros_like(pr)
    else:
        rc = ref_chosen_B.astype(jnp.float32)
        rr = ref_rejected_B.astype(jnp.float32)
    chosen_logratio_B = pc - rc
    rejected_logratio_B = pr - rr
    h_B = chosen_logratio_B - rejected_logratio_B
    loss = mean(DPO_LOSSES[loss_type].per_pair(h_B, beta, label_smoothing))

    return loss, _reward_metrics(mean, n, loss, beta * chosen_logratio_B,
                                 beta * rejected_logratio_B, pc, pr)


def _reward_metrics(mean, n, loss, reward_chosen_B, reward_rejected_B, logp_chosen_B,
                    logp_rejected_B) -> dict:
    """TRL's rewards/* and logps/* metrics. Implicit rewards are diagnostics only: no
    gradient flows through the metrics."""
    rc, rr = jax.lax.stop_gradient(reward_chosen_B), jax.lax.stop_gradient(reward_rejected_B)
    return {
        "loss": loss,
        "rewards/chosen": mean(rc),
        "rewards/rejected": mean(rr),
        "rewards/accuracies": mean((rc > rr).astype(jnp.float32)),  # ties count as wrong
        "rewards/margins": mean(rc - rr),
        "logps/chosen": mean(jax.lax.stop_gradient(logp_chosen_B)),
        "logps/rejected": mean(jax.lax.stop_gradient(logp_rejected_B)),
        "weight": n,
    }


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, without cancellation: log1p(-exp(x)) far from 0,
    log(-expm1(x)) near it (the branch at -log 2 of Maechler 2012, as TRL's ORPO)."""
    far_B = jnp.minimum(x, -0.6931471805599453)   # keeps the unused branch finite for grads
    near_B = jnp.minimum(x, -1e-30)
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(far_B)),
                     jnp.log(-jnp.expm1(near_B)))


def _mean_logps(sum_B: jax.Array, len_B: jax.Array) -> jax.Array:
    """Per-token mean log-prob from a sum and a token count. An empty row (an eval filler)
    gets -1, not 0/0, so that no NaN reaches a masked mean or its gradient."""
    len_B = len_B.astype(jnp.float32)
    return jnp.where(len_B > 0, sum_B.astype(jnp.float32) / jnp.maximum(len_B, 1.0), -1.0)


def orpo_loss(chosen_sum_B: jax.Array, rejected_sum_B: jax.Array, chosen_len_B: jax.Array,
              rejected_len_B: jax.Array, *, lam: float, pair_mask_B: jax.Array | None = None):
    """ORPO (Hong et al. 2024, eq. 6): NLL of the chosen response + lam * odds-ratio term.

    Inputs are per-sequence SUMS of response-token log-probs and response token counts.
    With log p = sum / count (the length-normalised log-prob, eq. 4),
      log odds(y) = log p - log(1 - p)                     (log1mexp, stable near p = 1)
      L_OR        = -log sigmoid(log odds(y_w) - log odds(y_l))
      L_SFT       = -sum(chosen sums) / sum(chosen counts)  (token mean over the batch)
      loss        = L_SFT + lam * mean(L_OR)
    TRL's ORPOTrainer names lam `beta` (`odds_ratio_loss` returns lam * log sigmoid); its
    NLL also covers the prompt tokens, ours the response only, as the paper's L_SFT.
    No reference model. metrics: TRL's rewards/* (lam * mean log-probs), nll_loss,
    log_odds_ratio (mean log sigmoid), log_odds_chosen (mean log-odds difference).
    """
    if not lam > 0:
        raise ValueError(f"orpo_loss: lam={lam!r} must be > 0")
    pc, pr = _mean_logps(chosen_sum_B, chosen_len_B), _mean_logps(rejected_sum_B, rejected_len_B)
    mean, n = _mean_fn(pc, pair_mask_B)
    w_B = jnp.ones_like(pc) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
    nll = -(chosen_sum_B.astype(jnp.float32) * w_B).sum() / jnp.maximum(
        (chosen_len_B.astype(jnp.float32) * w_B).sum(), 1.0)
    log_odds_B = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)
    loss = nll - lam * mean(ratio_B)
    metrics = _reward_metrics(mean, n, loss, lam * pc, lam * pr, pc, pr)
    metrics.update({"nll_loss": jax.lax.stop_gradient(nll),
                    "log_odds_ratio": mean(jax.lax.stop_gradient(ratio_B)),
                    "log_odds_chosen": mean(jax.lax.stop_gradient(log_odds_B))})
    return loss, metrics


def simpo_loss(chosen_sum_B: jax.Array, rejected_sum_B: jax.Array, chosen_len_B: jax.Array,
               rejected_len_B: jax.Array, *, beta: float, gamma: float,
               pair_mask_B: jax.Array | None = None):
    """SimPO (Meng et al. 2024, eq. 6), no reference model:
      loss = -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)
    from per-sequence log-prob SUMS and response token counts |y|. TRL runs it as
    CPOTrainer(loss_type="simpo", cpo_alpha=0) with simpo_gamma = gamma.
    metrics: rewards/* are the length-normalised rewards beta * log pi(y) / |y|.
    """
    if not beta > 0:
        raise ValueError(f"simpo_loss: beta={beta!r} must be > 0")
    pc, pr = _mean_logps(chosen_sum_B, chosen_len_B), _mean_logps(rejected_sum_B, rejected_len_B)
    mean, n = _mean_fn(pc, pair_mask_B)
    loss = mean(-jax.nn.log_sigmoid(beta * pc - beta * pr - gamma))
    return loss, _reward_metrics(mean, n, loss, beta * pc, beta * pr, pc, pr)
