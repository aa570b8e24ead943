"""The contract every long-context task follows: a registry of generators, one `Sample` type,
the length search that hits a target prompt length in a given tokenizer, and scoring.

A task generator is a pure function of (rng, size, filler): `size` is a monotone knob of how much
haystack the prompt holds (sentences, lines, ...). `generate(task, length, seed, tokenizer)` searches
`size` so that the prompt, counted in `tokenizer`, is within 1% of `length` tokens; the same
(task, length, seed, tokenizer) gives the same bytes on every machine, and the same (task, seed)
gives the same answers at every length.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Metric = Literal["string_match_all", "string_match_part", "babilong"]
LENGTH_TOLERANCE = 0.01


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt. The model reads `prompt + answer_prefix` and continues; `answers` are
    the gold strings, scored with `metric`. `metadata` records how it was built (needle depths,
    supporting-fact positions, ...) so an oracle can read the answer back."""

    task: str
    target_length: int
    seed: int
    prompt: str
    answer_prefix: str
    answers: list[str]
    metric: Metric
    prompt_tokens: int = 0
    max_new_tokens: int = 32
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Built:
    """What a generator returns for one size: the prompt parts, answers and metadata."""

    prompt: str
    answer_prefix: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: Literal["ruler", "babilong"]
    metric: Metric
    build: Callable[[random.Random, int], Built]  # (rng, size) -> Built; must be deterministic in both
    max_new_tokens: int = 32
    description: str = ""


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is registered twice")
    TASKS[spec.name] = spec
    return spec


def task_rng(task: str, seed: int) -> random.Random:
    """A generator seeded from (task, seed) through sha256, independent of Python's hash
    randomisation, so every machine draws the same numbers. The target length is deliberately not
    part of the seed: a seed names the same story, needles and answers at every rung of a length
    ladder (as BABILong reuses its samples across lengths), so accuracy by length compares like with like."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{task}|{seed}".encode()).digest()[:8], "little"))


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(task: str, length: int, seed: int, tokenizer) -> Sample:
    """The sample of `task` whose prompt (with its answer prefix) is within 1% of `length` tokens
    (or one token, whichever is larger).

    The haystack size is found by a secant-then-bisection search on the token count; each
    candidate size is built from the same (task, length, seed) randomness, so the result does not
    depend on the search path."""
    tolerance = max(1.0, LENGTH_TOLERANCE * length)  # 1%, but at least one token at short lengths
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    if length < 64:
        raise ValueError(f"length must be at least 64 tokens, got {length}")
    spec = TASKS[task]

    def build(size: int) -> tuple[Built, int]:
        built = spec.build(task_rng(task, seed), size)
        return built, count_tokens(tokenizer, built.prompt + built.answer_prefix)

    lo_size, (lo_built, lo_tokens) = 0, build(0)
    base_tokens = lo_tokens
    if lo_tokens > length * (1 + LENGTH_TOLERANCE):
        raise ValueError(
            f"task {task!r} needs {lo_tokens} tokens without any haystack, more than length={length}"
        )
    best = (abs(lo_tokens - length), 0, lo_built, lo_tokens)
    # Grow until past the target, guessing sizes from the tokens-per-unit seen so far.
    size, hi_size, hi = 1, None, None
    while hi_size is None:
        built, tokens = build(size)
        best = min(best, (abs(tokens - length), size, built, tokens), key=lambda b: (b[0], b[1]))
        if tokens >= length:
            hi_size, hi = size, tokens
        else:
            lo_size, lo_tokens = size, tokens
            per_unit = (tokens - base_tokens) / size
            if per_unit <= 0:
                size *= 2
            else:  # aim 2% past the target so the next build brackets it
                size = max(int((length - base_tokens) / per_unit * 1.02) + 1, size + 1)
    while hi_size - lo_size > 1 and best[0] > tolerance:
        # Interpolate within [lo, hi], then fall back to halving.
        guess = lo_size + int((length - lo_tokens) * (hi_size - lo_size) / max(hi - lo_tokens, 1))
        mid = min(max(guess, lo_size + 1), hi_size - 1)
        built, tokens = build(mid)
        best = min(best, (abs(tokens - length), mid, built, tokens), key=lambda b: (b[0], b[1]))
        if tokens >= length:
            hi_size, hi = mid, tokens
        else:
            lo_size, lo_tokens = mid, tokens
        if best[0] > tolerance and hi_size - lo_size > 2:
            half = (lo_size + hi_size) // 2
            built, tokens = build(half)
            best = min(best, (abs(tokens - length), half, built, tokens), key=lambda b: (b[0], b[1]))
            if tokens >= length:
                hi_size, hi = half, tokens
            else:
                lo_size, lo_tokens = half, tokens
    _, size, built, tokens = best
    if abs(tokens - length) > tolerance:
        raise ValueError(
            f"task {task!r}: cannot reach {length} tokens within 1% (closest {tokens} at size {size}); "
            "the haystack unit is too coarse for this length"
        )
    return Sample(
        task=task,
        target_length=length,
        seed=seed,
        prompt=built.prompt,
        answer_prefix=built.answer_prefix,
        answers=list(built.answers),
        metric=spec.metric,
        prompt_tokens=tokens,
        max_new_tokens=spec.max_new_tokens,
        metadata={**built.metadata, "size": size},
    )
