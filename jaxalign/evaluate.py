"""`jaxalign eval`: held-out preference accuracy and reward-model-judged win rate.

Three measurements, each run when its inputs are configured:
  rm/*      a reward model's accuracy on held-out pairs (r(chosen) > r(rejected)), margin;
  dpo/*     a policy's DPO-implied reward beta * (log pi/pi_ref) on the same pairs: accuracy
            and margin (0 and 0 for the reference itself);
  winrate/* the policy's and the reference's completions to held-out prompts, judged by the
            reward model: P(r(policy) > r(reference)), ties counting one half.
Models are HF directories, jaxalign checkpoints or run directories. The result is printed as
one JSON object and, with out_dir, written to out_dir/eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import checkpoint
from jaxalign.config import ConfigError, from_dict, load_yaml
from jaxalign.data.config import DataConfig, DatasetSpec, dataset_specs
from jaxalign.data.preference import PairSet, PrefEvalLoader, load_pairs
from jaxalign.data.prompts import load_prompts
from jaxalign.data.tokenize import Encoder
from jaxalign.generate import eos_ids_for, generate_ids
from jaxalign.models import heads, lora
from jaxalign.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    policy: str | None = None          # the model under test (DPO / PPO / SFT output)
    reference: str | None = None       # default: the policy run's starting model
    reward_model: str | None = None    # judge for rm/* and winrate/*
    pairs: tuple[DatasetSpec, ...] = ()     # held-out preference pairs
    prompts: tuple[DatasetSpec, ...] = ()   # held-out prompts for the win rate
    seq_len: int = 512                 # tokens per scored sequence
    max_prompt_len: int | None = None  # longer prompts keep their end (None: seq_len only)
    limit: int = 0                     # at most this many pairs / prompts (0: all)
    batch_size: int = 8                # sequences per forward pass
    beta: float = 0.1                  # scale of the DPO-implied reward (accuracy ignores it)
    max_new_tokens: int = 64           # completion length limit of the win rate
    temperature: float = 0.0           # 0: greedy completions
    seed: int = 0                      # sampling seed
    dtype: str = "float32"             # compute dtype
    out_dir: str | None = None         # write eval.json here

    def __post_init__(self):
        object.__setattr__(self, "pairs", dataset_specs(self.pairs, "pairs") if self.pairs else ())
        object.__setattr__(self, "prompts", dataset_specs(self.prompts, "prompts") if self.prompts else ())
        if not (self.policy or self.reward_model):
            raise ConfigError("eval: set policy and / or reward_model")
        if self.prompts and not (self.policy and self.reward_model):
            raise ConfigError("eval.prompts (win rate) needs both policy and reward_model")
        if self.batch_size < 1 or self.limit < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval: batch_size and max_new_tokens must be >= 1, limit >= 0")


def _pairs(cfg: EvalConfig, tokenizer) -> PairSet:
    data_cfg = DataConfig(train=cfg.pairs, seq_len=cfg.seq_len, pack=False,
                          max_prompt_len=cfg.max_prompt_len)
    encoder = Encoder(tokenizer)
    sets = [load_pairs(spec, data_cfg, encoder)[0] for spec in cfg.pairs]
    data = PairSet.concat("pairs", sets)
    return data.subset(range(min(len(data), cfg.limit))) if cfg.limit else data


def _batches(cfg: EvalConfig, data: PairSet, pad_id: int):
    return PrefEvalLoader(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, pad_id=pad_id)


def _rows(batch):
    return {k: jnp.asarray(batch[k]).reshape(-1, batch[k].shape[-1])
            for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def _accuracy(prefix: str, chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    diff = chosen - rejected
    return {f"{prefix}/accuracy": float((diff > 0).mean()), f"{prefix}/margin": float(diff.mean()),
            f"{prefix}/chosen": float(chosen.mean()), f"{prefix}/rejected": float(rejected.mean()),
            f"{prefix}/pairs": float(len(diff))}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def rm_accuracy(cfg: EvalConfig, rm) -> dict[str, float]:
    rm_cfg, rm_params, tok = rm
    score = jax.jit(lambda p, r: heads.score(rm_cfg, p, r["tokens"], r["segment_ids"],
                                             r["positions"]))
    out = []
    for batch in _batches(cfg, _pairs(cfg, tok), _pad_id(tok)):
        r = np.asarray(score(rm_params, _rows(batch))).reshape(-1, 2)
        out.append(r[batch["pair_mask"] > 0])
    r = np.concatenate(out)
    return _accuracy("rm", r[:, 0], r[:, 1])


def dpo_accuracy(cfg: EvalConfig, policy, reference) -> dict[str, float]:
    from jaxalign.train.dpo import pair_logps
    (p_cfg, p_params, tok), (r_cfg, r_params, _) = policy, reference
    logps, pairs = {}, _pairs(cfg, tok)
    for name, (c, params) in (("policy", (p_cfg, p_params)), ("reference", (r_cfg, r_params))):
        fn = jax.jit(lambda p, b, c=c: pair_logps(c, p, b, average=False, chunk=128))
        parts = []
        for batch in _batches(cfg, pairs, _pad_id(tok)):
            lp = np.asarray(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))
            parts.append(lp[batch["pair_mask"] > 0])
        logps[name] = np.concatenate(parts)
    reward = cfg.beta * (logps["policy"] - logps["reference"])
    return _accuracy("dpo", reward[:, 0], reward[:, 1])


def _score_completions(rm, prompt_ids, completions, batch_size: int) -> np.ndarray:
    rm_cfg, rm_params, tok = rm
    seqs = [np.concatenate([p, np.asarray(c, np.int32)]) for p, c in zip(prompt_ids, completions)]
    T = max(len(s) for s in seqs)
    score = jax.jit(lambda p, t, s: heads.score(rm_cfg, p, t, s))
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        tokens = np.full((batch_size, T), _pad_id(tok), np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        for r, s in enumerate(chunk):
            tokens[r, :len(s)], seg[r, :len(s)] = s, 1
        seg[len(chunk):, 0] = 1  # filler rows: one token, scored and dropped
        out.append(np.asarray(score(rm_params, tokens, seg))[:len(chunk)])
    return np.concatenate(out)


def win_rate(cfg: EvalConfig, policy, reference, rm) -> dict[str, float]:
    (p_cfg, p_params, tok), (r_cfg, r_params, _) = policy, reference
    if tok.get_vocab() != rm[2].get_vocab():
        raise ConfigError("eval: the reward model's tokenizer differs from the policy's; the "
                          "win rate scores the policy's tokens as they are")
    prompt_ids = [np.asarray(x, np.int32) for spec in cfg.prompts
                  for x in load_prompts(spec, tok, max_prompt_len=cfg.max_prompt_len).ids]
    if cfg.limit:
        prompt_ids = prompt_ids[:cfg.limit]
    eos = eos_ids_for(tok)
    completions = {}
    for name, (c, params) in (("policy", (p_cfg, p_params)), ("reference", (r_cfg, r_params))):
        done = []
        for i in range(0, len(prompt_ids), cfg.batch_size):
            done += generate_ids(c, params, prompt_ids[i:i + cfg.batch_size],
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=cfg.seed + i, eos_ids=eos, pad_id=_pad_id(tok))
        completions[name] = done
    r_pol = _score_completions(rm, prompt_ids, completions["policy"], cfg.batch_size)
    r_ref = _score_completions(rm, prompt_ids, completions["reference"], cfg.batch_size)
    wins = (r_pol > r_ref) + 0.5 * (r_pol == r_ref)
    return {"winrate/policy_vs_reference": float(wins.mean()),
            "winrate/reward_policy": float(r_pol.mean()),
            "winrate/reward_reference": float(r_ref.mean()),
            "winrate/prompts": float(len(wins)),
            "winrate/len_policy": float(np.mean([len(c) for c in completions["policy"]])),
            "winrate/len_reference": float(np.mean([len(c) for c in completions["reference"]]))}


def _load(path: str, dtype: str, **kw):
    cfg, params, _, tok_dir = checkpoint.load_model(path, None, dtype=dtype, **kw)
    if cfg.lora_rank:
        cfg, params = lora.merge(cfg, params)
    return cfg, params, load_tokenizer(tok_dir)


def default_reference(policy: str) -> str:
    """A run directory's starting model (its config's model.path); else the policy itself."""
    run_cfg = Path(policy).expanduser() / "config.yaml"
    if run_cfg.exists():
        return str(Path(load_yaml(str(run_cfg))["model"]["path"]).expanduser())
    return policy


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    results: dict[str, float] = {}
    rm = _load(cfg.reward_model, cfg.dtype, scan_layers=True) if cfg.reward_model else None
    policy = reference = None
    if cfg.policy:
        policy = _load(cfg.policy, cfg.dtype, scan_layers=True)
        ref_path = cfg.reference or default_reference(cfg.policy)
        log.info("reference: %s", ref_path)
        reference = _load(ref_path, cfg.dtype, scan_layers=True)
    if rm is not None and cfg.pairs:
        results.update(rm_accuracy(cfg, rm))
    if policy is not None and cfg.pairs:
        results.update(dpo_accuracy(cfg, policy, reference))
    if policy is not None and rm is not None and cfg.prompts:
        results.update(win_rate(cfg, policy, reference, rm))
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def load_config(path: str, overrides=()) -> EvalConfig:
    return from_dict(EvalConfig, load_yaml(path, overrides))
