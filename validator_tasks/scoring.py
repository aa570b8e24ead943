"""Scorers, as the original benchmarks define them (scores in [0, 1]; RULER reports them x100).

- `string_match_all`: the fraction of gold answers that occur in the prediction (RULER's niah, vt,
  cwe and fwe metric).
- `string_match_part`: 1.0 if any gold answer occurs in the prediction, else 0.0 (RULER's qa metric).
Both match case-insensitively as substrings. `score` dispatches on a sample's `metric`; "babilong"
goes to `validator_tasks.babilong.babilong_score`, imported only when needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _check(prediction: str, answers: Sequence[str]) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str):  # a bare string would be scored letter by letter
        raise TypeError("answers must be a list of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("answers is empty: nothing to score against")


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` found (case-insensitive substring) in `prediction`."""
    _check(prediction, answers)
    pred = prediction.lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of `answers` occurs (case-insensitive substring) in `prediction`, else 0.0."""
    _check(prediction, answers)
    pred = prediction.lower()
    return max(1.0 if a.lower() in pred else 0.0 for a in answers)


def score(sample: Any, prediction: str) -> float:
    """Score `prediction` against a `Sample` (or anything with `metric` and `answers`, or such a dict)."""
    metric = sample["metric"] if isinstance(sample, dict) else sample.metric
    answers = sample["answers"] if isinstance(sample, dict) else sample.answers
    metadata = (
        sample.get("metadata") if isinstance(sample, dict) else getattr(sample, "metadata", None)
    ) or {}
    if metric == "string_match_all":
        return string_match_all(prediction, answers)
    if metric == "string_match_part":
        return string_match_part(prediction, answers)
    if metric == "babilong":
        from validator_tasks.babilong import babilong_score

        # With the question, BABILong's strict rule: labels named in the question are ignored and
        # the gold must be the only label the answer names.
        return float(babilong_score(prediction, list(answers), question=metadata.get("question")))
    raise ValueError(f"unknown metric {metric!r}; expected string_match_all, string_match_part or babilong")
