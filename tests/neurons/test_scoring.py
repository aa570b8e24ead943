"""From per-item results to weights: the paired test between an earlier incumbent and a later
challenger, win rates, the softmax and the moving average."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neurons.scoring import Entry, beats, order, softmax_weights, update_moving_average, win_rates

MARGIN, ALPHA = 0.03, 0.03
N = 32  # prompts per round


def _kl(seed: int = 0) -> np.ndarray:
    """Per-prompt KL of a reference model: prompts differ a lot in difficulty."""
    return np.random.default_rng(seed).uniform(0.5, 2.0, N)


def _noise(scale: float, seed: int) -> np.ndarray:
    return 1.0 + scale * np.random.default_rng(seed).standard_normal(N)


def _wins(challenger_kl, incumbent_kl, challenger_lc=(), incumbent_lc=(), margin=MARGIN) -> bool:
    incumbent = Entry("5Inc", 10, list(incumbent_kl), list(incumbent_lc))
    challenger = Entry("5Ch", 20, list(challenger_kl), list(challenger_lc))
    return beats(challenger, incumbent, margin=margin, alpha=ALPHA)


def test_a_clearly_better_later_challenger_wins() -> None:
    base = _kl()
    assert _wins(base * 0.8 * _noise(0.02, 1), base)
    assert _wins(base * 0.5, base)
    # and the same pair the other way round does not
    assert not _wins(base, base * 0.8 * _noise(0.02, 1))


@pytest.mark.parametrize(
    "factor",
    [
        pytest.param(1.0, id="tie"),
        pytest.param(1 + 1e-4, id="copy-slightly-worse"),
        pytest.param(1 - 1e-4, id="copy-slightly-better"),
        pytest.param(0.99, id="1pct-better-under-3pct-margin"),
        pytest.param(0.98, id="2pct-better-under-3pct-margin"),
    ],
)
def test_the_earlier_incumbent_keeps_ties_copies_and_small_gains(factor: float) -> None:
    base = _kl()
    assert not _wins(base * factor, base)


def test_noise_on_a_copy_never_wins() -> None:
    base = _kl()
    for seed in range(20):
        assert not _wins(base * _noise(1e-3, seed), base), seed
        assert not _wins(base + np.random.default_rng(seed).normal(0, 1e-5, N), base), seed


def test_the_margin_decides_a_small_gain() -> None:
    base = _kl()
    # 5% better on every prompt: enough under a 3% margin, not under a 10% one
    assert _wins(base * 0.95, base, margin=0.03)
    assert not _wins(base * 0.95, base, margin=0.10)
    # 1% better wins only without a margin
    assert _wins(base * 0.99, base, margin=0.0)
    assert not _wins(base * 0.99, base, margin=0.03)


def test_better_on_kl_but_significantly_worse_on_long_context_does_not_win() -> None:
    base = _kl()
    good = [1.0] * 12 + [0.0] * 4  # 75% accuracy
    bad = [0.0] * 12 + [1.0] * 4  # 25%
    assert _wins(base * 0.5, base, good, good)  # control: equal long context, better KL wins
    assert not _wins(base * 0.5, base, bad, good)


def test_better_on_long_context_and_equal_on_kl_wins() -> None:
    base = _kl()
    assert _wins(base, base, [1.0] * 16, [0.0] * 16)
    assert _wins(base, base, [1.0] * 14 + [0.0] * 2, [0.0] * 14 + [1.0] * 2)
    # but equal long context and equal KL does not
    assert not _wins(base, base, [1.0] * 16, [1.0] * 16)


def test_long_context_of_another_length_is_not_compared() -> None:
    base = _kl()
    # a challenger that ran a different number of samples: only KL counts
    assert not _wins(base, base, [1.0] * 16, [0.0] * 8)
    assert _wins(base * 0.5, base, [0.0] * 16, [1.0] * 8)


def test_win_rates_for_three_entries_in_known_order() -> None:
    base = _kl()
    entries = [
        Entry("5C", 30, list(base * 0.25)),  # best, latest
        Entry("5A", 10, list(base)),  # worst, earliest
        Entry("5B", 20, list(base * 0.5)),
    ]
    assert win_rates(entries, margin=MARGIN, alpha=ALPHA) == {"5A": 0.0, "5B": 0.5, "5C": 1.0}
    # a later copy of the earliest loses to everything; the original keeps its pair with it
    entries = [
        Entry("5A", 10, list(base)),
        Entry("5B", 20, list(base * 0.5)),
        Entry("5Copy", 30, list(base * (1 + 1e-4))),
    ]
    assert win_rates(entries, margin=MARGIN, alpha=ALPHA) == {"5A": 0.5, "5B": 1.0, "5Copy": 0.0}


def test_block_then_hotkey_decides_who_is_the_incumbent() -> None:
    base = _kl()
    a, b = Entry("5A", 7, list(base)), Entry("5B", 7, list(base))
    assert [e.hotkey for e in order([b, a])] == ["5A", "5B"]
    assert win_rates([b, a], margin=MARGIN, alpha=ALPHA) == {"5A": 1.0, "5B": 0.0}
    assert win_rates([a, b], margin=MARGIN, alpha=ALPHA) == {"5A": 1.0, "5B": 0.0}
    # the block comes first: an earlier block keeps the tie whatever its hotkey
    z = Entry("5Z", 6, list(base))
    assert win_rates([a, z], margin=MARGIN, alpha=ALPHA) == {"5Z": 1.0, "5A": 0.0}


def test_win_rates_edge_cases_and_bad_arguments() -> None:
    base = _kl()
    assert win_rates([Entry("5A", 1, list(base))], margin=MARGIN, alpha=ALPHA) == {"5A": 1.0}
    assert win_rates([], margin=MARGIN, alpha=ALPHA) == {}
    with pytest.raises(ValueError, match="one entry per hotkey"):
        win_rates([Entry("5A", 1, list(base)), Entry("5A", 2, list(base))], margin=MARGIN, alpha=ALPHA)
    nan = base.copy()
    nan[3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        win_rates([Entry("5A", 1, list(base)), Entry("5B", 2, list(nan))], margin=MARGIN, alpha=ALPHA)
    with pytest.raises(ValueError, match="margin"):
        beats(Entry("5B", 2, list(base)), Entry("5A", 1, list(base)), margin=1.5, alpha=ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        beats(Entry("5B", 2, list(base)), Entry("5A", 1, list(base)), margin=MARGIN, alpha=0.0)


def test_softmax_sums_to_one_keeps_the_order_and_respects_temperature() -> None:
    rates = {"5A": 0.0, "5B": 0.5, "5C": 1.0}
    sharp = softmax_weights(rates, 0.1)
    soft = softmax_weights(rates, 1.0)
    for weights in (sharp, soft):
        assert set(weights) == set(rates)
        assert math.isclose(sum(weights.values()), 1.0)
        assert weights["5A"] < weights["5B"] < weights["5C"]
    assert sharp["5C"] > soft["5C"] and sharp["5A"] < soft["5A"]
    # exactly: exp(r / T) normalised
    total = sum(math.exp(r / 0.1) for r in rates.values())
    assert sharp["5C"] == pytest.approx(math.exp(10) / total)
    assert softmax_weights({"5A": 0.3, "5B": 0.3}, 0.05) == pytest.approx({"5A": 0.5, "5B": 0.5})
    # large rates over a tiny temperature do not overflow
    assert softmax_weights({"5A": 1.0, "5B": 0.0}, 1e-4) == pytest.approx({"5A": 1.0, "5B": 0.0})
    assert softmax_weights({}, 0.1) == {}
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            softmax_weights(rates, bad)


def test_moving_average_mixes_drops_the_deregistered_and_decays_the_absent() -> None:
    average = {"5A": 0.6, "5B": 0.4, "5Gone": 0.2}
    new = update_moving_average(average, {"5A": 0.2, "5C": 0.8}, alive={"5A", "5B", "5C"}, ema=0.5)
    assert new == pytest.approx({"5A": 0.4, "5B": 0.2, "5C": 0.4})
    assert "5Gone" not in new  # deregistered: dropped at once
    # a registered hotkey with no weight decays geometrically and finally disappears
    values = []
    for _ in range(40):
        new = update_moving_average(new, {"5A": 1.0}, alive={"5A", "5B", "5C"}, ema=0.5)
        values.append(new.get("5B", 0.0))
    assert values[0] == pytest.approx(0.1) and values[1] == pytest.approx(0.05)
    assert "5B" not in new and new["5A"] == pytest.approx(1.0)
    # a round weight for a hotkey no longer registered is ignored
    assert update_moving_average({}, {"5X": 1.0}, alive={"5A"}, ema=0.5) == {}
    # ema 1: the round replaces the average
    assert update_moving_average(average, {"5A": 1.0}, alive={"5A", "5B"}, ema=1.0) == {"5A": 1.0}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ema"):
            update_moving_average(average, {}, alive={"5A"}, ema=bad)


def test_resemblance_makes_a_copy_of_a_later_lookalike_unless_it_beats_the_original() -> None:
    import numpy as np

    from neurons.scoring import Entry, resemblance_copies

    rng = np.random.default_rng(0)
    kl = rng.uniform(0.9, 1.1, 32)
    base = [np.log(rng.dirichlet(np.ones(5), size=4)).astype(np.float32) for _ in range(3)]

    def nudged(scale):
        out = []
        for b in base:
            p = np.exp(b) * np.exp(scale * rng.standard_normal(b.shape))
            out.append(np.log(p / p.sum(1, keepdims=True)).astype(np.float32))
        return out

    other = [np.log(rng.dirichlet(np.ones(5), size=4)).astype(np.float32) for _ in range(3)]
    entries = [
        Entry("orig", 1, kl),
        Entry("noisy", 2, kl * rng.uniform(0.999, 1.001, 32)),  # the same KL, nearly the same outputs
        Entry("better", 3, kl * 0.8),  # nearly the same outputs, but clearly better: allowed
        Entry("independent", 4, kl * 1.01),  # different outputs: an original, whatever its KL
    ]
    behaviours = {"orig": base, "noisy": nudged(0.01), "better": nudged(0.05), "independent": other}
    copies = resemblance_copies(entries, behaviours, resemblance=0.2, margin=0.03, alpha=0.03)
    assert set(copies) == {"noisy"} and copies["noisy"][0] == "orig" and copies["noisy"][1] < 0.01
    # the earliest commitment is the original, whatever order the entries come in
    assert resemblance_copies(entries[::-1], behaviours, resemblance=0.2, margin=0.03, alpha=0.03) == copies
    # without a behaviour (judged before this version) an entry counts as an original
    assert resemblance_copies(entries, {"orig": base}, resemblance=0.2, margin=0.03, alpha=0.03) == {}
