"""Preference data for reward modelling and DPO: two responses to one prompt, tokenized side by side.

Rows are read and normalised by `jaxalign.data.pairs` (formats, HH split, row policies).

With a chat template (the tokenizer's, or `data.chat_template`) a pair renders as
prompt + response messages through `Encoder`, and the response mask is found the same way
as for SFT: the tokens that the full conversation adds to the prompt rendered with
`add_generation_prompt` (the assistant header is not trained; the end-of-turn / EOS token is).
Assistant turns inside the prompt are never trained. Without a template, string pairs are
plain text: `tok(prompt, add_special_tokens=True) + tok(response) + [eos]`; message lists then
need a template.

Length policies, in order (counted in `PairStats`):
  chosen == rejected after truncation                      data.on_identical: drop (default) | error
  prompt > data.max_prompt_len tokens                      data.prompt_truncation: keep_end (default:
                                                           keep its last tokens and a leading BOS) | drop
  prompt + response > data.seq_len                         data.truncation: truncate (cut the
                                                           response end, EOS included) | drop
  a side with no trained token left                        dropped (`dropped_no_loss`)

Batches: the SFT batch contract (`jaxalign.data.packing`) with a pair axis, one example per
row, never packed. B counts pairs; axis 1 is (chosen, rejected). The recipes read them through
`jaxalign.data.layout` (one row [prompt | chosen | rejected] per pair, or two rows):

  tokens, targets, segment_ids, positions   (B, 2, T) int32
  loss_mask                                 (B, 2, T) float32, 1 where targets[b, s, t] is a
                                            response token (EOS / end of turn included)
  prompt_len                                (B,) int32, prompt tokens shared by both rows
  pair_mask                                 (B,) float32, 1 for a real pair, 0 for an eval filler
  margin                                    (B,) float32, the rows' `margin` column (0 without
                                            one): reward models subtract it inside the sigmoid
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxalign.config import ConfigError
from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.formats import Example
from jaxalign.data.loader import EvalLoader, TrainLoader
from jaxalign.data.packing import BATCH_KEYS, empty_batch, write_row
from jaxalign.data.pairs import Pair, PairStats, PrefStats, normalise_pairs
from jaxalign.data.pipeline import load_splits, resolve_template
from jaxalign.data.sources import DataError, load_rows
from jaxalign.data.tokenize import Encoder, TokenizedSet, common_prefix, length_warning

log = logging.getLogger("jaxalign.data")

PREF_BATCH_KEYS = BATCH_KEYS + ("prompt_len", "pair_mask", "margin")

# ----------------------------------------------------------------------------- tokens


class ItemSet:
    """Subsets and concatenation of a tokenized set, through its `from_items` and items."""

    def subset(self, indices: Sequence[int], name: str | None = None):
        return type(self).from_items(name or self.name, [self[int(i)] for i in indices])

    @classmethod
    def concat(cls, name: str, sets: Sequence):
        return cls.from_items(name, [s[j] for s in sets for j in range(len(s))])


@dataclasses.dataclass
class PairSet(ItemSet):
    """Tokenized pairs: chosen[i] and rejected[i] (ids, mask as in `TokenizedSet`) share their
    first prompt_len[i] tokens; margin[i] is the row's `margin` column (0 without one). An
    item is (chosen, rejected, prompt_len, margin); from_items also takes 3-tuples."""

    name: str
    chosen: TokenizedSet
    rejected: TokenizedSet
    prompt_len: np.ndarray  # (n,) int32
    margin: np.ndarray | None = None  # (n,) float32

    def __post_init__(self):
        if self.margin is None:
            self.margin = np.zeros(len(self.prompt_len), np.float32)

    @classmethod
    def from_items(cls, name: str, items: Sequence[tuple]) -> "PairSet":
        return cls(name, TokenizedSet.from_pairs(name, [x[0] for x in items]),
                   TokenizedSet.from_pairs(name, [x[1] for x in items]),
                   np.array([x[2] for x in items], np.int32),
                   np.array([x[3] if len(x) > 3 else 0.0 for x in items], np.float32))

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, i: int):
        return self.chosen[i], self.rejected[i], int(self.prompt_len[i]), float(self.margin[i])

    @property
    def lengths(self) -> np.ndarray:
        """The longer side of each pair: what must fit a row."""
        return np.maximum(self.chosen.lengths, self.rejected.lengths)


    def fingerprint(self) -> int:
        crc = zlib.crc32(self.prompt_len.tobytes())
        if self.margin.any():   # margins join the fingerprint only where a dataset has them
            crc = zlib.crc32(self.margin.tobytes(), crc)
        for part in (self.chosen, self.rejected):
            crc = zlib.crc32(part.fingerprint().to_bytes(4, "little"), crc)
        return crc


def encode_prompted(items: Sequence[tuple], encoder: Encoder, where: Callable[[int], str]
                    ) -> list[tuple[list, int]]:
    """items: (prompt messages, responses (each a tuple of messages), plain texts (prompt,
    response, ...) or None, row). -> [([(ids, mask) per response], prompt_len)], untruncated.
    The masks cover the response only; prompt_len is the number of leading tokens every
    response shares with the prompt (rendered with the generation prompt, or plain with
    special tokens)."""
    templated = encoder.template is not None
    examples, prompts = [], []
    for prompt, responses, plain, row in items:
        if templated:
            examples += [Example(prompt + r, "chat", row) for r in responses]
            prompts.append(encoder.render(prompt, True, where(row)))
        elif plain is not None:
            examples += [Example(({"role": "user", "content": plain[0]},
                                  {"role": "assistant", "content": text}), "prompt_completion", row)
                         for text in plain[1:]]
            prompts.append(plain[0])
        else:
            raise DataError(f"{where(row)}: chat-format preference data needs a chat template, "
                            f"and the tokenizer has none; set data.chat_template")
    encoded = iter(encoder.encode_many(examples, where))
    out = []
    for (_, responses, _, _), prompt_ids in zip(items, encoder.token_ids(prompts, special=not templated)):
        sides, p = [], len(prompt_ids)
        for ids, mask in (next(encoded) for _ in responses):
            cut = common_prefix(ids, prompt_ids)
            mask = mask.copy()
            mask[:cut] = 0  # assistant turns inside the prompt are context, not trained
            sides.append((ids, mask))
            p = min(p, cut)
        out.append((sides, p))
    return out


def fit_sides(sides: list, p: int, cfg: DataConfig, bos: int | None):
    """Applies the length policies to sequences sharing a p-token prompt; returns
    (reason dropped | None, sides, p, events)."""
    events = []
    if cfg.max_prompt_len is not None and p > cfg.max_prompt_len:
        if cfg.prompt_truncation == "drop":
            return "long_prompt", sides, p, events
        keep = int(bos is not None and p > 0 and sides[0][0][0] == bos)  # keep a leading BOS
        cut = np.s_[keep:keep + p - cfg.max_prompt_len]
        sides = [(np.delete(i, cut), np.delete(m, cut)) for i, m in sides]
        p = cfg.max_prompt_len
        events.append("prompt_truncated")
    if max(len(i) for i, _ in sides) > cfg.seq_len:
        if cfg.truncation == "drop":
            return "too_long", sides, p, events
        sides = [(i[:cfg.seq_len], m[:cfg.seq_len]) for i, m in sides]
        p = min(p, cfg.seq_len)
        events.append("truncated")
    if not all(m[1:].any() for _, m in sides):  # the first token is never a target
        return "no_loss", sides, p, events
    return None, sides, p, events


def count_fit(stats: PairStats, reason: str | None, events: list[str]) -> bool:
    """Counts what `fit_sides` did to one item (its cuts even when it is then dropped, so
    that 'truncated' means every item cut to seq_len); True when the item is kept."""
    for e in events:
        setattr(stats, e, getattr(stats, e) + 1)
    if reason is None:
        return True
    setattr(stats, f"dropped_{reason}", getattr(stats, f"dropped_{reason}") + 1)
    stats.truncated_no_loss += reason == "no_loss" and "truncated" in events
    return False


def log_length_warnings(stats: PairStats, cfg: DataConfig, unit: str) -> None:
    if stats.prompt_truncated or stats.dropped_long_prompt:
        log.warning("%s: %d prompt(s) longer than max_prompt_len %s were %s", stats.name,
                    stats.prompt_truncated + stats.dropped_long_prompt, cfg.max_prompt_len,
                    "cut from the left" if cfg.prompt_truncation == "keep_end" else "dropped")
    warning = length_warning(stats, cfg.seq_len, cfg.truncation, unit, "response")
    if warning:
        log.warning("%s", warning)


def tokenize_pairs(pairs: Sequence[Pair], encoder: Encoder, cfg: DataConfig, stats: PairStats,
                   where: Callable[[int], str]) -> PairSet:
    """Encodes, applies cfg's length / identity policies and counts into `stats`."""
    bos = getattr(encoder.tok, "bos_token_id", None)
    kept = []
    items = [(pair.prompt, (pair.chosen, pair.rejected), pair.plain, pair.row) for pair in pairs]
    for pair, (sides, p) in zip(pairs, encode_prompted(items, encoder, where)):
        reason, (c, r), p, events = fit_sides(sides, p, cfg, bos)
        if reason is None and np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1]):
            reason = "identical"
        if reason == "identical" and cfg.on_identical == "error":
            raise DataError(f"{where(pair.row)}: chosen and rejected are identical after truncation "
                            f"to {cfg.seq_len} tokens (set data.on_identical: drop to skip such rows)")
        if not count_fit(stats, reason, events):
            continue
        stats.tokens += len(c[0]) + len(r[0])
        stats.loss_tokens += int(c[1][1:].sum() + r[1][1:].sum())
        kept.append((c, r, p, pair.margin))
    stats.kept += len(kept)
    return PairSet.from_items(stats.name, kept)


# ----------------------------------------------------------------------------- batches


def empty_pair_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """B filler pairs: every position padding, pair_mask 0."""
    batch = {k: v.reshape(batch_size, 2, seq_len)
             for k, v in empty_batch(2 * batch_size, seq_len, pad_id).items()}
    batch["prompt_len"] = np.zeros(batch_size, np.int32)
    batch["pair_mask"] = np.zeros(batch_size, np.float32)
    batch["margin"] = np.zeros(batch_size, np.float32)
    return batch


def write_pair(batch: dict[str, np.ndarray], r: int, pair: tuple) -> None:
    """Writes (chosen, rejected, prompt_len[, margin]) into pair r; each side is one SFT row
    (`write_row`)."""
    chosen, rejected, p = pair[:3]
    rows = {k: batch[k][r] for k in BATCH_KEYS}  # (2, T) views into the batch
    write_row(rows, 0, [chosen])
    write_row(rows, 1, [rejected])
    batch["prompt_len"][r] = p
    batch["pair_mask"][r] = 1.0
    batch["margin"][r] = pair[3] if len(pair) > 3 else 0.0


class PrefLoader(TrainLoader):
    """Infinite, deterministic, resumable batches of pairs for this process: `TrainLoader`'s
    mixture stream, state() / restore() and process slicing, with pairs instead of rows."""

    def __init__(self, datasets: Sequence[PairSet], weights: Sequence[float] | None = None, *,
                 seq_len: int, batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(datasets, weights, seq_len=seq_len, batch_size=batch_size, pack=False,
                         pad_id=pad_id, seed=seed, shuffle=shuffle, process_index=process_index,
                         process_count=process_count)
        self._check["kind"] = "preference"

    def next_global(self) -> dict[str, np.ndarray]:
        batch = empty_pair_batch(self.batch_size, self.seq_len, self.pad_id)
        for r in range(self.batch_size):
            i, j = self.stream.peek()
            write_pair(batch, r, self.datasets[i][j])
            self.stream.advance()
        self.batches += 1
        return batch


class UnpackedEvalLoader(EvalLoader):
    """Every item once, in order, one item a row (never packed); the last batch is filled with
    fillers (pair_mask 0, segment_ids and loss_mask 0), so every batch has the same shape.
    A subclass says how to write a batch: `empty` and `fill(batch, items)`."""

    def __init__(self, dataset, *, seq_len: int, batch_size: int, pad_id: int,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(dataset, seq_len=seq_len, batch_size=batch_size, pack=False, pad_id=pad_id,
                         process_index=process_index, process_count=process_count)

    def global_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.num_batches):
            batch = self.empty(self.batch_size, self.seq_len, self.pad_id)
            stop = min((b + 1) * self.batch_size, len(self.dataset))
            self.fill(batch, [self.dataset[i] for i in range(b * self.batch_size, stop)])
            yield batch


class PrefEvalLoader(UnpackedEvalLoader):
    """Every pair once, in order (see `UnpackedEvalLoader`)."""
    empty = staticmethod(empty_pair_batch)

    @staticmethod
    def fill(batch, pairs) -> None:
        for r, pair in enumerate(pairs):
            write_pair(batch, r, pair)


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass
class PreferenceData:
    train: PrefLoader
    eval: PrefEvalLoader | None
    stats: PrefStats             # training datasets (eval hold-outs already removed)
    eval_stats: PrefStats | None
    pad_id: int


@dataclasses.dataclass(frozen=True)
class DataKind:
    """How `build_preference_data` reads one kind of preference data into loaders."""
    load: Callable               # (spec, cfg, encoder) -> (dataset, PairStats)
    concat: Callable             # (name, datasets) -> dataset
    train_loader: type           # (datasets, weights, *, seq_len, batch_size, pad_id, seed, ...)
    eval_loader: type            # (dataset, *, seq_len, batch_size, pad_id, ...)
    unit: str = "pairs"


def load_pairs(spec: DatasetSpec, cfg: DataConfig, encoder: Encoder) -> tuple[PairSet, PairStats]:
    """Reads, normalises and tokenizes one preference dataset under cfg's policies."""
    source = load_rows(spec, cache_dir=cfg.cache_dir)
    pairs, stats = normalise_pairs(source, spec.format, on_empty=cfg.on_empty,
                                   on_identical=cfg.on_identical)
    data = tokenize_pairs(pairs, encoder, cfg, stats, source.where)
    log_length_warnings(stats, cfg, "pair(s)")
    return data, stats


def build_preference_data(cfg: DataConfig, tokenizer, *, batch_size: int,
                          eval_batch_size: int | None = None, process_index: int = 0,
                          process_count: int = 1, kind: DataKind | None = None) -> PreferenceData:
    """Builds the pair loaders (or `kind`'s, e.g. unpaired rows). `batch_size` counts pairs
    over all processes; each process's loaders yield its pairs [i * B / P, (i + 1) * B / P)."""
    kind = kind or PAIRS
    if cfg.pack:
        raise ConfigError("data.pack: preference pairs are not packed (each side takes one row); "
                          "set data.pack: false")
    if cfg.train_on_prompt:
        raise ConfigError("data.train_on_prompt: preference losses compare response tokens only; "
                          "set data.train_on_prompt: false")
    encoder = Encoder(tokenizer, chat_template=resolve_template(cfg.chat_template))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train_sets, stats, eval_set, eval_stats = load_splits(
        cfg, lambda spec: kind.load(spec, cfg, encoder), kind.concat, PrefStats, unit=kind.unit,
        why_empty=lambda s: f"{s.rows} rows; dropped " + ", ".join(
            f"{n} {k.replace('_', ' ')}" for k, n in s.dropped().items()))
    log.info("preference data:\n%s", stats.summary())
    train = kind.train_loader(train_sets, [spec.weight for spec in cfg.train], seq_len=cfg.seq_len,
                       batch_size=batch_size, pad_id=pad_id, seed=cfg.seed, shuffle=cfg.shuffle,
                       process_index=process_index, process_count=process_count)
    evaluator = None
    if eval_set is not None and len(eval_set):
        evaluator = kind.eval_loader(eval_set, seq_len=cfg.seq_len,
                                   batch_size=eval_batch_size or batch_size, pad_id=pad_id,
                                   process_index=process_index, process_count=process_count)
    return PreferenceData(train, evaluator, stats, eval_stats, pad_id)


PAIRS = DataKind(load_pairs, PairSet.concat, PrefLoader, PrefEvalLoader)
