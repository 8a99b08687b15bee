"""Every key of an RL run's YAML (`jaxalign ppo`), except the shared model / lora / optim /
mesh sections of `jaxalign.config`.

`algorithm` picks a row of the objectives table (`objectives.OBJECTIVES`); validation reads
that row's properties (group size, value model), never its name. The `ppo` section holds the
policy-gradient settings every objective uses (epochs, minibatches, clipping) and the KL
penalty of objectives that put it in the reward; `grpo` the in-loss KL coefficient and the
group normalisation.
"""

from __future__ import annotations

import dataclasses

from jaxalign.config import LoopConfig, OptimConfig, RunConfig, require, require_at_least
from jaxalign.data.config import DatasetSpec
from jaxalign.train.rl.objectives import OBJECTIVES, Objective

NORMALIZE = ("none", "batch", "running")
CONVENTIONS = ("auto", "trl", "jaxalign")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    """The prompts the policy completes.

    prompts         a dataset (path or spec) whose rows hold "prompt" (a string or a message
                       list) or "messages" (a trailing assistant turn is dropped); its other
                       columns reach the reward functions as keyword arguments.
    chat            render with the tokenizer's chat template + generation prompt.
    max_prompt_len  longer prompts are dropped (counted and logged), not cut.
    shuffle, seed   a fresh seeded permutation of the prompts every epoch.
    eval_prompts    held-out prompts (same row formats) that train.eval_every scores the
                       policy on; their reference answers (answer_field, else a column
                       answer / reference / completion) give exact match and ROUGE-L.
    answer_field    the eval prompts' column holding the reference answer."""
    prompts: DatasetSpec | str
    chat: bool = False
    max_prompt_len: int = 256
    shuffle: bool = True
    seed: int = 0
    eval_prompts: DatasetSpec | str | None = None
    answer_field: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", DatasetSpec.coerce(self.prompts, "data.prompts"))
        if self.eval_prompts is not None:
            object.__setattr__(self, "eval_prompts",
                               DatasetSpec.coerce(self.eval_prompts, "data.eval_prompts"))
        require(self.max_prompt_len >= 1, f"data.max_prompt_len must be >= 1, got {self.max_prompt_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How a completion is scored: a reward model, reward functions or both.

    model                reward model: directory, run directory or hub model hf://org/name (or null)
    revision             hub id only: branch, tag or commit of reward.model (default main)
    functions            'module:function' (importable) or 'path/file.py:function' reward
                         functions (summed with the model's score); they run as code
    weights              one weight per source, the model first (default: all 1)
    missing_eos_penalty  subtracted from the score of a completion that did not end with EOS
    normalize            'none', 'batch' (whiten over the rollout) or 'running' (whiten with
                         running mean / std over all rollouts so far, kept in the checkpoint)
    clip                 clip the (normalised) score to [-clip, clip]
    convention           how reward functions are called: 'auto' (TRL's for a function from
                         a trl module or naming completion_ids / trainer_state / log_extra /
                         log_metric, else jaxalign's), 'trl' (as TRL's GRPOTrainer: message
                         lists on conversational data, completion_ids, trainer_state) or
                         'jaxalign' (prompt / completion strings, the columns it names)"""
    model: str | None = None
    revision: str | None = None
    functions: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    missing_eos_penalty: float | None = None
    normalize: str = "none"
    clip: float | None = None
    convention: str = "auto"

    def __post_init__(self):
        require(self.convention in CONVENTIONS,
               f"reward.convention {self.convention!r}: expected one of {CONVENTIONS}")
        if isinstance(self.functions, str):
            object.__setattr__(self, "functions", (self.functions,))
        require(self.model is not None or bool(self.functions),
               "reward: give reward.model, reward.functions or both")
        n = len(self.functions) + (self.model is not None)
        require(not self.weights or len(self.weights) == n,
               f"reward.weights has {len(self.weights)} entries for {n} reward "
               f"source(s) (the model first, then each function)")
        for name in self.functions:
            require(isinstance(name, str) and name.count(":") == 1 and all(name.split(":")),
                   f"reward.functions: {name!r} is not of the form module:function")
        require(self.normalize in NORMALIZE,
               f"reward.normalize {self.normalize!r}: expected one of {NORMALIZE}")
        require(self.clip is None or self.clip > 0,
               f"reward.clip must be positive or null, got {self.clip}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Sampling the completions of one iteration."""
    batch_size: int = 16            # prompts per iteration
    num_generations: int = 1        # completions per prompt (the group of GRPO / RLOO)
    max_new_tokens: int = 64        # completion length limit
    min_new_tokens: int = 0         # EOS not sampled before this many tokens (0: off; not in eval)
    temperature: float = 1.0        # the policy distribution PPO optimises is softmax(logits / T)
    top_p: float = 1.0              # nucleus sampling (1: off)
    top_k: int = 0                  # sample among the k likeliest tokens (0: off)
    decode_scan_layers: bool | None = None  # the prefill's layer form; None: as model.scan_layers
    # Compute dtype of sampling; None: the policy's. bfloat16 decodes from bf16 copies of the
    # weights (half the bytes a step reads); the log-probs PPO trains on still come from the
    # training forward, and `logprob_gap` reports how far the sampler's own ones drift.
    decode_dtype: str | None = None

    def __post_init__(self):
        require_at_least(self, "rollout", 1, "batch_size", "num_generations", "max_new_tokens")
        require(self.temperature > 0, f"rollout.temperature must be > 0 (sampling), got {self.temperature}")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"rollout.top_k must be >= 0, got {self.top_k}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens,
               f"rollout.min_new_tokens must be in [0, rollout.max_new_tokens = "
               f"{self.max_new_tokens}], got {self.min_new_tokens}")
        require(self.decode_dtype in (None, "float32", "bfloat16"),
               f"rollout.decode_dtype must be float32 or bfloat16, got {self.decode_dtype!r}")

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_generations


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOAlgoConfig:
    """The policy-gradient update of every objective; kl_* and the value settings apply to
    the objectives whose properties ask for them (KL in the reward, a value model)."""
    epochs: int = 4                 # passes over each rollout
    minibatches: int = 1            # optimizer steps per pass
    clip_eps: float = 0.2           # policy ratio clipped to [1 - eps, 1 + eps]
    value_clip_eps: float = 0.2     # value prediction kept within eps of the rollout's
    vf_coef: float = 0.1            # weight of the value loss (value-model objectives)
    ent_coef: float = 0.0           # entropy bonus
    gamma: float = 1.0              # discount of GAE
    lam: float = 0.95               # lambda of GAE
    whiten_advantages: bool = True  # advantages to zero mean, unit std per rollout
    kl_kind: str = "k1"             # per-token KL estimator in the reward: k1 or k3
    kl_coef: float = 0.05           # fixed, or the adaptive controller's start
    kl_target: float | None = None  # adaptive KL controller when set (per-sequence KL)
    kl_horizon: float = 10000.0     # adaptive controller's horizon (steps), as in TRL / Ziegler et al.
    max_approx_kl: float | None = None  # stop the epochs once an epoch's approx KL exceeds it
    reuse_old_logp: bool = True     # old log-probs from the first update's forward where exact
    value_model: str = "shared"     # 'shared' head on the policy trunk or a 'separate' critic
    critic_init: str = "policy"     # separate critic: from the 'policy' or the 'reward' model

    def __post_init__(self):
        require(self.epochs >= 1 and self.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1")
        require(self.clip_eps > 0 and self.value_clip_eps > 0, "ppo.clip_eps and ppo.value_clip_eps must be > 0")
        require(self.kl_kind in ("k1", "k3"), f"ppo.kl_kind {self.kl_kind!r}: expected k1 or k3")
        require(self.kl_coef >= 0, f"ppo.kl_coef must be >= 0, got {self.kl_coef}")
        require(self.kl_target is None or self.kl_target > 0, "ppo.kl_target must be positive or null")
        require(self.kl_horizon > 0, "ppo.kl_horizon must be positive")
        require(self.value_model in ("shared", "separate"),
               f"ppo.value_model {self.value_model!r}: expected shared or separate")
        require(self.critic_init in ("policy", "reward"),
               f"ppo.critic_init {self.critic_init!r}: expected policy or reward")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO's in-loss KL and group normalisation."""
    beta: float = 0.04              # coefficient of the k3 KL term in the loss
    scale_rewards: bool = True      # divide by the group's std (False: Dr. GRPO, centre only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """Warnings (or a stop) when the policy collapses or drifts."""
    entropy_floor: float | None = None  # trips when the mean per-token entropy (nats) is below this
    kl_ceiling: float | None = None     # trips when the per-sequence KL is above this
    action: str = "warn"                # on a trip: 'warn' or 'stop' (after checkpointing the iteration)

    def __post_init__(self):
        require(self.action in ("warn", "stop"), f"monitor.action {self.action!r}: expected warn or stop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLTrainConfig(LoopConfig):
    """The RL driver's loop (`jaxalign.train.rl.driver`); the keys every loop reads are
    `LoopConfig`'s (its steps are iterations here; logits_chunk >= 1)."""
    iterations: int                 # rollout -> update cycles
    sample_every: int = 10          # write sample completions every N iterations (0: never)
    num_samples: int = 2            # completions written each time
    # Held-out evaluation (`heldout.py`): every N iterations sample data.eval_prompts (0: never)
    eval_every: int = 0
    eval_temperature: float = 0.0   # 0: greedy; else sampled at this temperature (own RNG)
    # Keep the policy of the best evaluation in run_dir/best by this eval metric (e.g.
    # eval/exact_match, eval/reward, eval/reward/<function>); null: keep none
    best_metric: str | None = None
    best_mode: str = "max"          # 'max' or 'min': which direction of best_metric is better
    # Stop (checkpointed, exit 0) after N evaluations without a new best (0: never)
    early_stop_patience: int = 0

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, "train", 1, "iterations", "logits_chunk")
        require_at_least(self, "train", 0, "sample_every", "num_samples", "eval_every",
                         "eval_temperature", "early_stop_patience")
        require(self.best_mode in ("max", "min"),
               f"train.best_mode {self.best_mode!r}: expected max or min")
        require(self.best_metric is None or self.eval_every > 0,
               "train.best_metric needs train.eval_every > 0 (and data.eval_prompts)")
        require(not self.early_stop_patience or self.best_metric is not None,
               "train.early_stop_patience needs train.best_metric (what must improve)")
        if self.best_metric is not None and not self.best_metric.startswith("eval/"):
            object.__setattr__(self, "best_metric", f"eval/{self.best_metric}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig(RunConfig):
    """out_dir, model, lora and mesh as every recipe (`RunConfig`); its own train section."""
    algorithm: str = "ppo"          # a row of objectives.OBJECTIVES
    data: PromptDataConfig
    reward: RewardConfig
    train: RLTrainConfig
    optim: OptimConfig = OptimConfig(lr=1e-5)
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOAlgoConfig = PPOAlgoConfig()
    grpo: GRPOConfig = GRPOConfig()
    monitor: MonitorConfig = MonitorConfig()

    def __post_init__(self):
        require(self.algorithm in OBJECTIVES,
               f"algorithm {self.algorithm!r}: expected one of {tuple(OBJECTIVES)}")
        obj, rows = self.objective, self.rollout.rows
        require(self.rollout.num_generations >= obj.min_generations,
               f"algorithm {self.algorithm} needs rollout.num_generations >= "
               f"{obj.min_generations} (a group to compare within)")
        require(rows % self.ppo.minibatches == 0,
               f"rollout.batch_size x rollout.num_generations = {rows} rows must split into "
               f"ppo.minibatches = {self.ppo.minibatches}")
        require((rows // self.ppo.minibatches) % self.train.grad_accum == 0,
               f"a minibatch of {rows // self.ppo.minibatches} rows must split into "
               f"train.grad_accum = {self.train.grad_accum} micro-batches")
        require(not self.train.eval_every or self.data.eval_prompts is not None,
               "train.eval_every needs data.eval_prompts (the held-out prompts)")
        require(not (obj.needs_value and self.ppo.value_model == "separate"
                    and self.ppo.critic_init == "reward" and self.reward.model is None),
               "ppo.critic_init: reward needs reward.model")

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.algorithm]

    @property
    def minibatch_rows(self) -> int:
        return self.rollout.rows // self.ppo.minibatches

    @property
    def total_steps(self) -> int:
        """Optimizer steps if no epoch stops early (what the LR schedule spans)."""
        return self.train.iterations * self.ppo.epochs * self.ppo.minibatches


