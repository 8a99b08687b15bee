"""Frozen, validated configuration objects, one per concern.

Each config checks itself on construction, so a bad value fails where it is written,
with the offending key in the message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Mapping

ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "attn")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF architectures we read; anything else with model_type 'llama' (e.g. LlamaForTokenClassification,
# LlamaForQuestionAnswering) has other heads and is refused by name.
CAUSAL_LM_ARCHS = ("LlamaForCausalLM", "LLaMAForCausalLM")  # the second: early HF conversions
CLASSIFIER_ARCH = "LlamaForSequenceClassification"


class JaxalignError(ValueError):
    """Bad input that we can name: a file, row, tensor, key or mesh size. The CLI prints it
    as one line instead of a traceback."""


class ConfigError(JaxalignError):
    """A configuration value is missing, unknown or out of range."""


def require(cond: bool, msg: str) -> None:
    """Every config's validation: `msg` (naming the key) as a ConfigError unless `cond`."""
    if not cond:
        raise ConfigError(msg)


_require = require  # the short name this module's own checks use


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
    # too, recomputing only elementwise work.
    remat: Literal["none", "full", "dots", "attn"] = "none"
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
            _require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"model.num_heads ({self.num_heads}) must be a multiple of "
                 f"model.num_kv_heads ({self.num_kv_heads})")
        _require(self.rope_type in ROPE_TYPES,
                 f"model.rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        _require(self.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}")
        _require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
        _require(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}")
        _require(self.attention in ATTENTION_IMPLS, f"model.attention must be one of {ATTENTION_IMPLS}")
        _require(self.num_labels >= 0, f"model.num_labels must be >= 0, got {self.num_labels}")
        _require(self.lora_rank >= 0, f"lora.rank must be >= 0, got {self.lora_rank}")
        _require(0.0 <= self.lora_dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.lora_dropout}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        _require(not bad, f"lora.targets: unknown module(s) {bad}; expected some of {LORA_TARGETS}")

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
        model_type = hf.get("model_type")
        _require(model_type == "llama",
                 f"config.json: model_type {model_type!r} is not supported (only 'llama')")
        act = hf.get("hidden_act", "silu")
        _require(act == "silu", f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            _require(key in hf, f"config.json: required field {key!r} is missing")
        _require("num_labels" not in runtime,
                 "num_labels comes from config.json (its architectures); to put a score head on "
                 "a causal LM use checkpoint.load_model(path, num_labels=1)")
        num_labels = num_labels_from_hf(hf)

        # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta`
        # plus an optional `rope_scaling` dict. Accept both; where both are present,
        # `rope_scaling` wins, as in transformers (convert_rope_params_to_dict).
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ROPE_TYPES,
                 f"config.json: rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if rope_type in ("linear", "llama3"):
            _require("factor" in rope, f"config.json: rope type {rope_type!r} needs 'factor'")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _require(key in rope, f"config.json: llama3 rope scaling needs {key!r}")

        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            num_labels=num_labels,
            pad_token_id=_pad_id(hf.get("pad_token_id")),
            **runtime,
        )


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
    archs = list(hf.get("architectures") or [])
    known = CAUSAL_LM_ARCHS + (CLASSIFIER_ARCH,)
    _require(len(archs) <= 1 and all(a in known for a in archs),
             f"config.json: architectures {archs} is not supported; expected one of {list(known)}")
    if archs != [CLASSIFIER_ARCH]:
        return 0
    if hf.get("num_labels") is not None:
        n = int(hf["num_labels"])
    elif hf.get("id2label"):
        n = len(hf["id2label"])
    else:
        n = 2
    _require(n >= 1, f"config.json: {CLASSIFIER_ARCH} with {n} labels")
    return n


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh shape. One axis may be -1: it takes whatever devices are left."""

    data: int = 1                  # data-parallel replicas (batch split, params replicated)
    fsdp: int = -1                 # batch and parameters split (fully sharded data parallel)
    tensor: int = 1                # attention heads and MLP columns split (tensor parallel)

    def __post_init__(self):
        sizes = self.shape
        _require(all(s == -1 or s >= 1 for s in sizes),
                 f"mesh sizes must be >= 1 or -1, got data={self.data} fsdp={self.fsdp} "
                 f"tensor={self.tensor}")
        _require(sum(s == -1 for s in sizes) <= 1,
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
    path: str                      # HF dir, jaxalign checkpoint, training run dir or hub id org/name
    revision: str | None = None    # hub id only: branch, tag or commit (default main)
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"   # dtype the parameters (and optimizer moments) are kept in
    # Layer form and rematerialisation of the training forward; None: the measured default of
    # the backend (`jaxalign.runtime.train_layout`: scanned layers keeping projections and
    # attention, remat "attn", on CPU). remat "full" recomputes the most (least memory).
    scan_layers: bool | None = None
    remat: str | None = None       # none | full | dots | attn
    attention: str = "auto"        # auto | xla | cudnn (GPU flash attention, bf16)

    def __post_init__(self):
        # Checked here, so that a bad value is named as the YAML key, not as the model's
        # config.json that the loader builds the ModelConfig from.
        for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                             ("remat", (None,) + REMAT_POLICIES), ("attention", ATTENTION_IMPLS)):
            _require(getattr(self, key) in allowed,
                     f"model.{key} {getattr(self, key)!r} is not one of {allowed}")

    def runtime(self) -> dict[str, Any]:
        from jaxalign.runtime import train_layout
        scan, remat = train_layout()
        return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                    scan_layers=scan if self.scan_layers is None else self.scan_layers,
                    remat=remat if self.remat is None else self.remat, attention=self.attention)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters on chosen projections; the base weights stay frozen."""
    rank: int = 0                  # 0: full fine-tuning
    alpha: float = 16.0            # adapter scale = alpha / rank
    dropout: float = 0.0           # dropout on the adapter input
    targets: tuple[str, ...] = ("q_proj", "v_proj")   # HF projection names that get adapters

    def apply_to(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(lora_rank=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                           lora_targets=tuple(self.targets))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The supervised loop (`jaxalign.train.loop.train`). Its length is `steps` optimizer
    steps or `epochs` passes over the training examples (all datasets together; fractional
    allowed), exactly one of the two; the loop turns epochs into steps from the data."""
    steps: int | None = None        # optimizer steps of the run (or give epochs)
    epochs: float | None = None     # passes over the training examples (or give steps)
    batch_size: int                 # rows per optimizer step, all processes together
    grad_accum: int = 1             # micro-batches per step (batch_size / grad_accum rows each)
    seed: int = 0                   # parameter init (score head, LoRA), dropout
    log_every: int = 1              # metrics.jsonl gets every N-th step (and the last)
    eval_every: int = 0             # 0: evaluate only at the end (when there is eval data)
    eval_batches: int = 0           # 0: the whole eval set
    save_every: int = 0             # 0: checkpoint only at the end (and on SIGTERM / SIGINT)
    keep_checkpoints: int = 3       # the newest N checkpoints are kept
    max_bad_steps: int = 0          # non-finite steps skipped in a row before the run stops
    tensorboard: bool = True        # TensorBoard event files in run_dir/tensorboard
    wandb_project: str | None = None  # log to this Weights & Biases project (pip install 'jaxalign[wandb]')
    export_hf: bool = False         # write run_dir/hf at the end
    progress: bool = True           # the progress line on stderr (README: "What runs print")
    # Positions per LM-head chunk in token losses; 0 builds the full (B, T, V) logits.
    logits_chunk: int = 128
    # Memory per device (GiB) the pre-flight plans for; null: what the device / host reports.
    memory_limit_gb: float | None = None

    def __post_init__(self):
        _require(self.memory_limit_gb is None or self.memory_limit_gb > 0,
                 f"train.memory_limit_gb must be positive or null, got {self.memory_limit_gb}")
        _require((self.steps is None) != (self.epochs is None),
                 "train: give exactly one of train.steps and train.epochs, got "
                 f"steps={self.steps} epochs={self.epochs}")
        _require(self.epochs is None or self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _require(self.steps is None or self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        for key in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            _require(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "eval_batches", "save_every", "max_bad_steps", "logits_chunk"):
            _require(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        _require(self.batch_size % self.grad_accum == 0,
                 f"train.batch_size ({self.batch_size}) must be a multiple of "
                 f"train.grad_accum ({self.grad_accum})")
        if self.wandb_project:
            require_extra("wandb", "wandb", f"train.wandb_project={self.wandb_project}")


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
        _require(self.schedule in ("constant", "linear", "cosine"),
                 f"optim.schedule {self.schedule!r}: expected constant, linear or cosine")
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0,
                 f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0,
                 f"optim.max_grad_norm must be positive or null, got {self.max_grad_norm}")


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


# ----------------------------------------------------------------------------- YAML loading

def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
    """Builds a (nested) config dataclass from a dict; an unknown key is an error naming it."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}"
                          f" (known under {where or 'top level'}: {', '.join(sorted(fields))})")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = _dataclass_type(cls, name)
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{where}{name}.")
        elif sub is not None and hints.get(name) is sub:
            raise ConfigError(f"{where}{name}: expected a section of keys, got "
                              f"{'null' if value is None else repr(value)}")
        else:
            value = _coerce(hints.get(name), value, where + name)
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {where + missing[0]!r}"
                          + (f" (also missing: {', '.join(where + m for m in missing[1:])})"
                             if missing[1:] else "")
                          + f"; `jaxalign config` lists every key")
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    """A YAML scalar -> the field's declared type, or a ConfigError naming the key.

    YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string: numeric fields accept any string
    that parses as a number. bool is never taken for a number. Lists become tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if hint in (int, float, bool, str) or origin in (tuple, Literal):
            raise ConfigError(f"{key}: null is not allowed here")
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, key) if len(options) == 1 else value
    if isinstance(value, list):
        value = tuple(value)
    if origin is tuple and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = (value,)  # a single item written without brackets: `lora.targets: q_proj`
    if origin is tuple and isinstance(value, tuple) and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float or hint is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if hint is float:
            return float(number)
        if float(number) != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        # YAML reads `wandb_project: 2024` as a number; a list or mapping is a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _dataclass_type(cls, name: str):
    hint = typing.get_type_hints(cls).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` overrides, values parsed as YAML (3, true, [a, b]; from_dict turns a
    string such as 1e-4 into the number its field declares)."""
    import yaml
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p) or {}, Mapping):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is "
                                  f"{node[p]!r}, not a section of keys")
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str, overrides: list[str] = (), cls=None):
    """Reads a YAML config file, applies dotted overrides, builds `cls` (dict if None)."""
    import yaml
    from pathlib import Path
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    data = apply_overrides(data, list(overrides))
    return data if cls is None else from_dict(cls, data)
