"""Packed variable-length batches: `cu_seqlens` checks and the per-chunk tables the kernels walk.

A packed batch is B = 1 with several documents laid end to end along T; `cu_seqlens` holds the
cumulative offsets `[0, len_0, len_0 + len_1, ..., T]` (as in flash-linear-attention). Each
document starts from its own initial state (or zeros) and ends with its own final state, so
initial and final states are `[N, H, Dk, Dv]` for N documents.
"""

from __future__ import annotations

import functools
from itertools import pairwise
from typing import NamedTuple

import torch


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, batch: int, length: int) -> tuple[int, ...]:
    """Validate `cu_seqlens` against a [B, T, ...] input and return the offsets as host integers.

    Reading them once here (one device sync) lets every later step index documents and build the
    kernels' chunk tables without touching the device again."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D integer tensor of cumulative document offsets "
            f"[0, ..., T], got {getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
            f"of shape {tuple(getattr(cu_seqlens, 'shape', ()))}"
        )
    if batch != 1:
        raise ValueError(
            f"{op}: with cu_seqlens the documents are packed along T, so the batch size must be 1, "
            f"got {batch}; reshape to [1, B*T, H, D]"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens needs at least two offsets [0, T], got {cu_seqlens.tolist()}")
    offsets = tuple(cu_seqlens.tolist())
    if offsets[0] != 0 or offsets[-1] != length:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0 and end at T={length}, got {offsets[0]} ... {offsets[-1]}"
        )
    if any(b < a for a, b in pairwise(offsets)):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {list(offsets)}")
    return offsets


def batch_offsets(batch: int, length: int) -> tuple[int, ...]:
    """The offsets of a [B, T] batch seen as B packed documents of length T."""
    return tuple(n * length for n in range(batch + 1))


def check_state_count(op: str, initial_state: torch.Tensor | None, num_sequences: int) -> None:
    if initial_state is not None and initial_state.shape[0] != num_sequences:
        raise ValueError(
            f"{op}: initial_state has {initial_state.shape[0]} states, but there are {num_sequences} "
            f"sequences (one state per document of cu_seqlens, or per batch row)"
        )


class ChunkTable(NamedTuple):
    """Where every chunk of every document lies, for kernels that run one program per chunk.

    cu_seqlens: the document offsets [N + 1] on the device. chunk_start/chunk_end: first and
    one-past-last token of each chunk (a chunk never crosses a document boundary; the last chunk of
    a document may be short). seq_chunk_offset[n]: index of document n's first chunk, so its chunks
    are seq_chunk_offset[n] .. seq_chunk_offset[n + 1] - 1.
    """

    cu_seqlens: torch.Tensor  # [N + 1] int64
    chunk_start: torch.Tensor  # [NC] int32
    chunk_end: torch.Tensor  # [NC] int32
    seq_chunk_offset: torch.Tensor  # [N + 1] int32
    num_chunks: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1


@functools.lru_cache(maxsize=64)
def chunk_table(offsets: tuple[int, ...], chunk_size: int, device: torch.device) -> ChunkTable:
    """The chunk table of documents at host `offsets`, built once per (offsets, chunk size, device):
    every layer of a model calls the kernels with the same packing."""
    starts, ends, seq_chunk_offset = [], [], [0]
    for bos, eos in pairwise(offsets):
        for start in range(bos, eos, chunk_size):
            starts.append(start)
            ends.append(min(start + chunk_size, eos))
        seq_chunk_offset.append(len(starts))

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device)

    return ChunkTable(
        tensor(offsets, torch.int64),
        tensor(starts, torch.int32),
        tensor(ends, torch.int32),
        tensor(seq_chunk_offset, torch.int32),
        len(starts),
    )


def per_document(fn, q, k, v, gate, scale, initial_state, output_final_state, offsets: tuple[int, ...]):
    """Run a single-sequence op over each packed document in turn (the naive and torch backends).

    Each document gets its own initial state (or zeros) and returns its own final state; outputs
    are concatenated back along T.
    """
    outputs, finals = [], []
    for n, (start, end) in enumerate(pairwise(offsets)):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, ht = fn(
            q[:, start:end],
            k[:, start:end],
            v[:, start:end],
            gate[:, start:end],
            scale=scale,
            initial_state=h0,
            output_final_state=output_final_state,
        )
        outputs.append(o)
        finals.append(ht)
    o = torch.cat(outputs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)
