"""Supervised fine-tuning: the shared loop + token cross-entropy on completion tokens."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxalign import checkpoint, sharding
from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.data.config import DataConfig
from jaxalign.data.pipeline import build_sft_data
from jaxalign.losses.xent import head_masked_xent, masked_xent
from jaxalign.models import functional, lora
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.loop import Task, TrainConfig, train
from jaxalign.train.optim import OptimConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the starting weights come from and how to run them."""
    path: str                      # HF dir or jaxalign checkpoint
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False      # unrolled steps ran 2x faster on CPU; scan compiles faster
    remat: str = "none"
    attention: str = "auto"        # auto | xla | cudnn (GPU flash attention, bf16)

    def runtime(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                    remat=self.remat, attention=self.attention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    rank: int = 0                  # 0: full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def apply_to(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                           lora_targets=tuple(self.targets))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    out_dir: str
    model: ModelSource
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()


def sft_loss_fn(cfg: ModelConfig, logits_chunk: int = 128):
    """loss_fn(trainable, frozen, batch, rng) for the shared train step.

    logits_chunk > 0: log-probs straight from the hidden states, `logits_chunk` positions at
    a time (the (B, T, V) logits are never built); 0: from the full logits.
    """
    def loss_fn(trainable, frozen, batch, rng):
        params = lora.combine(trainable, frozen)
        logits_BTV, hidden_BTD, _ = functional.apply(
            cfg, params, batch["tokens"], positions_BT=batch["positions"],
            segment_ids_BT=batch["segment_ids"], dropout_key=rng, return_logits=not logits_chunk)
        if not logits_chunk:
            return masked_xent(logits_BTV, batch["targets"], batch["loss_mask"])
        head, head_is_VD = functional.lm_head(cfg, params)
        return head_masked_xent(hidden_BTD, head, batch["targets"], batch["loss_mask"],
                                head_is_VD=head_is_VD, chunk=logits_chunk)
    return loss_fn


def load_policy(source: ModelSource, lora_cfg: LoRAConfig, mesh, seed: int):
    """-> (cfg, trainable, frozen, frozen_shardings, hf_config, tokenizer dir)."""
    cfg, params, hf_config, tok_dir = checkpoint.load_model(source.path, mesh, **source.runtime())
    cfg = lora_cfg.apply_to(cfg)
    shardings = functional.param_shardings(cfg, mesh)
    if cfg.lora_rank:
        params = lora.add_adapters(cfg, params, mesh, seed)
        trainable, frozen = lora.split(params)
        frozen_sh = lora.split(shardings)[1]
    else:
        trainable, frozen, frozen_sh = params, {}, {}
    return cfg, trainable, frozen, frozen_sh, hf_config, tok_dir


def write_run_config(run_dir: Path, raw: dict, algorithm: str = "sft") -> None:
    """The resolved config.yaml, and run.json naming the algorithm (which tells
    `jaxalign.train.runs.load_trained` how the checkpointed params are laid out)."""
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        (run_dir / "run.json").write_text(json.dumps({"algorithm": algorithm}) + "\n")


def run_sft(cfg: SFTConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Runs or resumes SFT in cfg.out_dir. `devices`: the mesh's devices (default: all)."""
    run_dir = Path(cfg.out_dir)
    raw = raw_config if raw_config is not None else json.loads(json.dumps(dataclasses.asdict(cfg)))
    write_run_config(run_dir, raw)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model_cfg, trainable, frozen, frozen_sh, hf_config, tok_dir = load_policy(
        cfg.model, cfg.lora, mesh, cfg.train.seed)
    tokenizer = load_tokenizer(tok_dir)
    data = build_sft_data(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count())
    task = Task(loss_fn=sft_loss_fn(model_cfg, cfg.train.logits_chunk), train_data=data.train,
                eval_data=(lambda: iter(data.eval)) if data.eval is not None else None)

    def on_end(state):
        if cfg.train.export_hf:
            from jaxalign.convert import hf
            merged_cfg, merged = lora.merge(model_cfg, lora.combine(state.params, frozen))
            hf.save(run_dir / "hf", merged_cfg, merged, hf_config=hf_config, source_dir=tok_dir)

    with jax.set_mesh(mesh):
        return train(run_dir=run_dir, cfg=cfg.train, optim=cfg.optim, mesh=mesh,
                     trainable=trainable, frozen=frozen, frozen_shardings=frozen_sh, task=task,
                     run_config=raw, on_end=on_end)
