"""Programmatic reward functions for PPO / GRPO demos and tests (`reward.functions`).

Each takes the prompts and the completions (lists of str, completions decoded without
special tokens) and returns one float per completion:

  jaxalign.rewards:digits       share of the completion's non-space characters that are digits:
                                a dense "answer with a number" signal that even a random tiny
                                model can climb (the tests' learning check)
  jaxalign.rewards:arithmetic   1 for the exact answer to an arithmetic task of
                                `jaxalign.synth.tasks` ("37 + 48 = 85", its exact_match),
                                0.5 when the right number appears in the completion, else 0
  jaxalign.rewards:brevity      1 for an empty completion down to 0 at 32 words or more
                                (pair it with reward.missing_eos_penalty for "short, and done")
"""

from __future__ import annotations

import re
from typing import Sequence

from jaxalign.synth.tasks import OPS, exact_match

_EQUATION = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)")
_NUMBER = re.compile(r"-?\d+")


def digits(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    out = []
    for c in completions:
        chars = [ch for ch in c if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0)
    return out


def arithmetic(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Prompts without an 'a op b' equation score 0."""
    out = []
    for p, c in zip(prompts, completions):
        m = _EQUATION.search(p)
        if m is None:
            out.append(0.0)
            continue
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        result = OPS[op](a, b)
        if exact_match([c], [f"{a} {op} {b} = {result}"])["exact_match"] == 1.0:
            out.append(1.0)
        elif str(result) in _NUMBER.findall(c):
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def brevity(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    return [max(0.0, 1.0 - len(c.split()) / 32.0) for c in completions]
