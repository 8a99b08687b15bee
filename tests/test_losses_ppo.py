"""PPO / GRPO / RLOO pieces against plain-Python loop references, closed forms and TRL."""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import ppo

B, T = 4, 6
# Ragged: rows end at different lengths, one row is full, one has a single token.
LENGTHS = [6, 3, 1, 4]


def ragged_mask():
    mask = np.zeros((B, T), np.float32)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1.0
    return mask


def rand(seed, scale=1.0, shape=(B, T)):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=tol, atol=tol)


# ---- GAE -------------------------------------------------------------------------------------

def gae_reference(rewards, values, mask, gamma, lam):
    """TRL's PPO loop: values and rewards past the response are 0, walk time backwards."""
    adv = np.zeros((B, T))
    for i in range(B):
        last = 0.0
        for t in reversed(range(T)):
            if mask[i, t] == 0:
                last = 0.0
                continue
            next_value = values[i, t + 1] if t + 1 < T and mask[i, t + 1] else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop(gamma, lam):
    mask = ragged_mask()
    rewards, values = rand(1) * mask, rand(2)  # values nonzero on padding: it must be ignored
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                       gamma=gamma, lam=lam)
    want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
    close(adv, want_adv)
    close(ret, want_ret)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    mask = ragged_mask()
    rewards, values = rand(3) * mask, rand(4) * mask
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                       gamma=1.0, lam=1.0)
    to_go = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * mask
    close(ret, to_go)
    close(adv, (to_go - values) * mask)


# ---- whitening -------------------------------------------------------------------------------

@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(shift_mean):
    mask = ragged_mask()
    x = rand(5, 3.0) + 2.0
    xs = [float(x[i, t]) for i in range(B) for t in range(T) if mask[i, t]]
    n = len(xs)
    mu = sum(xs) / n
    var = sum((v - mu) ** 2 for v in xs) / (n - 1)  # unbiased, like TRL's masked_var
    want = np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            want[i, t] = (float(x[i, t]) - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)
    close(ppo.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean), want)


# ---- clipped losses --------------------------------------------------------------------------

def test_policy_loss_matches_loop():
    mask = ragged_mask()
    old = rand(6, 0.5) - 2.0
    logp = old + rand(7, 0.3)  # ratios around 0.6..1.7, so the 0.2 clip binds for many tokens
    adv = rand(8)
    eps = 0.2
    losses, clipped, kls, ratios = [], [], [], []
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            a = float(adv[i, t])
            unclipped, clip_term = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            losses.append(max(unclipped, clip_term))
            clipped.append(float(clip_term > unclipped))
            kls.append(0.5 * (float(logp[i, t]) - float(old[i, t])) ** 2)
            ratios.append(r)
    loss, m = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                              jnp.asarray(mask), clip_eps=eps)
    n = len(losses)
    assert 0 < sum(clipped) < n  # both branches are exercised
    close(loss, sum(losses) / n)
    close(m["policy_loss"], sum(losses) / n)
    close(m["clipfrac"], sum(clipped) / n)
    close(m["approx_kl"], sum(kls) / n)
    close(m["ratio"], sum(ratios) / n)
    assert float(m["weight"]) == sum(LENGTHS)


def test_policy_loss_gradient_vanishes_once_clipped():
    # A > 0 and ratio above 1 + eps: the clipped (constant) term is the max, so no gradient.
    logp = jnp.asarray([[0.5, 0.0]])
    ones = jnp.ones((1, 2))
    grad = jax.grad(lambda lp: ppo.policy_loss(lp, 0 * ones, ones, ones, clip_eps=0.2)[0])(logp)
    close(grad, [[0.0, -0.5]])  # second token: ratio 1, d(-A r)/dlogp = -r / n_tokens


def test_value_loss_matches_loop():
    mask = ragged_mask()
    old = rand(9)
    values = old + rand(10, 0.4)
    returns = rand(11)
    eps = 0.2
    losses, clipped = [], []
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            v, o, r = float(values[i, t]), float(old[i, t]), float(returns[i, t])
            vc = o + min(max(v - o, -eps), eps)
            losses.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped.append(float((vc - r) ** 2 > (v - r) ** 2))
    loss, m = ppo.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns),
                             jnp.asarray(mask), clip_eps=eps)
    n = len(losses)
    assert 0 < sum(clipped) < n
    close(loss, 0.5 * sum(losses) / n)
    close(m["value_loss"], 0.5 * sum(losses) / n)
    close(m["value_clipfrac"], sum(clipped) / n)
    assert float(m["weight"]) == sum(LENGTHS)


# ---- KL estimators ---------------------------------------------------------------------------

P = [0.5, 0.3, 0.15, 0.05]
Q = [0.25, 0.25, 0.25, 0.25]


def expectation_under_p(kind):
    """sum_x p(x) k(x): the exact mean of the estimator over samples x ~ p."""
    logp = jnp.log(jnp.asarray([P], jnp.float32))
    logq = jnp.log(jnp.asarray([Q], jnp.float32))
    return float((jnp.asarray(P) * ppo.kl_penalty(logp, logq, kind)[0]).sum())


def test_k1_and_k3_are_unbiased_for_kl():
    kl = sum(p * math.log(p / q) for p, q in zip(P, Q))
    assert expectation_under_p("k1") == pytest.approx(kl, rel=1e-5)
    assert expectation_under_p("k3") == pytest.approx(kl, rel=1e-5)


def test_k2_and_abs_expectations():
    assert expectation_under_p("k2") == pytest.approx(
        sum(p * 0.5 * math.log(p / q) ** 2 for p, q in zip(P, Q)), rel=1e-5)
    assert expectation_under_p("abs") == pytest.approx(
        sum(p * abs(math.log(p / q)) for p, q in zip(P, Q)), rel=1e-5)


def test_k3_is_nonnegative_per_sample_and_unknown_kind_is_named():
    lr = jnp.linspace(-5.0, 5.0, 41)[None, :]
    assert float(ppo.kl_penalty(lr, jnp.zeros_like(lr), "k3").min()) >= 0.0
    with pytest.raises(ValueError, match="kind='k4'"):
        ppo.kl_penalty(lr, lr, "k4")


# ---- entropy, GRPO, controller, explained variance ------------------------------------------

def test_rollout_entropy_is_the_softmax_entropy():
    """The entropy the RL metrics and the collapse monitor read (the rollout's response_stats,
    which replaced the unused entropy_from_logits) against the formula in plain Python, with an
    exp-overflowing and a nearly one-hot row; logits enter as hidden states times an identity head."""
    from jaxalign.train.rl.rollout import response_stats
    logits = rand(12, 4.0, (2, 3, 5))
    logits[0, 0] += 100.0  # exp(100) overflows fp32: only a logsumexp form survives this
    logits[1, 2] *= 200.0  # nearly one-hot
    targets = np.zeros((2, 3), np.int32)
    _, got = response_stats(jnp.asarray(logits), jnp.eye(5), jnp.asarray(targets),
                            head_is_VD=True, temperature=1.0, chunk=3)
    got = np.asarray(got)
    for i in range(2):
        for t in range(3):
            row = [float(v) for v in logits[i, t]]
            top = max(row)
            z = sum(math.exp(v - top) for v in row)
            ps = [math.exp(v - top) / z for v in row]
            assert got[i, t] == pytest.approx(-sum(p * math.log(p) for p in ps if p > 0), abs=5e-5)


@pytest.mark.parametrize("head_is_VD", [True, False])
def test_rollout_logprobs_are_the_supervised_ones(head_is_VD):
    """RL scores responses with the same head path as SFT / DPO / eval (`xent.head_logprobs`):
    equal log-probs at temperature 1, and at temperature 0.7 the log-softmax of logits / 0.7."""
    from jaxalign.losses.xent import head_logprobs, token_logprobs
    from jaxalign.train.rl.rollout import response_stats
    hidden = jnp.asarray(rand(21, 1.0, (2, 7, 16)))
    head = jnp.asarray(rand(22, 0.5, (40, 16) if head_is_VD else (16, 40)))
    targets = jnp.asarray(np.random.default_rng(23).integers(0, 40, (2, 7)), jnp.int32)
    sft, _ = head_logprobs(hidden, head, targets, head_is_VD=head_is_VD, chunk=4)
    rl, _ = response_stats(hidden, head, targets, head_is_VD=head_is_VD, temperature=1.0, chunk=3)
    np.testing.assert_allclose(np.asarray(rl), np.asarray(sft), rtol=0, atol=1e-6)
    logits = jnp.einsum("btd,vd->btv" if head_is_VD else "btd,dv->btv", hidden, head,
                        precision="highest")
    hot, _ = response_stats(hidden, head, targets, head_is_VD=head_is_VD, temperature=0.7, chunk=3)
    np.testing.assert_allclose(np.asarray(hot), np.asarray(token_logprobs(logits / 0.7, targets)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_matches_loop(scale):
    g = 4
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25]  # a zero-std group too
    want = []
    for k in range(0, len(rewards), g):
        grp = rewards[k:k + g]
        mu = statistics.mean(grp)
        sd = statistics.stdev(grp)
        want += [(r - mu) / (sd + 1e-4) if scale else r - mu for r in grp]
    close(ppo.group_advantages(jnp.asarray(rewards), g, scale=scale), want)


def test_group_advantages_bad_group_size():
    with pytest.raises(ValueError, match="group_size=5"):
        ppo.group_advantages(jnp.zeros(12), 5)
    with pytest.raises(ValueError, match="group_size=1"):
        ppo.group_advantages(jnp.zeros(12), 1)


@pytest.mark.parametrize("kl, want_err",
                         [(6.0, 0.0), (9.0, 0.2), (6.3, 0.05), (1.0, -0.2), (5.7, -0.05)])
def test_adaptive_kl_formula(kl, want_err):
    target, horizon, n_steps, coef = 6.0, 10000.0, 256, 0.2
    want = coef * (1 + want_err * n_steps / horizon)
    kw = dict(target=target, horizon=horizon)
    assert ppo.adaptive_kl_update(coef, kl, n_steps, **kw) == pytest.approx(want, rel=1e-12)


def test_explained_variance():
    mask = ragged_mask()
    returns = rand(13)
    values = returns + rand(14, 0.5)
    rs = [float(returns[i, t]) for i in range(B) for t in range(T) if mask[i, t]]
    ds = [float(returns[i, t] - values[i, t]) for i in range(B) for t in range(T) if mask[i, t]]
    want = 1 - statistics.pvariance(ds) / statistics.pvariance(rs)
    v, r, m = jnp.asarray(values), jnp.asarray(returns), jnp.asarray(mask)
    close(ppo.explained_variance(v, r, m), want)
    close(ppo.explained_variance(r, r, m), 1.0)


def test_leave_one_out_advantages_match_formula_by_hand():
    """RLOO (Ahmadian et al. 2024): A_i = r_i - (sum_{j != i} r_j) / (k - 1), per group of k
    consecutive rows; equivalently k / (k - 1) times r_i minus the group mean."""
    k, groups = 4, 3
    r = np.random.default_rng(7).normal(size=k * groups).astype(np.float32)
    want = []
    for g in range(groups):
        rows = r[g * k:(g + 1) * k]
        for i in range(k):
            others = [rows[j] for j in range(k) if j != i]
            want.append(rows[i] - sum(others) / (k - 1))
    got = ppo.leave_one_out_advantages(jnp.asarray(r), k)
    close(got, want)
    close(got, (r.reshape(groups, k) - r.reshape(groups, k).mean(1, keepdims=True)).reshape(-1)
          * k / (k - 1))
    with pytest.raises(ValueError, match="group_size=1 >= 2"):
        ppo.leave_one_out_advantages(jnp.asarray(r), 1)
    with pytest.raises(ValueError, match="do not split"):
        ppo.leave_one_out_advantages(jnp.asarray(r), 5)


def test_rloo_advantages_match_trl():
    """The sequence KL penalty and the leave-one-out baseline, against TRL 1.16's
    RLOOTrainer._generate_and_score_completions (trl/trainer/rloo_trainer.py, lines
    1664-1690: `per_token_kl = old - ref`, `kl = (per_token_kl * completion_mask).sum(-1)`,
    `rewards = rewards - self.beta * kl`, then `grouped_sum - grouped_rewards) /
    (scorable_counts - 1)`), reproduced line by line on the same numbers."""
    torch = pytest.importorskip("torch")
    k, groups, N, beta = 4, 2, 5, 0.05
    rng = np.random.default_rng(3)
    scores = rng.normal(size=k * groups).astype(np.float32)
    old = rng.normal(size=(k * groups, N)).astype(np.float32)
    ref = rng.normal(size=(k * groups, N)).astype(np.float32)
    mask = (np.arange(N)[None] < rng.integers(1, N + 1, size=(k * groups, 1))).astype(np.float32)

    # --- TRL 1.16, rloo_trainer.py (the inlined lines, unscorable rows aside) ---
    rewards = torch.tensor(scores)
    old_per_token_logps, ref_per_token_logps = torch.tensor(old), torch.tensor(ref)
    completion_mask = torch.tensor(mask)
    per_token_kl = old_per_token_logps - ref_per_token_logps
    kl = (per_token_kl * completion_mask).sum(-1)
    rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    # ---

    kl_BN = ppo.kl_penalty(jnp.asarray(old), jnp.asarray(ref), "k1") * mask
    adv_BN, ret_BN = ppo.rloo_sequence_advantages(jnp.asarray(scores), mask_BN=jnp.asarray(mask),
                                                  kl_BN=kl_BN, kl_coef=beta, group_size=k)
    close(adv_BN, advantages.numpy()[:, None] * mask)
    assert not np.asarray(ret_BN).any()
