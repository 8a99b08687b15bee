"""Reward modelling: the shared loop + a scalar head + the Bradley-Terry loss.

The reward model is the policy architecture with its LM head replaced by a score head
(`heads.add_score_head`); it starts from an HF causal LM, an SFT run or an existing reward
model. Chosen and rejected responses go through one forward pass, by default as one row
[prompt | chosen | rejected] per pair (`data.share_prompt`), each scored at its own last token.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxalign.config import LoRAConfig, ModelConfig, ModelSource, RunConfig, \
    require_at_least
from jaxalign.data.config import DataConfig
from jaxalign.data.preference import build_preference_data
from jaxalign.losses.preference import bradley_terry
from jaxalign.train.recipes import RECIPES
from jaxalign.data.layout import laid_out
from jaxalign.models import functional, layout, lora
from jaxalign.train.loop import Task
from jaxalign.train.setup import Loaded, load_start, run_recipe, supervised


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMOptions:
    """The Bradley-Terry loss of reward modelling."""
    center_coef: float = 0.0        # coef * mean((r_c + r_r)^2) keeps rewards near zero
    # Required reward gap: -log sigmoid(r_c - r_r - margin), added to each pair's own `margin`
    # column where the data has one (TRL's RewardTrainer subtracts that column likewise).
    margin: float = 0.0

    def __post_init__(self):
        require_at_least(self, "rm", 0, "center_coef")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig(RunConfig):
    data: DataConfig
    rm: RMOptions = RMOptions()


def rm_loss_fn(cfg: ModelConfig, opts: RMOptions):
    def loss_fn(trainable, frozen, batch, rng):
        params = lora.combine(trainable, frozen)
        r_B2 = layout.branch_scores(cfg, params, batch, branches=2, dropout_key=rng)
        # The rows' margin column (zeros without one) plus the configured constant.
        margin_B = batch["margin"] + opts.margin if "margin" in batch else None
        if margin_B is None and opts.margin:
            margin_B = jax.numpy.full(r_B2.shape[:1], opts.margin, jax.numpy.float32)
        return bradley_terry(r_B2[:, 0], r_B2[:, 1], margin_B=margin_B,
                             center_coef=opts.center_coef, pair_mask_B=batch["pair_mask"])
    return loss_fn


def split_trainable(cfg: ModelConfig, params):
    """(trainable, frozen). With LoRA the fresh score head trains beside the adapters."""
    if not cfg.lora_rank:
        return params, {}
    adapters, base = lora.split(params)
    adapters["score"] = base.pop("score")
    return adapters, base


def init_reward_model(source: ModelSource, lora_cfg: LoRAConfig, mesh, seed: int) -> Loaded:
    """The reward model to train: any model source with a (fresh, for a causal LM) score head."""
    cfg, params, hf_config, tok_dir = load_start(source.path, mesh, num_labels=1, seed=seed,
                                                 revision=source.revision, **source.runtime())
    cfg = lora_cfg.apply_to(cfg)
    if cfg.lora_rank:
        params = lora.add_adapters(cfg, params, mesh, seed)
    trainable, frozen = split_trainable(cfg, params)
    frozen_sh = split_trainable(cfg, functional.param_shardings(cfg, mesh))[1]
    return Loaded(cfg, trainable, frozen, frozen_sh, hf_config, tok_dir)


def _task(cfg: RMConfig, models: Loaded, tokenizer):
    data = build_preference_data(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    train, eval_data = laid_out(data, share=cfg.data.share_prompt, pad_id=data.pad_id)
    loss_for = lambda model_cfg: rm_loss_fn(model_cfg, cfg.rm)
    task = Task(loss_fn=loss_for(models.cfg), loss_for=loss_for, train_data=train,
                eval_data=eval_data, perplexity=False, progress=RECIPES["rm"].progress)
    return task, {"pad_token_id": data.pad_id}


def run_rm(cfg: RMConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Trains (or resumes) a reward model in cfg.out_dir; `train.export_hf` writes
    run_dir/hf as an HF LlamaForSequenceClassification directory."""
    return run_recipe(cfg, raw_config, devices, algorithm="rm",
                      load=lambda c, mesh: init_reward_model(c.model, c.lora, mesh, c.train.seed),
                      run=supervised(_task))
