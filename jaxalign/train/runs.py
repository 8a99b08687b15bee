"""Training run directories as model sources: the latest checkpoint's params, rebuilt with
the layout the run's algorithm trained (`run.json`; runs written before it existed are SFT).

Only the sections that shape the params are read from config.yaml (model, lora, train,
optim), so any algorithm's run loads here without its data or loss settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax

from jaxalign import sharding
from jaxalign.config import MeshConfig, from_dict, load_yaml
from jaxalign.models import lora

log = logging.getLogger(__name__)


def run_algorithm(run_dir: str | Path) -> str:
    meta = Path(run_dir) / "run.json"
    return json.loads(meta.read_text())["algorithm"] if meta.exists() else "sft"


def _build(algorithm: str, source, lora_cfg, mesh, seed: int):
    """-> (cfg, trainable, frozen, hf_config, tokenizer dir) as the run's training began."""
    if algorithm == "rm":
        from jaxalign.train.rm import load_reward_model
        cfg, trainable, frozen, _, hf_config, tok_dir = load_reward_model(source, lora_cfg, mesh, seed)
    elif algorithm in ("sft", "dpo", "kto"):
        from jaxalign.train.sft import load_policy
        cfg, trainable, frozen, _, hf_config, tok_dir = load_policy(source, lora_cfg, mesh, seed)
    else:
        raise NotImplementedError(f"loading a {algorithm!r} run directory as a model")
    return cfg, trainable, frozen, hf_config, tok_dir


def load_trained(run_dir: str | Path, mesh=None, **runtime):
    """A training run directory -> (cfg, params, hf_config, tokenizer dir), from its latest
    checkpoint; with LoRA, the params hold base weights and adapters (merge to export)."""
    from jaxalign.checkpoint import ModelSourceError, TrainCheckpoints
    from jaxalign.train.loop import TrainConfig
    from jaxalign.train.optim import OptimConfig, make_optimizer
    from jaxalign.train.sft import LoRAConfig, ModelSource
    from jaxalign.train.step import init_state

    run_dir = Path(run_dir)
    algorithm = run_algorithm(run_dir)
    if algorithm in ("ppo", "grpo"):  # the checkpoint holds value head / critic beside the policy
        from jaxalign.train.roles import load_trained_policy
        return load_trained_policy(run_dir, mesh, **runtime)
    raw = load_yaml(str(run_dir / "config.yaml"))
    source = from_dict(ModelSource, raw.get("model"), "model.")
    source = dataclasses.replace(source, **runtime) if runtime else source
    lora_cfg = from_dict(LoRAConfig, raw.get("lora"), "lora.")
    train_cfg = from_dict(TrainConfig, raw.get("train"), "train.")
    optim_cfg = from_dict(OptimConfig, raw.get("optim"), "optim.")
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1),
                                                            jax.devices()[:1])
    cfg, trainable, frozen, hf_config, tok_dir = _build(algorithm, source, lora_cfg, mesh,
                                                        train_cfg.seed)
    ckpts = TrainCheckpoints(run_dir, keep=train_cfg.keep_checkpoints)
    step = ckpts.latest_step()
    if step is None:
        raise ModelSourceError(f"{run_dir}: a run directory without checkpoints")
    optimizer, _ = make_optimizer(optim_cfg, train_cfg.steps)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, 0), trainable)
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    # Params onto their own shardings; the optimizer state (not needed here) replicated.
    state_sh = dataclasses.replace(
        jax.tree.map(lambda _: sharding.replicated(mesh), abstract), params=shardings)
    state, _ = ckpts.restore(step, abstract, state_sh)
    ckpts.close()
    log.info("loaded %s run %s at step %d", algorithm, run_dir, step)
    return cfg, lora.combine(state.params, frozen), hf_config, tok_dir
