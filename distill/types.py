"""The data that flows through distillation: teacher top-k predictions and loss targets.

Alignment convention (the same as vLLM's prompt logprobs): for a token sequence x_0 .. x_{n-1}, row t
of a `TopK` is the teacher's distribution of x_t given x_0 .. x_{t-1}. Row 0 has no prediction.
The student's logits at position t predict x_{t+1}, so student position t is trained on row t + 1
(`KDTargets.from_topk` does that shift once, in one place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

MISSING_ID = -1  # token id of an empty top-k slot (row 0, or fewer candidates than k)


@dataclass(frozen=True)
class TopK:
    """A teacher's top-k predictions for one sequence of n tokens.

    token_ids:    int32 [n, k], most likely first; MISSING_ID where a slot is empty.
    logprobs:     float32 [n, k], normalised over the teacher's full vocabulary; -inf where empty.
    tail_logprob: float32 [n], log of the probability mass outside the k ids (-inf when there is none).
    Row 0 is empty (no token precedes x_0): ids MISSING_ID, logprobs -inf, tail_logprob 0 (all mass unknown).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray

    def __post_init__(self) -> None:
        ids, lp, tail = self.token_ids, self.logprobs, self.tail_logprob
        if ids.ndim != 2 or lp.shape != ids.shape or tail.shape != ids.shape[:1]:
            raise ValueError(
                f"TopK shapes disagree: token_ids {ids.shape}, logprobs {lp.shape}, tail_logprob {tail.shape}; "
                "expected [n, k], [n, k], [n]"
            )

    @property
    def length(self) -> int:
        return self.token_ids.shape[0]

    @property
    def k(self) -> int:
        return self.token_ids.shape[1]

    @staticmethod
    def empty_rows(n: int, k: int) -> TopK:
        return TopK(
            np.full((n, k), MISSING_ID, dtype=np.int32),
            np.full((n, k), -np.inf, dtype=np.float32),
            np.zeros(n, dtype=np.float32),
        )

    @staticmethod
    def tail_from_logprobs(logprobs: np.ndarray) -> np.ndarray:
        """log(1 - sum exp(logprobs)) per row, in float64, clamped at 0 mass (-inf)."""
        mass = np.exp(logprobs.astype(np.float64)).sum(-1)
        with np.errstate(divide="ignore"):
            return np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)


@runtime_checkable
class Teacher(Protocol):
    """Anything that returns top-k next-token predictions for batches of token-id sequences.

    Token ids are in the teacher's own vocabulary (see `distill.teachers.align` for a teacher with a
    different tokenizer than the student). `name` identifies model, revision and backend settings
    that change the numbers; the logit cache keys on it.
    """

    name: str
    vocab_size: int

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]: ...

    def close(self) -> None: ...


@dataclass
class KDTargets:
    """Loss targets for N student positions (flattened), aligned with the student's hidden states.

    token_ids:    int64 [N, k] student-vocabulary ids (any value where logprobs is -inf).
    logprobs:     float32 [N, k] teacher log-probabilities of those ids.
    tail_logprob: float32 [N] log of the teacher mass outside the k ids.
    mask:         bool [N] positions that carry a teacher distribution.
    labels:       int64 [N] the actual next token (for the optional cross-entropy term), -100 where none.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @staticmethod
    def from_topk(tokens: np.ndarray, topk: TopK) -> KDTargets:
        """Targets for one sequence: student position t gets teacher row t + 1; the last position has none."""
        n = len(tokens)
        if topk.length != n:
            raise ValueError(f"teacher rows ({topk.length}) do not match the sequence length ({n})")
        ids = np.full((n, topk.k), 0, dtype=np.int64)
        lp = np.full((n, topk.k), -np.inf, dtype=np.float32)
        tail = np.zeros(n, dtype=np.float32)
        labels = np.full(n, -100, dtype=np.int64)
        if n > 1:
            ids[:-1] = np.maximum(topk.token_ids[1:], 0)
            lp[:-1] = topk.logprobs[1:]
            tail[:-1] = topk.tail_logprob[1:]
            labels[:-1] = tokens[1:]
        mask = np.isfinite(lp).any(-1) | np.isfinite(tail) & (tail < 0)
        mask[-1:] = False
        return KDTargets(
            torch.from_numpy(ids),
            torch.from_numpy(lp),
            torch.from_numpy(tail),
            torch.from_numpy(mask),
            torch.from_numpy(labels),
        )

    @staticmethod
    def cat(parts: list[KDTargets]) -> KDTargets:
        return KDTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in KDTargets.FIELDS))

    def to(self, device: torch.device | str) -> KDTargets:
        return KDTargets(*(getattr(self, f).to(device, non_blocking=True) for f in KDTargets.FIELDS))

    def __len__(self) -> int:
        return self.mask.shape[0]


KDTargets.FIELDS = ("token_ids", "logprobs", "tail_logprob", "mask", "labels")
