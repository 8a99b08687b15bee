"""Completion-vs-reference text metrics: ROUGE-L (the `rouge-score` package, as the
summarisation literature and HF `evaluate` compute it) and exact match. Pure functions of
strings; aggregation is the plain mean over pairs."""

from __future__ import annotations

from typing import Sequence

from jaxalign.config import JaxalignError
from jaxalign.synth.tasks import normalise


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise JaxalignError(f"got {len(predictions)} completions for {len(references)} references")


def rouge_l(predictions: Sequence[str], references: Sequence[str], *,
            use_stemmer: bool = False) -> list[float]:
    """ROUGE-L F-measure of each (prediction, reference): longest common subsequence of
    rouge-score's tokens (lower-cased alphanumeric words), F = 2PR / (P + R)."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    # rouge-score's argument order is (target, prediction).
    return [scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Equal after stripping surrounding whitespace and one trailing period (the rule of
    `jaxalign.synth.tasks` and scripts/eval_tasks.py)."""
    _check(predictions, references)
    return [normalise(p) == normalise(r) for p, r in zip(predictions, references)]


def mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0
