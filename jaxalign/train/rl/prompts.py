"""RL prompts on the host: read a prompt set (`read_prompts`, through the one prompt reader
`jaxalign.data.prompts`), walk it in a resumable, seeded order (`PromptStream`), left-pad a
batch of them (`stack_prompts`).

Each prompt keeps its row's other columns (`Prompts.columns`), which reach the reward
functions as keyword lists (an `answer` column for a verifiable reward).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxalign.data.prompts import Prompts, load_prompts
from jaxalign.generate import bucket_length
from jaxalign.train.rl.config import PromptDataConfig


def read_prompts(cfg: PromptDataConfig, tokenizer) -> Prompts:
    """RL's prompt set: `jaxalign.data.prompts.load_prompts` under the data.* keys, prompts
    longer than data.max_prompt_len dropped (not cut: a cut prompt is another question)."""
    return load_prompts(cfg.prompts, tokenizer, chat=cfg.chat, max_prompt_len=cfg.max_prompt_len,
                        too_long="drop")


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
