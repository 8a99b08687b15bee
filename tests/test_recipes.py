"""The TRL-tutorial recipes (configs/recipes/) run end to end on the tiny model with the same
keys: only model.path, the data paths and the run length are overridden."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.config import from_dict, load_yaml
from jaxalign.train.recipes import RECIPES

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    from jaxalign.synth import prefs, tasks
    root = tmp_path_factory.mktemp("recipes")
    tasks.write_splits(root / "tasks", 64, 8)
    tasks.write_splits(root / "arith", 64, 8, kinds=("arithmetic",))
    prefs.write_splits(root / "prefs", 32, 8)
    return root, make_tiny_model(root / "model")


def _run(command, name, tmp_path, overrides):
    config_cls, run = RECIPES[command].load()
    path = RECIPE_DIR / name
    raw = load_yaml(str(path), [f"out_dir={tmp_path / 'run'}", *overrides])
    written = load_yaml(str(path))
    changed = {k for k in raw if raw[k] != written.get(k)}
    assert changed <= {"out_dir", "model", "data", "train"}, changed
    cfg = from_dict(config_cls, raw)
    metrics = run(cfg, raw, jax.devices()[:1])
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    return cfg, metrics, rows


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_trl_sft_lora_recipe(tiny, tmp_path):
    root, model = tiny
    cfg, metrics, rows = _run("sft", "trl_sft_lora.yaml", tmp_path, [
        f"model.path={model}", f"data.train=[{{path: {root / 'tasks/train.jsonl'}, max_examples: 48}}]"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (16, 32, ("q_proj", "v_proj"))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (3, 32, 8)
    assert (cfg.optim.lr, cfg.train.eval_every, cfg.train.save_every) == (2e-4, 500, 500)
    # 3 epochs of the 46 kept tasks (2 held out), packed: steps counted from the data
    assert rows[-1]["step"] >= 2 and np.isfinite(metrics["loss"]) and "eval/loss" in rows[-1]
    assert json.loads((tmp_path / "run/run.json").read_text())["lora"]["targets"] == ["q_proj", "v_proj"]
    assert (tmp_path / "run/hf/config.json").exists()


@pytest.mark.slow  # runs the TRL recipe configs
def test_trl_ppo_recipe(tiny, tmp_path):
    root, model = tiny
    cfg, metrics, rows = _run("ppo", "trl_ppo.yaml", tmp_path, [
        f"model.path={model}", f"data.prompts={root / 'arith/train.jsonl'}", "train.iterations=2"])
    assert (cfg.optim.lr, cfg.rollout.batch_size, cfg.minibatch_rows, cfg.ppo.epochs) == (1.41e-5, 64, 16, 4)
    assert cfg.ppo.kl_target == 0.02
    assert [r["step"] for r in rows] == [1, 2] and all(r["epochs"] == 4 for r in rows)
    # the adaptive controller moved the coefficient from its 0.2 start
    assert rows[-1]["kl_coef"] != 0.2 and np.isfinite(metrics["reward_mean"])


@pytest.mark.slow  # runs the TRL recipe configs
def test_trl_dpo_recipe(tiny, tmp_path):
    root, model = tiny
    cfg, metrics, rows = _run("dpo", "trl_dpo.yaml", tmp_path, [
        f"model.path={model}", f"data.train=[{root / 'prefs/train.jsonl'}]",
        f"data.eval=[{root / 'prefs/eval.jsonl'}]", "train.steps=2"])
    assert (cfg.dpo.beta, cfg.dpo.loss_type) == (0.1, "sigmoid")
    assert rows[-1]["step"] == 2 and np.isfinite(metrics["loss"])
