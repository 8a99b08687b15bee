"""The eval config: the same shape as the training configs (sections), validated on
construction; a bad value is one line naming its key.

    out_dir: runs/eval
    models:                    # which models are compared
      policies: {sft: runs/sft, dpo: runs/dpo}
      reference: sft           # the baseline: a policy name or a model path
      reward_model: runs/rm/hf
    data:                      # held-out data, each list optional
      pairs: [...]             # preference pairs: reward-model and DPO-implied accuracy
      prompts: [...]           # prompts to complete: ROUGE-L / exact match, win rate, KL, samples
      heldout: [...]           # SFT-format rows: token-weighted perplexity
    eval: {batch_size: 8, seq_len: 512, max_new_tokens: 64, temperature: 0.0, samples: 16}
    lm_eval: {task_file: tasks/my_task.yaml}   # optional, needs the `lmeval` extra
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping

from jaxalign.config import DTYPES, ConfigError, from_dict, load_yaml, require, require_at_least
from jaxalign.data.config import DatasetSpec, dataset_specs

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names become metric keys and file names
REFERENCE = "reference"  # the name a reference given as a path (or found in a run dir) takes

# Keys of the flat eval config this one replaced, and where each now lives.
MOVED = {"policy": "models.policies", "reference": "models.reference",
         "reward_model": "models.reward_model", "pairs": "data.pairs", "prompts": "data.prompts",
         **{k: f"eval.{k}" for k in ("seq_len", "max_prompt_len", "limit", "batch_size", "beta",
                                     "max_new_tokens", "temperature", "seed", "dtype")}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalModels:
    """Models: HF directories, jaxalign checkpoints or training run directories."""
    # {name: path} of the policies under test; a single path is named "policy".
    policies: dict[str, str]
    # The baseline every other policy is compared with (win rate, KL, DPO-implied reward):
    # a name in policies (e.g. the SFT policy) or a model path (then named "reference").
    # None: with one policy that is a run dir, the model it started from; else no comparison.
    reference: str | None = None
    reward_model: str | None = None    # judge of win rates and reward accuracy

    def __post_init__(self):
        policies = self.policies
        if isinstance(policies, str):
            policies = {"policy": policies}
        require(isinstance(policies, Mapping) and len(policies) > 0,
                 "models.policies must map names to model paths, e.g. {sft: runs/sft}")
        for name, path in policies.items():
            require(isinstance(name, str) and NAME.match(name) is not None,
                     f"models.policies: name {name!r} must be letters, digits, '_', '-' or '.'")
            require(isinstance(path, str) and path.strip() != "",
                     f"models.policies.{name} must be a model path, got {path!r}")
        object.__setattr__(self, "policies", dict(policies))
        require(self.reference is None or (isinstance(self.reference, str) and self.reference),
                 f"models.reference must be a policy name or a model path, got {self.reference!r}")
        require(not (self.reference not in (None, *policies) and REFERENCE in policies),
                 f"models.policies.{REFERENCE}: the name is taken by models.reference given as "
                 f"a path; rename the policy or name it in models.reference")
        require(self.reward_model is None or (isinstance(self.reward_model, str)
                                               and self.reward_model.strip() != ""),
                 f"models.reward_model must be a model path, got {self.reward_model!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalData:
    """Held-out data (dataset specs as in training: a path or {path, format, split, ...})."""
    pairs: tuple[DatasetSpec, ...] = ()    # preference pairs
    prompts: tuple[DatasetSpec, ...] = ()  # prompts (prompt / chat / pair rows) to complete
    heldout: tuple[DatasetSpec, ...] = ()  # SFT-format rows for perplexity (trained tokens only)
    # Column of the prompt rows holding the reference answer (ROUGE-L, exact match); None:
    # the first of answer, reference, completion present, else the last assistant turn.
    answer_field: str | None = None
    chat: bool | None = None               # prompts in the chat template; None: if there is one
    chat_template: str | None = None       # instead of the tokenizer's (as data.chat_template)
    cache_dir: str | None = None           # HF datasets cache for hub datasets

    def __post_init__(self):
        for key in ("pairs", "prompts", "heldout"):
            value = getattr(self, key)
            object.__setattr__(self, key, dataset_specs(value, f"data.{key}") if value else ())
        require(self.answer_field is None or (isinstance(self.answer_field, str)
                                               and self.answer_field != ""),
                 f"data.answer_field must be a column name or null, got {self.answer_field!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How the measurements run: batch shapes, sampling, limits."""
    batch_size: int = 8                # rows per forward / generation call (the last is padded)
    seq_len: int = 512                 # pair and held-out rows are cut / padded to this
    max_prompt_len: int | None = None  # longer prompts keep their end (as training does)
    limit: int = 0                     # at most this many pairs, prompts, held-out rows per file (0: all)
    max_new_tokens: int = 64           # completion length limit (EOS ends a row sooner)
    temperature: float = 0.0           # 0: greedy completions (KL is then measured on them)
    top_p: float = 1.0                 # nucleus sampling mass (1: off)
    top_k: int = 0                     # sample among the k likeliest tokens (0: off)
    samples: int = 16                  # prompts in samples.jsonl (0: all)
    seed: int = 0                      # sampling seed (batch k uses seed + k * batch_size)
    beta: float = 0.1                  # scale of the DPO-implied reward (accuracy ignores it)
    rouge_stemmer: bool = False        # rouge-score's Porter stemmer
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of every model
    bootstrap: int = 1000              # percentile-bootstrap resamples of each interval (0: none)
    confidence: float = 0.95           # the intervals' confidence level

    def __post_init__(self):
        require_at_least(self, "eval", 1, "batch_size", "max_new_tokens")
        require_at_least(self, "eval", 0, "limit", "samples", "seed", "top_k", "temperature",
                         "bootstrap")
        require_at_least(self, "eval", 2, "seq_len")
        require(self.max_prompt_len is None or 1 <= self.max_prompt_len < self.seq_len,
                 f"eval.max_prompt_len must be null or in [1, eval.seq_len), got {self.max_prompt_len}")
        require(0 < self.top_p <= 1, f"eval.top_p must be in (0, 1], got {self.top_p}")
        require(self.beta > 0, f"eval.beta must be positive, got {self.beta}")
        require(0 < self.confidence < 1, f"eval.confidence must be in (0, 1), got {self.confidence}")
        require(self.dtype in DTYPES, f"eval.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMEvalConfig:
    """One lm-evaluation-harness task from a local task file, run on HF exports of policies."""
    task_file: str                     # a task YAML; its folder is the harness' include path
    task: str | None = None            # default: the file's `task:` name
    policies: tuple[str, ...] = ()     # names in models.policies (default: all of them)
    limit: int | None = None           # examples per task (None: all)
    num_fewshot: int | None = None     # few-shot examples (None: the task's own setting)
    batch_size: int = 8                # the harness' batch size

    def __post_init__(self):
        require(isinstance(self.task_file, str) and self.task_file != "",
                 "lm_eval.task_file must be a path to a task YAML")
        require(self.limit is None or self.limit >= 1,
                 f"lm_eval.limit must be >= 1 or null, got {self.limit}")
        require(self.num_fewshot is None or self.num_fewshot >= 0,
                 f"lm_eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        require(self.batch_size >= 1, f"lm_eval.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """`jaxalign eval`: sections models, data, eval and (optional) lm_eval."""
    models: EvalModels                 # the policies, their reference and the reward model
    data: EvalData = EvalData()        # held-out pairs, prompts and SFT rows
    eval: EvalOptions = EvalOptions()  # batch shapes, sampling and limits
    lm_eval: LMEvalConfig | None = None  # an lm-evaluation-harness task (the lmeval extra)
    # eval.json, eval_summary.json, samples.jsonl, generations_<name>.jsonl (None: stdout only)
    out_dir: str | None = None

    def __post_init__(self):
        m, d = self.models, self.data
        require(bool(d.pairs or d.prompts or d.heldout or self.lm_eval),
                 "eval config: nothing to measure; give data.pairs, data.prompts, data.heldout "
                 "or lm_eval")
        if self.lm_eval is not None:
            unknown = [p for p in self.lm_eval.policies if p not in m.policies]
            if unknown:
                raise ConfigError(f"lm_eval.policies: {unknown[0]!r} is not in models.policies "
                                  f"({', '.join(m.policies)})")


def from_raw(raw: Mapping[str, Any]) -> EvalConfig:
    """EvalConfig from a YAML mapping; a key of the old flat shape says where it moved."""
    moved = [k for k in raw if k in MOVED]
    if moved:
        raise ConfigError(f"eval config: key {moved[0]!r} moved to {MOVED[moved[0]]} (the eval "
                          f"config has sections models, data, eval, lm_eval like the training "
                          f"configs; see configs/tiny_eval.yaml)")
    if "models" not in raw:
        raise ConfigError("eval config: missing key 'models' (models.policies: {name: path})")
    if isinstance(raw["models"], Mapping) and "policies" not in raw["models"]:
        raise ConfigError("eval config: missing key 'models.policies' ({name: model path})")
    return from_dict(EvalConfig, raw)


def load_config(path: str, overrides=()) -> EvalConfig:
    return from_raw(load_yaml(path, list(overrides)))
