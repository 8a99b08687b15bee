"""PPO and GRPO: configuration, the advantage computation and the loss functions.

Both algorithms share one driver (`jaxalign.train.rl.run_rl`): rollout -> score ->
advantages -> epochs of minibatches, each minibatch one optimizer step through the shared
`make_train_step`. They differ only here:

  ppo   per-token reward = -kl_coef * KL(policy || reference) plus the score on the last
        generated token; GAE over values from a value head on the policy trunk (or a separate
        critic); clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy.
  grpo  num_generations completions per prompt; the advantage of a completion is its score
        normalised within its group (every token gets it); no critic; clipped policy loss +
        beta * KL_k3(policy || reference) in the loss, as TRL's GRPOTrainer.

Losses read only arrays (`jaxalign.losses.ppo`); the configs below say which.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign.config import ConfigError, MeshConfig
from jaxalign.losses import ppo as L
from jaxalign.models import lora
from jaxalign.train.optim import OptimConfig
from jaxalign.train.reward import RewardConfig
from jaxalign.train.rollout import Models, PromptDataConfig, policy_forward, values
from jaxalign.train.sft import LoRAConfig, ModelSource

ALGORITHMS = ("ppo", "grpo")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    batch_size: int = 16            # prompts per iteration
    num_generations: int = 1        # completions per prompt (GRPO's group size, >= 2)
    max_new_tokens: int = 64
    temperature: float = 1.0        # the policy distribution PPO optimises is softmax(logits / T)
    top_p: float = 1.0
    top_k: int = 0
    decode_scan_layers: bool | None = None  # None: as model.scan_layers

    def __post_init__(self):
        for key in ("batch_size", "num_generations", "max_new_tokens"):
            _check(getattr(self, key) >= 1, f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0 (sampling), got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"rollout.top_k must be >= 0, got {self.top_k}")

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_generations


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOAlgoConfig:
    epochs: int = 4                 # passes over each rollout
    minibatches: int = 1            # optimizer steps per pass
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0           # entropy bonus
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_kind: str = "k1"             # per-token KL estimator in the reward: k1 or k3
    kl_coef: float = 0.05           # fixed, or the adaptive controller's start
    kl_target: float | None = None  # adaptive KL controller when set (per-sequence KL)
    kl_horizon: float = 10000.0
    max_approx_kl: float | None = None  # stop the epochs once an epoch's approx KL exceeds it
    value_model: str = "shared"     # 'shared' head on the policy trunk or a 'separate' critic
    critic_init: str = "policy"     # separate critic: from the 'policy' or the 'reward' model

    def __post_init__(self):
        _check(self.epochs >= 1 and self.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1")
        _check(self.clip_eps > 0 and self.value_clip_eps > 0, "ppo.clip_eps and ppo.value_clip_eps must be > 0")
        _check(self.kl_kind in ("k1", "k3"), f"ppo.kl_kind {self.kl_kind!r}: expected k1 or k3")
        _check(self.kl_coef >= 0, f"ppo.kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.kl_target is None or self.kl_target > 0, "ppo.kl_target must be positive or null")
        _check(self.kl_horizon > 0, "ppo.kl_horizon must be positive")
        _check(self.value_model in ("shared", "separate"),
               f"ppo.value_model {self.value_model!r}: expected shared or separate")
        _check(self.critic_init in ("policy", "reward"),
               f"ppo.critic_init {self.critic_init!r}: expected policy or reward")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    beta: float = 0.04              # coefficient of the k3 KL term in the loss
    scale_rewards: bool = True      # divide by the group's std (False: Dr. GRPO, centre only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    entropy_floor: float | None = None  # mean per-token entropy (nats) below this ...
    kl_ceiling: float | None = None     # ... or per-sequence KL above this ...
    action: str = "warn"                # ... 'warn' or 'stop' (after checkpointing the iteration)

    def __post_init__(self):
        _check(self.action in ("warn", "stop"), f"monitor.action {self.action!r}: expected warn or stop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLTrainConfig:
    iterations: int                 # rollout -> update cycles
    seed: int = 0
    grad_accum: int = 1             # micro-batches per minibatch step
    save_every: int = 0             # 0: only at the end (and on SIGTERM / SIGINT / errors)
    keep_checkpoints: int = 3
    sample_every: int = 10          # write sample completions every N iterations (0: never)
    num_samples: int = 2
    max_bad_steps: int = 0          # non-finite steps in a row allowed before the run stops
    logits_chunk: int = 128         # response positions per LM-head chunk
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True
    export_hf: bool = False

    def __post_init__(self):
        for key in ("iterations", "grad_accum", "keep_checkpoints", "logits_chunk"):
            _check(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "sample_every", "num_samples", "max_bad_steps"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    out_dir: str
    algorithm: str = "ppo"
    model: ModelSource
    data: PromptDataConfig
    reward: RewardConfig
    train: RLTrainConfig
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOAlgoConfig = PPOAlgoConfig()
    grpo: GRPOConfig = GRPOConfig()
    monitor: MonitorConfig = MonitorConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5)
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _check(self.algorithm in ALGORITHMS, f"algorithm {self.algorithm!r}: expected one of {ALGORITHMS}")
        rows = self.rollout.rows
        if self.algorithm == "grpo":
            _check(self.rollout.num_generations >= 2,
                   "algorithm grpo needs rollout.num_generations >= 2 (a group to compare within)")
        _check(rows % self.ppo.minibatches == 0,
               f"rollout.batch_size x rollout.num_generations = {rows} rows must split into "
               f"ppo.minibatches = {self.ppo.minibatches}")
        _check((rows // self.ppo.minibatches) % self.train.grad_accum == 0,
               f"a minibatch of {rows // self.ppo.minibatches} rows must split into "
               f"train.grad_accum = {self.train.grad_accum} micro-batches")
        _check(not (self.algorithm == "ppo" and self.ppo.value_model == "separate"
                    and self.ppo.critic_init == "reward" and self.reward.model is None),
               "ppo.critic_init: reward needs reward.model")

    @property
    def minibatch_rows(self) -> int:
        return self.rollout.rows // self.ppo.minibatches

    @property
    def total_steps(self) -> int:
        """Optimizer steps if no epoch stops early (what the LR schedule spans)."""
        return self.train.iterations * self.ppo.epochs * self.ppo.minibatches


# ----------------------------------------------------------------------------- pure parts

@dataclasses.dataclass(frozen=True)
class Objective:
    """What the loss and the advantages need, static and hashable (a compile cache key)."""
    algorithm: str
    temperature: float
    logits_chunk: int
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    ent_coef: float
    gamma: float
    lam: float
    whiten: bool
    kl_kind: str
    beta: float
    group_size: int
    scale_rewards: bool

    @classmethod
    def of(cls, cfg: RLConfig) -> "Objective":
        p = cfg.ppo
        return cls(algorithm=cfg.algorithm, temperature=float(cfg.rollout.temperature),
                   logits_chunk=cfg.train.logits_chunk, clip_eps=p.clip_eps,
                   value_clip_eps=p.value_clip_eps, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                   gamma=p.gamma, lam=p.lam, whiten=p.whiten_advantages,
                   kl_kind=p.kl_kind if cfg.algorithm == "ppo" else "k3", beta=cfg.grpo.beta,
                   group_size=cfg.rollout.num_generations, scale_rewards=cfg.grpo.scale_rewards)


def _masked_mean(x_BN, mask_BN):
    return (x_BN * mask_BN).sum() / jnp.maximum(mask_BN.sum(), 1.0)


def advantages(obj: Objective, exp: dict, scores_B: jax.Array, kl_coef: jax.Array) -> dict:
    """Advantages and returns of a scored rollout, plus the KL figures. Pure; jit with `obj`
    static. `kl_coef` is traced, so the adaptive controller never recompiles."""
    mask_BN = exp["mask_BN"].astype(jnp.float32)
    kl_BN = L.kl_penalty(exp["old_logp_BN"], exp["ref_logp_BN"], obj.kl_kind) * mask_BN
    out = {"kl_B": kl_BN.sum(1), "kl_token": _masked_mean(kl_BN, mask_BN)}
    if obj.algorithm == "ppo":
        B = mask_BN.shape[0]
        last_B = jnp.maximum(exp["lengths_B"] - 1, 0)
        # The score lands on the last generated token; the KL penalty on every token.
        rewards_BN = (-kl_coef * kl_BN).at[jnp.arange(B), last_B].add(scores_B.astype(jnp.float32))
        adv_BN, ret_BN = L.gae(rewards_BN, exp["values_BN"], mask_BN, gamma=obj.gamma, lam=obj.lam)
        if obj.whiten:
            adv_BN = L.whiten(adv_BN, mask_BN) * mask_BN
        out["explained_variance"] = L.explained_variance(exp["values_BN"], ret_BN, mask_BN)
    else:
        adv_B = L.group_advantages(scores_B, obj.group_size, scale=obj.scale_rewards)
        adv_BN, ret_BN = adv_B[:, None] * mask_BN, jnp.zeros_like(mask_BN)
    out.update(advantages_BN=adv_BN, returns_BN=ret_BN)
    return out


TRAIN_KEYS = ("tokens_BT", "positions_BT", "segment_ids_BT", "response_BN", "mask_BN",
              "old_logp_BN", "ref_logp_BN", "values_BN", "advantages_BN", "returns_BN")


def make_loss_fn(models: Models, obj: Objective):
    """loss_fn(trainable, frozen, batch, rng) for the shared train step. Dropout stays off:
    the ratio must be 1 before the first update (the old log-probs had none)."""
    def loss_fn(trainable, frozen, batch, rng):
        del rng
        policy = lora.combine(trainable["policy"], frozen["policy"])
        mask_BN = batch["mask_BN"].astype(jnp.float32)
        logp_BN, ent_BN, hidden_BND = policy_forward(models.policy, policy, batch,
                                                     temperature=obj.temperature,
                                                     chunk=obj.logits_chunk)
        loss, metrics = L.policy_loss(logp_BN, batch["old_logp_BN"], batch["advantages_BN"],
                                      mask_BN, clip_eps=obj.clip_eps)
        entropy = _masked_mean(ent_BN, mask_BN)
        loss = loss - obj.ent_coef * entropy
        metrics = dict(metrics, entropy=jax.lax.stop_gradient(entropy))
        if obj.algorithm == "ppo":
            v_BN = values(models, trainable, frozen, batch, hidden_BND)
            vloss, vmetrics = L.value_loss(v_BN, batch["values_BN"], batch["returns_BN"], mask_BN,
                                           clip_eps=obj.value_clip_eps)
            loss = loss + obj.vf_coef * vloss
            metrics.update(vmetrics)
        else:
            kl = _masked_mean(L.kl_penalty(logp_BN, batch["ref_logp_BN"], "k3"), mask_BN)
            loss = loss + obj.beta * kl
            metrics["kl_loss"] = jax.lax.stop_gradient(kl)
        metrics["weight"] = mask_BN.sum()
        return loss, metrics
    return loss_fn
