"""The roles of an RL run (policy, reference, value, reward), loaded once, and what they
cost in memory.

  policy     the trained model (LoRA: adapters trainable, base frozen)
  reference  LoRA: the policy with its adapters switched off (no memory); else a frozen copy
  value      objectives that need one (PPO): a scalar head on the policy trunk ('shared'), or
             a separate critic Llama with a score head, from the policy or the reward model
             ('separate'); none otherwise
  reward     a frozen reward model (aux['reward']) and / or Python functions (host side)

`memory_report` logs (and writes to memory.json) the param bytes of every role and the
compiled programs' memory analysis (arguments, outputs, temporaries), before the first update.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxalign import sharding
from jaxalign.models import lora
from jaxalign.models.llama import score_init_std
from jaxalign.train import preflight
from jaxalign.train.rl import rollout as R
from jaxalign.train.rl.config import RLConfig
from jaxalign.train.rl.rewards import RewardModelError, load_frozen_reward_model
from jaxalign.train.setup import load_policy, load_start

log = logging.getLogger(__name__)


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Roles:
    models: R.Models
    trainable: dict
    frozen: dict
    aux: dict
    hf_config: dict
    tok_dir: str
    bytes: dict
    judge: object = None   # a reward model with its own tokenizer (evaluate.judge.Judge)


def _copy(tree):
    # A real copy: the policy's buffers are donated to every update.
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def _value_head(d: int, mesh, seed: int) -> dict:
    w = score_init_std(d) * jax.random.normal(jax.random.PRNGKey(seed), (d, 1), jnp.float32)
    return {"score": jax.device_put(w, sharding.replicated(mesh))}


def _critic(cfg: RLConfig, mesh, reward):
    """A separate critic: a Llama with a score head from the policy or the reward model. With
    LoRA its trunk trains through its own adapters (and, from the reward model, shares its
    frozen weights); the score head always trains."""
    runtime = cfg.model.runtime()
    if cfg.ppo.critic_init == "reward":
        ccfg, base = reward
        base = base if cfg.lora.rank else _copy(base)
    else:
        ccfg, base, _, _ = load_start(cfg.model.path, mesh, num_labels=1,
                                      seed=cfg.train.seed + 2, revision=cfg.model.revision,
                                      **runtime)
    if not cfg.lora.rank:
        return ccfg, base, {}
    ccfg = cfg.lora.apply_to(ccfg)
    adapters, frozen = lora.split(lora.add_adapters(ccfg, base, mesh, cfg.train.seed + 3))
    frozen = dict(frozen)
    adapters["score"] = _copy(frozen.pop("score"))
    return ccfg, adapters, frozen


def build_roles(cfg: RLConfig, mesh, tokenizer_cb, rewarder=None) -> tuple[Roles, object]:
    """Loads every model the run needs. `tokenizer_cb(tok_dir)` loads the tokenizer and the
    prompts (so bad data fails before the other models load) and returns the tokenizer. A
    reward model with another tokenizer is handed to `rewarder` (it scores decoded text)."""
    policy = load_policy(cfg.model, cfg.lora, mesh, cfg.train.seed)
    policy_cfg, p_train, p_frozen = policy.cfg, policy.trainable, policy.frozen
    tokenizer = tokenizer_cb(policy.tok_dir)
    aux, trainable, frozen = {}, {"policy": p_train}, {"policy": p_frozen}
    reward, judge = None, None
    if cfg.reward.model is not None:
        *reward, judge = load_frozen_reward_model(cfg.reward.model, mesh, tokenizer,
                                                  revision=cfg.reward.revision,
                                                  **cfg.model.runtime())
        if judge is not None and cfg.objective.needs_value and cfg.ppo.value_model != "shared" \
                and cfg.ppo.critic_init == "reward":
            raise RewardModelError(f"ppo.critic_init: reward needs a reward model with the "
                                   f"policy's tokenizer; {cfg.reward.model} has another")
        if judge is None:   # scored inside the rollout on the policy's ids
            aux["reward"] = reward[1]
        elif rewarder is not None:
            rewarder.judge = judge
    ref = "adapters_off" if cfg.lora.rank else "copy"
    if ref == "copy":
        aux["ref"] = _copy(p_train)
    value, critic_cfg = "none", None
    if cfg.objective.needs_value:
        value = cfg.ppo.value_model
        if value == "shared":
            trainable["value_head"] = _value_head(policy_cfg.hidden_size, mesh, cfg.train.seed + 1)
        else:
            critic_cfg, trainable["critic"], frozen["critic"] = _critic(cfg, mesh, reward)
    models = R.Models(policy=policy_cfg, ref=ref, value=value, critic=critic_cfg,
                      reward=reward[0] if reward and judge is None else None)
    # A LoRA critic from the reward model shares its frozen trunk: count those buffers once.
    shared = {id(x) for x in jax.tree.leaves(aux.get("reward", {}))}
    sizes = {"policy_trainable": nbytes(p_train), "policy_frozen": nbytes(p_frozen),
              "reference": nbytes(aux.get("ref", {})),
              "value": nbytes({k: v for k, v in trainable.items() if k != "policy"})
              + nbytes([x for x in jax.tree.leaves(frozen.get("critic", {}))
                         if id(x) not in shared]),
              "reward_model": nbytes(reward[1] if reward else {})}
    return Roles(models, trainable, frozen, aux, policy.hf_config, str(policy.tok_dir),
                 sizes, judge), tokenizer


def memory_report(run_dir: Path, roles: Roles, cfg: RLConfig, opt_bytes: int,
                   programs: dict) -> dict:
    b = roles.bytes
    ref = ("shared: the policy with LoRA adapters off" if roles.models.ref == "adapters_off"
           else _mib(b["reference"]) + " (frozen copy)")
    value = {"shared": "head on the policy trunk", "separate": "separate critic",
             "none": "none"}[roles.models.value]
    reward = " + ".join(([f"model {_mib(b['reward_model'])}"] if cfg.reward.model else [])
                        + list(cfg.reward.functions))
    log.info("memory, params (global): policy %s trainable + %s frozen | reference %s | value %s "
             "%s | reward %s | optimizer state %s", _mib(b["policy_trainable"]),
             _mib(b["policy_frozen"]), ref, value, _mib(b["value"]), reward, _mib(opt_bytes))
    report = {"params_bytes": dict(b, optimizer_state=opt_bytes), "programs": {}}
    for name, exe in programs.items():
        m = exe.memory_analysis()
        if m is None:
            continue
        stats = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
                 ("argument", "output", "alias", "temp", "generated_code")}
        stats["peak_estimate"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
        report["programs"][name] = stats
        log.info("memory, compiled %s (per device): arguments %s, outputs %s (%s aliased), "
                 "temporaries %s -> peak about %s", name, _mib(stats["argument"]),
                 _mib(stats["output"]), _mib(stats["alias"]), _mib(stats["temp"]),
                 _mib(stats["peak_estimate"]))
    if jax.process_index() == 0:
        (run_dir / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_memory(run_dir: Path, mesh, roles: Roles, cfg: RLConfig, state, programs: dict | None,
                 report: dict | None) -> dict | None:
    """The memory pre-flight (`preflight.check`) over every role's compiled programs (None:
    `preflight.check_resident`, before anything is compiled): the
    rollout holds the policy, frozen and auxiliary (reference, reward) params; the train step
    the state and the frozen params; all of them stay resident throughout."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.minibatch_rows // cfg.train.grad_accum
    knobs = preflight.Knobs(remat=roles.models.policy.remat, grad_accum=cfg.train.grad_accum,
                            can_double_accum=micro % 2 == 0 and (micro // 2) % shards == 0,
                            lora_rank=cfg.lora.rank, fsdp=mesh.shape["fsdp"],
                            devices=jax.device_count())
    resident = {"params": state.params, "optimizer": (state.opt_state, state.rng, state.step),
                "frozen": roles.frozen, "aux": roles.aux}
    if programs is None:  # before compiling: the resident arrays alone
        return preflight.check_resident(run_dir, mesh, resident, knobs, cfg.train.memory_limit_gb)
    args = {"rollout": [state.params, roles.frozen, roles.aux], "advantages": [],
            "train_step": [state, roles.frozen]}
    return preflight.check(
        run_dir, mesh, {name: (exe, args.get(name, [])) for name, exe in programs.items()},
        resident, knobs, cfg.train.memory_limit_gb, report)
