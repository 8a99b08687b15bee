"""Configuration of the data pipeline: which datasets, how they are tokenized and batched.

Frozen and validated on construction like every jaxalign config (docs/architecture.md); a bad
value raises `ConfigError` naming the key (`data.train[1].weight`). Dataset specs may be
given as dicts (from YAML) or plain path strings; they are normalised to `DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Sequence

from jaxalign.config import ConfigError, require

FORMATS = ("auto", "alpaca", "dolly", "chat", "sharegpt", "prompt_completion", "text",
           "preference", "hh_rlhf",  # preference pairs (jaxalign.data.preference)
           "unpaired")               # KTO's labelled rows (jaxalign.data.unpaired)
TRUNCATION = ("truncate", "drop")
ON_EMPTY = ("drop", "error")
PROMPT_TRUNCATION = ("keep_end", "drop")
ON_IDENTICAL = ("drop", "error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One dataset: a local file / `save_to_disk` folder / hub name, and how to read it.

    `weight` is the mixing weight among the training datasets (ignored for eval);
    `max_examples` keeps the first N rows of the split (before shuffling), for quick runs.
    `name` is the hub configuration name (`load_dataset(path, name)`), if any.
    """

    path: str                # a .jsonl / .json / .csv / .parquet / .arrow file, a folder or a hub name
    format: Literal["auto", "alpaca", "dolly", "chat", "sharegpt", "prompt_completion", "text",
                    "preference", "hh_rlhf", "unpaired"] = "auto"   # row layout; auto: from the first row's keys
    weight: float = 1.0      # mixing weight among the training datasets
    split: str = "train"     # the split of a folder or hub dataset
    max_examples: int | None = None   # keep the first N rows (before shuffling)
    name: str | None = None  # hub configuration name (load_dataset(path, name))

    def validate(self, key: str) -> None:
        require(isinstance(self.path, str) and self.path != "",
                 f"{key}.path must be a non-empty string, got {self.path!r}")
        require(self.format in FORMATS,
                 f"{key}.format {self.format!r} is not one of {FORMATS}")
        require(isinstance(self.weight, (int, float)) and self.weight > 0,
                 f"{key}.weight must be a positive number, got {self.weight!r}")
        require(isinstance(self.split, str) and self.split != "",
                 f"{key}.split must be a non-empty string, got {self.split!r}")
        require(self.max_examples is None
                 or (isinstance(self.max_examples, int) and self.max_examples > 0),
                 f"{key}.max_examples must be a positive integer or null, got {self.max_examples!r}")

    @classmethod
    def coerce(cls, value: Any, key: str) -> "DatasetSpec":
        """A spec from a DatasetSpec, a path string or a dict; unknown keys are named."""
        if isinstance(value, DatasetSpec):
            spec = value
        elif isinstance(value, str):
            spec = cls(path=value)
        elif isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            for k in value:
                require(k in known, f"{key}: unknown key {k!r}; expected one of {sorted(known)}")
            require("path" in value, f"{key}.path is required")
            spec = cls(**value)
        else:
            raise ConfigError(f"{key} must be a path string or a mapping with 'path', "
                              f"got {type(value).__name__}")
        spec.validate(key)
        return spec


def dataset_specs(value: Any, key: str) -> tuple[DatasetSpec, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping, DatasetSpec)):
        value = [value]
    require(isinstance(value, Sequence), f"{key} must be a dataset spec or a list of them")
    return tuple(DatasetSpec.coerce(v, f"{key}[{i}]") for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data pipeline: SFT (`build_sft_data`) and preference pairs (`build_preference_data`).

    train            one or more DatasetSpecs, mixed by their weights.
    eval             optional DatasetSpec(s) for evaluation; or instead
    eval_fraction    hold out this fraction of every training dataset (seeded, at example level).
    seq_len          tokens per row; an example may use all of them (its last token has no target).
    pack             pack several examples per row (segment ids, restarting positions) or pad one per row.
    truncation       over-long examples: 'truncate' keeps the first seq_len tokens, 'drop' skips them.
    train_on_prompt  loss on every token instead of only assistant / completion tokens.
    chat_template    a Jinja chat template (or a path to a .jinja file) used instead of the tokenizer's.
    on_empty         an empty completion / assistant message / text: 'drop' (counted and logged) or 'error'.
    shuffle          per-epoch permutation of each training dataset (eval is never shuffled).
    seed             seeds shuffling, mixing and the eval hold-out.
    cache_dir        HF `datasets` cache directory (None: the datasets default).

    Preference data only (reward modelling, DPO; see jaxalign.data.preference):
    max_prompt_len   prompt tokens allowed (None: no limit but seq_len); must be < seq_len.
    prompt_truncation  a longer prompt: 'keep_end' keeps its last max_prompt_len tokens (and a
                     leading BOS), so the response keeps seq_len - max_prompt_len; 'drop' skips the pair.
    on_identical     chosen == rejected: 'drop' (counted and logged) or 'error'.
    share_prompt     each pair (KTO: row and KL row) as one row [prompt | chosen | rejected],
                     the prompt computed once (`jaxalign.data.layout`; exact); false: two rows.
    """

    train: tuple[DatasetSpec, ...]
    eval: tuple[DatasetSpec, ...] = ()
    eval_fraction: float = 0.0
    seq_len: int = 1024
    pack: bool = False
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    chat_template: str | None = None
    on_empty: Literal["drop", "error"] = "drop"
    shuffle: bool = True
    seed: int = 0
    cache_dir: str | None = None
    max_prompt_len: int | None = None
    prompt_truncation: Literal["keep_end", "drop"] = "keep_end"
    on_identical: Literal["drop", "error"] = "drop"
    share_prompt: bool = True

    def __post_init__(self):
        train = dataset_specs(self.train, "data.train")
        require(len(train) > 0, "data.train must name at least one dataset")
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "eval", dataset_specs(self.eval, "data.eval"))
        require(isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1,
                 f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        require(not (self.eval and self.eval_fraction > 0),
                 "data.eval and data.eval_fraction are exclusive: give one of them")
        require(isinstance(self.seq_len, int) and self.seq_len >= 2,
                 f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        require(isinstance(self.pack, bool), f"data.pack must be true or false, got {self.pack!r}")
        require(self.truncation in TRUNCATION,
                 f"data.truncation {self.truncation!r} is not one of {TRUNCATION}")
        require(isinstance(self.train_on_prompt, bool),
                 f"data.train_on_prompt must be true or false, got {self.train_on_prompt!r}")
        require(self.chat_template is None or (isinstance(self.chat_template, str)
                                                and self.chat_template.strip() != ""),
                 "data.chat_template must be a non-empty string or null")
        require(self.on_empty in ON_EMPTY, f"data.on_empty {self.on_empty!r} is not one of {ON_EMPTY}")
        require(isinstance(self.shuffle, bool), f"data.shuffle must be true or false, got {self.shuffle!r}")
        require(isinstance(self.seed, int) and self.seed >= 0,
                 f"data.seed must be a non-negative integer, got {self.seed!r}")
        require(self.max_prompt_len is None
                 or (isinstance(self.max_prompt_len, int) and 1 <= self.max_prompt_len < self.seq_len),
                 f"data.max_prompt_len must be null or an integer in [1, seq_len={self.seq_len}), "
                 f"got {self.max_prompt_len!r}")
        require(self.prompt_truncation in PROMPT_TRUNCATION,
                 f"data.prompt_truncation {self.prompt_truncation!r} is not one of {PROMPT_TRUNCATION}")
        require(isinstance(self.share_prompt, bool),
                 f"data.share_prompt must be true or false, got {self.share_prompt!r}")
        require(self.on_identical in ON_IDENTICAL,
                 f"data.on_identical {self.on_identical!r} is not one of {ON_IDENTICAL}")

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """From a YAML mapping; an unknown key is named."""
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            require(k in known, f"data: unknown key {k!r}; expected one of {sorted(known)}")
        return cls(**d)
