"""What an RL run loads before its first iteration: the roles (policy, reference, reward
model, critic), the tokenizer, the prompts (and held-out prompts) and the reward sources,
with the cheap checks first so that a bad name fails before any model is read."""

from __future__ import annotations

import dataclasses
import logging

from jaxalign import distributed
from jaxalign.config import JaxalignError
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.rl import heldout as H, prompts as RP
from jaxalign.train.rl.config import RLConfig
from jaxalign.train.rl.rewards import Rewarder, check_reward_model_dir
from jaxalign.train.rl.roles import Roles, build_roles

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    """What `run_recipe` loads for an RL run: the roles, the tokenizer, the prompts and the
    reward sources; .cfg / .hf_config / .tok_dir describe the policy (run.json)."""
    roles: Roles
    tokenizer: object
    prompts: RP.Prompts
    rewarder: Rewarder
    eval_prompts: RP.Prompts | None = None   # data.eval_prompts (held-out evaluation)

    @property
    def cfg(self):
        return self.roles.models.policy

    @property
    def hf_config(self) -> dict:
        return self.roles.hf_config

    @property
    def tok_dir(self) -> str:
        return self.roles.tok_dir


def load(cfg: RLConfig, mesh) -> Loaded:
    """Checks what can fail cheaply first (rows over the mesh, reward function names, the
    reward model's kind, the prompts), then loads every role."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.rollout.rows % shards or cfg.minibatch_rows % (shards * cfg.train.grad_accum):
        raise JaxalignError(f"{cfg.rollout.rows} rollout rows / minibatches of "
                            f"{cfg.minibatch_rows} rows (x train.grad_accum) must split over "
                            f"data x fsdp = {shards} devices")
    distributed.process_rows(mesh, cfg.rollout.rows)  # each process's rows: one block
    rewarder = Rewarder(cfg.reward)   # imports the reward functions: a bad name fails here
    if cfg.reward.model is not None:
        # a wrong kind (or a hub id not in the cache) fails before any model loads
        check_reward_model_dir(cfg.reward.model, cfg.reward.revision)
    holder = {}

    def tokenizer_and_prompts(tok_dir):
        tok = load_tokenizer(tok_dir)
        holder["prompts"] = RP.read_prompts(cfg.data, tok)
        if cfg.data.eval_prompts is not None:
            holder["eval"] = H.read_eval_prompts(cfg, tok)
        return tok

    roles, tokenizer = build_roles(cfg, mesh, tokenizer_and_prompts, rewarder)
    prompts = holder["prompts"]
    log.info("%s: %d prompts; %s, %d iterations of %d prompts x %d generation(s)",
             prompts.name, len(prompts.ids), cfg.algorithm, cfg.train.iterations,
             cfg.rollout.batch_size, cfg.rollout.num_generations)
    return Loaded(roles, tokenizer, prompts, rewarder, holder.get("eval"))
