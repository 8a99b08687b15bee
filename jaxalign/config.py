"""Frozen, validated configuration objects, one per concern.

Each config checks itself on construction, so a bad value fails where it is written,
with the offending key in the message. Reading them from YAML files: `configfile.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "attn")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
LAYER_TYPES = ("sliding_attention", "full_attention")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The HF model_types and architectures we read are the families' (jaxalign.families).


from jaxalign import families
from jaxalign.errors import ConfigError, JaxalignError  # noqa: F401 (re-exported)
# Reading YAML files into these classes (re-exported: most callers import it from here).
from jaxalign.configfile import apply_overrides, from_dict, load_yaml  # noqa: F401
from jaxalign.families.base import HIDDEN_ACTS, ROPE_TYPES


def require(cond: bool, msg: str) -> None:
    """Every config's validation: `msg` (naming the key) as a ConfigError unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def require_at_least(cfg, section: str, minimum, *keys: str) -> None:
    """`section.key must be >= minimum` for each of `keys` (a NaN fails too)."""
    for key in keys:
        value = getattr(cfg, key)
        require(value >= minimum, f"{section}.{key} must be >= {minimum}, got {value}")


def require_extra(module: str, extra: str, setting: str) -> None:
    """An optional dependency asked for by `setting` (e.g. "train.wandb_project=x"): refused
    at config time, naming the extra that installs it, instead of an ImportError mid-run."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{setting} needs the {module} package, which is not installed: "
                          f"pip install 'jaxalign[{extra}]'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder plus how we run it.

    The first group mirrors the Hugging Face `LlamaConfig` fields we support; the second
    (dtypes, layer scanning, remat) only changes how the same numbers are computed.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: Literal["default", "linear", "llama3"] = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # The model family (jaxalign.families): its HF names and conversion rows. Its block
    # differences are the flags below; each one off costs the Llama block nothing.
    family: str = "llama"
    qkv_bias: bool = False             # biases on q, k, v but not o (Qwen2)
    qk_norm: bool = False              # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # keys within this many positions only (Mistral, Phi-3)
    # Gemma 2 / 3. `layer_types` (config.json's, one per layer): the window applies to the
    # "sliding_attention" layers only (None: to every layer). `gemma_block`: RMSNorms scale
    # by (1 + w), norms after attention and after the MLP too, embeddings times sqrt(D).
    layer_types: tuple[str, ...] | None = None
    gemma_block: bool = False
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"   # the MLP gate's activation
    query_pre_attn_scalar: float | None = None   # attention scale scalar**-0.5 (else head_dim)
    attn_logit_softcap: float | None = None      # scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcap: float | None = None     # LM logits -> c * tanh(logits / c) (Gemma 2)
    rope_local_theta: float | None = None        # RoPE base of the sliding layers (Gemma 3)
    # 0: causal LM (LM head or tied embedding). > 0: a sequence classifier as in HF
    # LlamaForSequenceClassification, i.e. a `score` (hidden -> num_labels, no bias) read at the
    # rightmost token that is not `pad_token_id`, and no LM head; 1 = the scalar head of reward
    # and value models.
    num_labels: int = 0
    # config.json's pad_token_id. A classifier scores each row at its rightmost real token
    # whose id is not this one: transformers' rule, so an exported reward model gives the
    # same scores there (heads.scored_token_index).
    pad_token_id: int | None = None

    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Scanned layers compile in constant time; unrolled layers ran a train step 2x faster
    # on a 2-core CPU (docs/architecture.md, CPU facts). Same parameter layout either way.
    scan_layers: bool = True
    # What the backward recomputes (jax.checkpoint per layer): "none" nothing; "full" all but
    # each layer's input; "dots" keeps the projections' outputs; "attn" keeps the attention's
    # output and log-sum-exp too (O(T)), recomputing only elementwise work.
    remat: Literal["none", "full", "dots", "attn"] = "none"
    # Rows of at most this many tokens run the training forward's layers unrolled and without
    # remat, longer ones as scan_layers / remat say (0: never). The CPU's bf16 default
    # (`runtime.train_layout`): unrolled is faster on short rows, scanned on long ones.
    unroll_up_to: int = 0
    # Attention kernel of the training / scoring forward (the KV-cache decode always uses XLA):
    # "xla" materialises the (T, S) scores; "cudnn" is cuDNN's fused flash attention (GPU,
    # bf16 compute only); "auto" picks cudnn where it applies, else xla.
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # LoRA adapters (rank 0 = none) on the named HF projections; scale = alpha / rank.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim"):
            require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        require(self.num_heads % self.num_kv_heads == 0,
                 f"model.num_heads ({self.num_heads}) must be a multiple of "
                 f"model.num_kv_heads ({self.num_kv_heads})")
        require(self.rope_type in ROPE_TYPES,
                 f"model.rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        require(self.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}")
        require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
        require(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}")
        require(self.attention in ATTENTION_IMPLS, f"model.attention must be one of {ATTENTION_IMPLS}")
        require(self.family in families.FAMILIES,
                 f"model.family {self.family!r} is not one of {sorted(families.FAMILIES)}")
        require(self.sliding_window is None or self.sliding_window > 0,
                 f"model.sliding_window must be positive or null, got {self.sliding_window}")
        require(self.hidden_act in HIDDEN_ACTS,
                 f"model.hidden_act {self.hidden_act!r} is not one of {HIDDEN_ACTS}")
        require(self.layer_types is None or (
            len(self.layer_types) == self.num_layers and set(self.layer_types) <= set(LAYER_TYPES)),
            f"model.layer_types must list one of {LAYER_TYPES} per layer ({self.num_layers}), "
            f"got {self.layer_types}")
        require(self.num_labels >= 0, f"model.num_labels must be >= 0, got {self.num_labels}")
        require(self.lora_rank >= 0, f"lora.rank must be >= 0, got {self.lora_rank}")
        require(0.0 <= self.lora_dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.lora_dropout}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        require(not bad, f"lora.targets: unknown module(s) {bad}; expected some of {LORA_TARGETS}")

    def without_lora(self) -> "ModelConfig":
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("lora_")}
        return dataclasses.replace(self, **defaults)

    def lora_on(self, target: str) -> bool:
        return self.lora_rank > 0 and target in self.lora_targets

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime) -> "ModelConfig":
        """Reads a Hugging Face `config.json` dict (transformers 4 or 5 layout).

        Anything we would have to approximate is refused with the field that caused it.
        """
        require("num_labels" not in runtime,
                 "num_labels comes from config.json (its architectures); to put a score head on "
                 "a causal LM use checkpoint.load_model(path, num_labels=1)")
        return cls(**families.read_config(hf), pad_token_id=_pad_id(hf.get("pad_token_id")),
                   **runtime)


def _pad_id(value) -> int | None:
    # Some configs write a list (several eos ids do); transformers compares with one id.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def num_labels_from_hf(hf: Mapping[str, Any]) -> int:
    """0 for a causal LM; the label count of a LlamaForSequenceClassification.

    transformers 5 writes `id2label` (not `num_labels`); where both are present, `num_labels`
    wins, as in PretrainedConfig. With neither, transformers' default is 2 labels.
    """
    return families.num_labels(hf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh shape. One axis may be -1: it takes whatever devices are left."""

    data: int = 1                  # data-parallel replicas (batch split, params replicated)
    fsdp: int = -1                 # batch and parameters split (fully sharded data parallel)
    tensor: int = 1                # attention heads and MLP columns split (tensor parallel)

    def __post_init__(self):
        sizes = self.shape
        require(all(s == -1 or s >= 1 for s in sizes),
                 f"mesh sizes must be >= 1 or -1, got data={self.data} fsdp={self.fsdp} "
                 f"tensor={self.tensor}")
        require(sum(s == -1 for s in sizes) <= 1,
                 f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} "
                 f"tensor={self.tensor}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


# ----------------------------------------------------------------------------- run sections
# The sections every training recipe shares (model, lora, train, optim, mesh) live here, so
# that a reader of one YAML file needs this module, the recipe's own config and at most one
# data config (tests/test_structure.py checks it).

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the starting weights come from and how to run them."""
    path: str                      # HF dir, jaxalign checkpoint, training run dir or hf://org/name
    revision: str | None = None    # hub id only: branch, tag or commit (default main)
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"   # dtype the parameters (and optimizer moments) are kept in
    # Layer form and rematerialisation of the training forward; None: the measured default of
    # the backend and dtype (`jaxalign.runtime.train_layout`; on CPU scanned layers keeping
    # projections and attention, remat "attn", and in bfloat16 rows of up to 512 tokens
    # unrolled without remat). remat "full" recomputes the most (least memory). A remat
    # policy set without scan_layers runs scanned: unrolled, XLA merges the recomputation back.
    scan_layers: bool | None = None
    remat: str | None = None       # none | full | dots | attn
    attention: str = "auto"        # auto | xla | cudnn (GPU flash attention, bf16)

    def __post_init__(self):
        # Checked here, so that a bad value is named as the YAML key, not as the model's
        # config.json that the loader builds the ModelConfig from.
        for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                             ("remat", (None,) + REMAT_POLICIES), ("attention", ATTENTION_IMPLS)):
            require(getattr(self, key) in allowed,
                     f"model.{key} {getattr(self, key)!r} is not one of {allowed}")

    def runtime(self) -> dict[str, Any]:
        from jaxalign.runtime import train_layout
        scan, remat, unroll_up_to = train_layout(self.dtype)
        if self.scan_layers is not None or self.remat is not None:
            unroll_up_to = 0      # a layout asked for is the layout run, whatever the rows
        if self.scan_layers is None and self.remat not in (None, "none"):
            # A remat policy asked for without a layer form runs in scanned layers, the form
            # in which it lowers the peak: unrolled, XLA merges the recomputation back into the
            # forward (bf16 SmolLM2 SFT step on CPU, XLA's temporaries: unrolled 3.30 GiB
            # without remat, 3.37 GiB with full remat even under prevent_cse; scanned with full
            # remat 1.55 GiB).
            scan = True
        return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                    scan_layers=scan if self.scan_layers is None else self.scan_layers,
                    remat=remat if self.remat is None else self.remat, attention=self.attention,
                    unroll_up_to=unroll_up_to)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters on chosen projections; the base weights stay frozen."""
    rank: int = 0                  # 0: full fine-tuning
    alpha: float = 16.0            # adapter scale = alpha / rank
    dropout: float = 0.0           # dropout on the adapter input
    targets: tuple[str, ...] = ("q_proj", "v_proj")   # HF projection names that get adapters

    def apply_to(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                           # a family may name fused HF modules (Phi-3's qkv_proj)
                           lora_targets=families.lora_targets(cfg.family, tuple(self.targets)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The `train` keys every loop reads (the loop shell, `jaxalign.train.shell`): the
    supervised loop's `TrainConfig` and the RL driver's `RLTrainConfig` add their own."""
    grad_accum: int = 1             # micro-batches per optimizer step (each a 1 / grad_accum share of its rows)
    seed: int = 0                   # parameter init (score head, LoRA), dropout; RL: sampling, prompt order
    save_every: int = 0             # checkpoint every N steps / iterations (0: off); always at the end, on SIGTERM
    save_every_minutes: float = 30.0  # also after N minutes without a checkpoint (0: off)
    keep_checkpoints: int = 3       # the newest N checkpoints are kept
    max_bad_steps: int = 0          # non-finite steps skipped in a row before the run stops
    tensorboard: bool = True        # TensorBoard event files in run_dir/tensorboard
    wandb_project: str | None = None  # log to this Weights & Biases project (pip install 'jaxalign[wandb]')
    export_hf: bool = False         # write run_dir/hf (the trained model; RL: the policy) at the end
    progress: bool = True           # the progress line on stderr (README: "What runs print")
    # Positions per LM-head chunk in token losses; 0 builds the full (B, T, V) logits.
    logits_chunk: int = 128
    # Memory per device (GiB) the pre-flight plans for; null: what the device / host reports.
    memory_limit_gb: float | None = None
    # bf16 compute over fp32 params: each step's forward reads the trainable weights rounded
    # to bf16 stochastically (unbiased), not to nearest, which hides updates below half a bf16
    # step (small learning rates); evaluations read them the same way. false: to nearest.
    stochastic_rounding: bool = True

    def __post_init__(self):
        require(self.memory_limit_gb is None or self.memory_limit_gb > 0,
                 f"train.memory_limit_gb must be positive or null, got {self.memory_limit_gb}")
        require_at_least(self, "train", 1, "grad_accum", "keep_checkpoints")
        require_at_least(self, "train", 0, "save_every", "save_every_minutes", "max_bad_steps",
                         "logits_chunk")
        if self.wandb_project:
            require_extra("wandb", "wandb", f"train.wandb_project={self.wandb_project}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """The supervised loop (`jaxalign.train.loop.train`). Its length is `steps` optimizer
    steps or `epochs` passes over the training examples (all datasets together; fractional
    allowed), exactly one of the two; the loop turns epochs into steps from the data."""
    steps: int | None = None        # optimizer steps of the run (or give epochs)
    epochs: float | None = None     # passes over the training examples (or give steps)
    batch_size: int                 # rows per optimizer step, all processes together
    log_every: int = 1              # metrics.jsonl gets every N-th step (and the last)
    eval_every: int = 0             # 0: evaluate only at the end (when there is eval data)
    eval_batches: int = 0           # 0: the whole eval set

    def __post_init__(self):
        super().__post_init__()
        require((self.steps is None) != (self.epochs is None),
                 "train: give exactly one of train.steps and train.epochs, got "
                 f"steps={self.steps} epochs={self.epochs}")
        require(self.epochs is None or self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        require(self.steps is None or self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        require_at_least(self, "train", 1, "batch_size", "log_every")
        require_at_least(self, "train", 0, "eval_every", "eval_batches")
        require(self.batch_size % self.grad_accum == 0,
                 f"train.batch_size ({self.batch_size}) must be a multiple of "
                 f"train.grad_accum ({self.grad_accum})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (`jaxalign.train.optim`)."""
    lr: float = 2e-5                   # peak learning rate
    schedule: Literal["constant", "linear", "cosine"] = "cosine"   # decay after the warmup
    warmup_steps: int = 0              # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0          # final lr / peak lr for linear and cosine decay
    weight_decay: float = 0.0          # AdamW decoupled weight decay
    b1: float = 0.9                    # Adam first-moment decay
    b2: float = 0.999                  # Adam second-moment decay
    eps: float = 1e-8                  # Adam denominator epsilon
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self):
        require(self.schedule in ("constant", "linear", "cosine"),
                 f"optim.schedule {self.schedule!r}: expected constant, linear or cosine")
        for key, ok, rule in (   # Adam: b2 = 1 (1 - b2^t = 0) or eps = 0 make NaN params
                ("lr", self.lr > 0, "positive"), ("eps", self.eps > 0, "positive"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "positive or null"),
                ("b1", 0 <= self.b1 < 1, "in [0, 1)"), ("b2", 0 <= self.b2 < 1, "in [0, 1)")):
            require(ok, f"optim.{key} must be {rule}, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The sections of every supervised recipe's YAML; a recipe's config adds `data` and its
    own options section (sft.py, rm.py, dpo.py)."""
    out_dir: str                   # the run directory; rerunning on it resumes
    model: ModelSource
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()
