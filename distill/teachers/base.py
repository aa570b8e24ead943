"""What every teacher backend shares: the error type and the checks of `topk` arguments.

Turning vLLM's candidate lists (k or k + 1 per position: the actual token comes with its true rank)
into top-k arrays is `distill.teachers.vllm_parse.select_flat`, the one place for the server (JSON)
and the in-process engine alike.
"""

from __future__ import annotations

import numpy as np

from distill.teachers.errors import TeacherError
from distill.teachers.vllm_parse import VLLM_NEG_INF

__all__ = ["VLLM_NEG_INF", "TeacherError", "check_k", "check_sequences"]


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
