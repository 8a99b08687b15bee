"""`build_sft_data`: DataConfig + tokenizer -> train loader, eval loader and counts.

Every dataset is read, normalised and tokenized up front (SFT sets fit in memory as flat
int32 arrays), so the counts are known before step 1 and the loaders only index arrays.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.formats import normalise
from jaxalign.data.loader import EvalLoader, TrainLoader
from jaxalign.data.sources import DataError, load_rows
from jaxalign.data.tokenize import DataStats, Encoder, SourceStats, TokenizedSet, length_warning, \
    tokenize_examples

log = logging.getLogger("jaxalign.data")


@dataclasses.dataclass
class SFTData:
    train: TrainLoader
    eval: EvalLoader | None
    stats: DataStats           # training datasets (eval hold-outs already removed)
    eval_stats: DataStats | None
    pad_id: int


def resolve_template(template: str | None) -> str | None:
    """`data.chat_template` is a Jinja string or a path to a .jinja file."""
    if template is not None and template.endswith(".jinja") and "{" not in template:
        path = Path(template).expanduser()
        if not path.exists():
            raise DataError(f"data.chat_template: template file {path} does not exist")
        return path.read_text()
    return template


def load_tokenized(spec: DatasetSpec, cfg: DataConfig, encoder: Encoder) -> tuple[TokenizedSet, SourceStats]:
    """Reads, normalises and tokenizes one dataset under cfg's policies."""
    source = load_rows(spec, cache_dir=cfg.cache_dir)
    examples, dropped, fmt = normalise(source, spec.format, cfg.on_empty)
    stats = SourceStats(source.name, format=fmt, rows=len(source.rows), dropped_empty=dropped)
    data = tokenize_examples(examples, encoder, seq_len=cfg.seq_len, truncation=cfg.truncation,
                             stats=stats, where=source.where)
    warning = length_warning(stats, cfg.seq_len, cfg.truncation, "example(s)", "trained")
    if warning:
        log.warning("%s", warning)
    return data, stats


def hold_out(data: TokenizedSet, fraction: float, seed: int, i: int) -> tuple[TokenizedSet, TokenizedSet]:
    n = len(data)
    n_eval = min(max(1, round(fraction * n)), n - 1)
    if n_eval < 1:
        raise DataError(f"{data.name}: {n} example(s) are too few to hold out data.eval_fraction")
    perm = np.random.default_rng([seed, 2, i]).permutation(n)
    held = np.sort(perm[:n_eval])
    kept = np.sort(perm[n_eval:])
    return data.subset(kept), data.subset(held, name=f"{data.name} (held out)")


def _concat(name: str, sets: list[TokenizedSet]) -> TokenizedSet:
    return TokenizedSet.from_pairs(name, [s[j] for s in sets for j in range(len(s))])


def load_splits(cfg: DataConfig, load, concat, new_stats, *, unit: str, why_empty):
    """The train datasets (one per cfg.train spec) and the eval set (cfg.eval, or
    cfg.eval_fraction held out of each train set), built the same way for every kind of data.
    `load(spec)` -> (dataset, stats); `concat(name, datasets)`; `new_stats()` collects the
    per-source stats; `why_empty(stats)` explains a source left with nothing.
    Returns (train_sets, stats, eval_set or None, eval_stats or None)."""
    train_sets, stats = [], new_stats()
    for spec in cfg.train:
        data, s = load(spec)
        if len(data) == 0:
            raise DataError(f"{s.name}: no usable {unit} after filtering ({why_empty(s)})")
        train_sets.append(data)
        stats.sources.append(s)
    eval_set, eval_stats = None, None
    if cfg.eval:
        eval_stats, parts = new_stats(), []
        for spec in cfg.eval:
            data, s = load(spec)
            parts.append(data)
            eval_stats.sources.append(s)
        eval_set = concat("eval", parts)
    elif cfg.eval_fraction > 0:
        held = []
        for i, data in enumerate(train_sets):
            train_sets[i], h = hold_out(data, cfg.eval_fraction, cfg.seed, i)
            held.append(h)
            log.info("%s: held out %d of %d %s for eval", data.name, len(h), len(data), unit)
        eval_set = concat("eval", held)
    return train_sets, stats, eval_set, eval_stats


def build_sft_data(cfg: DataConfig, tokenizer, *, batch_size: int, eval_batch_size: int | None = None,
                   process_index: int = 0, process_count: int = 1) -> SFTData:
    """Builds the SFT loaders. `batch_size` is the global batch (rows over all processes);
    each process's loaders yield its rows [i * B / P, (i + 1) * B / P)."""
    encoder = Encoder(tokenizer, chat_template=resolve_template(cfg.chat_template),
                      train_on_prompt=cfg.train_on_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train_sets, stats, eval_set, eval_stats = load_splits(
        cfg, lambda spec: load_tokenized(spec, cfg, encoder), _concat, DataStats, unit="examples",
        why_empty=lambda s: (f"{s.rows} rows: {s.dropped_empty} empty, {s.dropped_too_long} too "
                             f"long, {s.dropped_no_loss} with no trained token"))
    log.info("data:\n%s", stats.summary())
    train = TrainLoader(train_sets, [spec.weight for spec in cfg.train], seq_len=cfg.seq_len,
                        batch_size=batch_size, pack=cfg.pack, pad_id=pad_id, seed=cfg.seed,
                        shuffle=cfg.shuffle, process_index=process_index, process_count=process_count)
    evaluator = None
    if eval_set is not None and len(eval_set):
        evaluator = EvalLoader(eval_set, seq_len=cfg.seq_len, batch_size=eval_batch_size or batch_size,
                               pack=cfg.pack, pad_id=pad_id, process_index=process_index,
                               process_count=process_count)
    return SFTData(train, evaluator, stats, eval_stats, pad_id)
