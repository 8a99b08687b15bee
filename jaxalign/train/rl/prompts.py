"""RL prompts on the host: read a prompt set (`read_prompts`), walk it in a resumable, seeded
order (`PromptStream`), left-pad a batch of them (`stack_prompts`).

Each prompt keeps its row's other columns (`Prompts.columns`), which reach the reward
functions as keyword lists (an `answer` column for a verifiable reward).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from jaxalign.data.sources import DataError, load_rows
from jaxalign.generate import bucket_length
from jaxalign.train.rl.config import PromptDataConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompts:
    name: str                  # the file, for messages
    texts: list[str]           # what reward functions see: the prompt string / last user turn
    ids: list[list[int]]       # what the policy sees: rendered and tokenized
    # Every other column of the rows ("prompt" aside), one value per prompt (None where a
    # row lacks it): the reward functions' keyword arguments.
    columns: dict[str, list] = dataclasses.field(default_factory=dict)

    def columns_of(self, indices) -> dict[str, list]:
        return {k: [v[i] for i in indices] for k, v in self.columns.items()}


def _messages(value, where: str) -> list[dict]:
    if not (isinstance(value, list) and value
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt_of(row: dict, where: str) -> tuple[list[dict] | None, str]:
    """(messages or None, the prompt's text for reward functions)."""
    if row.get("prompt") is not None:
        p = row["prompt"]
        if isinstance(p, str):
            return None, p
        msgs = _messages(p, f"{where}: field 'prompt'")
    elif row.get("messages") is not None:
        msgs = _messages(row["messages"], f"{where}: field 'messages'")
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{where}: 'messages' holds only an assistant turn; no prompt")
    else:
        raise DataError(f"{where}: no 'prompt' or 'messages' field (keys: {sorted(row)})")
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return msgs, users[-1] if users else msgs[-1]["content"]


def read_prompts(cfg: PromptDataConfig, tokenizer) -> Prompts:
    """The prompt set, rendered and tokenized; errors name the file and row."""
    source = load_rows(cfg.prompts)
    if cfg.chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source.name}: data.chat is true but the tokenizer has no chat template")
    texts, rendered = [], []
    for i, row in enumerate(source.rows):
        where = source.where(i)
        msgs, text = _prompt_of(row, where)
        if cfg.chat:
            msgs = msgs or [{"role": "user", "content": text}]
            rendered.append(tokenizer.apply_chat_template(msgs, tokenize=False,
                                                          add_generation_prompt=True))
        elif msgs is not None:
            raise DataError(f"{where}: a message-list prompt needs data.chat: true")
        else:
            rendered.append(text)
        texts.append(text)
    # A rendered template spells out its special tokens; plain text gets the tokenizer's (BOS).
    ids = tokenizer(rendered, add_special_tokens=not cfg.chat).input_ids if rendered else []
    keep = []
    for i, row_ids in enumerate(ids):
        if not row_ids:
            raise DataError(f"{source.where(i)}: the prompt is empty (no tokens)")
        if len(row_ids) <= cfg.max_prompt_len:
            keep.append(i)
    if len(keep) < len(ids):
        log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_len=%d tokens",
                    source.name, len(ids) - len(keep), len(ids), cfg.max_prompt_len)
    if not keep:
        raise DataError(f"{source.name}: no usable prompts (all {len(ids)} are longer than "
                        f"data.max_prompt_len={cfg.max_prompt_len} tokens)")
    names = sorted({k for row in source.rows for k in row} - {"prompt"})
    columns = {k: [source.rows[i].get(k) for i in keep] for k in names}
    return Prompts(source.name, [texts[i] for i in keep], [list(ids[i]) for i in keep], columns)


class PromptStream:
    """Prompt indices, `batch` at a time, in a seeded permutation per epoch; resumable from
    (epoch, index), which the checkpoint stores. A batch may span two epochs."""

    def __init__(self, n: int, batch: int, *, seed: int, shuffle: bool):
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        out: list[int] = []
        while len(out) < self.batch:
            take = self._order(self.epoch)[self.index:self.index + self.batch - len(out)]
            out.extend(int(i) for i in take)
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def prompt_length(prompts: Prompts) -> int:
    """One padded prompt length for the whole run: one compiled program per shape."""
    return bucket_length(max(len(x) for x in prompts.ids))


def stack_prompts(prompts: Prompts, indices: Sequence[int], pad_id: int, length: int):
    """Left-padded (tokens, mask) int32 arrays for the given prompt indices."""
    tokens = np.full((len(indices), length), pad_id, np.int32)
    mask = np.zeros((len(indices), length), np.int32)
    for r, i in enumerate(indices):
        ids = prompts.ids[i]
        tokens[r, length - len(ids):] = ids
        mask[r, length - len(ids):] = 1
    return tokens, mask
