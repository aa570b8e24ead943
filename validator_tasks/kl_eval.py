"""KL fidelity evaluation: per-prompt KL of students to a teacher, a paired one-sided comparison of
two students, and a guard against rambling or silent students.

Per-prompt KL is the tail-bucket forward KL (the loss students are trained on, `distill.losses`),
averaged over the prompt's scored positions, so one long prompt does not outweigh many short ones.
The comparison asks whether a challenger's KL is lower than the incumbent's by more than a relative
margin: a one-sided paired t-test on d_i = (1 - margin) * kl_incumbent_i - kl_challenger_i, so a copy
(d_i ~ margin * kl) or noise cannot win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distill.losses import per_position_kl
from distill.types import KDTargets, TopK


@torch.no_grad()
def per_prompt_kl(
    model,
    prompts: list[tuple[np.ndarray, TopK]],
    *,
    score_from: int = 0,
    device: str | torch.device = "cpu",
    deadline: float | None = None,
    behaviour: bool = False,
):
    """Mean per-position KL(teacher || model) for each (tokens, teacher TopK) prompt; positions
    predicting tokens before `score_from` (e.g. the block-seeded prefix) are not scored.

    With `behaviour`, also returns the model's own output on the prompts: for each prompt, its
    log-probabilities [scored positions, k + 1] of the teacher's k buckets and the tail (-inf where
    the teacher has no entry), what `behaviour_distance` compares between two models. `deadline`
    (a time.monotonic() value) is checked between prompts: BudgetExceeded when spent."""
    import time

    from validator_tasks.models import BudgetExceeded

    out = np.zeros(len(prompts), dtype=np.float64)
    outputs: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    for i, (tokens, topk) in enumerate(prompts):
        if deadline is not None and time.monotonic() > deadline:
            raise BudgetExceeded(f"time budget spent after {i} of {len(prompts)} KL prompts")
        targets = KDTargets.from_topk(np.asarray(tokens), topk)
        if score_from > 1:
            targets.mask[: score_from - 1] = False
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device)[None]
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        kl = per_position_kl(hidden, model.lm_head.weight, targets.to(device))
        mask = targets.mask.to(kl.device)
        if not bool(mask.any()):
            raise ValueError(
                f"prompt {i} has no scored position (length {len(tokens)}, score_from {score_from})"
            )
        out[i] = float(kl[mask].double().mean())
        if behaviour:
            outputs.append(_bucketed_logprobs(hidden[mask], model.lm_head.weight, targets, mask))
    model.train(was_training)
    return (out, outputs) if behaviour else out


def _bucketed_logprobs(hidden, weight, targets: KDTargets, mask) -> np.ndarray:
    logq = torch.log_softmax((hidden.float() @ weight.float().T), dim=-1)
    ids = targets.token_ids.to(hidden.device)[mask]
    valid = torch.isfinite(targets.logprobs.to(hidden.device)[mask])
    picked = torch.where(valid, logq.gather(1, ids), torch.full_like(ids, float("-inf"), dtype=logq.dtype))
    inside = torch.logsumexp(picked, dim=-1).clamp(max=0.0)
    tail = torch.log((-torch.expm1(inside)).clamp(min=1e-12))  # log(1 - mass inside), floored
    return torch.cat([picked, tail[:, None]], dim=1).cpu().numpy().astype(np.float32)


def behaviour_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """How differently two models answer the same prompts: the mean over scored positions of the
    symmetrised KL, 1/2 (KL(p_a || p_b) + KL(p_b || p_a)), between their distributions over the
    teacher's buckets. In the units of the KL to the teacher, so the two can be compared."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise ValueError("behaviours of different prompts cannot be compared")
    la = np.concatenate(a).astype(np.float64)
    lb = np.concatenate(b).astype(np.float64)
    pa, pb = np.exp(la), np.exp(lb)
    with np.errstate(invalid="ignore"):
        diff = np.where(np.isfinite(la) & np.isfinite(lb), la - lb, 0.0)
    per_position = 0.5 * ((pa - pb) * diff).sum(axis=1)
    return float(per_position.mean()) if len(per_position) else 0.0


@torch.no_grad()
def probe_logits(model, tokens: list[list[int]], ids: list[int]) -> np.ndarray:
    """The model's logits on each probe window at the vocabulary `ids`, centred per position and
    flattened: a fingerprint of the weights, comparable across rounds for the same probe."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    columns = torch.as_tensor(ids, dtype=torch.long, device=device)
    rows = []
    for window in tokens:
        x = torch.as_tensor(window, dtype=torch.long, device=device)[None]
        logits = model(input_ids=x, use_cache=False).logits[0].float()[:, columns]
        rows.append((logits - logits.mean(dim=1, keepdim=True)).cpu())
    model.train(was_training)
    return torch.cat(rows).flatten().double().numpy()


def save_prompts(path, prompts: list[tuple[np.ndarray, TopK]]) -> None:
    """KL prompts with the teacher's top-k, as one .npz (no pickle), written atomically."""
    import io

    from quasar.files import atomic_write

    arrays = {}
    for i, (tok, tk) in enumerate(prompts):
        arrays[f"tokens_{i}"] = np.asarray(tok, dtype=np.int64)
        arrays[f"ids_{i}"] = tk.token_ids
        arrays[f"lp_{i}"] = tk.logprobs
        arrays[f"tail_{i}"] = tk.tail_logprob
    buffer = io.BytesIO()
    np.savez(buffer, count=np.asarray(len(prompts)), **arrays)
    atomic_write(path, buffer.getvalue())


def load_prompts(path) -> list[tuple[np.ndarray, TopK]]:
    """What `save_prompts` wrote; OSError/KeyError/ValueError for a missing or damaged file."""
    with np.load(path, allow_pickle=False) as data:
        n = int(data["count"])
        return [
            (data[f"tokens_{i}"], TopK(data[f"ids_{i}"], data[f"lp_{i}"], data[f"tail_{i}"]))
            for i in range(n)
        ]


def save_behaviour(path, behaviour: list[np.ndarray]) -> None:
    import io

    from quasar.files import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, count=np.asarray(len(behaviour)), **{f"p{i}": b for i, b in enumerate(behaviour)})
    atomic_write(path, buffer.getvalue())


def load_behaviour(path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"p{i}"] for i in range(int(data["count"]))]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass(frozen=True)
class Comparison:
    """Result of `paired_comparison`: challenger_wins is True only when p_value < alpha."""

    n: int
    mean_incumbent: float
    mean_challenger: float
    margin: float
    statistic: float
    p_value: float
    alpha: float
    challenger_wins: bool


def paired_comparison(
    incumbent_kl, challenger_kl, *, margin: float = 0.03, alpha: float = 0.03, min_pairs: int = 2
) -> Comparison:
    """One-sided paired t-test that the challenger's per-prompt KL is lower than (1 - margin) times
    the incumbent's on the same prompts."""
    a = np.asarray(incumbent_kl, dtype=np.float64)
    b = np.asarray(challenger_kl, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D arrays over the same prompts, got shapes {a.shape} and {b.shape}")
    if len(a) < max(min_pairs, 2):
        raise ValueError(f"need at least {max(min_pairs, 2)} paired prompts, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-prompt KL values must be finite")
    if not 0.0 <= margin < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"margin must be in [0, 1) and alpha in (0, 1), got {margin}, {alpha}")
    d = (1.0 - margin) * a - b
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        statistic = math.inf if mean > 0 else (-math.inf if mean < 0 else 0.0)
        p_value = 0.0 if mean > 0 else 1.0
    else:
        statistic = mean / (sd / math.sqrt(n))
        p_value = student_t_sf(statistic, n - 1)
    return Comparison(n, float(a.mean()), float(b.mean()), margin, statistic, p_value, alpha, p_value < alpha)


@dataclass(frozen=True)
class LengthCheck:
    student_mean: float
    teacher_mean: float
    ratio: float
    low: float
    high: float
    within_band: bool


def generated_length_check(
    student_lengths, teacher_lengths, *, band: tuple[float, float] = (0.5, 2.0)
) -> LengthCheck:
    """Generated-length statistics against the teacher's on the same prompts. Rambling students
    (far longer than the teacher) and silent ones (far shorter) can score well on KL alone; callers
    require `within_band` before trusting the KL."""
    s = np.asarray(student_lengths, dtype=np.float64)
    t = np.asarray(teacher_lengths, dtype=np.float64)
    if s.size == 0 or t.size == 0:
        raise ValueError("need generated lengths of both the student and the teacher")
    low, high = band
    if not 0 < low <= 1 <= high:
        raise ValueError(f"band must satisfy 0 < low <= 1 <= high, got {band}")
    ratio = float(s.mean() / max(t.mean(), 1e-9))
    return LengthCheck(float(s.mean()), float(t.mean()), ratio, low, high, low <= ratio <= high)
