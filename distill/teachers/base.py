"""What every teacher backend shares: the error type and turning vLLM-style candidate lists into `TopK`.

vLLM reports, for each prompt position, the top-k candidates plus the actual prompt token (with its
true rank) when that token is outside the top-k, so a position carries k or k + 1 entries, and fewer
than k when the vocabulary is smaller than k. `select_topk` is the one place that reduces such a list
to exactly k slots, for the server (JSON) and the in-process engine (objects) alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distill.types import MISSING_ID, TopK

# vLLM's OpenAI server cannot put -inf in JSON and writes this instead (probability 0).
VLLM_NEG_INF = -9999.0


class TeacherError(RuntimeError):
    """A teacher could not produce top-k predictions; the message says what went wrong and what to do."""


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise TeacherError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_sequences(sequences: list[list[int]]) -> list[list[int]]:
    """Plain lists of non-negative Python ints (accepts numpy arrays and tensors row by row)."""
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise TeacherError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
    out: list[list[int]] = []
    for i, seq in enumerate(sequences):
        try:
            ids = [int(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
        except (TypeError, ValueError) as exc:
            raise TeacherError(f"sequence {i} is not a list of integer token ids ({exc})") from None
        if ids and min(ids) < 0:
            raise TeacherError(f"sequence {i} contains a negative token id ({min(ids)})")
        out.append(ids)
    return out


def select_topk(entries: Iterable[tuple[int, float, int | None]], k: int) -> tuple[list[int], list[float]]:
    """The k best (token_id, logprob) of one position from vLLM's (token_id, logprob, rank) entries.

    A later entry for the same id replaces an earlier one: vLLM lists the actual token first with its
    tie-pessimistic rank and again inside the top-k with its positional rank (its JSON and dict forms
    keep the later value too). Entries ranked above k are the actual token outside the top-k: dropped.
    Logprobs at or below vLLM's -9999 clamp become -inf.
    """
    best: dict[int, tuple[float, int]] = {}
    for token_id, logprob, rank in entries:
        lp = float(logprob)
        if math.isnan(lp) or lp > 1e-3 or lp == math.inf:
            raise TeacherError(f"invalid logprob {logprob!r} for token {token_id}")
        if lp <= VLLM_NEG_INF:
            lp = -math.inf
        if rank is None:
            raise TeacherError(f"missing rank for token {token_id}")
        best[int(token_id)] = (lp, int(rank))
    chosen = sorted(
        ((rank, -lp, tid) for tid, (lp, rank) in best.items() if 1 <= rank <= k),
    )[:k]
    return [tid for _, _, tid in chosen], [-neg for _, neg, _ in chosen]


def topk_from_rows(rows: list[tuple[list[int], list[float]] | None], k: int, exact_tail=None) -> TopK:
    """A `TopK` from per-position (ids, logprobs) lists (None = no prediction, i.e. row 0).

    Short rows are padded with MISSING_ID / -inf. The tail is 1 - sum(p) (all a top-k API gives),
    unless `exact_tail` (float32 [n]) is passed.
    """
    n = len(rows)
    ids = np.full((n, k), MISSING_ID, dtype=np.int32)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    has = np.zeros(n, dtype=bool)
    for t, row in enumerate(rows):
        if row is None:
            continue
        row_ids, row_lps = row
        m = len(row_ids)
        ids[t, :m] = row_ids
        lps[t, :m] = row_lps
        has[t] = True
    if exact_tail is not None:
        tail = np.asarray(exact_tail, dtype=np.float32)
    else:
        tail = np.zeros(n, dtype=np.float32)
        if has.any():
            tail[has] = TopK.tail_from_logprobs(lps[has])
    return TopK(ids, lps, tail)
