"""The training recipes the CLI offers: command name -> config class, runner, help.

A recipe is named by `module:attribute` strings so that `jaxalign --help` imports no JAX.
Adding a supervised objective is a loss (`jaxalign.losses`), a data shape if it needs one,
a module with its config, `load` and `task` for `setup.run_recipe`, and one row here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: str          # "module:ConfigClass", the YAML's schema
    run: str             # "module:function", run(cfg, raw_config) -> last metrics
    help: str

    def load(self) -> tuple[type, Callable[..., dict[str, Any]]]:
        return _attr(self.config), _attr(self.run)


def _attr(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("jaxalign.train.sft:SFTConfig", "jaxalign.train.sft:run_sft",
                  "supervised fine-tuning"),
    "rm": Recipe("jaxalign.train.rm:RMConfig", "jaxalign.train.rm:run_rm",
                 "reward modelling (Bradley-Terry); train.export_hf writes an HF "
                 "<Family>ForSequenceClassification"),
    "dpo": Recipe("jaxalign.train.dpo:DPOConfig", "jaxalign.train.dpo:run_dpo",
                  "DPO and variants (sigmoid / cDPO, ipo, hinge, robust; orpo, simpo without "
                  "a reference model)"),
    "kto": Recipe("jaxalign.train.kto:KTOConfig", "jaxalign.train.kto:run_kto",
                  "KTO on unpaired {prompt, completion, label} rows"),
    "ppo": Recipe("jaxalign.train.rl.config:RLConfig", "jaxalign.train.rl.driver:run_rl",
                  "policy-gradient RL from a reward model / functions; `algorithm` picks a "
                  "row of jaxalign/train/rl/objectives.py"),
}
