"""Supervised fine-tuning: the shared loop + token cross-entropy on completion tokens."""

from __future__ import annotations

import dataclasses

import jax

from jaxalign.config import ModelConfig, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.data.pipeline import build_sft_data
from jaxalign.losses.xent import head_masked_xent, masked_xent
from jaxalign.models import functional, lora
from jaxalign.train.loop import Task
from jaxalign.train.setup import Loaded, load_policy, run_recipe, supervised


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(RunConfig):
    data: DataConfig


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
                                head_is_VD=head_is_VD, chunk=logits_chunk,
                                softcap=cfg.final_logit_softcap)
    return loss_fn


def _task(cfg: SFTConfig, models: Loaded, tokenizer):
    data = build_sft_data(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count())
    loss_for = lambda model_cfg: sft_loss_fn(model_cfg, cfg.train.logits_chunk)
    return Task(loss_fn=loss_for(models.cfg), loss_for=loss_for, train_data=data.train,
                eval_data=(lambda: iter(data.eval)) if data.eval is not None else None), {}


def run_sft(cfg: SFTConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Runs or resumes SFT in cfg.out_dir. `devices`: the mesh's devices (default: all)."""
    return run_recipe(cfg, raw_config, devices, algorithm="sft",
                      load=lambda c, mesh: load_policy(c.model, c.lora, mesh, c.train.seed),
                      run=supervised(_task))
