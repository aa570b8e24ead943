"""RULER-style synthetic long-context tasks (after NVIDIA/RULER, arXiv 2404.06654), written afresh.

Registered at import: `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`,
`variable_tracking`, `common_words`, `frequent_words`. Each `build(rng, size)` draws its answers
(keys, values, needle depths, chosen words) from `rng` first and only then anything that depends on
`size`, so for one rng state the answers never change with the haystack size that the length search
in `base.generate` settles on. `size` counts about one word (one list entry for `common_words`), fine
enough to land within 1% of even a 512-token target.

Word lists, all the project's own (MIT licence), written for this module, nothing downloaded:
- `ADJECTIVES` x `NOUNS`: 32 x 32 = 1,024 adjective-noun keys for the needles ("amber-harbor").
- `NOISE`: the haystack filler, twelve plain sentences cycled in order.
- Pseudo-words for the word-extraction tasks: three consonant-vowel syllables drawn from `rng`
  (6 letters each, so one such word never contains another as a substring).
- Variable names: five random capital letters.
"""

from __future__ import annotations

import bisect
import random
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from validator_tasks.base import Built, TaskSpec, register

ADJECTIVES = (
    "amber", "ancient", "brave", "bright", "calm", "clever", "crimson", "daring", "dusty", "eager",
    "faded", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lonely",
    "mellow", "misty", "noble", "pale", "quiet", "rapid", "rusty", "silent", "silver", "sturdy",
    "tender", "wild",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "basket", "beacon", "bridge", "canyon", "castle", "comet", "falcon", "fern",
    "garden", "glacier", "harbor", "helmet", "island", "lantern", "meadow", "mirror", "orchard",
    "otter", "pebble", "pigeon", "quarry", "river", "saddle", "spindle", "summit", "thistle",
    "tunnel", "valley", "walrus", "willow",
)  # fmt: skip
KEYS: tuple[str, ...] = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)

NOISE = (
    "The river runs slowly past the old mill.",
    "Clouds drift over the hills in the afternoon.",
    "A small boat rests on the sand by the shore.",
    "The baker opens the shop before sunrise.",
    "Leaves turn brown and fall when autumn comes.",
    "The train leaves the station at noon each day.",
    "Children play in the park near the fountain.",
    "A cat sleeps on the warm stone wall.",
    "The road bends twice before it reaches the village.",
    "Rain taps softly on the tin roof at night.",
    "The lighthouse keeper climbs the stairs every evening.",
    "Bees move from flower to flower in the meadow.",
)
_NOISE_WORDS = [s.split() for s in NOISE]

NUM_DEPTHS = 40  # needle depths are drawn from 40 evenly spaced fractions of the context, as RULER does
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


# ---- shared pieces -------------------------------------------------------------------------------


def _depth(rng: random.Random) -> float:
    return rng.randrange(NUM_DEPTHS) / (NUM_DEPTHS - 1)


def _value(rng: random.Random, used: set[int], digits: int = 7) -> str:
    """A fresh `digits`-digit number (no leading zero) not drawn before in this sample."""
    while True:
        v = rng.randrange(10 ** (digits - 1), 10**digits)
        if v not in used:
            used.add(v)
            return str(v)


def _pseudo_word(rng: random.Random, used: set[str]) -> str:
    while True:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if w not in used:
            used.add(w)
            return w


def _noise_sentences(n_words: int) -> tuple[list[str], list[int]]:
    """The first `n_words` words of the cycled noise, as sentences (the last one possibly cut short),
    and the word offset at which each sentence starts (plus the end), for placing needles between
    sentences."""
    sentences: list[str] = []
    starts: list[int] = []
    taken, i = 0, 0
    while taken < n_words:
        words = _NOISE_WORDS[i % len(_NOISE_WORDS)][: n_words - taken]
        starts.append(taken)
        sentences.append(" ".join(words))
        taken += len(words)
        i += 1
    starts.append(taken)
    return sentences, starts


def _haystack(size: int, needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """`size` words of noise with each (depth, sentence) needle placed at the sentence boundary nearest
    at or before `depth` of the way through. Needles at one boundary keep their list order (variable
    chains rely on it). Returns the text and each needle's character offset in it."""
    sentences, starts = _noise_sentences(size)
    slots: dict[int, list[int]] = {}
    for k, (depth, _) in enumerate(needles):
        boundary = max(bisect.bisect_right(starts, round(depth * size)) - 1, 0)
        slots.setdefault(min(boundary, len(sentences)), []).append(k)
    parts: list[str] = []
    offsets = [0] * len(needles)
    pos = 0
    for b in range(len(sentences) + 1):
        for k in slots.get(b, []):
            offsets[k] = pos
            parts.append(needles[k][1])
            pos += len(needles[k][1]) + 1
        if b < len(sentences):
            parts.append(sentences[b])
            pos += len(sentences[b]) + 1
    return " ".join(parts), offsets


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_INTRO = (
    "Some special magic numbers are hidden in the long text below. Read it carefully and remember "
    "them: a question about them comes at the end.\n\n"
)


def _niah(
    rng: random.Random,
    size: int,
    *,
    n_keys: int,
    values_per_key: int,
    n_queried: int,
) -> Built:
    """The needle-in-a-haystack family: `n_keys` keys each with `values_per_key` values; the first
    `n_queried` keys are asked about, the rest are distractors."""
    # Everything random first, independent of `size`.
    keys = rng.sample(KEYS, n_keys)
    used: set[int] = set()
    values = [[_value(rng, used) for _ in range(values_per_key)] for _ in keys]
    needles = [(key, v) for key, vals in zip(keys, values) for v in vals]
    depths = [_depth(rng) for _ in needles]
    order = list(range(len(needles)))
    rng.shuffle(order)  # so the queried needle is not always the first one placed at a shared depth
    placed = [(depths[i], _needle(*needles[i])) for i in order]

    context, offsets = _haystack(size, placed)
    queried = keys[:n_queried]
    answers = [v for vals in values[:n_queried] for v in vals]
    if n_queried == 1 and values_per_key == 1:
        question = f"What is the special magic number for {queried[0]} mentioned in the text?"
        prefix = f" Answer: The special magic number for {queried[0]} mentioned in the text is"
    elif n_queried == 1:
        question = f"What are all the special magic numbers for {queried[0]} mentioned in the text?"
        prefix = f" Answer: The special magic numbers for {queried[0]} mentioned in the text are"
    else:
        joined = ", ".join(queried[:-1]) + f" and {queried[-1]}"
        question = f"What are the special magic numbers for {joined} mentioned in the text?"
        prefix = f" Answer: The special magic numbers for {joined} mentioned in the text are"
    prompt = f"{_NIAH_INTRO}{context}\n\nQuestion: {question}"
    start = len(_NIAH_INTRO)
    needle_meta: list[dict[str, Any]] = []
    for slot, i in enumerate(order):
        key, value = needles[i]
        needle_meta.append(
            {
                "key": key,
                "value": value,
                "queried": key in queried,
                "depth": depths[i],  # the drawn depth, a fraction of the haystack
                "char_offset": start + offsets[slot],
                "char_depth": offsets[slot] / max(len(context), 1),  # where it actually landed
            }
        )
    return Built(
        prompt=prompt,
        answer_prefix=prefix,
        answers=answers,
        metadata={"keys": queried, "distractor_keys": keys[n_queried:], "needles": needle_meta},
    )


# ---- the tasks -----------------------------------------------------------------------------------


def build_niah_single(rng: random.Random, size: int) -> Built:
    return _niah(rng, size, n_keys=1, values_per_key=1, n_queried=1)


def build_niah_multikey(rng: random.Random, size: int) -> Built:
    return _niah(rng, size, n_keys=4, values_per_key=1, n_queried=1)


def build_niah_multivalue(rng: random.Random, size: int) -> Built:
    return _niah(rng, size, n_keys=1, values_per_key=4, n_queried=1)


def build_niah_multiquery(rng: random.Random, size: int) -> Built:
    return _niah(rng, size, n_keys=4, values_per_key=1, n_queried=4)


VT_HOPS = 4  # one chain of 4 hops names 5 variables, RULER's default
VT_CHAINS = 2  # the asked chain plus one distractor chain with another value


def build_variable_tracking(rng: random.Random, size: int) -> Built:
    used_names: set[str] = set()
    used_values: set[int] = set()
    chains: list[tuple[str, list[str]]] = []
    for _ in range(VT_CHAINS):
        value = _value(rng, used_values, digits=5)
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in used_names:
                used_names.add(name)
                names.append(name)
        chains.append((value, names))
    # Each chain's statements at increasing depths, so every variable is assigned before it is read.
    placed: list[tuple[float, str, int, int]] = []
    for c, (value, names) in enumerate(chains):
        depths = sorted(_depth(rng) for _ in names)
        for hop, (depth, name) in enumerate(zip(depths, names)):
            rhs = value if hop == 0 else f"VAR {names[hop - 1]}"
            placed.append((depth, f"VAR {name} = {rhs}.", c, hop))
    placed.sort(key=lambda p: (p[0], p[3], p[2]))  # by depth, then hop: keeps each chain in order

    context, offsets = _haystack(size, [(d, s) for d, s, _, _ in placed])
    value, names = chains[0]
    intro = (
        "Memorize the variable assignments hidden in the text below; each one is a sentence starting "
        "with VAR. A question about them comes at the end.\n\n"
    )
    prompt = (
        f"{intro}{context}\n\nQuestion: Following the chains of assignments in the text above, which "
        f"variables end up holding the value {value}? List every one of them."
    )
    prefix = f" Answer: Following the assignments in the text above, the variables holding {value} are:"
    statements = [
        {
            "chain": c,
            "hop": hop,
            "text": text,
            "depth": depth,
            "char_offset": len(intro) + off,
            "char_depth": off / max(len(context), 1),
        }
        for (depth, text, c, hop), off in zip(placed, offsets)
    ]
    return Built(
        prompt=prompt,
        answer_prefix=prefix,
        answers=list(names),
        metadata={
            "value": value,
            "chains": [{"value": v, "variables": n} for v, n in chains],
            "statements": statements,
            "needles": statements,
        },
    )


CWE_ANSWERS = 10  # the ten common words asked for
CWE_MIN_COMMON = 4  # occurrences of each common word at the smallest size
CWE_MAX_COMMON = 30  # RULER's freq_cw
CWE_UNCOMMON = 3  # RULER's freq_ucw: the most times any other word appears


def build_common_words(rng: random.Random, size: int) -> Built:
    """A numbered list where 10 words appear 4-30 times each and every other word at most 3 times.

    `size` adds exactly one list entry per step: every fourth step a common-word entry (until they
    reach 30 each, RULER's frequency), the rest uncommon ones, so short targets are still reachable."""
    used: set[str] = set()
    common = [_pseudo_word(rng, used) for _ in range(CWE_ANSWERS)]
    # Size-dependent from here on.
    n_common = min(CWE_ANSWERS * CWE_MIN_COMMON + size // 4, CWE_ANSWERS * CWE_MAX_COMMON)
    n_uncommon = CWE_ANSWERS * CWE_MIN_COMMON + size - n_common
    entries = [common[i % CWE_ANSWERS] for i in range(n_common)]
    while len(entries) < n_common + n_uncommon:
        w = _pseudo_word(rng, used)
        entries.extend([w] * min(CWE_UNCOMMON, n_common + n_uncommon - len(entries)))
    rng.shuffle(entries)
    listing = "\n".join(f"{i}. {w}" for i, w in enumerate(entries, 1))
    counts = Counter(entries)
    prompt = (
        "Below is a numbered list of words. Some words occur many times in it, others only a few "
        f"times.\n\n{listing}\n\nQuestion: Which {CWE_ANSWERS} words occur most often in the list above?"
    )
    prefix = f" Answer: The {CWE_ANSWERS} words that occur most often in the list above are:"
    return Built(
        prompt=prompt,
        answer_prefix=prefix,
        answers=common,
        metadata={
            "counts": {w: counts[w] for w in common},
            "max_other_count": max((c for w, c in counts.items() if w not in common), default=0),
            "num_entries": len(entries),
        },
    )


FWE_ANSWERS = 3  # RULER asks for the top 3
FWE_ALPHA = 2.0  # RULER's Zipf exponent
FWE_MIN_WORDS = 60  # below this the Zipf counts of ranks 3 and 4 could tie
FWE_RANKS = 200  # ranks given Zipf counts; leftover words are one-off fillers


def build_frequent_words(rng: random.Random, size: int) -> Built:
    """A text of `FWE_MIN_WORDS + size` coded words whose counts follow a Zipf law (exponent 2): rank r
    appears floor(n * r^-2 / H) times; leftover positions hold words seen once. Answer: the top 3."""
    used: set[str] = set()
    top = [_pseudo_word(rng, used) for _ in range(FWE_ANSWERS)]
    # Size-dependent from here on.
    n = FWE_MIN_WORDS + size
    weights = [r**-FWE_ALPHA for r in range(1, FWE_RANKS + 1)]
    norm = sum(weights)
    counts = [int(n * w / norm) for w in weights]
    vocab = top + [_pseudo_word(rng, used) for _ in range(FWE_RANKS - FWE_ANSWERS)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    while len(words) < n:
        words.append(_pseudo_word(rng, used))
    rng.shuffle(words)
    lines = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    text = "\n".join(lines)
    prompt = (
        "Below is a text made of coded words. Find the three coded words that occur most often in it."
        f"\n\n{text}\n\nQuestion: Which three coded words occur most often in the coded text above?"
    )
    prefix = " Answer: The three coded words that occur most often in the coded text above are:"
    tally = Counter(words)
    return Built(
        prompt=prompt,
        answer_prefix=prefix,
        answers=top,
        metadata={
            "counts": {w: tally[w] for w in top},
            "max_other_count": max((c for w, c in tally.items() if w not in top), default=0),
            "num_words": n,
        },
    )


_TASKS: tuple[tuple[str, Callable[[random.Random, int], Built], int, str], ...] = (
    ("niah_single", build_niah_single, 128, "one magic-number needle in a noise haystack"),
    ("niah_multikey", build_niah_multikey, 128, "the needle among 3 distractor needles with other keys"),
    ("niah_multivalue", build_niah_multivalue, 128, "4 values for one key; all are asked for"),
    ("niah_multiquery", build_niah_multiquery, 128, "4 keys asked at once; all values are asked for"),
    ("variable_tracking", build_variable_tracking, 30, "chains of VAR assignments; name every holder"),
    ("common_words", build_common_words, 120, "the 10 most common words of a numbered list"),
    ("frequent_words", build_frequent_words, 50, "the 3 most frequent words of a Zipf coded text"),
)

for _name, _build, _budget, _desc in _TASKS:
    register(
        TaskSpec(
            name=_name,
            family="ruler",
            metric="string_match_all",
            build=_build,
            max_new_tokens=_budget,  # RULER's generation budgets
            description=_desc,
        )
    )
