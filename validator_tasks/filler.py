"""Filler prose for the BABILong-style haystack, generated from a small sentence grammar.

Origin and licence: the templates and word lists below were written for this package (quasar-sn24)
and are released with it under its MIT licence; nothing is downloaded or copied from books or other
datasets. The prose is readable but irrelevant village-and-countryside narration. It never names a
bAbI person, room or object (`FORBIDDEN_WORDS`, checked at import), so the haystack cannot contain a
fact that contradicts the story.

`filler_sentences(rng, n_words)` is the length knob: exactly `n_words` words, cut at a word
boundary, and the output for n words is a prefix of the output for n + 1 from the same rng state.
"""

from __future__ import annotations

import random
import re

# Names, rooms and objects the bAbI simulator uses (and close relatives), which filler must avoid.
FORBIDDEN_WORDS: frozenset[str] = frozenset(
    {
        "mary", "john", "daniel", "sandra", "bill", "fred", "julie", "jeff",
        "kitchen", "garden", "office", "hallway", "hall", "bedroom", "bathroom",
        "football", "apple", "milk",
    }
)  # fmt: skip

_SUBJECTS = [
    "the old ferryman", "a tired clerk", "the baker's daughter", "a travelling tinker",
    "the lighthouse keeper", "the choir master", "an elderly weaver", "the harbour pilot",
    "a young mapmaker", "the village smith", "a shy schoolteacher", "the widow from the ridge",
    "the miller's apprentice", "a wandering fiddler", "the night watchman", "a retired captain",
    "the shepherd's boy", "a quiet bookbinder", "the toll collector", "an impatient courier",
]  # fmt: skip
_ACTIONS = [
    "mended a torn sail", "counted the sacks of grain", "read an old letter twice",
    "watched the clouds gather over the hills", "sharpened a dull blade", "fed the restless geese",
    "tuned a cracked violin", "painted the fence a pale blue", "sorted a crate of rusty nails",
    "wrote a long entry in a ledger", "carried water up from the well", "patched a leaking roof",
    "whistled a tune nobody recognised", "stacked firewood against the wall", "argued about the price of wool",
    "traced the route of a forgotten canal", "polished a brass compass", "swept the steps of the chapel",
    "planted a row of onions", "listened for the evening train",
]  # fmt: skip
_WHEN = [
    "before the bells rang", "late in the afternoon", "while the river ran high", "at first light",
    "after the market closed", "during the long dry summer", "as the fog lifted", "on a grey morning",
    "just before the storm", "once the harvest was in", "when the lamps were lit", "in the middle of winter",
]  # fmt: skip
_WHERE = [
    "at the edge of the marsh", "beside the mill pond", "on the road to the market town",
    "near the old stone bridge", "under the crooked oak", "down by the harbour wall",
    "up on the windy ridge", "behind the chapel", "along the towpath", "outside the inn",
]  # fmt: skip
_WEATHER = [
    "the wind pushed across the moor", "a light rain settled over the valley",
    "the sky turned the colour of slate", "frost crept along the hedgerows",
    "the sun broke through for a moment", "thunder rolled somewhere beyond the hills",
    "a warm breeze came in from the sea", "snow gathered quietly on the rooftops",
]  # fmt: skip
_SOUNDS = [
    "a dog barked twice", "the church clock struck the hour", "a cart rattled over the cobbles",
    "gulls cried above the boats", "someone laughed behind a shuttered window", "a kettle began to sing",
]  # fmt: skip
_THOUGHTS = [
    "how the bridge had been built", "the name of the first mayor", "why the well had run dry",
    "the year the river froze", "who had planted the orchard", "where the old road used to lead",
]  # fmt: skip
_FEELINGS = ["uneasy", "hopeful", "restless", "content", "weary", "curious", "cheerful", "thoughtful"]

_TEMPLATES = [
    "{subj} {action} {when}.",
    "{subj} {action} {where}.",
    "{when}, {subj} {action}.",
    "{weather}, and {sound}.",
    "{where}, {sound}.",
    "nobody could quite remember {thought}.",
    "{subj} felt {feeling} and {action}.",
    "{weather} {when}.",
    "{subj} wondered aloud about {thought}.",
    "{subj} and {subj2} {action} {where}.",
]

_SLOTS = {
    "subj": _SUBJECTS,
    "subj2": _SUBJECTS,
    "action": _ACTIONS,
    "when": _WHEN,
    "where": _WHERE,
    "weather": _WEATHER,
    "sound": _SOUNDS,
    "thought": _THOUGHTS,
    "feeling": _FEELINGS,
}
_WORD_RE = re.compile(r"[a-z]+")


def _check_vocabulary() -> None:
    words = {
        w for lst in [*_SLOTS.values(), _TEMPLATES] for text in lst for w in _WORD_RE.findall(text.lower())
    }
    clash = sorted(words & FORBIDDEN_WORDS)
    if clash:
        raise RuntimeError(f"filler vocabulary mentions bAbI entities: {clash}")


_check_vocabulary()


def filler_sentence(rng: random.Random) -> str:
    """One sentence: a template with every slot drawn from `rng` (slots in fixed order, so the draws
    per sentence are a fixed sequence and the output is reproducible)."""
    template = rng.choice(_TEMPLATES)
    values = {slot: rng.choice(options) for slot, options in _SLOTS.items()}
    text = template.format(**values)
    return text[0].upper() + text[1:]


def filler_sentences(rng: random.Random, n_words: int) -> list[str]:
    """Sentences holding exactly `n_words` words; the last one is cut at a word boundary (and closed
    with a period) so the length search can move one word at a time."""
    if n_words < 0:
        raise ValueError(f"n_words must be non-negative, got {n_words}")
    out: list[str] = []
    remaining = n_words
    while remaining > 0:
        words = filler_sentence(rng).split()
        if len(words) > remaining:
            words = words[:remaining]
            words[-1] = words[-1].rstrip(",.") + "."
        out.append(" ".join(words))
        remaining -= len(words)
    return out


def filler_words(rng: random.Random, n_words: int) -> list[str]:
    """The words of `filler_sentences(rng, n_words)`, exactly `n_words` of them."""
    return [w for sentence in filler_sentences(rng, n_words) for w in sentence.split()]
