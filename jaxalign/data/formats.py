"""Detecting a dataset's format and normalising its rows to one canonical form.

Canonical example: a list of messages `{"role", "content"}` (roles system / user /
assistant) plus a `kind`:

  chat                 rendered with a chat template; loss on assistant messages.
  prompt_completion    one user message and one assistant message; rendered with a chat
                       template when there is one, else plain concatenation prompt + completion.
  text                 one assistant message holding the whole text; plain, loss on everything.

alpaca / dolly rows become `chat` examples (a user / assistant pair), so they need a template.

Formats (detected from the first row's keys, or named by `DatasetSpec.format`):

  alpaca             {instruction, input?, output}   user = instruction [+ "\n\n" + input]
  dolly              {instruction, context?, response}  user = instruction [+ "\n\n" + context]
  chat               {messages: [{role, content}]}
  sharegpt           {conversations: [{from, value}]}  from: system / human / gpt (or user / assistant)
  prompt_completion  {prompt, completion}  (strings; or lists of messages, TRL's conversational form)
  text               {text}

A missing (or null, which is what `datasets` fills in for a key absent from some rows) required
field, non-string content or an unknown role raises `DataError` naming the file, row and field.
An empty completion / assistant message / text is dropped and counted when `on_empty='drop'`
(the default: real datasets contain a few, and one should not stop a run), an error when 'error'.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxalign.data.sources import DataError, Source

log = logging.getLogger("jaxalign.data")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]
    kind: str  # 'chat' | 'prompt_completion' | 'text'
    row: int = -1  # index of the source row, for error messages


class EmptyField(Exception):
    """Raised inside a row converter; turned into a drop or an error by `normalise`."""


def detect_format(row: dict, name: str = "dataset") -> str:
    # `datasets` gives every row every column (null where a row lacked it): use non-null keys.
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "chosen" in keys and "rejected" in keys:
        raise DataError(f"{name}: rows have 'chosen' / 'rejected': this is preference data, "
                        f"not SFT data")
    raise DataError(f"{name}: cannot detect the format from the first row's keys {sorted(keys)}; "
                    f"expected messages, conversations, instruction+output (alpaca), "
                    f"instruction+response (dolly), prompt+completion or text; "
                    f"or set the dataset's format")


def get_field(row: dict, key: str, where: str, *, required: bool = True) -> Any:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    return value


def _string(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _joined(row, where, main, extra, answer):
    instruction = _string(get_field(row, main, where), main, where)
    context = _string(get_field(row, extra, where, required=False), extra, where)
    output = _string(get_field(row, answer, where), answer, where)
    if not output.strip():
        raise EmptyField(f"{where}: empty {answer!r}")
    user = instruction + ("\n\n" + context if context.strip() else "")
    return Example(({"role": "user", "content": user},
                    {"role": "assistant", "content": output}), "chat")


def parse_messages(msgs: Any, field: str, where: str, role_key="role", content_key="content",
              role_map=None, need_assistant=True) -> tuple[dict, ...]:
    if not isinstance(msgs, (list, tuple)):
        raise DataError(f"{where}: field {field!r} must be a list of messages, "
                        f"got {type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        f = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {f} must be a mapping, got {type(m).__name__}")
        role = _string(get_field(m, role_key, where + f", {f}"), f"{f}.{role_key}", where)
        content = _string(get_field(m, content_key, where + f", {f}"), f"{f}.{content_key}", where)
        known = role_map if role_map is not None else {r: r for r in ROLES}
        if role not in known:
            raise DataError(f"{where}: {f}.{role_key} {role!r} is not a known role; "
                            f"expected one of {sorted(known)}")
        role = known[role]
        if role == "assistant" and not content.strip():
            raise EmptyField(f"{where}: {f} is an empty assistant message")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise EmptyField(f"{where}: {field!r} has no assistant message")
    return tuple(out)


def _chat(row, where):
    return Example(parse_messages(get_field(row, "messages", where), "messages", where), "chat")


def _sharegpt(row, where):
    msgs = parse_messages(get_field(row, "conversations", where), "conversations", where,
                     role_key="from", content_key="value", role_map=SHAREGPT_ROLES)
    return Example(msgs, "chat")


def _prompt_completion(row, where):
    prompt = get_field(row, "prompt", where)
    completion = get_field(row, "completion", where)
    if isinstance(prompt, list):  # TRL's conversational prompt / completion
        msgs = parse_messages(prompt, "prompt", where, need_assistant=False)
        if isinstance(completion, str):
            if not completion.strip():
                raise EmptyField(f"{where}: empty 'completion'")
            return Example(msgs + ({"role": "assistant", "content": completion},), "chat")
        return Example(msgs + parse_messages(completion, "completion", where), "chat")
    prompt = _string(prompt, "prompt", where)
    completion = _string(completion, "completion", where)
    if not completion.strip():
        raise EmptyField(f"{where}: empty 'completion'")
    return Example(({"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion}), "prompt_completion")


def _text(row, where):
    text = _string(get_field(row, "text", where), "text", where)
    if not text.strip():
        raise EmptyField(f"{where}: empty 'text'")
    return Example(({"role": "assistant", "content": text},), "text")


CONVERTERS = {
    "alpaca": lambda row, where: _joined(row, where, "instruction", "input", "output"),
    "dolly": lambda row, where: _joined(row, where, "instruction", "context", "response"),
    "chat": _chat,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _text,
}


def normalise(source: Source, fmt: str = "auto", on_empty: str = "drop") -> tuple[list[Example], int, str]:
    """Converts every row of `source`; returns (examples, number dropped as empty, format used)."""
    if not source.rows:
        raise DataError(f"{source.name}: dataset has no rows")
    if fmt == "auto":
        fmt = detect_format(source.rows[0], source.name)
    if fmt not in CONVERTERS:
        raise DataError(f"{source.name}: unknown format {fmt!r}; expected one of {sorted(CONVERTERS)}")
    convert = CONVERTERS[fmt]
    examples, dropped, first = [], 0, None
    for i, row in enumerate(source.rows):
        try:
            ex = convert(row, source.where(i))
        except EmptyField as e:
            if on_empty == "error":
                raise DataError(f"{e} (set data.on_empty: drop to skip such rows)") from None
            dropped += 1
            first = first or str(e)
            continue
        examples.append(dataclasses.replace(ex, row=i))
    if dropped:
        log.warning("%s: dropped %d empty example(s), the first: %s", source.name, dropped, first)
    return examples, dropped, fmt
