"""RL rewards: a reward model and / or Python reward functions, combined into one score per
completion, then the missing-EOS penalty, normalisation and clipping.

A reward function is named `module:function` and returns one float per completion. Like a
TRL GRPO reward function it may take keyword arguments: `prompts=` and `completions=`
(lists of str, the completions decoded without special tokens) and every other column of
the prompt dataset as a list, one value per completion (`answer=` for a verifiable reward):

    def reward(prompts, completions, answer, **kwargs) -> list[float]

It gets the columns it names, or all of them when it takes **kwargs; a function whose first
two parameters are not named prompts and completions is called positionally, fn(prompts,
completions), as before. What it returns is checked: an exception, a NaN / inf or the wrong
count stops the run with an error naming the function, before anything of that iteration
is applied.

TRL's convention (`reward.convention: trl`, or `auto` for a function defined in a `trl`
module or naming one of TRL's own arguments): the function is called exactly as TRL 1.16's
GRPOTrainer._calculate_rewards calls it, `fn(prompts=, completions=, completion_ids=,
**columns, trainer_state=, log_extra=, log_metric=)`: on conversational data (prompts given
as message lists) `prompts` are the message lists and each completion is
[{"role": "assistant", "content": text}], else both are strings; `completion_ids` the
sampled token ids (EOS included); an async function is awaited. In either convention `None`
means "not applicable": it becomes NaN and is skipped in the weighted sum (TRL's nansum);
a completion that every source skips takes its group's mean score (so GRPO / RLOO give it
no advantage, as TRL zeroes it), or the rollout's mean when its whole group is skipped.

A reward model is a LlamaForSequenceClassification with num_labels=1 (an HF directory, a
jaxalign checkpoint, an RM run directory or a hub id at reward.revision); it scores the
policy's token ids at the last generated token that is not its pad id (with pad == eos, the
token before the eos: transformers' and TRL's choice, `heads.scored_token_index`). Its
forward runs inside the jitted rollout (`rollout.rollout`); this module only loads and
checks it. A reward model with another tokenizer than the policy's (TRL allows it) scores
the decoded completions instead, re-encoded with its own tokenizer and chat template
(`evaluate.judge`, on the host, one process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxalign import checkpoint
from jaxalign.config import ConfigError, JaxalignError, num_labels_from_hf
from jaxalign.convert import hub
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.rl.config import RewardConfig

log = logging.getLogger(__name__)


class RewardFunctionError(JaxalignError):
    """A reward function raised, or returned something other than one finite float per completion."""


class RewardModelError(JaxalignError):
    """reward.model is not a usable reward model (wrong kind)."""


def load_function(name: str) -> Callable:
    """`module:function` (an importable module: installed, or on PYTHONPATH; never the working
    directory implicitly) or `path/to/file.py:function` (that file, relative to the working
    directory). Either way it runs code named in the config (README: Safety and data)."""
    module, _, attr = name.partition(":")
    try:
        if module.endswith(".py"):
            fn = getattr(_module_from_file(Path(module)), attr)
        else:
            fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise ConfigError(f"reward.functions: cannot load {name!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward.functions: {name!r} is not callable")
    return fn


# Arguments only TRL's reward functions take: naming one says the function is written for TRL.
TRL_ARGUMENTS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric"})


@dataclasses.dataclass
class TrainerState:
    """What a TRL reward function reads from `trainer_state` for reward shaping over
    training (transformers' TrainerState field names)."""
    global_step: int = 0
    max_steps: int = 0


@dataclasses.dataclass
class TRLInputs:
    """The per-completion inputs only TRL's convention passes: `prompts` as TRL sees them (a
    string or a message list), the sampled ids, and the trainer state."""
    prompts: list
    completion_ids: list
    state: TrainerState = dataclasses.field(default_factory=TrainerState)


def is_trl_style(fn: Callable, convention: str = "auto") -> bool:
    if convention != "auto":
        return convention == "trl"
    if (getattr(fn, "__module__", "") or "").split(".")[0] == "trl":
        return True
    try:
        return bool(TRL_ARGUMENTS & set(inspect.signature(fn).parameters))
    except (TypeError, ValueError):
        return False
def _module_from_file(path: Path):
    import importlib.util
    import sys
    path = path.resolve()
    if not path.is_file():
        raise ImportError(f"no file {path}")
    key = f"jaxalign_reward_{abs(hash(str(path)))}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def call_style(fn: Callable) -> tuple[bool, set[str] | None]:
    """(called by keyword, the dataset columns it takes: None for all, as it has **kwargs).
    By keyword when it takes **kwargs or has parameters named prompts and completions;
    otherwise the old positional form fn(prompts, completions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False, set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True, None
    if {"prompts", "completions"} <= set(params):
        return True, set(params) - {"prompts", "completions"}
    return False, set()


def _trl_kwargs(name: str, prompts: Sequence[str], completions: Sequence[str],
                columns: dict[str, list] | None, trl: TRLInputs | None) -> dict:
    """TRL's call: conversational when the prompts are message lists (TRL's
    `is_conversational`), completions then wrapped as one assistant message each."""
    trl_prompts = list(trl.prompts) if trl is not None and trl.prompts else list(prompts)
    chat = bool(trl_prompts) and isinstance(trl_prompts[0], (list, tuple))
    short = name.split(":")[-1]
    return {"prompts": trl_prompts,
            "completions": [[{"role": "assistant", "content": c}] for c in completions]
            if chat else list(completions),
            "completion_ids": [list(map(int, x)) for x in trl.completion_ids] if trl else None,
            **{k: list(v) for k, v in (columns or {}).items()},
            "trainer_state": trl.state if trl else TrainerState(),
            "log_extra": lambda column, values: log.debug("%s: %s = %r", short, column, values),
            "log_metric": lambda key, value: log.debug("%s: %s = %r", short, key, value)}


def call_function(name: str, fn: Callable, prompts: Sequence[str], completions: Sequence[str],
                  columns: dict[str, list] | None = None, *, convention: str = "auto",
                  trl: TRLInputs | None = None) -> np.ndarray:
    """The function's scores as a float64 array (NaN where it returned None: not
    applicable), or RewardFunctionError naming `name`. `columns`: the prompt dataset's other
    columns, one value per completion; `trl`: what TRL's convention adds."""
    try:
        if is_trl_style(fn, convention):
            out = fn(**_trl_kwargs(name, prompts, completions, columns, trl))
        else:
            by_keyword, takes = call_style(fn)
            if by_keyword:
                kw = {k: list(v) for k, v in (columns or {}).items()
                      if takes is None or k in takes}
                out = fn(prompts=list(prompts), completions=list(completions), **kw)
            else:
                out = fn(list(prompts), list(completions))
        if inspect.isawaitable(out):   # an async reward function (an LLM judge, a sandbox)
            out = asyncio.run(_await(out))
    except Exception as e:  # any failure in user code: one clear error, no half-done iteration
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    try:
        out = list(out)
        values = [math.nan if v is None else float(v) for v in out]
        skipped = {i for i, v in enumerate(out) if v is None}
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"reward function {name} must return one float (or None) per "
                                  f"completion; got {type(out).__name__} ({e})") from None
    if len(values) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(values)} value(s) for "
                                  f"{len(completions)} completion(s)")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v) and i not in skipped]
    if bad:
        i = bad[0]
        raise RewardFunctionError(f"reward function {name} returned {values[i]} for completion {i} "
                                  f"({len(bad)} non-finite value(s)); completion: {completions[i]!r}")
    return np.asarray(values, np.float64)


async def _await(awaitable):
    return await awaitable


def check_reward_model_dir(path: str, revision: str | None = None) -> None:
    """Refuses an HF causal LM (or a multi-label classifier) before its weights are read."""
    config = hub.resolve(path, revision) / "config.json"
    if config.is_file():
        try:
            n = num_labels_from_hf(json.loads(config.read_text()))
        except (JaxalignError, json.JSONDecodeError) as e:
            raise RewardModelError(f"reward.model {path}: {e}") from None
        _check_labels(path, n)


def _check_labels(path: str, num_labels: int) -> None:
    if num_labels == 1:
        return
    kind = "a causal LM" if num_labels == 0 else f"a classifier with {num_labels} labels"
    raise RewardModelError(
        f"reward.model {path}: wrong kind of model: {kind}, not a reward model "
        f"(LlamaForSequenceClassification with num_labels=1; train one with `jaxalign rm`, or "
        f"use reward.functions)")


def load_frozen_reward_model(path: str, mesh, policy_tokenizer, revision: str | None = None,
                             **runtime):
    """-> (cfg, params, judge) of a trained reward model (the RL reward;
    `jaxalign.train.rm.init_reward_model` starts one to train). `path`: a directory or a hub
    id at `revision`. `judge` is None when the reward model shares the policy's tokenizer (it
    then scores the policy's token ids inside the rollout); otherwise an
    `evaluate.judge.Judge` that re-encodes the decoded completions with its own tokenizer."""
    from jaxalign.evaluate.judge import Judge, same_vocab
    check_reward_model_dir(path, revision)
    cfg, params, _, tok_dir = checkpoint.load_model(path, mesh, revision=revision, **runtime)
    _check_labels(path, cfg.num_labels)
    if not (Path(tok_dir) / "tokenizer.json").exists():
        return cfg, params, None
    rm_tokenizer = load_tokenizer(tok_dir)
    if same_vocab(rm_tokenizer, policy_tokenizer):
        return cfg, params, None
    import jax
    if jax.process_count() > 1:
        raise RewardModelError(f"reward.model {path}: its tokenizer differs from the policy's; "
                               f"re-encoding completions for it runs on one process only")
    judge = Judge(cfg, params, rm_tokenizer, name=f"reward.model {path}")
    log.info("reward.model %s: its tokenizer differs from the policy's; completions are decoded "
             "and re-encoded with its tokenizer%s before scoring", path,
             " and chat template" if judge.encoder.template else "")
    return cfg, params, judge


class RunningMoments:
    """Mean and variance over every score seen (Chan et al.'s parallel update); the state is
    three floats that the checkpoint's JSON stores exactly."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x: np.ndarray) -> None:
        n = float(len(x))
        if n == 0:
            return
        b_mean, b_var = float(np.mean(x)), float(np.var(x))
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    @classmethod
    def from_state(cls, state: dict | None) -> "RunningMoments":
        return cls(**state) if state else cls()


class Rewarder:
    """Scores completions on the host: sources combined, EOS penalty, normalisation, clip."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.functions = [(name, load_function(name)) for name in cfg.functions]
        n = len(cfg.functions) + (cfg.model is not None)
        self.weights = list(cfg.weights) or [1.0] * n
        self.moments = RunningMoments()
        self.judge = None   # an evaluate.judge.Judge: a reward model with its own tokenizer

    def raw(self, prompts: Sequence[str], completions: Sequence[str], model_scores: np.ndarray,
            eos: np.ndarray, columns: dict[str, list] | None = None, *,
            trl: TRLInputs | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """-> (score per completion, per-source means over the completions it scored).
        `columns`: the prompt dataset's other columns, one value per completion; `trl`:
        what TRL's convention adds. Raises RewardFunctionError."""
        total, parts = self.raw_rows(prompts, completions, model_scores, eos, columns, trl=trl)
        return total, {k: nanmean(v) for k, v in parts.items()}

    def raw_rows(self, prompts: Sequence[str], completions: Sequence[str],
                 model_scores: np.ndarray, eos: np.ndarray, columns: dict[str, list] | None = None,
                 *, trl: TRLInputs | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As `raw`, with each source's score per completion instead of its mean (the RL
        driver averages them over every process's rows). A source's NaN (its None) is left
        out of the weighted sum; a row no source scored is NaN."""
        parts: dict[str, np.ndarray] = {}
        weights = iter(self.weights)
        total = np.zeros(len(completions), np.float64)
        scored = np.zeros(len(completions), bool)
        if self.cfg.model is not None:
            if self.judge is not None:   # scores the decoded text in its own tokenization
                model_scores = self.judge.score(trl.prompts if trl is not None and trl.prompts
                                                else prompts, completions)
            s = np.asarray(model_scores, np.float64)
            total += next(weights) * s
            scored |= True
            parts["reward/model"] = s
        for name, fn in self.functions:
            s = call_function(name, fn, prompts, completions, columns,
                              convention=self.cfg.convention, trl=trl)
            total += np.where(np.isnan(s), 0.0, next(weights) * s)   # TRL's nansum
            scored |= ~np.isnan(s)
            parts[f"reward/{name.split(':')[1]}"] = s
        if self.cfg.missing_eos_penalty is not None:
            total = total - self.cfg.missing_eos_penalty * (~eos)
        return np.where(scored, total, np.nan), parts

    def normalise(self, scores: np.ndarray, keep: np.ndarray | None = None,
                  group: int = 1) -> np.ndarray:
        """Normalise and clip; updates the running moments (call once per rollout). `keep`:
        the rows whose score counts (`hosts.finite_rows`); the others neither move the
        batch statistics nor the running moments. A row no source scored (NaN: every reward
        function returned None) first takes the mean of its group's (`group` consecutive
        rows) scored rows, or the rollout's when the group has none (0 when nothing was
        scored)."""
        x = fill_unscored(np.asarray(scores, np.float64), group)
        kept = x if keep is None else x[keep]
        if self.cfg.normalize == "batch":
            x = (x - kept.mean()) / (kept.std() + 1e-8)
        elif self.cfg.normalize == "running":
            self.moments.update(kept)
            x = (x - self.moments.mean) / (math.sqrt(self.moments.var) + 1e-8)
        if self.cfg.clip is not None:
            x = np.clip(x, -self.cfg.clip, self.cfg.clip)
        return x


def nanmean(x) -> float:
    """The mean over the values that are not NaN (NaN when there are none), quietly."""
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def fill_unscored(x: np.ndarray, group: int = 1) -> np.ndarray:
    """NaN rows -> their group's mean of the scored rows, else the rollout's, else 0."""
    nan = np.isnan(x)
    if not nan.any():
        return x
    rollout = nanmean(x)
    out = x.copy()
    for g in range(0, len(x), max(group, 1)):
        block = x[g:g + group]
        fill = nanmean(block)
        fill = fill if math.isfinite(fill) else (rollout if math.isfinite(rollout) else 0.0)
        out[g:g + group] = np.where(np.isnan(block), fill, block)
    log.warning("%d of %d completions had no applicable reward (every source returned None); "
                "scored at their group's mean", int(nan.sum()), len(x))
    return out
