"""Canonical examples -> (token ids, loss mask), with truncation and counts.

`mask[t] = 1` means token t is a trained *target* (the model is taught to predict it from
tokens < t); the batch builder shifts it onto the input positions.

Chat examples go through a chat template (the tokenizer's, or `DataConfig.chat_template`).
Which tokens carry loss is found by rendering prefixes, so no `{% generation %}` tags are
needed: for every assistant message k, the tokens that `render(messages[:k+1])` adds to
`render(messages[:k], add_generation_prompt=True)` are that message (the role header belongs
to the generation prompt and is not trained). A template whose rendering of a prefix is not a
string prefix of the whole conversation (it rewrites earlier turns: Qwen3, DeepSeek-R1,
Mistral v0.3) goes through `data.spans` instead: the last reply trained after its generation
prompt, earlier replies located where the template renders them (one log line says so). A
template that refuses a system role gets the system text merged into the first user turn
(`render`; one log line). When the strings are prefixes but the tokens are not (BPE merging
across the boundary, e.g. ChatML's header "\n" with content starting "\n\n") the boundary is
the longest common token prefix: the merged token, which holds message text, is trained.

End of turn: if an assistant span contains the EOS token (ChatML's `<|im_end|>`) the span
ends at, and includes, the last EOS: that token is the trained end-of-turn token, and the
template's trailing "\n" is not trained. If the final assistant message has no EOS in its
span, one is appended and trained. The mask is separate from the ids, so this holds when
pad == eos.

`prompt_completion` examples without any template, and `text` examples always, are plain:
`tok(prompt, add_special_tokens=True) + tok(completion) + [eos]` (prompt untrained).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from jaxalign.data import spans as S
from jaxalign.data.formats import Example
from jaxalign.data.sources import DataError

log = logging.getLogger("jaxalign.data")

CHUNK = 512  # examples rendered per batched tokenizer call


@dataclasses.dataclass
class TokenizedSet:
    """Ragged token ids and loss masks of n examples, stored flat (`offsets` has n + 1 entries)."""

    name: str
    ids: np.ndarray      # (total,) int32
    mask: np.ndarray     # (total,) uint8, 1 = trained target
    offsets: np.ndarray  # (n + 1,) int64

    @classmethod
    def from_pairs(cls, name: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> "TokenizedSet":
        lengths = np.array([len(i) for i, _ in pairs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        return cls(name, cat([i for i, _ in pairs], np.int32), cat([m for _, m in pairs], np.uint8),
                   offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "TokenizedSet":
        return TokenizedSet.from_pairs(name or self.name, [self[int(i)] for i in indices])

    def fingerprint(self) -> int:
        """Cheap content check for resume: CRC of the lengths and masks and ids."""
        import zlib
        crc = zlib.crc32(self.offsets.tobytes())
        crc = zlib.crc32(self.mask.tobytes(), crc)
        return zlib.crc32(self.ids.tobytes(), crc)


@dataclasses.dataclass
class SourceStats:
    """What happened to one dataset's rows. The loop logs `DataStats.summary()`."""

    name: str
    format: str = ""
    rows: int = 0               # rows read
    dropped_empty: int = 0      # empty completion / assistant message / text (on_empty='drop')
    truncated: int = 0          # longer than seq_len and cut to seq_len (kept or not)
    dropped_too_long: int = 0   # longer than seq_len with truncation='drop'
    dropped_no_loss: int = 0    # no trained token left (e.g. the completion was cut off)
    truncated_no_loss: int = 0  # of `truncated`, those dropped because the cut left no target
    kept: int = 0
    tokens: int = 0             # tokens of the kept examples
    loss_tokens: int = 0        # trained targets of the kept examples


@dataclasses.dataclass
class DataStats:
    sources: list[SourceStats] = dataclasses.field(default_factory=list)
    per_source = SourceStats  # the counts class summed by `total` (PairStats for pairs)

    def total(self) -> SourceStats:
        out = self.per_source("total")
        for s in self.sources:
            for f in dataclasses.fields(self.per_source):
                if f.name not in ("name", "format"):
                    setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
        return out

    def as_dict(self) -> dict:
        return {"sources": [dataclasses.asdict(s) for s in self.sources],
                "total": dataclasses.asdict(self.total())}

    def summary(self) -> str:
        def line(s):
            return (f"{s.name}: {s.rows} rows -> {s.kept} examples, {s.tokens} tokens "
                    f"({s.loss_tokens} trained); dropped {s.dropped_empty} empty, "
                    f"{s.dropped_too_long} too long, {s.dropped_no_loss} with no trained token; "
                    f"truncated {s.truncated}{truncated_detail(s)}")
        return "\n".join(line(s) for s in self.sources + [self.total()])


def truncated_detail(s) -> str:
    return f" ({s.truncated_no_loss} of them then dropped)" if s.truncated_no_loss else ""


def length_warning(s, seq_len: int, truncation: str, unit: str, target: str) -> str | None:
    """The one warning line about over-long items of a source, or None when there were none.
    Truncated items whose cut left no trained token are counted both as truncated and as
    dropped, so the figures add up to what the summary shows."""
    if truncation == "drop":
        if not s.dropped_too_long:
            return None
        return f"{s.name}: {s.dropped_too_long} {unit} longer than seq_len {seq_len} were dropped"
    if not s.truncated:
        return None
    msg = f"{s.name}: {s.truncated} {unit} longer than seq_len {seq_len} were truncated"
    if s.truncated_no_loss:
        msg += (f"; {s.truncated_no_loss} of them had no {target} token left and were dropped "
                f"(raise data.seq_len to keep them)")
    return msg


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    neq = np.nonzero(a[:n] != b[:n])[0]
    return int(neq[0]) if len(neq) else n


class Encoder:
    """Tokenizes canonical examples with a tokenizer and an optional template override."""

    def __init__(self, tokenizer, *, chat_template: str | None = None, train_on_prompt: bool = False):
        self.tok = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.train_on_prompt = train_on_prompt
        self.eos = tokenizer.eos_token_id
        self.told: set[str] = set()  # the one-time log lines already given
        self.special: set[int] | None = None  # special token ids, found when first needed
        if self.eos is None:
            raise DataError("tokenizer has no eos_token_id; set one so examples can be ended")

    def render(self, messages, gen: bool, where: str) -> str:
        """The template's string. A template that refuses a system role (Gemma 2's
        raise_exception) gets the system text merged into the first user turn, as Gemma 3's
        own template does; said once."""
        try:
            return self._render(messages, gen, where)
        except DataError as refused:
            msgs = list(messages)
            if len(msgs) < 2 or msgs[0]["role"] != "system" or msgs[1]["role"] != "user":
                raise
            merged = [{**msgs[1], "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            try:
                out = self._render(merged + [dict(m) for m in msgs[2:]], gen, where)
            except DataError:
                raise refused from None
            self._tell("system", f"{where}: the chat template refuses a system message ({refused}); "
                                 f"its text is merged into the first user turn, here and in every "
                                 f"later such row")
            return out

    def _render(self, messages, gen: bool, where: str) -> str:
        if not messages:
            return ""
        try:
            return self.tok.apply_chat_template(list(messages), chat_template=self.template,
                                                tokenize=False, add_generation_prompt=gen)
        except Exception as e:
            raise DataError(f"{where}: chat template failed: {type(e).__name__}: {e}") from None

    def token_ids(self, texts: list[str], special: bool) -> list[np.ndarray]:
        if not texts:
            return []
        out = self.tok(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in out]

    def encode_many(self, examples: Sequence[Example], where: Callable[[int], str]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for start in range(0, len(examples), CHUNK):
            out.extend(self._encode_chunk(examples[start:start + CHUNK], where))
        return out

    def _templated(self, ex: Example) -> bool:
        return ex.kind == "chat" or (ex.kind == "prompt_completion" and self.template is not None)

    def _encode_chunk(self, examples, where):
        # Render every string first, then tokenize them in one batched call per kind.
        plans, plain_pc, plain_text = [], [], []
        for ex in examples:
            if self._templated(ex):
                if not self.template:
                    raise DataError(f"{where(ex.row)}: chat-format data needs a chat template, and "
                                    f"the tokenizer has none; set data.chat_template")
                plans.append(self._plan(ex, where(ex.row)))
            elif ex.kind == "prompt_completion":
                plain_pc.append(ex)
            else:
                plain_text.append(ex)
        # The last message's rendering is the full one: tokenize each distinct string once.
        unique = list(dict.fromkeys(t for _, strings in plans if isinstance(strings, list)
                                    for t in strings))
        toks = dict(zip(unique, self.token_ids(unique, special=False)))
        chat = iter([self._finish_chat(ex, [toks[t] for t in strings]) if isinstance(strings, list)
                     else self._finish_spans(ex, *strings) for ex, strings in plans])
        prompts = self.token_ids([ex.messages[0]["content"] for ex in plain_pc], special=True)
        completions = self.token_ids([ex.messages[1]["content"] for ex in plain_pc], special=False)
        pc = iter([self._finish_plain(p, c) for p, c in zip(prompts, completions)])
        text = iter([self._finish_plain(np.zeros(0, np.int32), t) for t in
                     self.token_ids([ex.messages[0]["content"] for ex in plain_text], special=True)])
        return [next(chat) if self._templated(ex) else next(pc) if ex.kind == "prompt_completion"
                else next(text) for ex in examples]

    def _plan(self, ex: Example, where: str):
        """Strings to tokenize: the full rendering, then (prefix, prefix + message k) for each
        assistant message k."""
        msgs = ex.messages
        full = self.render(msgs, False, where)
        strings = [full]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:k], True, where)
            upto = full if k == len(msgs) - 1 else self.render(msgs[:k + 1], False, where)
            if not (upto.startswith(before) and full.startswith(upto)):
                return ex, self._span_plan(msgs, where)
            strings += [before, upto]
        return ex, strings

    def _tell(self, key: str, line: str) -> None:
        if key not in self.told:
            self.told.add(key)
            log.warning(line)

    def _span_plan(self, msgs, where: str):
        """Not prefix-stable (the template re-renders earlier turns): see data/spans.py."""
        self._tell("spans", f"{where}: the chat template re-renders earlier turns (not "
                            f"prefix-stable); the last assistant turn is trained after its "
                            f"generation prompt and earlier turns as the template renders them there")
        render = lambda m, gen: self.render(m, gen, where)
        return S.plan_text(render, msgs, where, DataError)

    def _finish_spans(self, ex, text, spans):
        if self.special is None:
            self.special = S.special_ids(self.tok)
        ids, mask, final_eos = S.mask_from_spans(self.tok, text, spans, self.eos, self.special,
                                                  DataError)
        return self._close(ex, ids, mask, final_eos)

    def _finish_chat(self, ex, toks):
        ids = toks[0]
        mask = np.zeros(len(ids), np.uint8)
        last_has_eos = True
        for j in range(1, len(toks), 2):
            s = common_prefix(ids, toks[j])
            e = common_prefix(ids, toks[j + 1])
            eos_at = np.nonzero(ids[s:e] == self.eos)[0]
            if len(eos_at):
                e = s + int(eos_at[-1]) + 1
            mask[s:e] = 1
            last_has_eos = len(eos_at) > 0
        return self._close(ex, ids, mask, last_has_eos)

    def _close(self, ex, ids, mask, ends_with_eos: bool):
        """train_on_prompt trains on every token; a conversation ending on an assistant turn
        whose template writes no EOS gets one (trained), so the model learns to stop."""
        if self.train_on_prompt:
            mask[:] = 1
        if not ends_with_eos and ex.messages[-1]["role"] == "assistant":
            ids = np.append(ids, np.int32(self.eos))
            mask = np.append(mask, np.uint8(1))
        return ids, mask

    def _finish_plain(self, prompt: np.ndarray, completion: np.ndarray):
        """prompt + completion + EOS; the prompt is trained only with train_on_prompt."""
        ids = np.concatenate([prompt, completion]).astype(np.int32)
        mask = np.concatenate([np.full(len(prompt), self.train_on_prompt),
                               np.ones(len(completion))]).astype(np.uint8)
        if len(ids) == 0 or ids[-1] != self.eos:  # the tokenizer may already add it
            ids = np.append(ids, np.int32(self.eos))
            mask = np.append(mask, np.uint8(1))
        return ids, mask


def tokenize_examples(examples: Sequence[Example], encoder: Encoder, *, seq_len: int,
                      truncation: str, stats: SourceStats, where: Callable[[int], str]
                      ) -> TokenizedSet:
    """Encodes, applies the truncation policy and counts into `stats`."""
    kept = []
    for ids, mask in encoder.encode_many(examples, where):
        if len(ids) > seq_len:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated = True
        else:
            truncated = False
        stats.truncated += truncated
        if not mask[1:].any():  # the first token is never a target
            stats.dropped_no_loss += 1
            stats.truncated_no_loss += truncated
            continue
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask[1:].sum())
        kept.append((ids, mask))
    stats.kept += len(kept)
    return TokenizedSet.from_pairs(stats.name, kept)
