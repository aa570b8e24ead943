"""BABILong-style tasks: a small bAbI-world simulator whose facts are spread through filler prose.

People move between six rooms and pick up and put down objects. The story, question and answer are
drawn first and computed from the simulated world state (correct by construction); only then is the
haystack built around them, so the answer never depends on the target length. Registered tasks:

- ``babilong_qa1``: one supporting fact ("Where is Mary?").
- ``babilong_qa2``: two supporting facts ("Where is the football?": who holds it, where they went).
- ``babilong_qa3``: three supporting facts ("Where was the apple before the kitchen?").

The fact and question wording is this package's own (MIT), not the bAbI templates. Scoring
(`babilong_score`) follows BABILong's label matching; see its docstring.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from validator_tasks.base import Built, TaskSpec, register
from validator_tasks.filler import filler_sentences

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom")
OBJECTS = ("football", "apple", "milk")

_MOVE = (
    "{p} went to the {x}.",
    "{p} walked into the {x}.",
    "{p} headed over to the {x}.",
    "{p} wandered into the {x}.",
)
_GRAB = ("{p} picked up the {x}.", "{p} took the {x}.", "{p} grabbed the {x} there.")
_DROP = ("{p} put down the {x}.", "{p} left the {x} there.", "{p} dropped the {x}.")
_TEMPLATES = {"move": _MOVE, "grab": _GRAB, "drop": _DROP}

INSTRUCTION = (
    "The text below is long and mostly irrelevant. Scattered through it are short statements about "
    "people moving between rooms and handling objects. Read them in order, use only them, and answer "
    "the question at the end with the single word naming a room."
)
ANSWER_PREFIX = "\nAnswer:"
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Fact:
    action: str  # "move" | "grab" | "drop"
    person: str
    target: str  # a location for "move", an object otherwise
    text: str


@dataclass(frozen=True)
class Story:
    facts: list[Fact]
    question: str
    question_info: dict[str, str]
    answer: str
    supporting: list[int]  # indices into facts, ascending


class _World:
    """World state plus, per object, the facts that put it in each location it has been in."""

    def __init__(self) -> None:
        self.person_at: dict[str, str] = {}
        self.person_move: dict[str, int] = {}  # person -> index of their latest move fact
        self.holder: dict[str, str] = {}  # object -> person holding it
        self.grab_fact: dict[str, int] = {}  # object -> index of the fact it was picked up in
        self.object_at: dict[str, str] = {}
        # object -> [(location, facts that establish it)], one entry per change of location
        self.object_trail: dict[str, list[tuple[str, list[int]]]] = {}

    def _place(self, obj: str, loc: str, why: list[int]) -> None:
        if self.object_at.get(obj) != loc:
            self.object_trail.setdefault(obj, []).append((loc, sorted(why)))
        self.object_at[obj] = loc

    def apply(self, i: int, fact: Fact) -> None:
        p, x = fact.person, fact.target
        if fact.action == "move":
            self.person_at[p], self.person_move[p] = x, i
            for obj, who in self.holder.items():
                if who == p:
                    self._place(obj, x, [self.grab_fact[obj], i])
        elif fact.action == "grab":
            self.holder[x], self.grab_fact[x] = p, i
            self._place(x, self.person_at[p], [self.person_move[p], i])
        else:  # drop: the object stays where its holder is
            del self.holder[x]


def _legal_actions(world: _World, with_objects: bool) -> list[tuple[str, str, str]]:
    acts = [("move", p, loc) for p in PEOPLE for loc in LOCATIONS if world.person_at.get(p) != loc]
    if with_objects:
        for p in PEOPLE:
            if p not in world.person_at:
                continue
            for obj in OBJECTS:
                if world.holder.get(obj) == p:
                    acts.append(("drop", p, obj))
                elif obj not in world.holder and world.object_at.get(obj) in (None, world.person_at[p]):
                    acts.append(("grab", p, obj))
    return acts


def _draw_facts(rng: random.Random, n: int, with_objects: bool) -> tuple[list[Fact], _World]:
    world, facts = _World(), []
    for i in range(n):
        acts = _legal_actions(world, with_objects)
        handle = [a for a in acts if a[0] != "move"]
        # Objects are handled often enough that qa2/qa3 stories usually have an answer.
        action, p, x = (
            rng.choice(handle)
            if handle and rng.random() < 0.4
            else rng.choice([a for a in acts if a[0] == "move"])
        )
        fact = Fact(action, p, x, rng.choice(_TEMPLATES[action]).format(p=p, x=x))
        world.apply(i, fact)
        facts.append(fact)
    return facts, world


def _story_qa1(rng: random.Random) -> Story | None:
    facts, world = _draw_facts(rng, rng.randint(4, 10), with_objects=False)
    person = rng.choice(sorted(world.person_at))
    return Story(
        facts, f"Where is {person}?", {"kind": "where_person", "entity": person},
        world.person_at[person], [world.person_move[person]],
    )  # fmt: skip


def _story_qa2(rng: random.Random) -> Story | None:
    facts, world = _draw_facts(rng, rng.randint(6, 14), with_objects=True)
    # Held objects whose holder moved after picking them up: the answer needs the grab and the move.
    candidates = sorted(o for o, p in world.holder.items() if world.person_move[p] > world.grab_fact[o])
    if not candidates:
        return None
    obj = rng.choice(candidates)
    support = sorted({world.grab_fact[obj], world.person_move[world.holder[obj]]})
    return Story(
        facts, f"Where is the {obj}?", {"kind": "where_object", "entity": obj}, world.object_at[obj], support
    )


def _story_qa3(rng: random.Random) -> Story | None:
    facts, world = _draw_facts(rng, rng.randint(8, 18), with_objects=True)
    # Objects with at least two locations whose current location was visited once (else "before" is ambiguous).
    candidates = []
    for obj, trail in sorted(world.object_trail.items()):
        # Also one holder across the last two places, so exactly three facts support the answer.
        once = len(trail) >= 2 and [loc for loc, _ in trail].count(trail[-1][0]) == 1
        if once and len(set(trail[-2][1]) | set(trail[-1][1])) == 3:
            candidates.append(obj)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    (before, why_before), (now, why_now) = world.object_trail[obj][-2:]
    support = sorted(set(why_before) | set(why_now))
    info = {"kind": "where_before", "entity": obj, "location": now}
    return Story(facts, f"Where was the {obj} before the {now}?", info, before, support)


def _draw_story(rng: random.Random, draw: Callable[[random.Random], Story | None]) -> Story:
    for _ in range(1000):  # rejection sampling: a handful of tries suffice in practice
        story = draw(rng)
        if story is not None:
            return story
    raise RuntimeError("could not draw a story with an answerable question in 1000 tries")


def build_babilong(rng: random.Random, size: int, draw: Callable[[random.Random], Story | None]) -> Built:
    """The prompt with `size` filler words; the story and fact depths are drawn before any filler."""
    story = _draw_story(rng, draw)
    depths = sorted(rng.random() for _ in story.facts)
    sentences = filler_sentences(rng, size)
    # Facts go between filler sentences, in story order, at the boundary nearest their drawn depth.
    slots = [min(round(d * len(sentences)), len(sentences)) for d in depths]
    pieces: list[str] = []
    fact_piece: list[int] = []
    k = 0
    for b in range(len(sentences) + 1):
        while k < len(story.facts) and slots[k] == b:
            fact_piece.append(len(pieces))
            pieces.append(story.facts[k].text)
            k += 1
        if b < len(sentences):
            pieces.append(sentences[b])
    context = " ".join(pieces)
    head = f"{INSTRUCTION}\n\n<context>\n"
    prompt = f"{head}{context}\n</context>\n\nQuestion: {story.question}"
    # Character offsets of each fact in the prompt, found by walking the joined pieces.
    starts, offset = [], 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece) + 1
    offsets = [len(head) + starts[j] for j in fact_piece]
    depth = [starts[j] / max(len(context), 1) for j in fact_piece]
    facts_meta = [
        {"action": f.action, "person": f.person, "target": f.target, "text": f.text, "offset": o, "depth": d}
        for f, o, d in zip(story.facts, offsets, depth)
    ]
    metadata: dict[str, Any] = {
        "question": story.question,
        "question_info": story.question_info,
        "facts": facts_meta,
        "supporting_facts": story.supporting,
        "supporting_offsets": [offsets[i] for i in story.supporting],
        "supporting_depths": [depth[i] for i in story.supporting],
        "labels": list(LOCATIONS),
        "filler_words": size,
    }
    return Built(prompt=prompt, answer_prefix=ANSWER_PREFIX, answers=[story.answer], metadata=metadata)


def _register(name: str, draw: Callable[[random.Random], Story | None], description: str) -> None:
    def build(rng: random.Random, size: int) -> Built:
        return build_babilong(rng, size, draw)

    register(
        TaskSpec(name, "babilong", "babilong", build, max_new_tokens=MAX_NEW_TOKENS, description=description)
    )


_register("babilong_qa1", _story_qa1, "bAbI qa1 in filler: one supporting fact (where is a person)")
_register("babilong_qa2", _story_qa2, "bAbI qa2 in filler: two supporting facts (where is a held object)")
_register(
    "babilong_qa3", _story_qa3, "bAbI qa3 in filler: three supporting facts (where was an object before)"
)


_CUT = re.compile(r"<context>|<example>|question")
_SENTENCE_END = re.compile(r"[.!?\n]")


def _first_sentence(prediction: str) -> str:
    text = _CUT.split(prediction.lower(), maxsplit=1)[0].strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0]


def babilong_score(
    prediction: str,
    answers: list[str],
    *,
    question: str | None = None,
    labels: Sequence[str] = LOCATIONS,
) -> float:
    """BABILong-style label matching: 1.0 if the prediction names the gold label, else 0.0.

    The prediction is lowercased, cut at `<context>`, `<example>` or "question", and only its first
    sentence (up to `.`, `!`, `?` or a newline) is kept. Labels (the six rooms, plus the gold) are
    matched as whole words.
    - With `question` (BABILong's own rule): labels that occur in the question are ignored, and the
      prediction is right iff the gold labels are exactly the labels it mentions.
    - Without it (the question's own room, as in "before the kitchen", cannot then be told from a
      hedge): the prediction is right iff the first label it mentions is a gold one.
    """
    golds = {a.strip().lower() for a in answers if a.strip()}
    if not golds:
        raise ValueError("babilong_score needs at least one non-empty gold answer")
    text = _first_sentence(prediction)
    candidates = {lab.lower() for lab in labels} | golds
    if question is not None:
        q = question.lower()
        ignored = {lab for lab in candidates - golds if re.search(rf"\b{re.escape(lab)}\b", q)}
        found = {lab for lab in candidates - ignored if re.search(rf"\b{re.escape(lab)}\b", text)}
        return float(found == golds)
    hits = [(m.start(), lab) for lab in candidates for m in [re.search(rf"\b{re.escape(lab)}\b", text)] if m]
    return float(bool(hits) and min(hits)[1] in golds)
