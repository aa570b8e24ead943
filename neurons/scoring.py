"""From per-item results to weights: pairwise paired tests, win rates, softmax, moving average.

Every eligible submission of a round was scored on the same items: per-prompt KL to the teacher
(lower is better) and per-sample long-context scores in [0, 1] (higher is better; as a loss,
1 - score). For each pair, the submission committed earlier is the incumbent and keeps the pair
unless the later one is significantly better on one axis by the relative margin (a one-sided
paired t-test, `validator_tasks.kl_eval.paired_comparison`) and not significantly worse on the
other. A copy, or noise on top of a copy, therefore never wins against its original, and a
challenger must earn its place (SN9's "epsilon advantage for the older model", SN24's paired test).

win rate = pairs won / pairs played; round weights = softmax(win rate / temperature) over the
eligible submissions (others get 0); the moving average mixes each round's weights in with `ema`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from validator_tasks.kl_eval import paired_comparison


@dataclass(frozen=True)
class Entry:
    """One eligible submission's results on the round's shared items."""

    hotkey: str
    block: int  # its commitment's block: earlier is the incumbent
    kl: Sequence[float]  # per prompt, lower is better
    longctx: Sequence[float] = ()  # per sample in [0, 1], higher is better; empty: axis not run


def _better(incumbent_loss, challenger_loss, margin: float, alpha: float) -> bool:
    a, b = np.asarray(incumbent_loss, dtype=np.float64), np.asarray(challenger_loss, dtype=np.float64)
    if len(a) < 2 or len(a) != len(b):
        return False
    return paired_comparison(a, b, margin=margin, alpha=alpha).challenger_wins


def beats(challenger: Entry, incumbent: Entry, *, margin: float, alpha: float) -> bool:
    """True when `challenger` is significantly better than `incumbent` on KL or on long context
    by `margin`, and significantly worse on neither."""
    axes = [(incumbent.kl, challenger.kl)]
    if len(challenger.longctx) and len(challenger.longctx) == len(incumbent.longctx):
        axes.append((1.0 - np.asarray(incumbent.longctx, float), 1.0 - np.asarray(challenger.longctx, float)))
    better = any(_better(inc, ch, margin, alpha) for inc, ch in axes)
    worse = any(_better(ch, inc, 0.0, alpha) for inc, ch in axes)
    return better and not worse


def order(entries: Sequence[Entry]) -> list[Entry]:
    """Oldest commitment first; equal blocks by hotkey, so every validator orders alike."""
    return sorted(entries, key=lambda e: (e.block, e.hotkey))


def win_rates(entries: Sequence[Entry], *, margin: float, alpha: float) -> dict[str, float]:
    ranked = order(entries)
    if len({e.hotkey for e in ranked}) != len(ranked):
        raise ValueError("one entry per hotkey")
    if len(ranked) == 1:
        return {ranked[0].hotkey: 1.0}
    wins = dict.fromkeys((e.hotkey for e in ranked), 0)
    for i, incumbent in enumerate(ranked):
        for challenger in ranked[i + 1 :]:
            winner = challenger if beats(challenger, incumbent, margin=margin, alpha=alpha) else incumbent
            wins[winner.hotkey] += 1
    return {h: w / (len(ranked) - 1) for h, w in wins.items()}


def softmax_weights(rates: Mapping[str, float], temperature: float) -> dict[str, float]:
    if not rates:
        return {}
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top = max(rates.values())
    exp = {h: math.exp((r - top) / temperature) for h, r in rates.items()}
    total = sum(exp.values())
    return {h: v / total for h, v in exp.items()}


def update_moving_average(
    average: Mapping[str, float], round_weights: Mapping[str, float], alive: set[str], ema: float
) -> dict[str, float]:
    """new = ema * this round + (1 - ema) * old, for every hotkey still registered (`alive`); a
    registered hotkey without a weight this round decays toward 0, a deregistered one is dropped."""
    if not 0 < ema <= 1:
        raise ValueError(f"ema must be in (0, 1], got {ema}")
    out = {}
    for hotkey in sorted(alive):
        value = ema * round_weights.get(hotkey, 0.0) + (1 - ema) * average.get(hotkey, 0.0)
        if value > 1e-9:
            out[hotkey] = value
    return out


def resemblance_copies(
    entries: Sequence[Entry],
    behaviours: Mapping[str, Sequence[np.ndarray]],
    *,
    resemblance: float,
    margin: float,
    alpha: float,
) -> dict[str, tuple[str, float]]:
    """{later hotkey: (earlier hotkey, relative distance)} for every submission that answers the
    round's prompts like an earlier original and does not beat it by the margin.

    The relative distance is `behaviour_distance` between the two models' outputs over the smaller
    of their mean KLs to the teacher: a copy with noise, re-drawn unused rows or a short fine-tune
    sits far closer to its original than to the teacher, while independently trained students differ
    from each other about as much as each differs from the teacher. A later submission that resembles
    an earlier one earns nothing unless it is significantly better than it (`beats`): a real
    improvement of a public checkpoint is allowed, a copy that merely beats whom its original beats
    is not. Entries without a behaviour are treated as originals."""
    from validator_tasks.kl_eval import behaviour_distance

    copies: dict[str, tuple[str, float]] = {}
    originals: list[Entry] = []
    for entry in order(entries):
        mine = behaviours.get(entry.hotkey)
        for earlier in originals:
            theirs = behaviours.get(earlier.hotkey)
            if mine is None or theirs is None:
                continue
            scale = max(min(float(np.mean(entry.kl)), float(np.mean(earlier.kl))), 1e-12)
            relative = behaviour_distance(mine, theirs) / scale
            if relative < resemblance and not beats(entry, earlier, margin=margin, alpha=alpha):
                copies[entry.hotkey] = (earlier.hotkey, relative)
                break
        else:
            originals.append(entry)
    return copies
