"""DPO and its variants: the shared loop + reference log-probs outside the gradient + a
pairwise loss on sequence log-probs. ORPO and SimPO (`dpo.loss_type: orpo | simpo`) run
the same loop on the policy alone: no reference model is loaded or run for them.

The reference is the starting policy. With LoRA it is the same params run with the adapters
switched off (`use_lora=False`): no second copy of the model in memory. Without LoRA it is a
frozen copy held in the step's `frozen` tree, which the optimizer never sees. Its log-probs
are computed in the same jitted step, under `stop_gradient`, on the same rows: by default one
row [prompt | chosen | rejected] per pair (`data.share_prompt`, `jaxalign.data.layout`), the
LM head run only on the response positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign import checkpoint
from jaxalign.config import ConfigError, ModelConfig, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.data.preference import build_preference_data
from jaxalign.losses.preference import DPO_LOSSES, DPO_LOSS_TYPES, POLICY_ONLY_LOSS_TYPES, \
    dpo_loss, orpo_loss, simpo_loss
from jaxalign.train.recipes import RECIPES
from jaxalign.data.layout import laid_out
from jaxalign.models import functional, layout, lora
from jaxalign.train.loop import Task
from jaxalign.train.setup import Loaded, load_policy, run_recipe, supervised


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOOptions:
    """The pairwise loss: DPO and its variants."""
    beta: float = 0.1               # reward scale beta of log(pi / pi_ref); orpo: the odds-ratio weight
    loss_type: str = "sigmoid"      # sigmoid | ipo | hinge | robust | orpo | simpo
    simpo_gamma: float = 0.5        # simpo: target reward margin gamma
    label_smoothing: float = 0.0    # cDPO (sigmoid) / robust DPO noise rate
    reference_free: bool = False    # compare against a uniform reference
    # Sequence log-prob = sum over response tokens (DPO); IPO is usually run on the mean.
    average_logps: bool | None = None   # None: mean for ipo, sum otherwise
    reference: str | None = None    # a different reference model (HF dir / run); None: the start

    def __post_init__(self):
        types = DPO_LOSS_TYPES + POLICY_ONLY_LOSS_TYPES
        if self.loss_type not in types:
            raise ConfigError(f"dpo.loss_type {self.loss_type!r} is not one of {types}")
        if self.loss_type in POLICY_ONLY_LOSS_TYPES:
            why = {"reference": "uses no reference model", "average_logps": "always "
                   "length-normalises", "label_smoothing": "has no label smoothing"}
            for key, value in (("reference", self.reference), ("average_logps", self.average_logps),
                               ("label_smoothing", self.label_smoothing or None)):
                if value is not None:
                    raise ConfigError(f"dpo.{key}: loss_type {self.loss_type!r} {why[key]}; "
                                      f"remove dpo.{key}")
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        row = DPO_LOSSES.get(self.loss_type)
        if row and row.label_smoothing and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if row and not row.label_smoothing and self.label_smoothing:
            raise ConfigError(f"dpo.label_smoothing has no effect with loss_type "
                              f"{self.loss_type!r}; remove it")

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and self.loss_type not in POLICY_ONLY_LOSS_TYPES

    @property
    def average(self) -> bool:
        if self.average_logps is not None:
            return self.average_logps
        return self.loss_type in DPO_LOSSES and DPO_LOSSES[self.loss_type].average


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(RunConfig):
    data: DataConfig
    dpo: DPOOptions = DPOOptions()


def pair_logps(cfg: ModelConfig, params, batch: dict, *, average: bool, chunk: int,
               dropout_key=None, use_lora: bool = True) -> jax.Array:
    """(B, 2) sequence log-probs of (chosen, rejected) over their response tokens, from a
    layout batch (`jaxalign.data.layout`: one shared row per pair, or two rows)."""
    return layout.branch_logps(cfg, params, batch, branches=2, average=average, chunk=chunk,
                               dropout_key=dropout_key, use_lora=use_lora)


def dpo_loss_fn(cfg: ModelConfig, opts: DPOOptions, *, ref_cfg: ModelConfig | None,
                chunk: int = 128):
    """Frozen tree: {'base': LoRA base weights or {}, 'ref': a separate reference or {}}.
    ref_cfg None: the reference is the policy with adapters off (LoRA)."""
    def loss_fn(trainable, frozen, batch, rng):
        params = lora.combine(trainable, frozen["base"])
        if opts.loss_type in POLICY_ONLY_LOSS_TYPES:
            return policy_only_loss(opts, pair_logps(cfg, params, batch, average=False,
                                                     chunk=chunk, dropout_key=rng), batch)
        pol_B2 = pair_logps(cfg, params, batch, average=opts.average, chunk=chunk,
                            dropout_key=rng)
        if opts.reference_free:
            ref_B2 = jnp.zeros_like(pol_B2)
        else:
            ref_B2 = reference_logps(cfg, ref_cfg, params, frozen, batch, average=opts.average,
                                     chunk=chunk)
        return dpo_loss(pol_B2[:, 0], pol_B2[:, 1], ref_B2[:, 0], ref_B2[:, 1], beta=opts.beta,
                        loss_type=opts.loss_type, label_smoothing=opts.label_smoothing,
                        reference_free=opts.reference_free, pair_mask_B=batch["pair_mask"])
    return loss_fn


def reference_logps(cfg: ModelConfig, ref_cfg: ModelConfig | None, params, frozen, batch: dict,
                    *, average: bool, chunk: int) -> jax.Array:
    """(B, 2) `pair_logps` of the reference, outside the gradient: the policy with adapters
    off when ref_cfg is None (LoRA), else the frozen copy frozen['ref']."""
    if ref_cfg is None:
        ref_B2 = pair_logps(cfg, jax.lax.stop_gradient(params), batch, average=average,
                            chunk=chunk, use_lora=False)
    else:
        ref_B2 = pair_logps(ref_cfg, frozen["ref"], batch, average=average, chunk=chunk)
    return jax.lax.stop_gradient(ref_B2)


def policy_only_loss(opts: DPOOptions, sums_B2: jax.Array, batch: dict):
    """ORPO / SimPO from the policy's (chosen, rejected) log-prob sums and token counts."""
    lens_B2 = layout.branch_counts(batch, 2)
    args = (sums_B2[:, 0], sums_B2[:, 1], lens_B2[:, 0], lens_B2[:, 1])
    if opts.loss_type == "orpo":
        return orpo_loss(*args, lam=opts.beta, pair_mask_B=batch["pair_mask"])
    return simpo_loss(*args, beta=opts.beta, gamma=opts.simpo_gamma,
                      pair_mask_B=batch["pair_mask"])


def load_dpo_models(cfg, mesh, section: str = "dpo") -> Loaded:
    """Policy + reference: frozen = {'base': LoRA base, 'ref': reference params}; extra
    ['ref_cfg']: the reference's config, or None when it is the policy with adapters off (or
    when the objective uses none). The options are cfg.<section> (`reference`,
    `uses_reference`): DPO's, or another objective's with a reference model (KTO)."""
    opts = getattr(cfg, section)
    policy = load_policy(cfg.model, cfg.lora, mesh, cfg.train.seed)
    model_cfg = policy.cfg
    ref_cfg, ref, ref_sh = None, {}, {}
    if opts.uses_reference and (opts.reference is not None or not model_cfg.lora_rank):
        # A separate frozen reference: the given model, or a copy of the starting policy.
        path = opts.reference or cfg.model.path
        revision = None if opts.reference else cfg.model.revision
        ref_cfg, ref, _, _ = checkpoint.load_model(path, mesh, revision=revision,
                                                   **cfg.model.runtime())
        if ref_cfg.lora_rank:
            ref_cfg, ref = lora.merge(ref_cfg, ref)
        if ref_cfg.vocab_size != model_cfg.vocab_size:
            raise ConfigError(f"{section}.reference {path}: vocab size {ref_cfg.vocab_size} "
                              f"differs from the policy's {model_cfg.vocab_size}")
        ref_sh = functional.param_shardings(ref_cfg, mesh)
    return dataclasses.replace(policy, frozen={"base": policy.frozen, "ref": ref},
                               frozen_shardings={"base": policy.frozen_shardings, "ref": ref_sh},
                               base=policy.frozen, extra={"ref_cfg": ref_cfg})


def preference_task(section: str, build_data, make_loss):
    """`setup.supervised`'s task for an objective on (pair or unpaired) batches with an
    optional reference: cfg.<section> holds its options, build_data(data cfg, tokenizer,
    batch_size=...) its loaders, make_loss(model cfg, options, ref_cfg=..., chunk=...) its loss; the progress line
    shows RECIPES[section].progress."""
    def task(cfg, models: Loaded, tokenizer):
        data = build_data(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count())
        def loss_for(model_cfg):
            return make_loss(model_cfg, getattr(cfg, section), ref_cfg=models.extra["ref_cfg"],
                             chunk=cfg.train.logits_chunk)
        # Pairs (KTO: a row and its KL row) share their prompt: one row each by default.
        train, eval_data = laid_out(data, share=cfg.data.share_prompt, pad_id=data.pad_id)
        return Task(loss_fn=loss_for(models.cfg), loss_for=loss_for, train_data=train,
                    eval_data=eval_data, perplexity=False, progress=RECIPES[section].progress), {}
    return task


def run_dpo(cfg: DPOConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Runs (or resumes) DPO (or ORPO / SimPO) in cfg.out_dir."""
    return run_recipe(cfg, raw_config, devices, algorithm="dpo", load=load_dpo_models,
                      run=supervised(preference_task("dpo", build_preference_data, dpo_loss_fn)))
