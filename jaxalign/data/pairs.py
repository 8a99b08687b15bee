"""Preference pairs: formats, the HH-RLHF split and the row policies, before any tokenizer.

Formats (detected from the first row's keys, or named by `DatasetSpec.format`):

  preference  {prompt, chosen, rejected}, each a string or a list of messages {role, content}.
              A string prompt is one user message, a string response one assistant message.
              A response list that repeats the prompt messages first (UltraFeedback-style whole
              conversations) has that copy removed.
  hh_rlhf     {chosen, rejected}: two whole conversations, either HH-RLHF strings
              ("\\n\\nHuman: ...\\n\\nAssistant: ...") or message lists, split by `split_turn`.

Row policies (each counted in `PairStats`, the first case of each logged with its row):
  missing field / non-string content / not a conversation   DataError naming file, row, field
  empty response (or response without assistant turn)      data.on_empty: drop (default) | error
  empty prompt, or HH pair with no common turn to split at  always dropped (`dropped_no_prompt`)
  chosen == rejected                                        data.on_identical: drop (default) | error

Tokenizing, the length policies and batches: `jaxalign.data.preference`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Sequence

from jaxalign.data.formats import EmptyField, get_field, parse_messages
from jaxalign.data.sources import DataError, Source
from jaxalign.data.tokenize import DataStats, truncated_detail

log = logging.getLogger("jaxalign.data")

PAIR_FORMATS = ("preference", "hh_rlhf")
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
    margin: float = 0.0   # the row's `margin` column (reward models; TRL's RewardTrainer)


class Identical(Exception):
    pass


class NoPrompt(Exception):
    pass


def detect_pair_format(row: dict, name: str = "dataset") -> str:
    keys = {k for k, v in row.items() if v is not None}
    if "chosen" in keys or "rejected" in keys:
        return "preference" if "prompt" in keys else "hh_rlhf"
    raise DataError(f"{name}: cannot detect a preference format from the first row's keys "
                    f"{sorted(keys)}; expected prompt+chosen+rejected or chosen+rejected (HH-RLHF)")


def check_type(value: Any, field: str, where: str) -> None:
    if not isinstance(value, (str, list, tuple)):
        raise DataError(f"{where}: field {field!r} must be a string or a list of messages, "
                        f"got {type(value).__name__}")


def prompt_messages(row: dict, where: str) -> tuple[dict, ...]:
    """The `prompt` field as messages: a string is one user message; () when it is empty."""
    prompt = get_field(row, "prompt", where)
    check_type(prompt, "prompt", where)
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},) if prompt.strip() else ()
    return parse_messages(prompt, "prompt", where, need_assistant=False)


def response_messages(value, field: str, prompt: tuple[dict, ...], where: str) -> tuple[dict, ...]:
    """A response field as messages: a string is one assistant message; a list that repeats the
    prompt first has that copy removed. Raises `EmptyField` without an assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise EmptyField(f"{where}: empty {field!r}")
        return ({"role": "assistant", "content": value},)
    msgs = parse_messages(value, field, where, need_assistant=False)
    if prompt and msgs[:len(prompt)] == prompt:
        msgs = msgs[len(prompt):]  # a whole conversation that starts with the prompt
    if not any(m["role"] == "assistant" for m in msgs):
        raise EmptyField(f"{where}: {field!r} has no assistant message after the prompt")
    return msgs


def both_sides(parse: Callable[[str, Any], Any], row: dict, where: str) -> list:
    """parse(field, value) for chosen and rejected; an empty side is reported only after both
    were checked, so a malformed other side is still an error, not a silent drop."""
    values = [get_field(row, f, where) for f in ("chosen", "rejected")]
    out, empty = [], None
    for f, v in zip(("chosen", "rejected"), values):
        check_type(v, f, where)
        try:
            out.append(parse(f, v))
        except EmptyField as e:
            empty = empty or e
    if empty is not None:
        raise empty
    return out


def _preference(row: dict, where: str) -> Pair:
    p = prompt_messages(row, where)
    chosen, rejected = both_sides(lambda f, v: response_messages(v, f, p, where), row, where)
    if not p:
        raise NoPrompt(f"{where}: empty 'prompt'")
    if chosen == rejected:
        raise Identical(f"{where}: chosen and rejected are identical")
    texts = (row["prompt"], row["chosen"], row["rejected"])
    return Pair(p, chosen, rejected, texts if all(isinstance(t, str) for t in texts) else None)


def hh_turns(field: str, value, where: str) -> list[tuple[str, str, int | None]]:
    """(role, raw content, offset of the content in the string or None) per turn."""
    if not isinstance(value, str):
        return [(m["role"], m["content"], None)
                for m in parse_messages(value, field, where, need_assistant=False)]
    if not value.strip():
        raise EmptyField(f"{where}: empty {field!r}")
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
        raise Identical(f"{where}: chosen and rejected are identical")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k][:2] == rejected[k][:2]:
        k += 1
    for j in range(min(k, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[j][0] == rejected[j][0] == "assistant":
            return j
    raise NoPrompt(f"{where}: chosen and rejected share no turns before a common Assistant "
                    f"turn, so there is no prompt to split at")


def _hh_rlhf(row: dict, where: str) -> Pair:
    turns = both_sides(lambda f, v: hh_turns(f, v, where), row, where)
    j = split_turn(*turns, where)
    msgs = [tuple({"role": r, "content": c.strip() if off is not None else c} for r, c, off in t)
            for t in turns]
    for f, t in zip(("chosen", "rejected"), turns):
        if any(r == "assistant" and not c.strip() for r, c, _ in t[j:]):
            raise EmptyField(f"{where}: empty assistant turn in the {f!r} response")
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
    truncated: int = 0            # a side > seq_len, response end cut (kept or not)
    dropped_too_long: int = 0     # a side > seq_len with truncation='drop'
    dropped_no_loss: int = 0      # a side with no response token left after truncation
    truncated_no_loss: int = 0    # of `truncated`, those dropped because the cut left no target
    kept: int = 0
    tokens: int = 0               # both sides of the kept pairs
    loss_tokens: int = 0

    def dropped(self) -> dict[str, int]:
        return {f.name[8:]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("dropped_")}


@dataclasses.dataclass
class PrefStats(DataStats):
    sources: list[PairStats] = dataclasses.field(default_factory=list)
    per_source = PairStats

    def summary(self) -> str:
        def line(s):
            dropped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in s.dropped().items())
            return (f"{s.name}: {s.rows} rows -> {s.kept} pairs, {s.tokens} tokens "
                    f"({s.loss_tokens} trained); dropped {dropped}; prompt truncated "
                    f"{s.prompt_truncated}, response truncated {s.truncated}{truncated_detail(s)}")
        return "\n".join(line(s) for s in self.sources + [self.total()])


def row_margin(row: dict, where: str) -> float:
    """A pair's `margin` column (absent or null: 0): a finite number, or a CSV cell holding one."""
    value = row.get("margin")
    if value is None:
        return 0.0
    try:
        if isinstance(value, bool):
            raise ValueError
        margin = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field 'margin' must be a number, got "
                        f"{type(value).__name__} {value!r}") from None
    if margin != margin or margin in (float("inf"), float("-inf")):
        raise DataError(f"{where}: field 'margin' must be finite, got {margin}")
    return margin


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
        except (EmptyField, Identical, NoPrompt) as e:
            reason, knob, policy = {EmptyField: ("empty", "on_empty", on_empty),
                                    Identical: ("identical", "on_identical", on_identical),
                                    NoPrompt: ("no_prompt", None, "drop")}[type(e)]
            if policy == "error":
                raise DataError(f"{e} (set data.{knob}: drop to skip such rows)") from None
            setattr(stats, f"dropped_{reason}", getattr(stats, f"dropped_{reason}") + 1)
            first.setdefault(reason, str(e))
            continue
        if isinstance(pair, Pair):
            pair = dataclasses.replace(pair, margin=row_margin(row, source.where(i)))
        pairs.append(dataclasses.replace(pair, row=i))
    for reason, msg in first.items():
        log.warning("%s: dropped %d pair(s) (%s), the first: %s", source.name,
                    getattr(stats, f"dropped_{reason}"), reason.replace("_", " "), msg)
    return pairs, stats

