"""RULER's scorers on hand-written right, wrong and partial answers."""

from __future__ import annotations

import pytest

from validator_tasks.base import Sample
from validator_tasks.scoring import score, string_match_all, string_match_part


def _sample(metric: str, answers: list[str]) -> Sample:
    return Sample(
        task="t", target_length=64, seed=0, prompt="p", answer_prefix="", answers=answers, metric=metric
    )  # type: ignore[arg-type]


def test_match_all_right_wrong_partial() -> None:
    answers = ["4821937", "7719204", "3300185"]
    assert string_match_all("They are 4821937, 7719204 and 3300185.", answers) == 1.0
    assert string_match_all("I do not know.", answers) == 0.0
    assert string_match_all("4821937 and 3300185", answers) == pytest.approx(2 / 3)
    assert string_match_all("7719204", answers) == pytest.approx(1 / 3)


def test_match_all_case_insensitive_and_substring() -> None:
    assert string_match_all("the variables are abcde and FGHIJ", ["ABCDE", "fghij"]) == 1.0
    assert string_match_all("Amber-Harbor", ["amber-harbor"]) == 1.0
    assert string_match_all("value=12345678", ["1234567"]) == 1.0  # substring, as RULER matches
    assert string_match_all("", ["x"]) == 0.0


def test_match_part() -> None:
    answers = ["Paris", "the city of Paris"]
    assert string_match_part("It is PARIS.", answers) == 1.0
    assert string_match_part("It is Lyon.", answers) == 0.0
    assert string_match_part("paris", ["London", "Paris"]) == 1.0  # any one answer is enough


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        string_match_all("x", [])
    with pytest.raises(TypeError, match="list"):
        string_match_part("x", "abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown metric"):
        score(_sample("exact", ["a"]), "a")  # type: ignore[arg-type]


def test_score_dispatch() -> None:
    s = _sample("string_match_all", ["alpha", "beta"])
    assert score(s, "ALPHA") == 0.5
    assert score(_sample("string_match_part", ["alpha", "beta"]), "ALPHA") == 1.0
    assert score({"metric": "string_match_all", "answers": ["alpha"]}, "alpha") == 1.0


def test_score_babilong_uses_the_question_for_the_strict_rule() -> None:
    sample = {"metric": "babilong", "answers": ["kitchen"], "metadata": {"question": "Where is Mary?"}}
    assert score(sample, "In the kitchen.") == 1.0
    assert score(sample, "garden or kitchen") == 0.0  # a hedge naming two rooms is wrong
    assert score(sample, "the garden") == 0.0
    before = {
        "metric": "babilong",
        "answers": ["garden"],
        "metadata": {"question": "Where was the apple before the kitchen?"},
    }
    assert (
        score(before, "The apple was in the garden before the kitchen.") == 1.0
    )  # rooms in the question are ignored
