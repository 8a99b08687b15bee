"""Reward modelling and DPO through the shared loop, on a tiny model and the synthetic
preference set: learning, HF export of the reward model, sharded = unsharded, exact resume,
and a reference that never moves."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.config import ConfigError, MeshConfig, from_dict
from jaxalign.data.layout import branch_layout, laid_out
from jaxalign.data.preference import build_preference_data
from jaxalign.models import functional, heads
from jaxalign.train.dpo import DPOConfig, dpo_loss_fn, load_dpo_models, pair_logps, run_dpo
from jaxalign.train.loop import put_batch
from jaxalign.config import OptimConfig
from jaxalign.train.optim import make_optimizer
from jaxalign.train.rm import RMConfig, init_reward_model, rm_loss_fn, run_rm
from jaxalign.train.step import init_state, make_train_step

from conftest import pref_config, read_metrics


@pytest.mark.slow  # trains and resumes whole runs
def test_reward_model_learns_and_exports_to_transformers(prefs):
    """>= 0.95 held-out accuracy; run_dir/hf scores padded batches in transformers as we do."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification
    from jaxalign.checkpoint import load_model

    out = prefs["root"] / "rm"
    cfg = pref_config(RMConfig, prefs, out, {"rm": {"center_coef": 0.01}}, steps=24, export_hf=True)
    final = run_rm(cfg, devices=jax.devices()[:1])
    assert final["eval/accuracy"] >= 0.95, final
    assert final["eval/margin"] > 2.0, final
    assert "eval/perplexity" not in final

    # The exported reward model, on a right-padded eval batch as the pipeline builds it
    # (pad == eos here): transformers scores the rightmost token != pad id, and so does
    # jaxalign, in training as here (test_reward_model.py has rows ending in eos).
    cfg_rm, params, _, _ = load_model(out / "hf")
    assert cfg_rm.num_labels == 1
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=8)
    batch = next(iter(data.eval))
    tokens = batch["tokens"].reshape(16, -1)
    seg = batch["segment_ids"].reshape(16, -1)
    pad = data.pad_id
    assert cfg_rm.pad_token_id == pad == prefs["tok"].eos_token_id
    ours = np.asarray(heads.score(cfg_rm, params, tokens, seg))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        out / "hf", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.pad_token_id == pad
    with torch.no_grad():
        theirs = model(torch.tensor(np.where(seg > 0, tokens, pad), dtype=torch.long),
                       attention_mask=torch.tensor(seg > 0)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.ptp(ours) > 1.0  # a trained model, not a constant


def _one_step(loss_fn, trainable, frozen, batch):
    opt, sched = make_optimizer(OptimConfig(lr=1e-3, max_grad_norm=None), 10)
    state = init_state(trainable, opt, 0)
    return jax.jit(make_train_step(loss_fn, opt, sched))(state, frozen, batch)[1]


@pytest.mark.slow  # compiles each algorithm's step on 1 and on 8 devices
@pytest.mark.parametrize("algo", ["rm", "dpo", "dpo_lora"])
def test_sharded_step_equals_single_device(prefs, tmp_path, algo):
    if algo == "rm":
        cfg = pref_config(RMConfig, prefs, tmp_path)
        load = lambda mesh: init_reward_model(cfg.model, cfg.lora, mesh, 0)
        make_loss = lambda m: rm_loss_fn(m.cfg, cfg.rm)
    else:
        lora = {"lora": {"rank": 4, "alpha": 8.0}} if algo == "dpo_lora" else {}
        cfg = pref_config(DPOConfig, prefs, tmp_path, lora)
        load = lambda mesh: load_dpo_models(cfg, mesh)
        make_loss = lambda m: dpo_loss_fn(m.cfg, cfg.dpo, ref_cfg=m.extra["ref_cfg"])
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=8)
    batch = branch_layout(next(data.train), share=True, pad_id=data.pad_id)

    one = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(one):
        m = load(one)
        ref = _one_step(make_loss(m), m.trainable, m.frozen, put_batch(batch, one))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        m = load(mesh)
        got = _one_step(make_loss(m), m.trainable, m.frozen, put_batch(batch, mesh))
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    if algo != "rm":  # policy == reference at the start: DPO's loss is exactly log 2
        np.testing.assert_allclose(ref["loss"], math.log(2), rtol=1e-6)


@pytest.mark.slow  # trains and resumes whole runs
def test_dpo_exact_resume_and_learning(prefs, tmp_path):
    """6 steps straight vs 3 steps, then the same command resumed to 6: identical metrics.jsonl;
    and DPO moves the held-out implied reward margin up from 0."""
    kw = dict(eval_every=3, eval_batches=2)
    straight = pref_config(DPOConfig, prefs, prefs["root"] / "dpo", steps=6, **kw)
    run_dpo(straight, devices=jax.devices()[:1])
    first = pref_config(DPOConfig, prefs, tmp_path / "b", steps=3, **kw)
    run_dpo(first, devices=jax.devices()[:1])
    resumed = pref_config(DPOConfig, prefs, tmp_path / "b", steps=6, **kw)
    run_dpo(resumed, devices=jax.devices()[:1])
    a = (prefs["root"] / "dpo" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()
    rows = read_metrics(prefs["root"] / "dpo")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[-1]["eval/rewards/margins"] > rows[2]["eval/rewards/margins"] > 0
    assert rows[-1]["eval/rewards/accuracies"] > 0.5


@pytest.mark.slow  # trains and resumes whole runs
@pytest.mark.parametrize("cls, run_fn, section", [
    (RMConfig, run_rm, None),
    (DPOConfig, run_dpo, {"dpo": {"loss_type": "simpo", "beta": 2.0}}),
], ids=["rm", "simpo"])   # ORPO's state is SimPO's (policy only, no reference)
def test_exact_resume_of_the_other_supervised_objectives(prefs, tmp_path, cls, run_fn, section):
    """As for DPO (above) and SFT / KTO (their tests): 4 steps straight == 2 steps, then the same
    command resumed to 4, byte for byte in metrics.jsonl."""
    kw = dict(eval_every=2, eval_batches=1, batch_size=8)
    run_fn(pref_config(cls, prefs, tmp_path / "a", section, steps=4, **kw), devices=jax.devices()[:1])
    run_fn(pref_config(cls, prefs, tmp_path / "b", section, steps=2, **kw), devices=jax.devices()[:1])
    run_fn(pref_config(cls, prefs, tmp_path / "b", section, steps=4, **kw), devices=jax.devices()[:1])
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert len(a.splitlines()) == 4 and a == (tmp_path / "b" / "metrics.jsonl").read_text()


@pytest.mark.slow  # trains and resumes whole runs
@pytest.mark.parametrize("lora", [False, True])
def test_dpo_reference_is_never_updated(prefs, tmp_path, lora):
    """Full fine-tuning: the frozen copy is bitwise unchanged after training. LoRA: the
    adapter-disabled policy (the reference) gives the same log-probs after training."""
    from jaxalign.train.loop import Task, train
    section = {"lora": {"rank": 4, "alpha": 8.0}} if lora else {}
    cfg = pref_config(DPOConfig, prefs, tmp_path, section, steps=3)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=16)
    batch = branch_layout(next(iter(data.eval)), share=True, pad_id=data.pad_id)
    with jax.set_mesh(mesh):
        m = load_dpo_models(cfg, mesh)
        model_cfg, ref_cfg, trainable, frozen = m.cfg, m.extra["ref_cfg"], m.trainable, m.frozen
        frozen_sh = m.frozen_shardings
        before = jax.tree.map(np.asarray, frozen)
        ref_logps = lambda params: np.asarray(pair_logps(model_cfg, params, batch, average=False,
                                                         chunk=64, use_lora=False))
        from jaxalign.models import lora as lora_mod
        start = ref_logps(lora_mod.combine(trainable, frozen["base"])) if lora else None
        task = Task(loss_fn=dpo_loss_fn(model_cfg, cfg.dpo, ref_cfg=ref_cfg),
                    train_data=laid_out(data, share=True, pad_id=data.pad_id)[0])
        captured = {}
        train(run_dir=tmp_path, cfg=cfg.train, optim=cfg.optim, mesh=mesh, trainable=trainable,
              frozen=frozen, frozen_shardings=frozen_sh, task=task,
              on_end=lambda state: captured.update(params=state.params))
    after = jax.tree.map(np.asarray, frozen)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    if lora:
        assert ref_cfg is None and not jax.tree.leaves(frozen["ref"])  # no second copy
        trained = lora_mod.combine(captured["params"], frozen["base"])
        np.testing.assert_array_equal(ref_logps(trained), start)
        moved = np.asarray(pair_logps(model_cfg, trained, batch, average=False, chunk=64))
        assert np.abs(moved - start).max() > 1e-3  # while the policy did move
    else:
        assert jax.tree.leaves(frozen["ref"])


def test_dpo_options_are_validated():
    from jaxalign.train.dpo import DPOOptions
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        DPOOptions(loss_type="kto")
    with pytest.raises(ConfigError, match="dpo.beta"):
        DPOOptions(beta=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOOptions(loss_type="ipo", label_smoothing=0.1)
    assert DPOOptions(loss_type="ipo").average and not DPOOptions().average


@pytest.mark.slow  # trains and resumes whole runs
def test_eval_accuracy_and_win_rate(prefs):
    """`jaxalign eval` on the runs above: its preference accuracies are the runs' own held-out
    figures; a policy judged against itself ties every prompt (win rate 0.5, DPO accuracy 0,
    KL 0)."""
    from jaxalign import cli
    from jaxalign.evaluate import from_raw, run_eval
    rm_run, dpo_run = prefs["root"] / "rm", prefs["root"] / "dpo"
    if not (rm_run / "hf").exists() or not (dpo_run / "checkpoints").exists():
        pytest.skip("needs the reward-model and DPO runs of the tests above")
    data = {"pairs": [{"path": str(prefs["eval"])}], "prompts": [{"path": str(prefs["eval"])}]}
    opts = {"seq_len": 192, "limit": 32, "batch_size": 16, "max_new_tokens": 8}
    # One policy that is a run dir: its reference is the model the run started from.
    got = run_eval(from_raw({"models": {"policies": {"dpo": str(dpo_run)},
                                        "reward_model": str(rm_run)},
                             "data": data, "eval": opts}))
    dpo_rows = read_metrics(dpo_run)
    rm_rows = read_metrics(rm_run)
    assert got["dpo/dpo/pairs"] == 32 and got["gen/dpo/prompts"] == 32
    assert got["dpo/dpo/accuracy"] == pytest.approx(dpo_rows[-1]["eval/rewards/accuracies"], abs=1e-6)
    assert got["dpo/dpo/margin"] == pytest.approx(dpo_rows[-1]["eval/rewards/margins"], rel=1e-4)
    assert got["rm/accuracy"] >= 0.95 and rm_rows[-1]["eval/accuracy"] >= 0.95
    assert 0.0 <= got["winrate/dpo"] <= 1.0

    out = prefs["root"] / "eval_self"
    cfg_path = prefs["root"] / "eval.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump({
        "models": {"policies": {"base": str(prefs["model_dir"])},
                   "reference": str(prefs["model_dir"]), "reward_model": str(rm_run / "hf")},
        "data": data, "eval": opts, "out_dir": str(out)}))
    assert cli.main(["eval", str(cfg_path)]) == 0
    self_eval = json.loads((out / "eval.json").read_text())
    assert self_eval["winrate/base"] == 0.5 and self_eval["kl/base/sequence"] == 0.0
    assert self_eval["dpo/base/accuracy"] == 0.0 and self_eval["dpo/base/margin"] == 0.0
    assert self_eval["rm/accuracy"] == got["rm/accuracy"]  # run dir and its HF export agree

def test_every_process_lays_out_its_rows_to_the_same_shape(prefs):
    """A multi-process run lays out the whole batch, then takes its rows: each process's
    shared rows and loss gathers are padded to the same L and M (its own rows' bucket would
    give the processes different programs, and the collectives mismatched sizes), and the
    processes' rows together are the one-process layout."""
    cfg = pref_config(DPOConfig, prefs, prefs["root"] / "unused")
    whole = build_preference_data(cfg.data, prefs["tok"], batch_size=8)
    one = next(laid_out(whole, share=True, pad_id=whole.pad_id)[0])
    parts = []
    for index in range(2):
        data = build_preference_data(cfg.data, prefs["tok"], batch_size=8, process_index=index,
                                     process_count=2)
        train, evals = laid_out(data, share=True, pad_id=data.pad_id)
        parts.append((next(train), next(evals())))
    for k, v in one.items():
        assert parts[0][0][k].shape == parts[1][0][k].shape, k
        np.testing.assert_array_equal(np.concatenate([p[0][k] for p in parts]), v, err_msg=k)
    for k in ("tokens", "logp_index"):
        assert parts[0][1][k].shape == parts[1][1][k].shape, k
