"""Loss masks for chat templates that re-render earlier turns (the prefix method fails).

Stock templates of several families render a conversation differently from the sum of its
prefixes: Qwen3 strips `<think>` blocks from assistant turns before the last user turn,
DeepSeek-R1-Distill's generation prompt ends in `<think>\\n` that its rendering of a finished
turn never shows (it strips the reasoning), Mistral v0.3 puts the system text into the *last*
user turn. For those, the training text and its mask are built from what the model sees:

- the context C = render(messages[:-1], add_generation_prompt=True): the prompt the model is
  given at generation time for the last assistant turn (system placement and earlier turns
  exactly as the stock template renders them there);
- the last assistant turn: if render(messages) continues C, its continuation (Qwen3: the
  thinking block, the answer and `<|im_end|>`); otherwise the message's own text (less any
  leading part C already ends with, e.g. DeepSeek's `<think>\\n`) followed by the text the
  template closes a turn with (its EOS);
- each earlier assistant turn k is located in C by rendering C twice more with message k's
  content replaced by a marker: the characters where the renderings differ are that message's
  text as rendered; the special token right after it (the end-of-turn) is trained too.

A template that drops a message's text (a marker never appears) is refused with one line.
"""

from __future__ import annotations

import numpy as np

# Two markers with different first and last characters: the region where a rendering with a
# marker differs from the real one is over-estimated only when the content shares the
# marker's first (last) character, which cannot happen for both markers at once.
MARKERS = ("\u2983jxa-a\u2984", "\u2985jxa-b\u2986")


def _prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _suffix(a: str, b: str, cap: int) -> int:
    i = 0
    while i < cap and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def content_region(render, msgs, k: int, gen: bool, base: str) -> tuple[int, int] | None:
    """(start, end) of message k's rendered text in base = render(msgs, gen); None when the
    template drops it."""
    starts, ends = [], []
    for mark in MARKERS:
        alt = [dict(m) for m in msgs]
        alt[k]["content"] = mark
        r = render(alt, gen)
        if mark not in r:
            return None
        p = _prefix(base, r)
        s = _suffix(base, r, min(len(base), len(r)) - p)
        starts.append(p)
        ends.append(len(base) - s)
    return min(starts), max(ends)


def _leading_overlap(context: str, text: str) -> int:
    """Length of the longest non-blank head of `text` that `context` already ends with
    (DeepSeek-R1's generation prompt ends in the `<think>\\n` a stored answer starts with)."""
    for j in range(min(len(context), len(text), 256), 0, -1):  # generation prompts are short
        if text[:j].strip() and context.endswith(text[:j]):
            return j
    return 0


def plan_text(render, msgs, where: str, error) -> tuple[str, list[tuple[int, int, bool]]]:
    """The training text and its trained character spans (start, end, is_final_turn)."""
    last_is_reply = msgs[-1]["role"] == "assistant"
    ctx = msgs[:-1] if last_is_reply else msgs
    context = render(ctx, last_is_reply)
    spans = []
    for k, m in enumerate(ctx):
        if m["role"] != "assistant":
            continue
        region = content_region(render, ctx, k, last_is_reply, context)
        if region is None:
            raise error(f"{where}: the chat template drops the text of message {k}, so its loss "
                        f"mask cannot be found; use a template that renders every assistant "
                        f"turn (data.chat_template)")
        spans.append((region[0], region[1], False))
    if not last_is_reply:
        return context, spans
    full = render(msgs, False)
    if full.startswith(context):
        text = full
    else:
        region = content_region(render, msgs, len(msgs) - 1, False, full)
        if region is None:
            raise error(f"{where}: the chat template drops the text of the last assistant turn; "
                        f"use a template that renders it (data.chat_template)")
        a, b = region
        head = full[:a]
        lead = head[len(head.rstrip()):]
        lead = "" if context.endswith(lead) else lead
        reply = msgs[-1]["content"]
        reply = reply[_leading_overlap(context, reply):]
        text = context + lead + reply + full[b:]
    spans.append((len(context), len(text), True))
    return text, spans


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def mask_from_spans(tokenizer, text: str, spans, eos: int, special: set[int], error=ValueError
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids of `text`, the mask of tokens overlapping a span (an earlier turn also trains
    the special end-of-turn token right after it; the final turn ends at its last EOS), and
    whether the final turn has an EOS."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise error("this chat template re-renders earlier turns, and finding the assistant "
                    "tokens then needs a fast tokenizer (tokenizer.json)") from None
    ids = np.asarray(enc["input_ids"], np.int32)
    offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), np.uint8)
    final_eos = True
    for s, e, final in spans:
        hit = np.nonzero((offs[:, 0] < e) & (offs[:, 1] > s))[0]
        if not len(hit):
            continue
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        if final:
            eos_at = np.nonzero(ids[lo:hi] == eos)[0]
            final_eos = len(eos_at) > 0
            if final_eos:
                hi = lo + int(eos_at[-1]) + 1
        elif hi < len(ids) and int(ids[hi]) in special:
            hi += 1
        mask[lo:hi] = 1
    return ids, mask, final_eos
