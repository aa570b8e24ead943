"""The original per-candidate parsers of vLLM prompt logprobs, kept only as the test oracle and the
benchmark baseline (`bench/teacher_ingest.py`). Production code never calls them: it uses
`distill.teachers.vllm_parse`, which must give exactly what these give (tests/distill/test_vllm_ingest_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from distill.teachers.errors import TeacherError
from distill.types import MISSING_ID, TopK

# vLLM's OpenAI server cannot put -inf in JSON and writes this instead (probability 0).
VLLM_NEG_INF = -9999.0


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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def reference_parse_prompt_logprobs(entries: Any, prompt: list[int], k: int, where: str = "prompt") -> TopK:
    """One choice's `prompt_logprobs` list -> `TopK` for `prompt` (validated; TeacherError otherwise)."""
    if not isinstance(entries, list):
        raise TeacherError(f"{where}: prompt_logprobs is {type(entries).__name__}, expected a list")
    if len(entries) != len(prompt):
        raise TeacherError(
            f"{where}: {len(entries)} prompt_logprobs entries for a prompt of {len(prompt)} tokens "
            "(the server must return one entry per prompt token)"
        )
    rows: list[tuple[list[int], list[float]] | None] = []
    for t, entry in enumerate(entries):
        if t == 0:
            if entry is not None:
                raise TeacherError(f"{where}: entry 0 should be null (nothing precedes the first token)")
            rows.append(None)
            continue
        if not isinstance(entry, dict) or not entry:
            raise TeacherError(f"{where}: entry {t} is {entry!r:.80}, expected a non-empty object")
        parsed: list[tuple[int, float, int]] = []
        for key, val in entry.items():
            try:
                tid = int(key)
            except (TypeError, ValueError):
                raise TeacherError(f"{where}: entry {t} has a non-integer token key {key!r}") from None
            if not isinstance(val, dict) or not _is_number(val.get("logprob")):
                raise TeacherError(f"{where}: entry {t}, token {tid}: no numeric logprob in {val!r:.80}")
            lp, rank = float(val["logprob"]), val.get("rank")
            if not math.isfinite(lp):  # -inf arrives as -9999; anything non-finite is corrupt
                raise TeacherError(f"{where}: entry {t}, token {tid}: non-finite logprob {lp}")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise TeacherError(f"{where}: entry {t}, token {tid}: invalid rank {rank!r}")
            parsed.append((tid, lp, rank))
        if not any(tid == prompt[t] for tid, _, _ in parsed):
            # vLLM always lists the actual token: without it, this entry belongs to another prompt.
            raise TeacherError(
                f"{where}: entry {t} does not list the prompt token {prompt[t]}; response misaligned with the request"
            )
        rows.append(select_topk(parsed, k))
    return topk_from_rows(rows, k)


def reference_parse_completion_response(body: Any, prompts: list[list[int]], k: int) -> list[TopK]:
    """A /v1/completions JSON body for `prompts` (a list of token-id lists) -> one `TopK` per prompt."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise TeacherError(f"response has no 'choices' list: {str(body)[:200]}")
    choices = body["choices"]
    if len(choices) != len(prompts):
        raise TeacherError(f"response has {len(choices)} choices for {len(prompts)} prompts")
    out: list[TopK | None] = [None] * len(prompts)
    for pos, choice in enumerate(choices):
        idx = choice.get("index", pos) if isinstance(choice, dict) else None
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(prompts):
            raise TeacherError(f"choice {pos} has an invalid index {idx!r} (expected 0..{len(prompts) - 1})")
        if out[idx] is not None:
            raise TeacherError(f"two choices carry index {idx}")
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != prompts[idx]:
            raise TeacherError(f"choice {idx}: prompt_token_ids differ from the prompt sent")
        out[idx] = reference_parse_prompt_logprobs(
            choice.get("prompt_logprobs"), prompts[idx], k, f"choice {idx}"
        )
    return out  # type: ignore[return-value]


def _entries_of_position(plp: Any, t: int) -> list[tuple[int, float, int | None]] | None:
    """(token_id, logprob, rank) at position t of vLLM's prompt logprobs, in either container form."""
    if hasattr(plp, "start_indices") and hasattr(plp, "end_indices"):  # FlatLogprobs
        lo, hi = plp.start_indices[t], plp.end_indices[t]
        if lo == hi:
            return None
        return list(zip(plp.token_ids[lo:hi], plp.logprobs[lo:hi], plp.ranks[lo:hi]))
    entry = plp[t]
    if not entry:
        return None
    return [(tid, lp.logprob, lp.rank) for tid, lp in entry.items()]


def reference_parse_engine_prompt_logprobs(
    plp: Any, prompt: list[int], k: int, where: str = "prompt"
) -> TopK:
    """`RequestOutput.prompt_logprobs` (FlatLogprobs or list of {id: Logprob}) -> validated `TopK`."""
    if plp is None:
        raise TeacherError(f"{where}: vLLM returned no prompt logprobs (was prompt_logprobs set?)")
    if len(plp) != len(prompt):
        raise TeacherError(
            f"{where}: {len(plp)} prompt-logprob positions for a prompt of {len(prompt)} tokens"
        )
    rows: list[tuple[list[int], list[float]] | None] = []
    for t in range(len(prompt)):
        entries = _entries_of_position(plp, t)
        if t == 0:
            if entries:
                raise TeacherError(f"{where}: position 0 should have no prediction")
            rows.append(None)
            continue
        if not entries:
            raise TeacherError(f"{where}: position {t} has no candidates")
        if not any(int(tid) == prompt[t] for tid, _, _ in entries):
            raise TeacherError(
                f"{where}: position {t} does not list the prompt token {prompt[t]}: misaligned"
            )
        rows.append(select_topk(entries, k))
    return topk_from_rows(rows, k)
