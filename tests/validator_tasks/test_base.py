"""The shared length search and registry of validator_tasks.base."""

from __future__ import annotations

import random

import pytest

from validator_tasks import base
from validator_tasks.base import Built, TaskSpec, generate

WORDS = ["amber", "basin", "cedar", "delta", "ember", "fjord", "grove", "harbor", "inlet", "juniper"]


def _build(rng: random.Random, size: int) -> Built:
    value = str(rng.randrange(10**6, 10**7))  # drawn before anything that depends on size
    text = " ".join(rng.choice(WORDS) for _ in range(size))
    return Built(f"Remember {value}. {text}\nWhat number was to be remembered?", " Answer:", [value])


@pytest.fixture
def dummy_task(monkeypatch):
    monkeypatch.setitem(base.TASKS, "dummy", TaskSpec("dummy", "ruler", "string_match_all", _build))
    return "dummy"


@pytest.fixture(scope="module")
def tokenizer():
    from distill.tiny import local_corpus, train_tokenizer

    return train_tokenizer(local_corpus()[:200], 1000)


@pytest.mark.parametrize("length", [64, 500, 4096, 32768])
def test_length_within_one_percent_and_deterministic(dummy_task, tokenizer, length):
    sample = generate(dummy_task, length, seed=3, tokenizer=tokenizer)
    counted = len(tokenizer(sample.prompt + sample.answer_prefix, add_special_tokens=False)["input_ids"])
    assert counted == sample.prompt_tokens
    assert abs(counted - length) <= max(1, 0.01 * length)
    again = generate(dummy_task, length, seed=3, tokenizer=tokenizer)
    assert again == sample
    assert generate(dummy_task, length, seed=4, tokenizer=tokenizer).prompt != sample.prompt


def test_answers_do_not_depend_on_length(dummy_task, tokenizer):
    a = generate(dummy_task, 512, seed=9, tokenizer=tokenizer)
    b = generate(dummy_task, 2048, seed=9, tokenizer=tokenizer)
    assert a.answers == b.answers and a.answers[0] in b.prompt
    assert generate(dummy_task, 512, seed=10, tokenizer=tokenizer).answers != a.answers


def test_rejects_unknown_task_short_length_and_oversized_base(dummy_task, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        generate("nope", 1000, 0, tokenizer)
    with pytest.raises(ValueError, match="at least 64"):
        generate(dummy_task, 10, 0, tokenizer)
    monkeypatch.setitem(
        base.TASKS,
        "huge",
        TaskSpec("huge", "ruler", "string_match_all", lambda r, n: Built("x " * 500, "", ["x"])),
    )
    with pytest.raises(ValueError, match="without any haystack"):
        generate("huge", 100, 0, tokenizer)


def test_rng_is_stable_across_processes():
    # sha256-derived, not hash(): a fixed value guards against accidental changes of the derivation.
    assert base.task_rng("t", 7).randrange(10**9) == 895_748_910
    assert base.task_rng("t", 7).random() != base.task_rng("t", 8).random()
