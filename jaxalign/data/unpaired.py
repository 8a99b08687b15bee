"""Unpaired preference data for KTO: one response per prompt and a desirable / undesirable label.

Format (TRL's unpaired preference type; detected for a dataset whose rows have `label`, or
named `format: unpaired`):

  unpaired  {prompt, completion, label}: prompt and completion each a string or a list of
            messages (as for `preference` pairs); label a bool, true = desirable.

Paired preference data (`preference` {prompt, chosen, rejected} or `hh_rlhf` {chosen,
rejected}, detected from a first row without `label`, or named) is unpaired as TRL 1.16's
`unpair_preference_dataset` does it: every pair gives a desirable row (its chosen response)
and an undesirable one (its rejected response) with the same prompt, in TRL's order (its
batched map over blocks of 1000 source rows: the block's chosen rows, then its rejected
rows). The pairs pass the preference formats' own row policies first (empty responses,
identical sides: data.on_empty, data.on_identical), counted in the source's stats.

Rows are parsed, tokenized (chat template, response-only mask) and length-checked by the
preference pipeline (`jaxalign.data.pairs.prompt_messages`, `jaxalign.data.preference`'s
`encode_prompted` and `fit_sides`), under the same data.* policies and counts.

KL rows. KTO's reference point is the policy / reference KL on MISMATCHED prompt /
completion pairs of the same batch. TRL 1.16 (`KTOTrainer._prepare_dataset`) gives row i the
completion of row i - 1 (cyclically, within each batch); we do the same within each global
batch, at the token level (prompt_i's tokens + completion_{i-1}'s tokens, cut to seq_len), as
TRL does. In an eval batch the shift cycles over the real rows only.

Batches reuse the pair layout (`jaxalign.data.preference`), so the DPO forward pass runs
them unchanged: axis 1 is (the row's own completion, its KL completion).

  tokens, targets, segment_ids, positions   (B, 2, T) int32
  loss_mask                                 (B, 2, T) float32: completion tokens of each side
  prompt_len                                (B,) int32
  label                                     (B,) float32, 1 desirable, 0 undesirable
  pair_mask                                 (B,) float32, 1 for a real row, 0 for an eval filler
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import numpy as np

from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.loader import TrainLoader
from jaxalign.data.packing import BATCH_KEYS, write_row
from jaxalign.data.pairs import (PAIR_FORMATS, Pair, PairStats, detect_pair_format,
                                 normalise_pairs, prompt_messages, response_messages)
from jaxalign.data.preference import (DataKind, ItemSet, PreferenceData, UnpackedEvalLoader,
                                      build_preference_data, empty_pair_batch, encode_prompted,
                                      count_fit, fit_sides, log_length_warnings)
from jaxalign.data.sources import DataError, load_rows
from jaxalign.data.tokenize import Encoder, TokenizedSet

UNPAIRED_BATCH_KEYS = BATCH_KEYS + ("prompt_len", "label", "pair_mask")


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One unpaired row, normalised. `plain` holds (prompt, completion) text for tokenizers
    without a chat template, where the row has a string form."""

    prompt: tuple[dict, ...]
    completion: tuple[dict, ...]
    label: bool
    plain: tuple[str, str] | None = None
    row: int = -1


# A CSV cell holds text: the words a bool is written as there (sources.read_csv keeps cells
# as written).
CSV_BOOLS = {"true": True, "false": False}


def _unpaired(row: dict, where: str) -> Labelled:
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in CSV_BOOLS:
        label = CSV_BOOLS[label.strip().lower()]
    if not isinstance(label, (bool, np.bool_)):
        got = f"{type(label).__name__} {label!r}" if isinstance(label, (str, int, float)) \
            else type(label).__name__
        raise DataError(f"{where}: field 'label' must be a bool (true = desirable), got {got}")
    p = prompt_messages(row, where)
    value = row.get("completion")
    if not isinstance(value, (str, list, tuple)):
        raise DataError(f"{where}: field 'completion' must be a string or a list of messages, "
                        f"got {type(value).__name__}")
    completion = response_messages(value, "completion", p, where)
    texts = (row["prompt"], value)
    return Labelled(p, completion, bool(label),
                    texts if all(isinstance(t, str) for t in texts) else None)


CONVERTERS = {"unpaired": _unpaired}

# TRL's `unpair_preference_dataset` maps in batches of datasets' default 1000 rows; each
# batch lists its chosen rows, then its rejected rows.
TRL_MAP_BATCH = 1000


def unpair(pairs: Sequence[Pair], block: int = TRL_MAP_BATCH) -> list[Labelled]:
    """Preference pairs -> labelled rows, in TRL's order (see the module docstring)."""
    out: list[Labelled] = []
    blocks: dict[int, list[Pair]] = {}
    for p in pairs:
        blocks.setdefault(p.row // block, []).append(p)
    for _, chunk in sorted(blocks.items()):
        for side, label in ((1, True), (2, False)):
            for p in chunk:
                plain = (p.plain[0], p.plain[side]) if p.plain is not None else None
                out.append(Labelled(p.prompt, (p.chosen, p.rejected)[side - 1], label, plain,
                                    p.row))
    return out


def unpaired_format(row: dict, fmt: str, name: str) -> str:
    """`fmt`, or for auto: unpaired when the first row has a label, a pair format when it
    has chosen / rejected, else unpaired (whose converter names the missing field)."""
    if fmt != "auto":
        return fmt
    keys = {k for k, v in row.items() if v is not None}
    if "label" not in keys and keys & {"chosen", "rejected"}:
        return detect_pair_format(row, name)
    return "unpaired"


@dataclasses.dataclass
class UnpairedSet(ItemSet):
    """Tokenized rows: examples[i] (ids, mask) starts with prompt_len[i] prompt tokens."""

    name: str
    examples: TokenizedSet
    prompt_len: np.ndarray  # (n,) int32
    label: np.ndarray       # (n,) bool

    @classmethod
    def from_items(cls, name: str, items: Sequence[tuple]) -> "UnpairedSet":
        return cls(name, TokenizedSet.from_pairs(name, [(i, m) for i, m, _, _ in items]),
                   np.array([p for _, _, p, _ in items], np.int32),
                   np.array([y for _, _, _, y in items], bool))

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, i: int):
        ids, mask = self.examples[i]
        return ids, mask, int(self.prompt_len[i]), bool(self.label[i])

    @property
    def lengths(self) -> np.ndarray:
        return self.examples.lengths


    def fingerprint(self) -> int:
        crc = zlib.crc32(self.prompt_len.tobytes() + self.label.tobytes())
        return zlib.crc32(self.examples.fingerprint().to_bytes(4, "little"), crc)


def tokenize_unpaired(rows: Sequence[Labelled], encoder: Encoder, cfg: DataConfig,
                      stats: PairStats, where: Callable[[int], str]) -> UnpairedSet:
    """Encodes, applies cfg's length policies and counts into `stats`."""
    bos = getattr(encoder.tok, "bos_token_id", None)
    items = [(r.prompt, (r.completion,), r.plain, r.row) for r in rows]
    kept = []
    for r, (sides, p) in zip(rows, encode_prompted(items, encoder, where)):
        reason, ((ids, mask),), p, events = fit_sides(sides, p, cfg, bos)
        if not count_fit(stats, reason, events):
            continue
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask[1:].sum())
        kept.append((ids, mask, p, r.label))
    stats.kept += len(kept)
    return UnpairedSet.from_items(stats.name, kept)


def load_unpaired(spec: DatasetSpec, cfg: DataConfig, encoder: Encoder
                  ) -> tuple[UnpairedSet, PairStats]:
    """Reads, normalises and tokenizes one unpaired dataset under cfg's policies."""
    source = load_rows(spec, cache_dir=cfg.cache_dir)
    if not source.rows:
        raise DataError(f"{source.name}: dataset has no rows")
    fmt = unpaired_format(source.rows[0], spec.format, source.name)
    if fmt in PAIR_FORMATS:   # paired preference data: unpaired as TRL does
        pairs, stats = normalise_pairs(source, fmt, on_empty=cfg.on_empty,
                                       on_identical=cfg.on_identical)
        rows = unpair(pairs)
        stats.format = f"{fmt} -> unpaired"
    else:
        rows, stats = normalise_pairs(source, fmt, on_empty=cfg.on_empty, converters=CONVERTERS)
    data = tokenize_unpaired(rows, encoder, cfg, stats, source.where)
    log_length_warnings(stats, cfg, "row(s)")
    return data, stats


# ----------------------------------------------------------------------------- batches


def empty_unpaired_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    batch = empty_pair_batch(batch_size, seq_len, pad_id)
    del batch["margin"]   # a reward models' column; KTO rows have none
    batch["label"] = np.zeros(batch_size, np.float32)
    return batch


def kl_side(example: tuple, other: tuple, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """example's prompt tokens + other's completion tokens (trained), cut to seq_len."""
    ids, _, p, _ = example
    o_ids, o_mask, o_p, _ = other
    kl_ids = np.concatenate([ids[:p], o_ids[o_p:]])[:seq_len]
    kl_mask = np.concatenate([np.zeros(p, np.uint8), o_mask[o_p:]])[:seq_len]
    return kl_ids, kl_mask


def write_unpaired(batch: dict[str, np.ndarray], examples: Sequence[tuple]) -> None:
    """Writes examples into rows 0..n-1, row r with the KL completion of example r - 1."""
    seq_len = batch["tokens"].shape[-1]
    for r, ex in enumerate(examples):
        rows = {k: batch[k][r] for k in BATCH_KEYS}  # (2, T) views into the batch
        write_row(rows, 0, [ex[:2]])
        write_row(rows, 1, [kl_side(ex, examples[r - 1], seq_len)])
        batch["prompt_len"][r] = ex[2]
        batch["label"][r] = float(ex[3])
        batch["pair_mask"][r] = 1.0


class UnpairedLoader(TrainLoader):
    """Infinite, deterministic, resumable batches of labelled rows: `TrainLoader`'s mixture
    stream, state() / restore() and process slicing, with KL rows built per global batch."""

    def __init__(self, datasets: Sequence[UnpairedSet], weights: Sequence[float] | None = None,
                 *, seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        if batch_size < 2:
            raise DataError("KTO's KL estimate pairs each prompt with another row's completion: "
                            "train.batch_size must be >= 2")
        super().__init__(datasets, weights, seq_len=seq_len, batch_size=batch_size, pack=False,
                         pad_id=pad_id, seed=seed, shuffle=shuffle, process_index=process_index,
                         process_count=process_count)
        self._check["kind"] = "unpaired"

    def next_global(self) -> dict[str, np.ndarray]:
        examples = []
        for _ in range(self.batch_size):
            i, j = self.stream.peek()
            examples.append(self.datasets[i][j])
            self.stream.advance()
        batch = empty_unpaired_batch(self.batch_size, self.seq_len, self.pad_id)
        write_unpaired(batch, examples)
        self.batches += 1
        return batch


class UnpairedEvalLoader(UnpackedEvalLoader):
    """Every row once, in order (see `UnpackedEvalLoader`)."""
    empty = staticmethod(empty_unpaired_batch)
    fill = staticmethod(write_unpaired)


UNPAIRED = DataKind(load_unpaired, UnpairedSet.concat, UnpairedLoader, UnpairedEvalLoader,
                    unit="rows")


def build_unpaired_data(cfg: DataConfig, tokenizer, **kw) -> PreferenceData:
    """`build_preference_data` for unpaired rows: -> PreferenceData with Unpaired loaders."""
    return build_preference_data(cfg, tokenizer, kind=UNPAIRED, **kw)
