"""Round planning: leaders keep their place (new versions included) in at most half the slots,
new submissions come first come first served, the rest round robin; bounded whatever the count."""

from __future__ import annotations

import pytest

from neurons.planning import Candidate, priority


def test_leaders_take_at_most_half_the_slots_then_new_then_least_recently_judged() -> None:
    candidates = [
        Candidate("old-judged", block=1, weight=0.0, last_judged=7),
        Candidate("older-judged", block=2, weight=0.0, last_judged=3),
        Candidate("new-late", block=50, weight=0.0, last_judged=None),
        Candidate("new-early", block=40, weight=0.0, last_judged=None),
        Candidate("king", block=90, weight=0.7, last_judged=None),  # a new version of the leader
        Candidate("prince", block=5, weight=0.2, last_judged=9),
        Candidate("knight", block=6, weight=0.1, last_judged=9),
    ]
    assert priority(candidates, slots=4) == [
        "king", "prince",  # ceil(4 / 2) leaders, heaviest first, whatever their commitment's age
        "new-early", "new-late",  # never judged: oldest commitment first
        "knight",  # the other leaders
        "older-judged", "old-judged",  # judged before: least recently first
    ]  # fmt: skip
    assert priority(candidates, slots=1)[:2] == ["king", "new-early"]


def test_a_sybil_flood_delays_a_newcomer_by_its_place_in_the_queue_only() -> None:
    sybils = [Candidate(f"s{i:03d}", block=i, weight=0.0, last_judged=None) for i in range(200)]
    honest = Candidate("honest", block=500, weight=0.0, last_judged=None)
    first = priority([*sybils, honest], slots=32)
    assert first.index("honest") == 200
    # one round later the 32 sybils judged then are at the back; a round judges 32 at most
    judged = {h for h in first[:32]}
    later = [Candidate(c.hotkey, c.block, 0.0, 1 if c.hotkey in judged else None) for c in [*sybils, honest]]
    assert priority(later, slots=32).index("honest") == 168
    assert priority([], slots=3) == []
    with pytest.raises(ValueError):
        priority(sybils, slots=0)
