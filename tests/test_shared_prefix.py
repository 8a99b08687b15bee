"""Pairs as one row [prompt | chosen | rejected] (`jaxalign.data.layout`, the default
`data.share_prompt: true`) compute what two rows compute: per-sequence log-probs, rewards,
every preference loss and its gradients, within 1e-5 relative. Both layouts gather the loss
positions before the LM head; the reference for the log-probs is the model's own full
logits on the two original rows (every position through the head), so the gather is checked
too. A windowed family checks that windows count positions, not slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.config import MeshConfig
from jaxalign.data.layout import branch_layout
from jaxalign.data.preference import build_preference_data
from jaxalign.data.unpaired import build_unpaired_data
from jaxalign.losses.preference import DPO_LOSS_TYPES, POLICY_ONLY_LOSS_TYPES
from jaxalign.losses.xent import token_logprobs
from jaxalign.models import functional, heads
from jaxalign.train.dpo import DPOConfig, DPOOptions, dpo_loss_fn, load_dpo_models, pair_logps
from jaxalign.train.kto import KTOConfig, KTOOptions, kto_loss_fn
from jaxalign.train.rm import RMConfig, RMOptions, init_reward_model, rm_loss_fn

from conftest import make_tiny_family_hf, pref_config

RTOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_trees_close(a, b, rtol=RTOL):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for path, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], la, lb):
        assert rel_err(x, y) <= rtol, (jax.tree_util.keystr(path[0]), rel_err(x, y))


def both_layouts(batch, pad_id):
    return {share: {k: jnp.asarray(v) for k, v in branch_layout(batch, share=share,
                                                                pad_id=pad_id).items()}
            for share in (True, False)}


def full_logits_logps(cfg, params, batch):
    """(B, 2) summed response log-probs from the model's full logits on the original rows."""
    rows = {k: jnp.asarray(batch[k].reshape(-1, batch[k].shape[-1]))
            for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    logits, _, _ = functional.apply(cfg, params, rows["tokens"], positions_BT=rows["positions"],
                                    segment_ids_BT=rows["segment_ids"])
    logp = token_logprobs(logits, rows["targets"]) * rows["loss_mask"]
    return np.asarray(logp.sum(-1)).reshape(-1, 2)


def perturbed(tree, scale=0.02, seed=1):
    """The policy moved away from the reference, so the DPO margins are not all zero."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def dpo_world(prefs, tmp_path_factory, mesh):
    cfg = pref_config(DPOConfig, prefs, tmp_path_factory.mktemp("dpo"))
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=4)
    batch = next(data.train)
    with jax.set_mesh(mesh):
        m = load_dpo_models(cfg, mesh)
    return dict(m=m, batch=batch, pad=data.pad_id, layouts=both_layouts(batch, data.pad_id))


def test_layout_holds_each_pair_once_with_its_prompt_once(dpo_world):
    batch, shared = dpo_world["batch"], dpo_world["layouts"][True]
    p = batch["prompt_len"]
    n = (batch["segment_ids"] > 0).sum(-1)
    for b in range(len(p)):
        row = np.asarray(shared["tokens"][b, 0])
        c, r = batch["tokens"][b, 0, :n[b, 0]], batch["tokens"][b, 1, :n[b, 1]]
        np.testing.assert_array_equal(row[:n[b, 0] + n[b, 1] - p[b]],
                                      np.concatenate([c, r[p[b]:]]))
        pos = np.asarray(shared["positions"][b, 0, n[b, 0]:n[b, 0] + n[b, 1] - p[b]])
        np.testing.assert_array_equal(pos, np.arange(p[b], n[b, 1]))   # continue after the prompt
        # The gather holds exactly each side's trained targets, in order.
        for side in (0, 1):
            keep = np.asarray(shared["logp_branch"][b]) == side + 1
            want = batch["targets"][b, side][batch["loss_mask"][b, side] > 0]
            np.testing.assert_array_equal(np.asarray(shared["logp_target"][b])[keep], want)
    # The prompt's tokens once; fewer slots than two rows; the head sees response positions only.
    real = int((np.asarray(shared["segment_ids"]) > 0).sum())
    assert real == (batch["segment_ids"] > 0).sum() - p.sum()
    assert shared["tokens"].size < batch["tokens"].size
    assert shared["logp_index"].shape[1] < batch["tokens"].shape[-1] * 2


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("average", [False, True])
def test_pair_logps_equal_the_two_rows_full_logits(dpo_world, average, mesh):
    m, batch = dpo_world["m"], dpo_world["batch"]
    params = perturbed(m.trainable)
    want = full_logits_logps(m.cfg, params, batch)
    if average:
        want = want / np.maximum(batch["loss_mask"].sum(-1), 1)
    with jax.set_mesh(mesh):
        for share, lay in dpo_world["layouts"].items():
            got = pair_logps(m.cfg, params, lay, average=average, chunk=32)
            assert rel_err(got, want) <= RTOL, share


# Every loss reads the layout only through the sequence log-probs (summed, or averaged for
# SimPO / ORPO's NLL term): one loss with a reference, and the two policy-only ones.
@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("loss_type", [DPO_LOSS_TYPES[0], *POLICY_ONLY_LOSS_TYPES])
def test_dpo_losses_and_grads_shared_equal_unshared(dpo_world, loss_type, mesh):
    m = dpo_world["m"]
    opts = DPOOptions(loss_type=loss_type, beta=0.5 if loss_type != "simpo" else 2.0)
    loss_fn = dpo_loss_fn(m.cfg, opts, ref_cfg=m.extra["ref_cfg"], chunk=32)
    trainable = perturbed(m.trainable)
    out = {}
    with jax.set_mesh(mesh):
        for share, lay in dpo_world["layouts"].items():
            grad_fn = jax.value_and_grad(lambda t: loss_fn(t, m.frozen, lay, None), has_aux=True)
            (loss, metrics), grads = grad_fn(trainable)
            out[share] = (loss, metrics, grads)
    (ls, ms, gs), (lu, mu, gu) = out[True], out[False]
    assert rel_err(ls, lu) <= RTOL, (loss_type, float(ls), float(lu))
    for k in mu:
        assert rel_err(ms[k], mu[k]) <= RTOL or abs(float(ms[k]) - float(mu[k])) < 1e-6, k
    assert_trees_close(gs, gu)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_reward_scores_and_grads_shared_equal_unshared(prefs, tmp_path, mesh):
    cfg = pref_config(RMConfig, prefs, tmp_path)
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=4)
    batch = next(data.train)
    with jax.set_mesh(mesh):
        m = init_reward_model(cfg.model, cfg.lora, mesh, 0)
        params = perturbed(m.trainable)
        rows = {k: jnp.asarray(batch[k].reshape(-1, batch[k].shape[-1]))
                for k in ("tokens", "segment_ids", "positions")}
        want = np.asarray(heads.score(m.cfg, params, rows["tokens"], rows["segment_ids"],
                                      rows["positions"])).reshape(-1, 2)
        loss_fn = rm_loss_fn(m.cfg, RMOptions(center_coef=0.01))
        out = {}
        for share, lay in both_layouts(batch, data.pad_id).items():
            from jaxalign.models.layout import branch_scores
            got = branch_scores(m.cfg, params, lay, branches=2)
            assert rel_err(got, want) <= RTOL, share
            out[share] = jax.value_and_grad(lambda t: loss_fn(t, m.frozen, lay, None),
                                            has_aux=True)(params)
    assert rel_err(out[True][0][0], out[False][0][0]) <= RTOL
    assert_trees_close(out[True][1], out[False][1])


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_kto_loss_and_grads_shared_equal_unshared(prefs, tmp_path, mesh):
    cfg = pref_config(KTOConfig, prefs, tmp_path)
    data = build_unpaired_data(cfg.data, prefs["tok"], batch_size=4)
    batch = next(data.train)
    with jax.set_mesh(mesh):
        m = load_dpo_models(cfg, mesh, "kto")
        loss_fn = kto_loss_fn(m.cfg, KTOOptions(beta=0.5), ref_cfg=m.extra["ref_cfg"], chunk=32)
        trainable = perturbed(m.trainable)
        want = full_logits_logps(m.cfg, trainable, batch)
        out = {}
        for share, lay in both_layouts(batch, data.pad_id).items():
            assert rel_err(pair_logps(m.cfg, trainable, lay, average=False, chunk=32), want) <= RTOL
            out[share] = jax.value_and_grad(lambda t: loss_fn(t, m.frozen, lay, None),
                                            has_aux=True)(trainable)
    assert rel_err(out[True][0][0], out[False][0][0]) <= RTOL
    assert_trees_close(out[True][1], out[False][1])


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_eval_pair_scores_shared_equal_unshared(prefs, tmp_path, mesh):
    from jaxalign.data.config import DataConfig
    from jaxalign.data.preference import load_pairs
    from jaxalign.data.tokenize import Encoder
    from jaxalign.evaluate import likelihood
    cfg = pref_config(DPOConfig, prefs, tmp_path)
    pairs, _ = load_pairs(cfg.data.eval[0], DataConfig(train=cfg.data.eval, seq_len=192),
                          Encoder(prefs["tok"]))
    pairs = pairs.subset(range(6))
    with jax.set_mesh(mesh):
        m = load_dpo_models(cfg, mesh)
        params = perturbed(m.trainable)
        got = {s: likelihood.pair_logps(m.cfg, params, pairs, seq_len=192, batch_size=4,
                                        pad_id=2, share=s) for s in (True, False)}
        assert rel_err(got[True], got[False]) <= RTOL
        rm = init_reward_model(pref_config(RMConfig, prefs, tmp_path / "rm").model, cfg.lora,
                               mesh, 0)
        scores = {s: likelihood.pair_scores(rm.cfg, perturbed(rm.trainable), pairs, seq_len=192,
                                            batch_size=4, pad_id=2, share=s) for s in (True, False)}
    assert rel_err(scores[True], scores[False]) <= RTOL
    assert np.ptp(scores[True]) > 0 and np.ptp(got[True]) > 0


def _pair_batch(rng, vocab, B, prompt, chosen, rejected, T):
    """A (B, 2, T) pair batch of random tokens, the whole response trained."""
    from jaxalign.data.preference import empty_pair_batch, write_pair
    batch = empty_pair_batch(B, T, 0)
    for b in range(B):
        p = prompt - b
        ids = rng.integers(3, vocab, p)
        sides = []
        for n in (chosen + b, rejected - b):
            full = np.concatenate([ids, rng.integers(3, vocab, n)])
            sides.append((full, np.concatenate([np.zeros(p, np.uint8), np.ones(n, np.uint8)])))
        write_pair(batch, b, (sides[0], sides[1], p))
    return batch


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("family, kw", [("mistral", dict(sliding_window=6)),
                                        ("gemma2", dict(sliding_window=5, num_hidden_layers=3,
                                                        final_logit_softcapping=6.0))])
def test_windowed_family_pair_logps_and_grads(tmp_path, family, kw):
    """Windows shorter than every response: a rejected token's window must count positions
    (continuing from the prompt), not slots (which would cross the chosen response)."""
    from jaxalign.convert import hf
    make_tiny_family_hf(tmp_path, family, seed=4, **kw)
    cfg, params, _ = hf.load(tmp_path, scan_layers=True)
    batch = _pair_batch(np.random.default_rng(0), cfg.vocab_size, 3, 9, 7, 11, 24)
    want = full_logits_logps(cfg, params, batch)
    lays = both_layouts(batch, 0)
    f = lambda p, lay: pair_logps(cfg, p, lay, average=False, chunk=16)
    for share, lay in lays.items():
        assert rel_err(f(params, lay), want) <= RTOL, share
    g = {s: jax.grad(lambda p: (f(p, lay) * jnp.array([1.0, -0.7])).sum())(params)
         for s, lay in lays.items()}
    assert_trees_close(g[True], g[False])
