"""KTO (Ethayarajh et al. 2024): a prospect-theoretic loss on unpaired, labelled responses.

A pure function of per-row sequence log-prob sums, as TRL 1.16's KTOTrainer computes it
(`_compute_loss`, loss_type="kto"):

  r_i   = log pi(y_i|x_i) - log pi_ref(y_i|x_i)                   the implied reward / beta
  z_ref = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])  no gradient (detached)
  L_i   = w_D (1 - sigmoid(beta (r_i - z_ref)))   for a desirable y_i   (paper eq. 7)
          w_U (1 - sigmoid(beta (z_ref - r_i)))   for an undesirable y_i
  loss  = mean_i L_i

y'_j is a MISMATCHED completion (another row's, see `jaxalign.data.unpaired`), so z_ref
estimates the batch's KL(pi || pi_ref) without favouring any label. w_D / w_U are TRL's
desirable_weight / undesirable_weight (the paper's lambda_D / lambda_U), for imbalanced data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kto_loss(policy_B: jax.Array, ref_B: jax.Array, policy_kl_B: jax.Array, ref_kl_B: jax.Array,
             label_B: jax.Array, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, row_mask_B: jax.Array | None = None):
    """(loss, metrics). label_B: 1 desirable, 0 undesirable. row_mask_B (optional) marks real
    rows (1) and eval fillers (0): fillers enter no mean, no KL and not metrics['weight'].

    Metrics follow TRL's names: kl (the reference point z_ref), rewards/chosen and
    rewards/rejected (mean beta * r over desirable / undesirable rows), rewards/margins
    (their difference), logps/chosen, logps/rejected; and rewards/accuracies (the rows on
    their label's side of z_ref); each a mean within the batch, which the
    loop then averages over batches by metrics['weight'] (the rows), as for every loss.
    """
    if not beta > 0:
        raise ValueError(f"kto_loss: beta={beta!r} must be > 0")
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError(f"kto_loss: desirable_weight={desirable_weight!r} and "
                         f"undesirable_weight={undesirable_weight!r} must be >= 0")
    pol, ref = policy_B.astype(jnp.float32), ref_B.astype(jnp.float32)
    w_B = jnp.ones_like(pol) if row_mask_B is None else row_mask_B.astype(jnp.float32)
    n = w_B.sum()
    good_B = label_B.astype(jnp.float32) * w_B
    bad_B = (1.0 - label_B.astype(jnp.float32)) * w_B

    kl_B = policy_kl_B.astype(jnp.float32) - ref_kl_B.astype(jnp.float32)
    kl = jax.lax.stop_gradient(jnp.maximum((kl_B * w_B).sum() / jnp.maximum(n, 1.0), 0.0))
    logratio_B = pol - ref
    good_loss_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio_B - kl)))
    bad_loss_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratio_B)))
    loss = (good_B * good_loss_B + bad_B * bad_loss_B).sum() / jnp.maximum(n, 1.0)

    reward_B = jax.lax.stop_gradient(beta * logratio_B)
    n_good, n_bad = good_B.sum(), bad_B.sum()
    per_good = lambda x_B: (x_B * good_B).sum() / jnp.maximum(n_good, 1.0)
    per_bad = lambda x_B: (x_B * bad_B).sum() / jnp.maximum(n_bad, 1.0)
    metrics = {
        "loss": loss,
        "kl": kl,
        "rewards/chosen": per_good(reward_B),
        "rewards/rejected": per_bad(reward_B),
        "rewards/margins": per_good(reward_B) - per_bad(reward_B),
        # A row on its label's side of the reference point: the value sigmoid(beta (r - z))
        # above one half for a desirable row, below for an undesirable one.
        "rewards/accuracies": (good_B * (logratio_B > kl) + bad_B * (logratio_B < kl)).sum()
        / jnp.maximum(n, 1.0),
        "logps/chosen": per_good(jax.lax.stop_gradient(pol)),
        "logps/rejected": per_bad(jax.lax.stop_gradient(pol)),
        "weight": n,
    }
    return loss, metrics
