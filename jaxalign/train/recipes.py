"""The training recipes: THE table that the CLI, `jaxalign plan`, the pipeline's stages and
wiring, the progress line and the config reference (docs/config.md) all read.

A recipe is named by `module:attribute` strings so that `jaxalign --help` imports no JAX.
Adding a supervised objective is a loss (`jaxalign.losses`), a data shape if it needs one,
a module with its config, `load` and `task` for `setup.run_recipe`, and one row here; with
that row it is a command, a pipeline stage, a section of the config reference, and (with a
`planner`) plannable. tests/test_structure.py checks that each reader sees every row.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Input:
    """A pipeline default: `key` of the recipe's section is set to the run dir of the earlier
    stage `stage` when that stage ran, the key is unset and the key `unless` is unset too."""
    key: str
    stage: str
    unless: str = ""


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: str          # "module:ConfigClass", the YAML's schema
    run: str             # "module:function", run(cfg, raw_config, devices) -> last metrics
    help: str
    progress: tuple[str, ...]        # the metric keys its progress line shows, in order
    planner: str | None = None       # "module:Planner" for `jaxalign plan`; None: not planned
    policy: bool = True              # its run dir holds a policy (not a reward model)
    # Pipeline wiring: what the section takes from earlier stages. After these, model.path
    # defaults to the pipeline's starting model.
    inputs: tuple[Input, ...] = ()

    def load(self) -> tuple[type, Callable[..., dict[str, Any]]]:
        return attr(self.config), attr(self.run)


def attr(name: str):
    """The object a "module:attribute" string names (imported on demand)."""
    module, _, name = name.partition(":")
    return getattr(importlib.import_module(module), name)


_FROM_SFT = Input("model.path", "sft")

# The order is the pipeline's default stage order (between data and eval).
RECIPES: dict[str, Recipe] = {
    "sft": Recipe("jaxalign.train.sft:SFTConfig", "jaxalign.train.sft:run_sft",
                  "supervised fine-tuning",
                  progress=("loss", "token_accuracy", "tokens_per_s"),
                  planner="jaxalign.train.plan:SFT_PLANNER"),
    "rm": Recipe("jaxalign.train.rm:RMConfig", "jaxalign.train.rm:run_rm",
                 "reward modelling (Bradley-Terry); train.export_hf writes an HF "
                 "<Family>ForSequenceClassification",
                 progress=("loss", "accuracy", "margin"),
                 planner="jaxalign.train.plan:RM_PLANNER", policy=False, inputs=(_FROM_SFT,)),
    "ppo": Recipe("jaxalign.train.rl.config:RLConfig", "jaxalign.train.rl.driver:run_rl",
                  "policy-gradient RL from a reward model / functions; `algorithm` picks a "
                  "row of jaxalign/train/rl/objectives.py",
                  progress=("reward_mean", "kl", "entropy", "response_length"),
                  inputs=(_FROM_SFT, Input("reward.model", "rm", unless="reward.functions"))),
    "dpo": Recipe("jaxalign.train.dpo:DPOConfig", "jaxalign.train.dpo:run_dpo",
                  "DPO and variants (sigmoid / cDPO, ipo, hinge, robust; orpo, simpo without "
                  "a reference model)",
                  progress=("loss", "rewards/accuracies", "rewards/margins"),
                  planner="jaxalign.train.plan:DPO_PLANNER", inputs=(_FROM_SFT,)),
    "kto": Recipe("jaxalign.train.kto:KTOConfig", "jaxalign.train.kto:run_kto",
                  "KTO on unpaired {prompt, completion, label} rows",
                  progress=("loss", "rewards/accuracies", "rewards/margins", "kl"),
                  planner="jaxalign.train.plan:KTO_PLANNER", inputs=(_FROM_SFT,)),
}
