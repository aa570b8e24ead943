"""Which submissions a validator round judges, when there are more than it has slots for.

Each judged submission costs up to a whole time budget (download, load, KL, long context), so a
round judges at most `slots` of them. Commitments that cannot change the outcome cost nothing and
take no slot: those that do not parse, point at another store, or were rejected before (the
verdict holds until the commitment changes), and those not downloadable yet (commit, then publish:
retried each round until their grace runs out). Of the rest, in this order:

1. the leaders: hotkeys with a moving-average weight, heaviest first, whatever version they commit
   now (a new version keeps its owner's place), at most half the slots (rounded up);
2. submissions never judged, oldest commitment first (first come, first served: a flood of
   hotkeys delays a newcomer by at most one round per `slots / 2` submissions committed before it);
3. the remaining leaders;
4. submissions judged before, least recently judged first (round robin).

Probing availability costs one metadata request per candidate, so a round's work is bounded by
`slots` time budgets plus that, whatever the number of commitments (256 uids at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    hotkey: str
    block: int  # of its commitment
    weight: float  # the hotkey's moving-average weight (0: none)
    last_judged: int | None  # round this exact commitment was last judged in (None: never)


def priority(candidates: Sequence[Candidate], slots: int) -> list[str]:
    """Every candidate's hotkey, in the order slots are offered (see the module docstring)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    leaders = sorted((c for c in candidates if c.weight > 0), key=lambda c: (-c.weight, c.block, c.hotkey))
    cap = (slots + 1) // 2
    rest = [c for c in candidates if c.weight <= 0]
    fresh = sorted((c for c in rest if c.last_judged is None), key=lambda c: (c.block, c.hotkey))
    seen = sorted(
        (c for c in rest if c.last_judged is not None), key=lambda c: (c.last_judged, c.block, c.hotkey)
    )
    ordered = leaders[:cap] + fresh + leaders[cap:] + seen
    return [c.hotkey for c in ordered]
