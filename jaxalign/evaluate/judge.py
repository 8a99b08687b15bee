"""A reward model that reads another tokenizer than the policy's (a Llama policy judged by a
Qwen reward model, as TRL allows): completions are decoded to text by the caller and
re-encoded here exactly as the reward model's own training data was (`data.tokenize.Encoder`
with the reward model's tokenizer: its chat template when it has one, the prompt as a user
turn and the completion as the assistant turn, EOS appended; without a template, prompt +
completion + EOS; a message-list prompt is then its last user turn), then scored at the last token (`heads.score`, as `jaxalign rm` trained it).

Used by RL (`rewards.Rewarder`, on each process's rows; one process) and by the eval stage's
reward scoring (`evaluate.run`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.data.formats import Example
from jaxalign.data.tokenize import Encoder
from jaxalign.evaluate import likelihood


def same_vocab(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


@dataclasses.dataclass
class Judge:
    cfg: ModelConfig
    params: object
    tokenizer: object
    name: str = "reward model"
    chat_template: str | None = None

    def __post_init__(self):
        self.encoder = Encoder(self.tokenizer, chat_template=self.chat_template)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, prompts: Sequence, completions: Sequence[str]
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(prompt ids, completion ids) in the reward model's tokenization. A prompt is a string
        or a message list (conversational data)."""
        examples = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            reply = {"role": "assistant", "content": c}
            if not isinstance(p, str) and self.encoder.template is None:
                # no template to render a conversation with: its last user turn, as plain text
                p = next((m["content"] for m in reversed(p) if m["role"] == "user"), "")
            if isinstance(p, str):
                examples.append(Example(({"role": "user", "content": p}, reply),
                                        "prompt_completion", i))
            else:
                examples.append(Example(tuple(dict(m) for m in p) + (reply,), "chat", i))
        pairs = self.encoder.encode_many(examples, lambda r: f"{self.name}: completion {r}")
        split = [int(np.argmax(m[1:])) + 1 if m[1:].any() else len(m) for _, m in pairs]
        return [ids[:s] for (ids, _), s in zip(pairs, split)], \
            [ids[s:] for (ids, _), s in zip(pairs, split)]

    def score(self, prompts: Sequence, completions: Sequence[str], batch_size: int | None = None
              ) -> np.ndarray:
        p_ids, c_ids = self.encode(prompts, completions)
        return likelihood.rewards(self.cfg, self.params, p_ids, c_ids,
                                  batch_size=batch_size or len(p_ids), pad_id=self.pad_id)
