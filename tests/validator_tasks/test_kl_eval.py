"""KL evaluation: per-prompt KL, the paired one-sided comparison and the generated-length guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.types import TopK
from tests.conftest import tiny_model
from validator_tasks.kl_eval import generated_length_check, paired_comparison, per_prompt_kl, student_t_sf


@pytest.mark.parametrize("t", [-4.0, -1.0, -0.2, 0.0, 0.3, 1.0, 2.5, 10.0])
def test_student_t_tail_matches_closed_forms(t):
    assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert student_t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), abs=1e-12)
    assert student_t_sf(t, 1e7) == pytest.approx(0.5 * math.erfc(t / math.sqrt(2)), abs=1e-6)  # -> normal


def test_comparison_needs_a_real_improvement_beyond_the_margin():
    rng = np.random.default_rng(0)
    king = rng.uniform(0.5, 1.5, 150)
    copy = king + rng.normal(0, 1e-4, 150)
    assert not paired_comparison(king, copy).challenger_wins  # a copy never beats the margin
    slightly = king * 0.99  # 1% better, margin 3%
    assert not paired_comparison(king, slightly).challenger_wins
    better = king * 0.85 + rng.normal(0, 0.02, 150)
    result = paired_comparison(king, better)
    assert result.challenger_wins and result.p_value < 1e-6 and result.statistic > 0
    noisy = king + rng.normal(0, 0.3, 150)
    assert not paired_comparison(king, noisy).challenger_wins


def test_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least"):
        paired_comparison([1.0], [0.5])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [0.5, 0.4])


def _teacher_rows(logits: torch.Tensor) -> TopK:
    """Exact full-vocabulary rows (k = V, no tail) from [n, V] logits predicting the next token."""
    n, V = logits.shape
    lp = torch.log_softmax(logits.double(), -1)
    order = lp.argsort(-1, descending=True)
    ids = np.full((n + 1, V), -1, dtype=np.int32)
    vals = np.full((n + 1, V), -np.inf, dtype=np.float32)
    ids[1:] = order.numpy()
    vals[1:] = lp.gather(-1, order).float().numpy()
    tail = np.full(n + 1, -np.inf, dtype=np.float32)
    tail[0] = 0.0
    return TopK(ids, vals, tail)


def test_per_prompt_kl_is_zero_against_itself_and_positive_against_another_model():
    student, other = tiny_model(0), tiny_model(1)
    prompts = []
    for n in (20, 33):
        tokens = np.random.default_rng(n).integers(0, student.config.vocab_size, n)
        with torch.no_grad():
            logits = student(torch.as_tensor(tokens)[None], use_cache=False).logits[0, :-1]
        prompts.append((tokens, _teacher_rows(logits)))
    self_kl = per_prompt_kl(student, prompts)
    assert np.all(np.abs(self_kl) < 1e-4)
    other_kl = per_prompt_kl(other, prompts)
    assert np.all(other_kl > 1e-3)
    later = per_prompt_kl(other, prompts, score_from=10)
    assert not np.allclose(later, other_kl)
    with pytest.raises(ValueError, match="no scored position"):
        per_prompt_kl(other, prompts, score_from=40)


def test_generated_length_band():
    ok = generated_length_check([100, 120, 90], [110, 100, 95])
    assert ok.within_band and ok.ratio == pytest.approx(310 / 305)
    assert not generated_length_check([900, 1000], [100, 120]).within_band  # rambling
    assert not generated_length_check([1, 2], [100, 120]).within_band  # silent


def _topk_prompts(teacher, k: int = 8) -> list:
    prompts = []
    for n in (20, 33, 27):
        tokens = np.random.default_rng(n).integers(0, teacher.config.vocab_size, n)
        with torch.no_grad():
            logits = teacher(torch.as_tensor(tokens)[None], use_cache=False).logits[0, :-1]
        full = _teacher_rows(logits)
        tail = np.log1p(-np.exp(full.logprobs[:, :k]).sum(-1).clip(max=1 - 1e-6)).astype(np.float32)
        tail[0] = 0.0
        prompts.append((tokens, TopK(full.token_ids[:, :k], full.logprobs[:, :k], tail)))
    return prompts


def test_behaviour_is_a_distribution_and_its_distance_is_zero_to_itself_only() -> None:
    from validator_tasks.kl_eval import behaviour_distance

    prompts = _topk_prompts(tiny_model(0))
    student = tiny_model(1)
    kl, mine = per_prompt_kl(student, prompts, score_from=2, behaviour=True)
    assert np.allclose(kl, per_prompt_kl(student, prompts, score_from=2))
    assert len(mine) == 3 and all(b.shape[1] == 8 + 1 for b in mine)
    for b in mine:  # the k buckets and the tail hold all the mass, nothing is NaN
        assert not np.isnan(b).any() and np.allclose(np.exp(b.astype(np.float64)).sum(axis=1), 1.0, atol=1e-4)
    _, theirs = per_prompt_kl(tiny_model(2), prompts, score_from=2, behaviour=True)
    assert behaviour_distance(mine, mine) == 0.0
    d = behaviour_distance(mine, theirs)
    assert d > 0 and d == pytest.approx(behaviour_distance(theirs, mine))
    with pytest.raises(ValueError):
        behaviour_distance(mine, theirs[:2])
