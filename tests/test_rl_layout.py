"""RL rows laid out and trimmed for less work, exactly: the grouped layout [prompt | r1 | ... |
rG] against one row per response (per-sequence log-probs, losses and gradients of GRPO, RLOO
and PPO, shared value head and separate critic), rows trimmed to the batch's buckets against
the padded rows, the sampler's prefill once per group against once per row (same tokens for
the same key, greedy and sampled), the old log-probs taken from the first update step against
the rollout's own forward, and the RSS timeline of a run's perf.jsonl."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_hf, ppo_config, run_rl_one_device
from jaxalign.convert import hf
from jaxalign.generate import generate
from jaxalign.models import heads
from jaxalign.train.rl import groups, objectives, rollout as R
from jaxalign.train.rl.objectives import OBJECTIVES, Settings

G, N = 3, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout")
    make_tiny_hf(path)
    cfg, params, _ = hf.load(path, scan_layers=False)
    return cfg, params


def _settings(name, layout_group, ent_coef=0.0):
    return Settings(objective=OBJECTIVES[name], temperature=0.8, logits_chunk=4, clip_eps=0.2,
                    value_clip_eps=0.2, vf_coef=0.1, ent_coef=ent_coef, gamma=1.0, lam=0.95,
                    whiten_advantages=False, kl_kind="k3", kl_loss_coef=0.04, group_size=G,
                    scale_rewards=True, layout_group=layout_group)


def _batch(P=7, n=N, pad_p=0, pad_n=0, seed=0):
    """Two prompt groups of G rows (prompt lengths 5 and 7, left-padded to P + pad_p),
    responses of varied lengths right-padded to n + pad_n; random old / ref log-probs,
    values, advantages, returns."""
    rng = np.random.default_rng(seed)
    rows = 2 * G
    P2, N2 = P + pad_p, n + pad_n
    prompt = np.zeros((rows, P2), np.int32)
    pmask = np.zeros((rows, P2), np.int32)
    for r in range(rows):
        length = (5, 7)[r // G]
        prompt[r, P2 - length:] = rng.integers(3, 90, length) if r % G == 0 else prompt[r - 1, P2 - length:]
        pmask[r, P2 - length:] = 1
    lengths = np.array([n, 2, 4, 1, n, 3])
    response = np.zeros((rows, N2), np.int32)
    rmask = np.zeros((rows, N2), np.int32)
    for r, length in enumerate(lengths):
        response[r, :length] = rng.integers(3, 90, length)
        rmask[r, :length] = 1
    f = lambda: (rng.normal(size=(rows, N2)) * rmask).astype(np.float32)
    return {"prompt_BP": prompt, "prompt_mask_BP": pmask, "response_BN": response,
            "mask_BN": rmask, "old_logp_BN": f() - 3.0 * rmask, "ref_logp_BN": f() - 3.0 * rmask,
            "values_BN": f(), "advantages_BN": f(), "returns_BN": f(),
            "fresh_old_B": np.zeros(rows, np.float32)}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _loss_and_grads(models, settings, trainable, frozen, batch):
    fn = objectives.make_loss_fn(models, settings)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(
        trainable, frozen, batch, None)
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


def _assert_trees_close(a, b, tol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert _rel(x, y) <= tol, (jax.tree_util.keystr(path), _rel(x, y))


def test_grouped_rows_are_per_row_rows(tiny):
    """The grouped layout's tokens, positions and branches put each response after its
    prompt; its per-sequence log-probs equal one row per response within 1e-5 relative."""
    cfg, params = tiny
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    out = jax.device_get(groups.grouped(batch["prompt_BP"], batch["prompt_mask_BP"],
                                        batch["response_BN"], batch["mask_BN"], G))
    assert out["tokens_BT"].shape == (2, 7 + G * N)
    assert out["positions_BT"][0, 7:7 + N].tolist() == list(range(5, 5 + N))   # after 5 tokens
    assert out["positions_BT"][0, 7 + N:7 + 2 * N].tolist() == list(range(5, 5 + N))
    assert out["branch_ids_BT"][1].tolist() == [0] * 7 + sum(([g] * N for g in range(1, G + 1)), [])
    kw = dict(temperature=0.8, chunk=4)
    per_row = jax.jit(lambda p, b: R.policy_forward(cfg, p, b, group=1, **kw))(params, batch)
    shared = jax.jit(lambda p, b: R.policy_forward(cfg, p, b, group=G, **kw))(params, batch)
    mask = np.asarray(batch["mask_BN"])
    seq_per_row = (np.asarray(per_row[0]) * mask).sum(1)
    seq_shared = (np.asarray(shared[0]) * mask).sum(1)
    assert _rel(seq_shared, seq_per_row) <= 1e-5
    assert _rel(np.asarray(shared[1]) * mask, np.asarray(per_row[1]) * mask) <= 1e-5


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("name,value", [("grpo", "none"), ("rloo", "none"), ("ppo", "shared"),
                                        ("ppo", "separate")])
def test_grouped_loss_and_grads_equal_per_row(tiny, name, value):
    cfg, params = tiny
    trainable, frozen = {"policy": params}, {"policy": {}}
    critic_cfg = None
    if value == "shared":
        trainable["value_head"] = {"score": 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                                    (cfg.hidden_size, 1))}
    elif value == "separate":
        critic_cfg = cfg.replace(num_labels=1)
        critic = dict(params)
        critic.pop("lm_head", None)
        critic["score"] = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (cfg.hidden_size, 1))
        trainable["critic"] = critic
    models = R.Models(policy=cfg, ref="copy", value=value, critic=critic_cfg)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    l1, m1, g1 = _loss_and_grads(models, _settings(name, 1, ent_coef=0.01), trainable, frozen, batch)
    lg, mg, gg = _loss_and_grads(models, _settings(name, G, ent_coef=0.01), trainable, frozen, batch)
    assert abs(lg - l1) <= 1e-5 * abs(l1)
    for k in m1:
        assert _rel(mg[k], m1[k]) <= 1e-5, k
    _assert_trees_close(gg, g1)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_trimmed_rows_equal_padded_rows(tiny):
    """Extra left padding of the prompts and right padding of the responses change neither
    the loss nor its gradients: `groups.trim` cuts them exactly."""
    cfg, params = tiny
    models = R.Models(policy=cfg, ref="copy", value="shared")
    trainable = {"policy": params, "value_head": {"score": jnp.full((cfg.hidden_size, 1), 0.05)}}
    padded = {k: jnp.asarray(v) for k, v in _batch(pad_p=9, pad_n=10).items()}
    P2, N2 = groups.buckets([5, 7], np.asarray(padded["mask_BN"]).sum(1), 16, 16)
    assert (P2, N2) == (16, 8)        # bucketed: powers of two, at least 16 / 8
    trimmed = jax.device_get(groups.trim(padded, 8, N))
    assert trimmed["prompt_BP"].shape == (2 * G, 8) and trimmed["response_BN"].shape == (2 * G, N)
    for layout in (1, G):
        s = _settings("ppo", layout)
        lp, mp, gp = _loss_and_grads(models, s, trainable, {"policy": {}}, padded)
        lt, mt, gt = _loss_and_grads(models, s, trainable, {"policy": {}}, trimmed)
        assert abs(lt - lp) <= 1e-5 * abs(lp) and mt["weight"] == mp["weight"]
        _assert_trees_close(gt, gp)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_zero_entropy_coefficient_keeps_the_gradient(tiny):
    """ent_coef 0: the entropy is a metric under stop_gradient; the gradient is the loss
    without it (as before), and a nonzero coefficient still moves it."""
    cfg, params = tiny
    models = R.Models(policy=cfg, ref="copy", value="none")
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    l0, m0, g0 = _loss_and_grads(models, _settings("grpo", G), {"policy": params}, {"policy": {}}, batch)
    l1, m1, g1 = _loss_and_grads(models, _settings("grpo", G, 1.0), {"policy": params},
                                 {"policy": {}}, batch)
    assert abs((l0 - l1) - float(m0["entropy"])) <= 1e-5 * abs(l0 - l1)
    assert _rel(g1["policy"]["embed"], g0["policy"]["embed"]) > 1e-3


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_samples_the_same_tokens(tiny, temperature):
    cfg, params = tiny
    b = _batch()
    kw = dict(max_new_tokens=8, temperature=temperature, top_p=0.95, eos_ids=(2,), pad_id=0)
    key = jax.random.PRNGKey(5)
    run = lambda group: jax.device_get(jax.jit(lambda p, t, m, k: generate(
        cfg, p, t, m, k, prefill_group=group, **kw))(params, b["prompt_BP"], b["prompt_mask_BP"], key))
    one, shared = run(1), run(G)
    assert (shared["tokens_BN"] == one["tokens_BN"]).all()
    assert (shared["mask_BN"] == one["mask_BN"]).all()
    np.testing.assert_allclose(shared["logprobs_BN"], one["logprobs_BN"], atol=1e-5)
    if temperature:   # sampled rows of one group differ: the cache is repeated, not the rows
        assert len({tuple(r) for r in one["tokens_BN"][:G]}) > 1


def test_group_layout_is_chosen_by_cost(tiny):
    cfg, _ = tiny
    assert groups.group_size(cfg, 64, 8, 4, 16) == 4         # long prompt, short responses
    assert groups.group_size(cfg, 64, 8, 4, 6) == 1          # a micro batch splits a group
    assert groups.group_size(cfg, 64, 8, 1, 16) == 1
    rows = groups.minibatch_rows(np.array([3, 0, 2, 1]), 2, 2)
    # micro batch k takes rows k, k + 2, ...: groups 3, 0 then 2, 1, members consecutive
    assert rows[0::2].tolist() == [6, 7, 0, 1] and rows[1::2].tolist() == [4, 5, 2, 3]


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_grpo_run_writes_rss_timeline(ppo_tiny, tmp_path):
    """A GRPO run (grouped layout, trimmed rows) writes the RSS of every phase per iteration."""
    out = tmp_path / "grpo"
    run_rl_one_device(ppo_config(ppo_tiny, out, "algorithm=grpo", "rollout.batch_size=4",
                                 "rollout.num_generations=4", "ppo.epochs=1",
                                 "train.iterations=2", "monitor.action=warn"))
    perf = [json.loads(x) for x in (out / "perf.jsonl").read_text().splitlines()]
    assert len(perf) == 2
    for p in perf:
        for phase in ("rollout", "scoring", "update"):
            assert 0 < p[f"rss_{phase}_gib"] <= p[f"rss_peak_{phase}_gib"] + 1e-3, (phase, p)


def test_first_step_forward_is_the_rollouts_forward(tiny):
    """The old log-probs the update's first step keeps (`objectives.first_forward`) are the
    policy forward the rollout would have run, and that step's loss and gradients with
    fresh_old_B = 1 (ratio 1 by construction) equal the step on the recomputed old log-probs."""
    cfg, params = tiny
    models = R.Models(policy=cfg, ref="copy", value="none")
    s = dataclasses.replace(_settings("grpo", G), reuse_old_logp=True)
    batch = _batch()
    trainable, frozen = {"policy": params}, {"policy": {}}
    kw = dict(temperature=s.temperature, chunk=s.logits_chunk, group=G)
    own_BN = R.policy_forward(cfg, params, batch, **kw)[0] * batch["mask_BN"]
    recomputed = dict(batch, old_logp_BN=np.asarray(own_BN))
    fresh = dict(batch, old_logp_BN=np.zeros_like(batch["old_logp_BN"]),
                 fresh_old_B=np.ones(len(batch["mask_BN"]), np.float32))
    loss_r, m_r, g_r = _loss_and_grads(models, s, trainable, frozen, recomputed)
    loss_f, m_f, g_f = _loss_and_grads(models, s, trainable, frozen, fresh)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r) and m_f["ratio"] == 1.0
    _assert_trees_close(g_f, g_r)
    # The step hands back its forward per row; first_forward puts it in place (rows shuffled).
    picked = np.array([3, 4, 5, 0, 1, 2])
    rows = {k: v[picked] for k, v in m_f["rows"].items()}
    sampler_BN = np.asarray(own_BN) + 0.25 * batch["mask_BN"]
    out, figures = jax.jit(lambda *a: objectives.first_forward(s, *a))(
        fresh, picked, rows, sampler_BN)
    assert _rel(out["old_logp_BN"], own_BN) <= 1e-5
    assert not np.asarray(out["fresh_old_B"]).any()
    mask = batch["mask_BN"].astype(bool)
    assert abs(float(figures["logprob_gap"]) - 0.25) <= 1e-5
    ent_BN = R.policy_forward(cfg, params, batch, **kw)[1]
    assert abs(float(figures["entropy"]) - float(np.asarray(ent_BN)[mask].mean())) <= 1e-5


def test_old_log_probs_are_reused_only_where_exact(tiny):
    """From the first step only where it sees the rollout's params on every row and nothing
    before the update needs them: GRPO with one minibatch, not PPO (KL in the reward, value
    head), RLOO (KL in the reward) or two minibatches (the second sees updated params)."""
    def cfg(*args):
        return ppo_config({"model_dir": "m", "prompts": "p.jsonl"}, "out",
                          "rollout.num_generations=4", *args)
    assert objectives.reuses(cfg("algorithm=grpo", "ppo.minibatches=1"))
    assert not objectives.reuses(cfg("algorithm=grpo", "ppo.minibatches=2"))
    assert not objectives.reuses(cfg("algorithm=grpo", "ppo.minibatches=1",
                                     "ppo.reuse_old_logp=false"))
    assert not objectives.reuses(cfg("algorithm=ppo", "ppo.minibatches=1"))
    assert not objectives.reuses(cfg("algorithm=rloo", "ppo.minibatches=1"))


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_grpo_run_reusing_old_log_probs_equals_recomputing(ppo_tiny, tmp_path):
    """Whole GRPO runs (two epochs per rollout, grouped layout): with the old log-probs from
    the first update step and with the rollout's own forward, the same metrics to rounding
    (KL, entropy, log-prob gap, losses, rewards) and the same samples."""
    args = ("algorithm=grpo", "rollout.batch_size=4", "rollout.num_generations=4",
            "ppo.epochs=2", "ppo.minibatches=1", "train.iterations=3", "monitor.action=warn",
            "train.sample_every=1")
    runs = {}
    for reuse in (True, False):
        out = tmp_path / str(reuse)
        run_rl_one_device(ppo_config(ppo_tiny, out, *args, f"ppo.reuse_old_logp={reuse}"))
        runs[reuse] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[reuse, "samples"] = (out / "samples.jsonl").read_text()
    assert runs[True, "samples"] == runs[False, "samples"]
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[True], runs[False]):
        assert a.keys() == b.keys()
        for k in ("kl", "kl_token", "entropy", "logprob_gap", "loss", "policy_loss", "kl_loss",
                  "reward_mean", "train_entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(b[k]), 1e-2), (k, a[k], b[k])
