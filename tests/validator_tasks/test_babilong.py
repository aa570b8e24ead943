"""BABILong-style tasks: determinism, length accuracy, solvability by an independent simulator, scoring."""

from __future__ import annotations

import random
import re

import pytest

import distill.tiny
from validator_tasks import babilong
from validator_tasks.babilong import LOCATIONS, OBJECTS, PEOPLE, babilong_score
from validator_tasks.base import TASKS, generate, task_rng
from validator_tasks.filler import FORBIDDEN_WORDS, filler_sentences, filler_words

TASK_NAMES = ["babilong_qa1", "babilong_qa2", "babilong_qa3"]
LENGTHS = [512, 4096, 16384]


@pytest.fixture(scope="module")
def tokenizer():
    return distill.tiny.train_tokenizer(distill.tiny.local_corpus(), 2000)


@pytest.fixture(scope="module")
def samples(tokenizer):
    """(task, length, seed) -> Sample, built once for the module."""
    return {(t, n, s): generate(t, n, s, tokenizer) for t in TASK_NAMES for n in LENGTHS for s in (0, 1)}


def resimulate(facts: list[dict], question: dict) -> str | None:
    """Answer the question from the facts alone, written apart from the generator. Tolerates unknown
    positions (a subset of facts) and returns None when the facts do not determine the answer."""
    where: dict[str, str | None] = {}
    holder: dict[str, str] = {}
    history: dict[str, list[str]] = {}

    def put(obj: str, loc: str | None) -> None:
        if loc is not None and (not history.get(obj) or history[obj][-1] != loc):
            history.setdefault(obj, []).append(loc)

    for f in facts:
        person, target = f["person"], f["target"]
        if f["action"] == "move":
            where[person] = target
            for obj, who in holder.items():
                if who == person:
                    put(obj, target)
        elif f["action"] == "grab":
            holder[target] = person
            put(target, where.get(person))
        elif f["action"] == "drop":
            holder.pop(target, None)
        else:
            raise AssertionError(f"unknown action {f['action']}")
    kind, entity = question["kind"], question["entity"]
    if kind == "where_person":
        return where.get(entity)
    trail = history.get(entity, [])
    if kind == "where_object":
        return trail[-1] if trail else None
    assert kind == "where_before"
    idx = [i for i, loc in enumerate(trail) if loc == question["location"]]
    return trail[idx[-1] - 1] if idx and idx[-1] > 0 else None


def test_registered():
    for name in TASK_NAMES:
        spec = TASKS[name]
        assert spec.family == "babilong" and spec.metric == "babilong"
        assert spec.max_new_tokens == babilong.MAX_NEW_TOKENS


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic(task, tokenizer, samples):
    again = generate(task, 4096, 0, tokenizer)
    first = samples[(task, 4096, 0)]
    assert again.prompt.encode() == first.prompt.encode()
    assert again.answers == first.answers and again.metadata == first.metadata
    assert samples[(task, 4096, 1)].prompt != first.prompt


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_length_within_one_percent(task, length, tokenizer, samples):
    sample = samples[(task, length, 0)]
    tokens = len(tokenizer(sample.prompt + sample.answer_prefix, add_special_tokens=False)["input_ids"])
    assert tokens == sample.prompt_tokens
    assert abs(tokens - length) <= 0.01 * length


@pytest.mark.parametrize("task", TASK_NAMES)
def test_story_independent_of_size(task):
    """The story, question and answer are drawn before the filler: only the haystack grows."""
    small = TASKS[task].build(task_rng(task, 5), 10)
    large = TASKS[task].build(task_rng(task, 5), 3000)
    assert small.answers == large.answers
    assert small.metadata["question"] == large.metadata["question"]
    strip = [{k: f[k] for k in ("action", "person", "target", "text")} for f in small.metadata["facts"]]
    assert strip == [
        {k: f[k] for k in ("action", "person", "target", "text")} for f in large.metadata["facts"]
    ]
    assert small.metadata["supporting_facts"] == large.metadata["supporting_facts"]
    assert len(large.prompt) > len(small.prompt)


def test_samples_length_independent_answers(samples):
    """Every sample at every length answers a question about its own story (answers are rooms)."""
    for sample in samples.values():
        assert len(sample.answers) == 1 and sample.answers[0] in LOCATIONS


@pytest.mark.parametrize("task", TASK_NAMES)
def test_solvable_and_facts_in_order(task, samples):
    expected_support = {"babilong_qa1": 1, "babilong_qa2": 2, "babilong_qa3": 3}[task]
    for length in LENGTHS:
        for seed in (0, 1):
            sample = samples[(task, length, seed)]
            meta = sample.metadata
            facts = meta["facts"]
            # The answer follows from the facts, and from the supporting facts alone.
            assert resimulate(facts, meta["question_info"]) == sample.answers[0]
            support = meta["supporting_facts"]
            assert support == sorted(support) and len(support) == expected_support
            assert resimulate([facts[i] for i in support], meta["question_info"]) == sample.answers[0]
            # Every fact is in the prompt, at its recorded offset, in story order.
            offsets = [f["offset"] for f in facts]
            assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
            for f in facts:
                assert sample.prompt[f["offset"] : f["offset"] + len(f["text"])] == f["text"]
                assert f["person"] in f["text"] and f["target"] in f["text"]
                assert 0.0 <= f["depth"] <= 1.0
            assert meta["supporting_offsets"] == [offsets[i] for i in support]
            assert sample.prompt.endswith("Question: " + meta["question"])
            assert meta["question_info"]["entity"] in meta["question"]
            # Oracle right, any other room wrong.
            assert babilong_score(sample.answers[0], sample.answers) == 1.0
            assert babilong_score(f" {sample.answers[0]}.", sample.answers, question=meta["question"]) == 1.0
            wrong = next(loc for loc in LOCATIONS if loc != sample.answers[0])
            assert babilong_score(wrong, sample.answers) == 0.0
            assert babilong_score(wrong, sample.answers, question=meta["question"]) == 0.0


def test_depths_spread(samples):
    """Over the long samples, facts land across the whole context, not bunched at one end."""
    depths = [f["depth"] for (t, n, s), x in samples.items() if n == 16384 for f in x.metadata["facts"]]
    assert min(depths) < 0.2 and max(depths) > 0.8


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_filler_never_names_entities(samples):
    names = {w.lower() for w in (*PEOPLE, *LOCATIONS, *OBJECTS)}
    assert names <= FORBIDDEN_WORDS
    for seed in range(5):
        assert not _words(" ".join(filler_words(random.Random(seed), 5000))) & FORBIDDEN_WORDS
    # In a built prompt, the entities occur only in the facts and the question.
    sample = samples[("babilong_qa3", 4096, 0)]
    context = sample.prompt.split("<context>\n", 1)[1].split("\n</context>", 1)[0]
    for f in sample.metadata["facts"]:
        context = context.replace(f["text"], " ")
    assert not _words(context) & FORBIDDEN_WORDS


def test_filler_word_granularity():
    for n in (0, 1, 7, 50, 333):
        assert len(filler_words(random.Random(3), n)) == n
    longer = filler_sentences(random.Random(3), 60)
    shorter = filler_sentences(random.Random(3), 59)
    # One word fewer changes only the last (cut) sentence.
    assert shorter[:-1] == longer[: len(shorter) - 1]
    with pytest.raises(ValueError):
        filler_words(random.Random(0), -1)


@pytest.mark.parametrize(
    ("prediction", "answers", "question", "score"),
    [
        ("garden", ["garden"], None, 1.0),
        (" Garden.", ["garden"], None, 1.0),
        ("The milk is in the GARDEN.", ["garden"], None, 1.0),
        ("\n garden\nkitchen", ["garden"], None, 1.0),  # only the first line counts
        ("kitchen", ["garden"], None, 0.0),
        ("", ["garden"], None, 0.0),
        ("I do not know.", ["garden"], None, 0.0),
        ("gardens", ["garden"], None, 0.0),  # whole words only
        ("The kitchen. The garden.", ["garden"], None, 0.0),  # only the first sentence counts
        ("kitchen or garden", ["garden"], None, 0.0),  # a wrong room named first
        ("garden or kitchen", ["garden"], None, 1.0),  # partial: first mention decides without the question
        ("garden or kitchen", ["garden"], "Where is Mary?", 0.0),  # ... but BABILong's rule rejects hedges
        (
            "The apple was in the garden before the kitchen.",
            ["garden"],
            "Where was the apple before the kitchen?",
            1.0,
        ),
        ("The apple was in the garden before the kitchen.", ["garden"], None, 1.0),
        (
            "kitchen",
            ["garden"],
            "Where was the apple before the kitchen?",
            0.0,
        ),  # question's room ignored: none left
        ("Question: where is the garden", ["garden"], None, 0.0),  # cut at an echoed question
        ("office <context> garden", ["garden"], None, 0.0),
    ],
)
def test_babilong_score_cases(prediction, answers, question, score):
    assert babilong_score(prediction, answers, question=question) == score


def test_babilong_score_needs_gold():
    with pytest.raises(ValueError):
        babilong_score("garden", [""])
