"""Prompts for generation: the one reader that RL rollouts and evaluation share.

`load_prompts(spec, tokenizer, ...)` reads a dataset's prompts, one per row in row order:

  {prompt[, ...]}      `prompt` a string (one user turn) or a list of messages; this covers
                       prompt / completion, preference and unpaired (KTO) rows
  {messages}           the messages before the last assistant turn (SFT chat rows)
  {chosen, rejected}   HH-RLHF pairs: the prompt as training splits it (`pairs.split_turn`)

Rendering: with a chat template (chat=True, or chat=None and the tokenizer / `chat_template`
has one) the prompt messages and the generation prompt, tokenized without special tokens
(the template spells them out), exactly as a training sequence starts; else the plain text
with the tokenizer's special tokens (BOS). Prompts longer than max_prompt_len tokens keep
their end (a leading BOS kept), as training's `prompt_truncation: keep_end`, or are dropped
(counted and logged), as RL does. `texts` is what reward functions see: the prompt string,
or the last user turn of a message prompt.

Each prompt keeps its row's other columns (`Prompts.columns`): RL hands them to reward
functions as keyword lists (an `answer` column for a verifiable reward).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxalign.data.config import DatasetSpec
from jaxalign.data.formats import EmptyField, get_field, parse_messages
from jaxalign.data.pairs import (Identical, NoPrompt, both_sides, check_type, detect_pair_format,
                                 hh_turns, split_turn)
from jaxalign.data.pipeline import resolve_template
from jaxalign.data.sources import DataError, load_rows
from jaxalign.data.tokenize import Encoder

log = logging.getLogger("jaxalign.data")

TOO_LONG = ("keep_end", "drop")


@dataclasses.dataclass
class Prompts:
    name: str                  # the file, for messages
    texts: list[str]           # what reward functions see: the prompt string / last user turn
    ids: list[list[int]]       # what the policy sees: rendered and tokenized
    rendered: list[str] = dataclasses.field(default_factory=list)  # the strings tokenized
    rows: list[int] = dataclasses.field(default_factory=list)      # source row of each prompt
    # Every other column of the rows ("prompt" aside), one value per prompt (None where a
    # row lacks it): what RL reward functions receive as keyword arguments.
    columns: dict[str, list] = dataclasses.field(default_factory=dict)
    # Each prompt as TRL's reward functions receive it: the string, or the message list
    # (conversational data); empty when the reader did not record them.
    trl: list = dataclasses.field(default_factory=list)

    def columns_of(self, indices) -> dict[str, list]:
        return {k: [v[i] for i in indices] for k, v in self.columns.items()}


def _hh_prompt(row: dict, where: str) -> tuple[tuple[dict, ...], str | None]:
    try:
        try:
            turns = both_sides(lambda f, v: hh_turns(f, v, where), row, where)
            j = split_turn(*turns, where)
        except (Identical, EmptyField):  # no pair to split: the prompt of the chosen conversation
            turns = [hh_turns("chosen", get_field(row, "chosen", where), where)]
            j = max((i for i, t in enumerate(turns[0]) if t[0] == "assistant"), default=0)
    except (EmptyField, NoPrompt) as e:
        raise DataError(str(e)) from None
    msgs = tuple({"role": r, "content": c.strip() if off is not None else c}
                 for r, c, off in turns[0][:j])
    plain = row["chosen"][:turns[0][j][2]] if j and turns[0][j][2] is not None else None
    return msgs, plain


def prompt_of(row: dict, fmt: str, where: str) -> tuple[tuple[dict, ...], str | None]:
    """(prompt messages, plain prompt text or None) of a row of format fmt ('prompt', 'chat'
    or a pair format)."""
    try:
        if fmt == "prompt":
            prompt = get_field(row, "prompt", where)
            check_type(prompt, "prompt", where)
            if isinstance(prompt, str):
                msgs, plain = ({"role": "user", "content": prompt},), prompt
            else:
                msgs, plain = parse_messages(prompt, "prompt", where, need_assistant=False), None
        elif fmt == "chat":
            msgs = parse_messages(get_field(row, "messages", where), "messages", where,
                                  need_assistant=False)
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"),
                       default=len(msgs))
            msgs, plain = msgs[:last], None
        elif fmt == "hh_rlhf":
            msgs, plain = _hh_prompt(row, where)
        else:
            raise DataError(f"{where}: prompts are read from formats prompt (also preference, "
                            f"prompt_completion, unpaired), chat and hh_rlhf, not {fmt!r}")
    except EmptyField as e:
        raise DataError(str(e)) from None
    if not msgs or (plain is not None and not plain.strip()):
        raise DataError(f"{where}: empty prompt")
    return msgs, plain


# How a prompt is found in a row of each named format ('prompt': its `prompt` field).
_PROMPT_FORMAT = {"preference": "prompt", "prompt_completion": "prompt", "unpaired": "prompt"}


def _format(row: dict, fmt: str, where: str) -> str:
    if fmt != "auto":
        return _PROMPT_FORMAT.get(fmt, fmt)
    keys = {k for k, v in row.items() if v is not None}
    found = [f for field, f in (("prompt", "prompt"), ("messages", "chat")) if field in keys]
    if found:
        return found[0]
    if keys & {"chosen", "rejected"}:
        return detect_pair_format(row, where)
    raise DataError(f"{where}: no 'prompt' or 'messages' field (keys: {sorted(keys)})")


def _last_user(msgs: tuple[dict, ...], plain: str | None) -> str:
    if plain is not None:
        return plain
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return users[-1] if users else msgs[-1]["content"]


def load_prompts(spec: DatasetSpec | str, tokenizer, *, chat: bool | None = None,
                 chat_template: str | None = None, max_prompt_len: int | None = None,
                 too_long: str = "keep_end", cache_dir: str | None = None) -> Prompts:
    """The prompts of a dataset (see the module docstring); errors name the file and row."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r} is not one of {TOO_LONG}")
    spec = DatasetSpec(path=spec) if isinstance(spec, str) else spec
    source = load_rows(spec, cache_dir=cache_dir)
    if not source.rows:
        raise DataError(f"{source.name}: file has no rows")
    encoder = Encoder(tokenizer, chat_template=resolve_template(chat_template))
    templated = encoder.template is not None if chat is None else chat
    if chat and encoder.template is None:
        raise DataError(f"{source.name}: data.chat is true but the tokenizer has no chat template")
    fmt = _format(source.rows[0], spec.format, source.where(0))
    texts, rendered, trl = [], [], []
    for i, row in enumerate(source.rows):
        where = source.where(i)
        msgs, plain = prompt_of(row, _format(row, fmt, where), where)
        if templated:
            rendered.append(encoder.render(msgs, True, where))
        elif plain is not None:
            rendered.append(plain)
        else:
            raise DataError(f"{where}: a message-list prompt needs a chat template (data.chat: "
                            f"true, or a tokenizer / chat_template with one)")
        texts.append(_last_user(msgs, plain))
        trl.append(plain if plain is not None else [dict(m) for m in msgs])
    ids = encoder.token_ids(rendered, special=not templated)
    bos = getattr(tokenizer, "bos_token_id", None)
    keep = []
    for n, x in enumerate(ids):
        if len(x) == 0:
            raise DataError(f"{source.where(n)}: the prompt is empty (no tokens)")
        if max_prompt_len is not None and len(x) > max_prompt_len:
            if too_long == "drop":
                continue
            lead = int(bos is not None and x[0] == bos)  # keep a leading BOS
            ids[n] = np.concatenate([x[:lead], x[len(x) - max_prompt_len + lead:]])
        keep.append(n)
    if len(keep) < len(ids):
        log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_len=%d tokens",
                    source.name, len(ids) - len(keep), len(ids), max_prompt_len)
    if not keep:
        raise DataError(f"{source.name}: no usable prompts (all {len(ids)} are longer than "
                        f"data.max_prompt_len={max_prompt_len} tokens)")
    names = sorted({k for row in source.rows for k in row} - {"prompt"})
    columns = {k: [source.rows[n].get(k) for n in keep] for k in names}
    return Prompts(source.name, [texts[n] for n in keep], [ids[n].tolist() for n in keep],
                   [rendered[n] for n in keep], keep, columns, [trl[n] for n in keep])
