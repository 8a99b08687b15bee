"""What every training recipe does the same way: load the policy (with LoRA), start a run
directory, export at the end; and `run_recipe`, the skeleton all four recipes share.

A supervised recipe (sft.py, rm.py, dpo.py) is then: a config class, a loss, a `load`
(the models it trains and holds frozen) and a `task` (its data and loss for the loop).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import jax

from jaxalign import checkpoint, distributed, rundir, sharding
from jaxalign.config import ConfigError, LoRAConfig, ModelConfig, ModelSource
from jaxalign.convert import hub
from jaxalign.export import write_merged
from jaxalign.models import functional, lora
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.preempt import StopFlag
from jaxalign.train.loop import Task, resolved_config, train, write_run_files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    """A recipe's models, as the loop takes them."""
    cfg: ModelConfig               # the trained model (LoRA settings included)
    trainable: Any
    frozen: Any
    frozen_shardings: Any
    hf_config: dict
    tok_dir: Path | str
    base: Any = None               # the trained model's frozen part (LoRA base); None: frozen
    extra: dict = dataclasses.field(default_factory=dict)   # recipe-specific (DPO: ref_cfg)


def load_start(path: str, mesh, **kw):
    """The model a run starts from: any model source, a LoRA run's adapters folded into its
    weights (kept as adapters, a new LoRA would replace them and lose what they learned; e.g.
    a reward model or PPO started from a LoRA SFT run). Same return as `load_model`."""
    cfg, params, hf_config, tok_dir = checkpoint.load_model(path, mesh, **kw)
    if cfg.lora_rank:
        cfg, params = lora.merge(cfg, params)
        if mesh is not None:
            params = jax.device_put(params, functional.param_shardings(cfg, mesh))
    return cfg, params, hf_config, tok_dir


def load_policy(source: ModelSource, lora_cfg: LoRAConfig, mesh, seed: int) -> Loaded:
    """The policy from any model source; with LoRA, fresh adapters train and the base is frozen."""
    cfg, params, hf_config, tok_dir = load_start(source.path, mesh, revision=source.revision,
                                                 **source.runtime())
    cfg = lora_cfg.apply_to(cfg)
    # What model.scan_layers / model.remat resolved to (unset: the backend's measured default).
    log.info("training layout: %s%s layers, remat %s",
             f"rows up to {cfg.unroll_up_to} tokens unrolled without remat, longer ones "
             if cfg.unroll_up_to else "", "scanned" if cfg.scan_layers else "unrolled", cfg.remat)
    shardings = functional.param_shardings(cfg, mesh)
    if cfg.lora_rank:
        params = lora.add_adapters(cfg, params, mesh, seed)
        trainable, frozen = lora.split(params)
        frozen_sh = lora.split(shardings)[1]
    else:
        trainable, frozen, frozen_sh = params, {}, {}
    return Loaded(cfg, trainable, frozen, frozen_sh, hf_config, tok_dir)


def run_recipe(cfg, raw_config: dict | None, devices, *, algorithm: str,
               load: Callable[[Any, Any], Any], run: Callable[..., dict[str, float]],
               policy_path: tuple[str, ...] = ()) -> dict[str, float]:
    """The skeleton of every recipe (sft, rm, dpo, the RL driver): the resolved config, the
    mesh, the models (loaded under the mesh), the run files that describe the trained model
    (`checkpoint.describe_run`), then the recipe's loop; returns its last metrics.

    `load(cfg, mesh)` -> the models: anything with .cfg, .hf_config and .tok_dir of the model
    being trained (`Loaded` for the supervised recipes); `run(cfg, models, run_dir, mesh,
    raw)` runs or resumes the loop; `policy_path`: the model's key path in the TrainState's
    params."""
    run_dir = Path(cfg.out_dir).expanduser()
    rundir.check_apart(run_dir, cfg.model.path, "model.path")
    rundir.claim(run_dir, "run")
    # The lock is held until the run ends: a second command on this directory is refused
    # instead of resuming from under the first one.
    with rundir.locked(run_dir):
        cfg = pin_hub_base(cfg, run_dir)
        check_rerun(run_dir, recipe=algorithm, base=cfg.model.path)
        raw = resolved_config(cfg, raw_config)
        distributed.check_same_run(raw)   # several processes: same config and data, or one line
        mesh = sharding.make_mesh(cfg.mesh, devices)
        # SIGTERM while loading or compiling is kept for the loop (it stops before its first step).
        with StopFlag(), jax.set_mesh(mesh):
            models = load(cfg, mesh)
            check_rerun(run_dir, lora=models.cfg)
            check_seq_len(cfg, models.cfg)
            write_run_files(run_dir, raw, algorithm=algorithm, model=models.cfg,
                            hf_config=models.hf_config, base=cfg.model.path,
                            base_revision=cfg.model.revision,
                            tokenizer_dir=models.tok_dir, policy_path=policy_path)
            return run(cfg, models, run_dir, mesh, raw)


def check_rerun(run_dir: Path, *, recipe: str | None = None, base: str | None = None,
                lora: ModelConfig | None = None) -> None:
    """A rerun on a run directory with checkpoints continues that run, so it must be the
    same run: the same algorithm, the same starting model (path and fingerprint: its
    config.json, weight files, a run's newest step) and the same LoRA settings. Anything else
    is one ConfigError naming the key, raised before run.json or config.yaml is rewritten."""
    meta = checkpoint.read_run(run_dir)
    if meta is None or not checkpoint.has_checkpoints(run_dir):
        return
    fix = f"use another out_dir, or restore the earlier value to resume {run_dir}"
    if recipe is not None and meta["algorithm"] != recipe:
        raise ConfigError(f"{run_dir}: a {meta['algorithm']} run, not {recipe}; {fix}")
    if base is not None and not hub.is_hub_id(base):
        path = str(Path(base).expanduser().absolute())
        if meta.get("base") != path:
            raise ConfigError(f"model.path: {run_dir} was started from {meta.get('base')}, "
                              f"not {path}; {fix}")
        if meta.get("base_fingerprint") not in (None, checkpoint.fingerprint(path)):
            raise ConfigError(f"model.path: {path} changed since {run_dir} started from it "
                              f"(its config.json, weight files or newest step differ); {fix}")
    if lora is not None:
        for key, field in checkpoint.LORA_FIELDS.items():
            was, now = meta["lora"].get(key), getattr(lora, field)
            if (list(was) if isinstance(was, (list, tuple)) else was) != \
                    (list(now) if isinstance(now, (list, tuple)) else now):
                raise ConfigError(f"lora.{key}: {run_dir} was trained with {was}, not {now}; "
                                  f"{fix}")


def check_seq_len(cfg, model_cfg: ModelConfig) -> None:
    """data.seq_len of a supervised run against the model's position range (the RL driver
    checks its prompts + rollout.max_new_tokens once the prompts are read)."""
    seq_len = getattr(getattr(cfg, "data", None), "seq_len", None)
    if seq_len is not None:
        functional.check_positions(model_cfg, seq_len, "data.seq_len")


def pin_hub_base(cfg, run_dir: Path):
    """A rerun (resume) of a run that started from a hub id at no fixed revision keeps the
    commit it started from (run.json), even if the branch has moved since: a LoRA run's
    frozen base, and the reference copied from it, must not change under its adapters."""
    recorded = checkpoint.run_base(run_dir)
    if (recorded is None or cfg.model.revision is not None or not recorded[1]
            or recorded[0] != cfg.model.path):
        return cfg
    log.info("%s: resuming from hub model %s at the commit the run started from, %s",
             run_dir, cfg.model.path, recorded[1])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, revision=recorded[1]))


def supervised(task: Callable[[Any, Loaded, Any], tuple[Task, dict]]):
    """`run_recipe`'s `run` for a supervised recipe: `task(cfg, models, tokenizer)` -> (the
    loop's Task, keyword arguments of the HF export at the end when train.export_hf)."""
    def run(cfg, models: Loaded, run_dir: Path, mesh, raw: dict) -> dict[str, float]:
        the_task, export_kw = task(cfg, models, load_tokenizer(models.tok_dir))
        base = models.frozen if models.base is None else models.base

        def on_end(state):
            if cfg.train.export_hf:
                write_merged(run_dir / "hf", models.cfg, lora.combine(state.params, base),
                          models.hf_config, models.tok_dir, **export_kw)

        return train(run_dir=run_dir, cfg=cfg.train, optim=cfg.optim, mesh=mesh,
                     trainable=models.trainable, frozen=models.frozen,
                     frozen_shardings=models.frozen_shardings, task=the_task, run_config=raw,
                     on_end=on_end, model=models.cfg, remat_chosen=cfg.model.remat is not None,
                     scan_chosen=cfg.model.scan_layers is not None)
    return run
