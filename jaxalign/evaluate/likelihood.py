"""Forward passes of evaluation: token-weighted perplexity, log-probs of completions (KL),
log-probs of preference pairs (DPO-implied reward) and reward-model scores.

Every jitted function sees batches of exactly `batch_size` rows (the last one is filled with
one-token filler rows, dropped on the host) and a sequence length from `bucket_length`, so
a whole evaluation compiles each function once per length bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.data.config import DataConfig
from jaxalign.data.layout import branch_layout
from jaxalign.data.loader import EvalLoader
from jaxalign.data.packing import empty_batch, write_row
from jaxalign.data.pipeline import load_tokenized, resolve_template
from jaxalign.data.preference import PairSet, PrefEvalLoader
from jaxalign.data.tokenize import Encoder
from jaxalign.generate import bucket_length
from jaxalign.losses.xent import head_logprobs
from jaxalign.models import functional, heads, layout

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@functools.lru_cache(maxsize=16)
def row_logps_fn(cfg: ModelConfig, chunk: int = 128):
    """Jitted `fn(params, batch) -> (sum of log p over loss-mask tokens (B,), their count (B,))`
    for one-sequence rows (tokens, targets, loss_mask, segment_ids, positions). The LM head
    runs `chunk` positions at a time: the (B, T, V) logits are never held."""
    def fn(params, batch):
        _, hidden_BTD, _ = functional.apply(cfg, params, batch["tokens"],
                                            positions_BT=batch["positions"],
                                            segment_ids_BT=batch["segment_ids"],
                                            return_logits=False)
        head, head_is_VD = functional.lm_head(cfg, params)
        logp_BT, _ = head_logprobs(hidden_BTD, head, batch["targets"], head_is_VD=head_is_VD,
                                   chunk=min(chunk, batch["tokens"].shape[1]),
                                   softcap=cfg.final_logit_softcap)
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        return (logp_BT * mask_BT).sum(axis=-1), mask_BT.sum(axis=-1)
    return jax.jit(fn)


def _device(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ROW_KEYS}


def heldout_sets(specs, tokenizer, *, seq_len: int, chat_template: str | None,
                 cache_dir: str | None, limit: int = 0):
    """Tokenized held-out datasets (SFT formats, loss on completion / assistant tokens only,
    longer rows truncated to seq_len), one per spec; `limit` caps each one's rows."""
    if limit:
        specs = [s if s.max_examples and s.max_examples <= limit
                 else dataclasses.replace(s, max_examples=limit) for s in specs]
    cfg = DataConfig(train=tuple(specs), seq_len=seq_len, pack=False, chat_template=chat_template,
                     cache_dir=cache_dir)
    encoder = Encoder(tokenizer, chat_template=resolve_template(chat_template))
    return [load_tokenized(spec, cfg, encoder)[0] for spec in cfg.train]


def perplexity(cfg: ModelConfig, params, sets, *, seq_len: int, batch_size: int,
               pad_id: int) -> dict[str, float]:
    """Token-weighted: exp(sum of -log p over every trained token / number of such tokens),
    over all rows of all sets (not a mean of per-row or per-batch perplexities)."""
    fn = row_logps_fn(cfg)
    total_logp, total_tokens = 0.0, 0.0
    for data in sets:
        for batch in EvalLoader(data, seq_len=seq_len, batch_size=batch_size, pack=False,
                                pad_id=pad_id):
            logp_B, n_B = jax.device_get(fn(params, _device(batch)))
            # fp64 on the host: thousands of tokens summed in fp32 would lose the last digits.
            total_logp += float(np.sum(logp_B, dtype=np.float64))
            total_tokens += float(np.sum(n_B, dtype=np.float64))
    nll = -total_logp / max(total_tokens, 1.0)
    return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": total_tokens}


def _sequence_batches(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      batch_size: int, pad_id: int):
    """Right-padded rows prompt + completion (loss mask on the completion), `batch_size` at a
    time, length bucketed; yields (batch, number of real rows)."""
    seqs = [(np.asarray(p, np.int32), np.asarray(c, np.int32)) for p, c in zip(prompts, completions)]
    T = bucket_length(max(len(p) + len(c) for p, c in seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        batch = empty_batch(batch_size, T, pad_id)
        for r, (p, c) in enumerate(chunk):
            mask = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8)])
            write_row(batch, r, [(np.concatenate([p, c]), mask)])
        for r in range(len(chunk), batch_size):  # filler: one real token, no loss
            write_row(batch, r, [(np.asarray([pad_id], np.int32), np.zeros(1, np.uint8))])
        yield batch, len(chunk)


def completion_logps(cfg: ModelConfig, params, prompts, completions, *, batch_size: int,
                     pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p(completion tokens | prompt) per row, completion lengths) under the model
    at temperature 1: the quantities a KL(policy || reference) estimate compares."""
    fn = row_logps_fn(cfg)
    sums, counts = [], []
    for batch, n in _sequence_batches(prompts, completions, batch_size, pad_id):
        logp_B, n_B = jax.device_get(fn(params, _device(batch)))
        sums.append(logp_B[:n])
        counts.append(n_B[:n])
    return np.concatenate(sums).astype(np.float64), np.concatenate(counts)


@functools.lru_cache(maxsize=8)
def _score_fn(cfg: ModelConfig):
    return jax.jit(lambda p, b: heads.score(cfg, p, b["tokens"], b["segment_ids"],
                                            b["positions"]))


def rewards(rm_cfg: ModelConfig, rm_params, prompts, completions, *, batch_size: int,
            pad_id: int) -> np.ndarray:
    """The reward model's score of each prompt + completion (its last real token)."""
    fn = _score_fn(rm_cfg)
    out = []
    for batch, n in _sequence_batches(prompts, completions, batch_size, pad_id):
        out.append(np.asarray(fn(rm_params, _device(batch)))[:n])
    return np.concatenate(out).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _pair_fn(cfg: ModelConfig, scores: bool, chunk: int = 128):
    if scores:
        return jax.jit(lambda p, b: layout.branch_scores(cfg, p, b, branches=2))
    return jax.jit(lambda p, b: layout.branch_logps(cfg, p, b, branches=2, average=False,
                                                    chunk=chunk))


def _pair_outputs(fn, params, pairs: PairSet, *, seq_len: int, batch_size: int, pad_id: int,
                  share: bool) -> np.ndarray:
    """(n, 2) of fn over every pair, in the branch layout (`jaxalign.data.layout`): one row
    [prompt | chosen | rejected] per pair when `share`, else two rows."""
    out = []
    for batch in PrefEvalLoader(pairs, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id):
        rows = branch_layout(batch, share=share, pad_id=pad_id)
        r = np.asarray(jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in rows.items()})))
        out.append(r[batch["pair_mask"] > 0])
    return np.concatenate(out).astype(np.float64)


def pair_scores(rm_cfg: ModelConfig, rm_params, pairs: PairSet, *, seq_len: int,
                batch_size: int, pad_id: int, share: bool = True) -> np.ndarray:
    """(n, 2) reward-model scores of (chosen, rejected)."""
    return _pair_outputs(_pair_fn(rm_cfg, True), rm_params, pairs, seq_len=seq_len,
                         batch_size=batch_size, pad_id=pad_id, share=share)


def pair_logps(cfg: ModelConfig, params, pairs: PairSet, *, seq_len: int, batch_size: int,
               pad_id: int, share: bool = True) -> np.ndarray:
    """(n, 2) summed response log-probs of (chosen, rejected): DPO's log pi(y | x)."""
    return _pair_outputs(_pair_fn(cfg, False), params, pairs, seq_len=seq_len,
                         batch_size=batch_size, pad_id=pad_id, share=share)
