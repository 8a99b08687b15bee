"""Programmatic reward functions for RL demos and tests (`reward.functions`).

Each takes the prompts and the completions (lists of str, completions decoded without
special tokens), and by keyword any column of the prompt dataset it names (see
`jaxalign.train.rl.rewards`), and returns one float per completion:

  jaxalign.rewards:digits       share of the completion's non-space characters that are digits:
                                a dense "answer with a number" signal that even a random tiny
                                model can climb (the tests' learning check)
  jaxalign.rewards:arithmetic   1 for the exact answer to an arithmetic task of
                                `jaxalign.synth.tasks` ("37 + 48 = 85", its exact_match),
                                0.5 when the right number appears in the completion, else 0
  jaxalign.rewards:brevity      1 for an empty completion down to 0 at 32 words or more
                                (pair it with reward.missing_eos_penalty for "short, and done")
  jaxalign.rewards:exact_answer a verifiable reward: 1 when the completion's final answer
                                equals the row's `answer` column, else 0
  jaxalign.rewards:task_match   a verifiable reward for `jaxalign.synth.tasks` rows: 1 when
                                the whole completion is the row's `answer` column under the
                                tasks' own exact match (case kept, one trailing period and
                                surrounding space dropped), else 0
"""

from __future__ import annotations

import re
from typing import Sequence

from jaxalign.synth.tasks import OPS, exact_match, normalise

_EQUATION = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)")
_NUMBER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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


def _final_answer(text: str) -> str:
    """GSM8K's convention: what follows the last '####' (else the whole text), stripped."""
    return text.rpartition("####")[2].strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def exact_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence,
                 **kwargs) -> list[float]:
    """1.0 when the completion's final answer is the `answer` column's, else 0.0.

    The expected answer is the column's text after its last '####' (GSM8K) or all of it. A
    numeric answer is compared with the last number in the completion (commas dropped, so
    1,000 = 1000 and 42.0 = 42); any other answer with the completion's final answer,
    whitespace and case aside."""
    out = []
    for c, a in zip(completions, answer):
        want = _final_answer(str(a))
        number = _as_number(want)
        if number is not None:
            found = _DECIMAL.findall(c)
            out.append(float(bool(found) and _as_number(found[-1]) == number))
        else:
            out.append(float(_final_answer(c).casefold() == want.casefold()))
    return out


def task_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence,
               **kwargs) -> list[float]:
    """1.0 when the completion equals the row's `answer` under `synth.tasks.normalise`, the
    comparison `synth.tasks.exact_match` scores, else 0.0. `exact_answer` is laxer (case
    folded, the last number of a numeric answer): "apple, pear" passes it for "Apple, Pear"."""
    return [float(normalise(c) == normalise(str(a))) for c, a in zip(completions, answer)]
