"""Preference data for reward modelling and DPO: two responses to one prompt, tokenized side by side.

Formats (detected from the first row's keys, or named by `DatasetSpec.format`):

  preference  {prompt, chosen, rejected}, each a string or a list of messages {role, content}.
              A string prompt is one user message, a string response one assistant message.
              A response list that repeats the prompt messages first (UltraFeedback-style whole
              conversations) has that copy removed.
  hh_rlhf     {chosen, rejected}: two whole conversations, either HH-RLHF strings
              ("\\n\\nHuman: ...\\n\\nAssistant: ...") or message lists, split by `split_turn`.

With a chat template (the tokenizer's, or `data.chat_template`) a pair renders as
prompt + response messages through `Encoder`, and the response mask is found the same way
as for SFT: the tokens that the full conversation adds to the prompt rendered with
`add_generation_prompt` (the assistant header is not trained; the end-of-turn / EOS token is).
Assistant turns inside the prompt are never trained. Without a template, string pairs are
plain text: `tok(prompt, add_special_tokens=True) + tok(response) + [eos]`; message lists then
need a template.

Policies, in order (each counted in `PairStats`, the first case of each logged with its row):
  missing field / non-string content / not a conversation   DataError naming file, row, field
  empty response (or response without assistant turn)      data.on_empty: drop (default) | error
  empty prompt, or HH pair with no common turn to split at  always dropped (`dropped_no_prompt`)
  chosen == rejected (also after truncation)               data.on_identical: drop (default) | error
  prompt > data.max_prompt_len tokens                      data.prompt_truncation: keep_end (default:
                                                           keep its last tokens and a leading BOS) | drop
  prompt + response > data.seq_len                         data.truncation: truncate (cut the
                                                           response end, EOS included) | drop
  a side with no trained token left                        dropped (`dropped_no_loss`)

Batches: the SFT batch contract (`jaxalign.data.packing`) with a pair axis, one example per
row, never packed. B counts pairs; axis 1 is (chosen, rejected), so both go through one forward
pass as 2B rows (`x.reshape(2 * B, T)`):

  tokens, targets, segment_ids, positions   (B, 2, T) int32
  loss_mask                                 (B, 2, T) float32, 1 where targets[b, s, t] is a
                                            response token (EOS / end of turn included)
  prompt_len                                (B,) int32, prompt tokens shared by both rows
  pair_mask                                 (B,) float32, 1 for a real pair, 0 for an eval filler
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxalign.config import ConfigError
from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.formats import Example, _Empty, _field, _messages
from jaxalign.data.loader import EvalLoader, TrainLoader
from jaxalign.data.packing import BATCH_KEYS, empty_batch, write_row
from jaxalign.data.pipeline import _hold_out, resolve_template
from jaxalign.data.sources import DataError, Source, load_rows
from jaxalign.data.tokenize import Encoder, TokenizedSet, _common_prefix

log = logging.getLogger("jaxalign.data")

PAIR_FORMATS = ("preference", "hh_rlhf")
PREF_BATCH_KEYS = BATCH_KEYS + ("prompt_len", "pair_mask")
HH_OPENER = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}

# ----------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference row, normalised. `plain` holds (prompt, chosen, rejected) text for
    tokenizers without a chat template, where the row has a string form."""

    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]
    plain: tuple[str, str, str] | None = None
    row: int = -1


class _Identical(Exception):
    pass


class _NoPrompt(Exception):
    pass


def detect_pair_format(row: dict, name: str = "dataset") -> str:
    keys = {k for k, v in row.items() if v is not None}
    if "chosen" in keys or "rejected" in keys:
        return "preference" if "prompt" in keys else "hh_rlhf"
    raise DataError(f"{name}: cannot detect a preference format from the first row's keys "
                    f"{sorted(keys)}; expected prompt+chosen+rejected or chosen+rejected (HH-RLHF)")


def _check_type(value: Any, field: str, where: str) -> None:
    if not isinstance(value, (str, list, tuple)):
        raise DataError(f"{where}: field {field!r} must be a string or a list of messages, "
                        f"got {type(value).__name__}")


def prompt_messages(row: dict, where: str) -> tuple[dict, ...]:
    """The `prompt` field as messages: a string is one user message; () when it is empty."""
    prompt = _field(row, "prompt", where)
    _check_type(prompt, "prompt", where)
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},) if prompt.strip() else ()
    return _messages(prompt, "prompt", where, need_assistant=False)


def response_messages(value, field: str, prompt: tuple[dict, ...], where: str) -> tuple[dict, ...]:
    """A response field as messages: a string is one assistant message; a list that repeats the
    prompt first has that copy removed. Raises `_Empty` without an assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise _Empty(f"{where}: empty {field!r}")
        return ({"role": "assistant", "content": value},)
    msgs = _messages(value, field, where, need_assistant=False)
    if prompt and msgs[:len(prompt)] == prompt:
        msgs = msgs[len(prompt):]  # a whole conversation that starts with the prompt
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Empty(f"{where}: {field!r} has no assistant message after the prompt")
    return msgs


def _both(parse: Callable[[str, Any], Any], row: dict, where: str) -> list:
    """parse(field, value) for chosen and rejected; an empty side is reported only after both
    were checked, so a malformed other side is still an error, not a silent drop."""
    values = [_field(row, f, where) for f in ("chosen", "rejected")]
    out, empty = [], None
    for f, v in zip(("chosen", "rejected"), values):
        _check_type(v, f, where)
        try:
            out.append(parse(f, v))
        except _Empty as e:
            empty = empty or e
    if empty is not None:
        raise empty
    return out


def _preference(row: dict, where: str) -> Pair:
    p = prompt_messages(row, where)
    chosen, rejected = _both(lambda f, v: response_messages(v, f, p, where), row, where)
    if not p:
        raise _NoPrompt(f"{where}: empty 'prompt'")
    if chosen == rejected:
        raise _Identical(f"{where}: chosen and rejected are identical")
    texts = (row["prompt"], row["chosen"], row["rejected"])
    return Pair(p, chosen, rejected, texts if all(isinstance(t, str) for t in texts) else None)


def _hh_turns(field: str, value, where: str) -> list[tuple[str, str, int | None]]:
    """(role, raw content, offset of the content in the string or None) per turn."""
    if not isinstance(value, str):
        return [(m["role"], m["content"], None)
                for m in _messages(value, field, where, need_assistant=False)]
    if not value.strip():
        raise _Empty(f"{where}: empty {field!r}")
    found = list(HH_OPENER.finditer(value))
    if not found or found[0].start() != 0:
        raise DataError(f"{where}: field {field!r} is not an HH-RLHF conversation: it must start "
                        f"with a '\\n\\nHuman:' turn, got {value[:40]!r}")
    ends = [m.start() for m in found[1:]] + [len(value)]
    return [(HH_ROLES[m.group(1)], value[m.end():e], m.end()) for m, e in zip(found, ends)]


def split_turn(chosen: Sequence[tuple], rejected: Sequence[tuple], where: str = "") -> int:
    """Where an implicit-prompt pair splits into prompt + two responses: turn index j.

    The rule: the prompt is turns[:j] for the largest j such that the first j turns of both
    conversations are equal (role and raw text) and turn j of both is an Assistant turn, i.e.
    the prompt ends with the last common "Assistant:" opener. So the prompt is never cut
    inside a turn, responses always start with an assistant turn, and for strings it is
    TRL's rule (longest common prefix, cut after its last "\\n\\nAssistant:"). If the
    conversations differ before that (a different Human turn), the response keeps the later
    turns of its own side; only its assistant turns are trained.
    """
    key = lambda turns: [t[:2] for t in turns]
    if key(chosen) == key(rejected):
        raise _Identical(f"{where}: chosen and rejected are identical")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k][:2] == rejected[k][:2]:
        k += 1
    for j in range(min(k, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[j][0] == rejected[j][0] == "assistant":
            return j
    raise _NoPrompt(f"{where}: chosen and rejected share no turns before a common Assistant "
                    f"turn, so there is no prompt to split at")


def _hh_rlhf(row: dict, where: str) -> Pair:
    turns = _both(lambda f, v: _hh_turns(f, v, where), row, where)
    j = split_turn(*turns, where)
    msgs = [tuple({"role": r, "content": c.strip() if off is not None else c} for r, c, off in t)
            for t in turns]
    for f, t in zip(("chosen", "rejected"), turns):
        if any(r == "assistant" and not c.strip() for r, c, _ in t[j:]):
            raise _Empty(f"{where}: empty assistant turn in the {f!r} response")
    plain = None
    if all(t[j][2] is not None for t in turns):
        c, r = row["chosen"], row["rejected"]
        plain = (c[:turns[0][j][2]], c[turns[0][j][2]:], r[turns[1][j][2]:])
    return Pair(msgs[0][:j], msgs[0][j:], msgs[1][j:], plain)


CONVERTERS = {"preference": _preference, "hh_rlhf": _hh_rlhf}


@dataclasses.dataclass
class PairStats:
    """What happened to one dataset's rows. `PrefStats.summary()` is what gets logged."""

    name: str
    format: str = ""
    rows: int = 0
    dropped_empty: int = 0        # an empty response (on_empty='drop')
    dropped_no_prompt: int = 0    # an empty prompt; an HH pair with no common turn to split at
    dropped_identical: int = 0    # chosen == rejected (on_identical='drop'), also after truncation
    prompt_truncated: int = 0     # prompt > max_prompt_len, cut from the left (keep_end)
    dropped_long_prompt: int = 0  # prompt > max_prompt_len with prompt_truncation='drop'
    truncated: int = 0            # a side > seq_len, response end cut (truncation='truncate')
    dropped_too_long: int = 0     # a side > seq_len with truncation='drop'
    dropped_no_loss: int = 0      # a side with no response token left after truncation
    kept: int = 0
    tokens: int = 0               # both sides of the kept pairs
    loss_tokens: int = 0

    def dropped(self) -> dict[str, int]:
        return {f.name[8:]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("dropped_")}


@dataclasses.dataclass
class PrefStats:
    sources: list[PairStats] = dataclasses.field(default_factory=list)

    def total(self) -> PairStats:
        out = PairStats("total")
        for s in self.sources:
            for f in dataclasses.fields(PairStats):
                if f.name not in ("name", "format"):
                    setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
        return out

    def as_dict(self) -> dict:
        return {"sources": [dataclasses.asdict(s) for s in self.sources],
                "total": dataclasses.asdict(self.total())}

    def summary(self) -> str:
        def line(s):
            dropped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in s.dropped().items())
            return (f"{s.name}: {s.rows} rows -> {s.kept} pairs, {s.tokens} tokens "
                    f"({s.loss_tokens} trained); dropped {dropped}; prompt truncated "
                    f"{s.prompt_truncated}, response truncated {s.truncated}")
        return "\n".join(line(s) for s in self.sources + [self.total()])


def normalise_pairs(source: Source, fmt: str = "auto", *, on_empty: str = "drop",
                    on_identical: str = "drop", converters: dict | None = None
                    ) -> tuple[list[Pair], PairStats]:
    """Converts every row of `source`; returns the pairs and their counts so far.
    `converters` (format -> row converter) replaces the preference formats, e.g. with
    `jaxalign.data.unpaired`'s; a converter returns a dataclass with a `row` field."""
    if not source.rows:
        raise DataError(f"{source.name}: dataset has no rows")
    converters = CONVERTERS if converters is None else converters
    if fmt == "auto":
        fmt = (detect_pair_format(source.rows[0], source.name) if converters is CONVERTERS
               else next(iter(converters)))
    if fmt not in converters:
        raise DataError(f"{source.name}: format {fmt!r} is not a preference format; "
                        f"expected one of {list(converters)}")
    stats = PairStats(source.name, format=fmt, rows=len(source.rows))
    pairs, first = [], {}
    for i, row in enumerate(source.rows):
        try:
            pair = converters[fmt](row, source.where(i))
        except (_Empty, _Identical, _NoPrompt) as e:
            reason, knob, policy = {_Empty: ("empty", "on_empty", on_empty),
                                    _Identical: ("identical", "on_identical", on_identical),
                                    _NoPrompt: ("no_prompt", None, "drop")}[type(e)]
            if policy == "error":
                raise DataError(f"{e} (set data.{knob}: drop to skip such rows)") from None
            setattr(stats, f"dropped_{reason}", getattr(stats, f"dropped_{reason}") + 1)
            first.setdefault(reason, str(e))
            continue
        pairs.append(dataclasses.replace(pair, row=i))
    for reason, msg in first.items():
        log.warning("%s: dropped %d pair(s) (%s), the first: %s", source.name,
                    getattr(stats, f"dropped_{reason}"), reason.replace("_", " "), msg)
    return pairs, stats


# ----------------------------------------------------------------------------- tokens


@dataclasses.dataclass
class PairSet:
    """Tokenized pairs: chosen[i] and rejected[i] (ids, mask as in `TokenizedSet`) share their
    first prompt_len[i] tokens."""

    name: str
    chosen: TokenizedSet
    rejected: TokenizedSet
    prompt_len: np.ndarray  # (n,) int32

    @classmethod
    def from_items(cls, name: str, items: Sequence[tuple]) -> "PairSet":
        return cls(name, TokenizedSet.from_pairs(name, [c for c, _, _ in items]),
                   TokenizedSet.from_pairs(name, [r for _, r, _ in items]),
                   np.array([p for _, _, p in items], np.int32))

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, i: int):
        return self.chosen[i], self.rejected[i], int(self.prompt_len[i])

    @property
    def lengths(self) -> np.ndarray:
        """The longer side of each pair: what must fit a row."""
        return np.maximum(self.chosen.lengths, self.rejected.lengths)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "PairSet":
        return PairSet.from_items(name or self.name, [self[int(i)] for i in indices])

    @classmethod
    def concat(cls, name: str, sets: Sequence["PairSet"]) -> "PairSet":
        return cls.from_items(name, [s[j] for s in sets for j in range(len(s))])

    def fingerprint(self) -> int:
        crc = zlib.crc32(self.prompt_len.tobytes())
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
            prompts.append(encoder._render(prompt, True, where(row)))
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
    for (_, responses, _, _), prompt_ids in zip(items, encoder._ids(prompts, special=not templated)):
        sides, p = [], len(prompt_ids)
        for ids, mask in (next(encoded) for _ in responses):
            cut = _common_prefix(ids, prompt_ids)
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
        if reason is not None:
            setattr(stats, f"dropped_{reason}", getattr(stats, f"dropped_{reason}") + 1)
            continue
        for e in events:
            setattr(stats, e, getattr(stats, e) + 1)
        stats.tokens += len(c[0]) + len(r[0])
        stats.loss_tokens += int(c[1][1:].sum() + r[1][1:].sum())
        kept.append((c, r, p))
    stats.kept += len(kept)
    return PairSet.from_items(stats.name, kept)


# ----------------------------------------------------------------------------- batches


def empty_pair_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """B filler pairs: every position padding, pair_mask 0."""
    batch = {k: v.reshape(batch_size, 2, seq_len)
             for k, v in empty_batch(2 * batch_size, seq_len, pad_id).items()}
    batch["prompt_len"] = np.zeros(batch_size, np.int32)
    batch["pair_mask"] = np.zeros(batch_size, np.float32)
    return batch


def write_pair(batch: dict[str, np.ndarray], r: int, pair: tuple) -> None:
    """Writes (chosen, rejected, prompt_len) into pair r; each side is one SFT row (`write_row`)."""
    chosen, rejected, p = pair
    rows = {k: batch[k][r] for k in BATCH_KEYS}  # (2, T) views into the batch
    write_row(rows, 0, [chosen])
    write_row(rows, 1, [rejected])
    batch["prompt_len"][r] = p
    batch["pair_mask"][r] = 1.0


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


class PrefEvalLoader(EvalLoader):
    """Every pair once, in order; the last batch is filled with filler pairs (pair_mask 0,
    segment_ids and loss_mask 0), so every batch has the same shape."""

    def __init__(self, dataset: PairSet, *, seq_len: int, batch_size: int, pad_id: int,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(dataset, seq_len=seq_len, batch_size=batch_size, pack=False, pad_id=pad_id,
                         process_index=process_index, process_count=process_count)

    def global_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.num_batches):
            batch = empty_pair_batch(self.batch_size, self.seq_len, self.pad_id)
            for r, i in enumerate(range(b * self.batch_size,
                                        min((b + 1) * self.batch_size, len(self.dataset)))):
                write_pair(batch, r, self.dataset[i])
            yield batch


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
    if stats.prompt_truncated or stats.dropped_long_prompt:
        log.warning("%s: %d prompt(s) longer than max_prompt_len %s were %s", source.name,
                    stats.prompt_truncated + stats.dropped_long_prompt, cfg.max_prompt_len,
                    "cut from the left" if cfg.prompt_truncation == "keep_end" else "dropped")
    if stats.truncated or stats.dropped_too_long or stats.dropped_no_loss:
        log.warning("%s: %d pair(s) longer than seq_len %d were %s; %d had no response token left",
                    source.name, stats.truncated + stats.dropped_too_long, cfg.seq_len,
                    "truncated" if cfg.truncation == "truncate" else "dropped", stats.dropped_no_loss)
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

    train_sets, stats = [], PrefStats()
    for spec in cfg.train:
        data, s = kind.load(spec, cfg, encoder)
        if len(data) == 0:
            raise DataError(f"{s.name}: no usable {kind.unit} after filtering ({s.rows} rows; dropped "
                            + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in s.dropped().items())
                            + ")")
        train_sets.append(data)
        stats.sources.append(s)

    eval_set, eval_stats = None, None
    if cfg.eval:
        eval_stats = PrefStats()
        parts = []
        for spec in cfg.eval:
            data, s = kind.load(spec, cfg, encoder)
            parts.append(data)
            eval_stats.sources.append(s)
        eval_set = kind.concat("eval", parts)
    elif cfg.eval_fraction > 0:
        held = []
        for i, data in enumerate(train_sets):
            train_sets[i], h = _hold_out(data, cfg.eval_fraction, cfg.seed, i)
            held.append(h)
            log.info("%s: held out %d of %d %s for eval", data.name, len(h), len(data), kind.unit)
        eval_set = kind.concat("eval", held)

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

# ----------------------------------------------------------------------------- prompts only


def _prompt_of(row: dict, fmt: str, where: str) -> tuple[tuple[dict, ...], str | None]:
    """(prompt messages, plain prompt text or None) of a preference, prompt or chat row."""
    if fmt in ("preference", "prompt_completion", "prompt"):
        prompt = _field(row, "prompt", where)
        _check_type(prompt, "prompt", where)
        if isinstance(prompt, str):
            msgs, plain = ({"role": "user", "content": prompt},), prompt
        else:
            msgs, plain = _messages(prompt, "prompt", where, need_assistant=False), None
    elif fmt == "hh_rlhf":
        try:
            try:
                turns = _both(lambda f, v: _hh_turns(f, v, where), row, where)
                j = split_turn(*turns, where)
            except (_Identical, _Empty):  # no pair to split: the prompt of the chosen conversation
                turns = [_hh_turns("chosen", _field(row, "chosen", where), where)]
                j = max((i for i, t in enumerate(turns[0]) if t[0] == "assistant"), default=0)
        except (_Empty, _NoPrompt) as e:
            raise DataError(str(e)) from None
        msgs = tuple({"role": r, "content": c.strip() if off is not None else c}
                     for r, c, off in turns[0][:j])
        plain = row["chosen"][:turns[0][j][2]] if j and turns[0][j][2] is not None else None
    elif fmt == "chat":
        msgs = _messages(_field(row, "messages", where), "messages", where, need_assistant=False)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        msgs, plain = msgs[:last], None
    else:
        raise DataError(f"{where}: load_prompts reads formats preference, hh_rlhf, "
                        f"prompt_completion and chat, not {fmt!r}")
    if not msgs or (plain is not None and not plain.strip()):
        raise DataError(f"{where}: empty prompt")
    return msgs, plain


def load_prompts(spec: DatasetSpec | str, tokenizer, *, chat_template: str | None = None,
                 tokenize: bool = False, max_prompt_len: int | None = None,
                 cache_dir: str | None = None) -> list[str] | list[np.ndarray]:
    """The prompts of a dataset, one per row in row order, for generation (PPO rollouts, eval).

    Rows may be preference pairs (the prompt as training splits it), {prompt[, completion]}
    or {messages} (the messages before the last assistant one). Returns the prompt rendered
    with the chat template and its generation prompt (plain text without a template), or with
    `tokenize`, int32 ids exactly as they start a training sequence (special tokens added only
    without a template), cut to their last `max_prompt_len` tokens (a leading BOS kept).
    No padding: the generator left-pads.
    """
    if isinstance(spec, str):
        spec = DatasetSpec(path=spec)
    if max_prompt_len is not None and not tokenize:
        raise ValueError("max_prompt_len counts tokens: pass tokenize=True with it")
    source = load_rows(spec, cache_dir=cache_dir)
    fmt = spec.format
    if fmt == "auto":
        keys = {k for k, v in source.rows[0].items() if v is not None}
        fmt = ("prompt" if "prompt" in keys else "chat" if "messages" in keys
               else detect_pair_format(source.rows[0], source.name))
    encoder = Encoder(tokenizer, chat_template=resolve_template(chat_template))
    texts = []
    for i, row in enumerate(source.rows):
        msgs, plain = _prompt_of(row, fmt, source.where(i))
        if encoder.template is not None:
            texts.append(encoder._render(msgs, True, source.where(i)))
        elif plain is not None:
            texts.append(plain)
        else:
            raise DataError(f"{source.where(i)}: chat-format prompts need a chat template, and the "
                            f"tokenizer has none; pass chat_template")
    if not tokenize:
        return texts
    ids = encoder._ids(texts, special=encoder.template is None)
    if max_prompt_len is not None:
        bos = getattr(tokenizer, "bos_token_id", None)
        for n, x in enumerate(ids):
            if len(x) > max_prompt_len:
                keep = int(bos is not None and x[0] == bos)
                ids[n] = np.concatenate([x[:keep], x[len(x) - max_prompt_len + keep:]])
    return ids
