"""RULER-style task generators: determinism, length accuracy, solvability, needle placement."""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter

import pytest

import validator_tasks.ruler as ruler
from distill import tiny
from validator_tasks.base import TASKS, Sample, generate, task_rng
from validator_tasks.scoring import score

RULER_TASKS = [
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
]


@functools.cache
def _tokenizer(vocab_size: int = 2000):
    return tiny.train_tokenizer(tiny.local_corpus(), vocab_size)


@functools.cache
def _sample(task: str, length: int, seed: int) -> Sample:
    return generate(task, length, seed, _tokenizer())


def _build(task: str, seed: int, size: int, length: int = 4096):
    return TASKS[task].build(task_rng(task, seed), size)


def _wrong(task: str, sample: Sample) -> str:
    """A plausible but wrong prediction: the distractors' answers where the task has distractors."""
    meta = sample.metadata
    if task == "niah_multikey":
        return " ".join(n["value"] for n in meta["needles"] if not n["queried"])
    if task == "variable_tracking":
        return ", ".join(meta["chains"][1]["variables"])
    if task in ("common_words", "frequent_words"):
        words = Counter(re.findall(r"\b[a-z]{6}\b", sample.prompt.split("\n\n")[1]))
        return ", ".join(w for w, _ in words.most_common(40) if w not in sample.answers)
    return "I could not find it. 1234567"


def test_all_registered() -> None:
    for task in RULER_TASKS:
        spec = TASKS[task]
        assert spec.family == "ruler" and spec.metric == "string_match_all"


@pytest.mark.parametrize("task", RULER_TASKS)
def test_deterministic(task: str) -> None:
    a = _sample(task, 512, 3)
    b = generate(task, 512, 3, _tokenizer())
    assert a.prompt.encode() == b.prompt.encode() and a.answer_prefix == b.answer_prefix
    assert a.answers == b.answers and a.metadata == b.metadata
    c = _sample(task, 512, 4)
    assert c.prompt != a.prompt and c.answers != a.answers


@pytest.mark.parametrize("length", [512, 4096, 16384])
@pytest.mark.parametrize("task", RULER_TASKS)
def test_length_within_one_percent(task: str, length: int) -> None:
    s = _sample(task, length, 0)
    counted = len(_tokenizer()(s.prompt + s.answer_prefix, add_special_tokens=False)["input_ids"])
    assert counted == s.prompt_tokens
    assert abs(counted - length) <= 0.01 * length


@pytest.mark.parametrize("task", RULER_TASKS)
def test_length_other_tokenizer(task: str) -> None:
    tok = _tokenizer(700)
    s = generate(task, 2048, 1, tok)
    counted = len(tok(s.prompt + s.answer_prefix, add_special_tokens=False)["input_ids"])
    assert abs(counted - 2048) <= 0.01 * 2048
    assert s.prompt != _sample(task, 512, 1).prompt


@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("task", RULER_TASKS)
def test_oracle_scores_one_and_wrong_zero(task: str, length: int) -> None:
    s = _sample(task, length, 0)
    assert score(s, "The answer is " + ", ".join(s.answers) + ".") == 1.0
    assert score(s, _wrong(task, s)) == 0.0
    if len(s.answers) > 1:
        assert 0.0 < score(s, s.answers[0]) < 1.0


@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_niah_needles_in_prompt(task: str, length: int) -> None:
    s = _sample(task, length, 2)
    needles = s.metadata["needles"]
    want = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}[task]
    assert len(needles) == want
    for n in needles:
        text = f"One of the special magic numbers for {n['key']} is: {n['value']}."
        assert s.prompt.count(text) == 1
        assert s.prompt[n["char_offset"] :].startswith(text)
        assert re.fullmatch(r"[1-9]\d{6}", n["value"])
    # The oracle reads the answers back from the needles of the asked keys.
    assert sorted(n["value"] for n in needles if n["queried"]) == sorted(s.answers)
    for key in s.metadata["keys"]:
        assert key in s.prompt.rsplit("Question:", 1)[1]
    for a in s.answers:  # each value appears exactly once, inside its needle
        assert s.prompt.count(a) == 1


def test_variable_tracking_chain() -> None:
    s = _sample("variable_tracking", 4096, 5)
    value = s.metadata["value"]
    chain = s.metadata["chains"][0]["variables"]
    assert chain == s.answers and len(chain) == ruler.VT_HOPS + 1
    positions = [s.prompt.index(f"VAR {chain[0]} = {value}.")]
    for prev, name in itertools.pairwise(chain):
        positions.append(s.prompt.index(f"VAR {name} = VAR {prev}."))
    assert positions == sorted(positions)  # each variable is assigned before it is copied
    # Follow the assignments in the prompt, as a reader would.
    env: dict[str, str] = {}
    for lhs, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", s.prompt):
        env[lhs] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert sorted(k for k, v in env.items() if v == value) == sorted(s.answers)


@pytest.mark.parametrize("length", [512, 4096, 16384])
def test_common_words_counts(length: int) -> None:
    s = _sample("common_words", length, 0)
    listing = s.prompt.split("\n\n")[1].splitlines()
    words = [line.split(". ", 1)[1] for line in listing]
    assert [line.split(". ", 1)[0] for line in listing] == [str(i) for i in range(1, len(words) + 1)]
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(len(s.answers))}
    assert top == set(s.answers)
    rest = max(c for w, c in counts.items() if w not in s.answers)
    assert min(counts[a] for a in s.answers) > rest
    assert rest <= ruler.CWE_UNCOMMON


@pytest.mark.parametrize("length", [512, 4096, 16384])
def test_frequent_words_counts(length: int) -> None:
    s = _sample("frequent_words", length, 0)
    counts = Counter(s.prompt.split("\n\n")[1].split())
    rest = max(c for w, c in counts.items() if w not in s.answers)
    assert len(s.answers) == 3 and min(counts[a] for a in s.answers) > rest


def test_needle_depths_spread() -> None:
    drawn: list[float] = []
    landed: list[float] = []
    for seed in range(40):
        for n in _build("niah_single", seed, 3000).metadata["needles"]:
            drawn.append(n["depth"])
            landed.append(n["char_depth"])
    for depths in (drawn, landed):
        assert min(depths) < 0.1 and max(depths) > 0.9
        assert all(0.0 <= d <= 1.0 for d in depths)
        assert len({round(d, 1) for d in depths}) >= 8  # not bunched in one region
    for d, c in zip(drawn, landed):
        assert abs(d - c) < 0.02  # needles land where their depth says


@pytest.mark.parametrize("task", RULER_TASKS)
def test_answers_do_not_depend_on_size(task: str) -> None:
    # The same randomness at two haystack sizes (what the length search tries) gives the same answers.
    small, large = _build(task, 7, 50), _build(task, 7, 5000)
    assert small.answers == large.answers
    if "needles" in small.metadata:
        assert [n["depth"] for n in small.metadata["needles"]] == [
            n["depth"] for n in large.metadata["needles"]
        ]
    assert len(large.prompt) > len(small.prompt)
    # And across target lengths the sample found by `generate` keeps the seed's answers at every size.
    s = _sample(task, 4096, 0)
    again = TASKS[task].build(task_rng(task, 0), 10)
    assert again.answers == s.answers
