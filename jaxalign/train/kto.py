"""KTO: the shared loop + reference log-probs outside the gradient + `kto_loss`, on unpaired
labelled rows (`jaxalign.data.unpaired`: TRL's {prompt, completion, label}).

Each batch row carries its own completion and a mismatched one (another row's completion
after the same prompt), so one forward pass over 2B rows gives both the rewards and the KL
reference point, exactly as for DPO's (chosen, rejected). The reference is DPO's: the policy
with adapters off under LoRA, else a frozen copy of the start (or `kto.reference`).
"""

from __future__ import annotations

import dataclasses

import functools

from jaxalign.config import ModelConfig, RunConfig, require, require_at_least
from jaxalign.data.config import DataConfig
from jaxalign.data.unpaired import build_unpaired_data
from jaxalign.losses.kto import kto_loss
from jaxalign.models import lora
from jaxalign.train.dpo import load_dpo_models, pair_logps, preference_task, reference_logps
from jaxalign.train.setup import run_recipe, supervised


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOOptions:
    """The KTO loss on labelled rows."""
    beta: float = 0.1                 # scale of the implicit reward beta * log(pi / pi_ref)
    desirable_weight: float = 1.0     # lambda_D: raise it when desirable rows are scarcer
    undesirable_weight: float = 1.0   # lambda_U
    reference: str | None = None      # a different reference model (HF dir / run); None: the start

    def __post_init__(self):
        require(self.beta > 0, f"kto.beta must be > 0, got {self.beta}")
        require_at_least(self, "kto", 0, "desirable_weight", "undesirable_weight")
        require(self.desirable_weight + self.undesirable_weight > 0,
                "kto.desirable_weight and kto.undesirable_weight are both 0")

    @property
    def uses_reference(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig(RunConfig):
    data: DataConfig
    kto: KTOOptions = KTOOptions()


def kto_loss_fn(cfg: ModelConfig, opts: KTOOptions, *, ref_cfg: ModelConfig | None,
                chunk: int = 128):
    """loss_fn for the shared step; frozen as in `dpo_loss_fn` ({'base', 'ref'}). Column 0 of
    the (B, 2) log-probs is each row's completion, column 1 its mismatched KL completion."""
    def loss_fn(trainable, frozen, batch, rng):
        params = lora.combine(trainable, frozen["base"])
        pol_B2 = pair_logps(cfg, params, batch, average=False, chunk=chunk, dropout_key=rng)
        ref_B2 = reference_logps(cfg, ref_cfg, params, frozen, batch, average=False, chunk=chunk)
        return kto_loss(pol_B2[:, 0], ref_B2[:, 0], pol_B2[:, 1], ref_B2[:, 1], batch["label"],
                        beta=opts.beta, desirable_weight=opts.desirable_weight,
                        undesirable_weight=opts.undesirable_weight,
                        row_mask_B=batch["pair_mask"])
    return loss_fn


def run_kto(cfg: KTOConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Runs (or resumes) KTO in cfg.out_dir."""
    return run_recipe(cfg, raw_config, devices, algorithm="kto",
                      load=functools.partial(load_dpo_models, section="kto"),
                      run=supervised(preference_task("kto", build_unpaired_data, kto_loss_fn)))
