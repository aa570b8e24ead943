"""Packed variable-length batches: `cu_seqlens` checks and the per-chunk tables the kernels walk.

A packed batch is B = 1 with several documents laid end to end along T; `cu_seqlens` holds the
cumulative offsets `[0, len_0, len_0 + len_1, ..., T]` (as in flash-linear-attention). Each
document starts from its own initial state (or zeros) and ends with its own final state, so
initial and final states are `[N, H, Dk, Dv]` for N documents.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Validate `cu_seqlens` against a [B, T, ...] input and return it as int64 on the input's device."""
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
    offsets = cu_seqlens.to(torch.int64)
    host = offsets.cpu()
    if host[0].item() != 0 or host[-1].item() != length:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0 and end at T={length}, got {host[0].item()} ... {host[-1].item()}"
        )
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {host.tolist()}")
    return offsets


def check_state_count(op: str, initial_state: torch.Tensor | None, num_sequences: int) -> None:
    if initial_state is not None and initial_state.shape[0] != num_sequences:
        raise ValueError(
            f"{op}: initial_state has {initial_state.shape[0]} states, but there are {num_sequences} "
            f"sequences (one state per document of cu_seqlens, or per batch row)"
        )


class ChunkTable(NamedTuple):
    """Where every chunk of every document lies, for kernels that run one program per chunk.

    chunk_start/chunk_end: first and one-past-last token of each chunk (a chunk never crosses a
    document boundary; the last chunk of a document may be short). seq_chunk_offset[n]: index of
    document n's first chunk, so its chunks are seq_chunk_offset[n] .. seq_chunk_offset[n + 1] - 1.
    """

    chunk_start: torch.Tensor  # [NC] int32
    chunk_end: torch.Tensor  # [NC] int32
    seq_chunk_offset: torch.Tensor  # [N + 1] int32
    num_chunks: int


def chunk_table(cu_seqlens: torch.Tensor, chunk_size: int) -> ChunkTable:
    offsets = cu_seqlens.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    per_seq = (lengths + chunk_size - 1) // chunk_size
    seq_chunk_offset = torch.cat((per_seq.new_zeros(1), per_seq.cumsum(0)))
    num_chunks = int(seq_chunk_offset[-1].item())
    seq_of_chunk = torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), per_seq)
    index_in_seq = torch.arange(num_chunks, device=offsets.device) - seq_chunk_offset[seq_of_chunk]
    start = offsets[seq_of_chunk] + index_in_seq * chunk_size
    end = torch.minimum(start + chunk_size, offsets[seq_of_chunk + 1])
    return ChunkTable(
        start.to(torch.int32), end.to(torch.int32), seq_chunk_offset.to(torch.int32), num_chunks
    )


def per_document(fn, q, k, v, gate, scale, initial_state, output_final_state, cu_seqlens):
    """Run a single-sequence op over each packed document in turn (the naive and torch backends).

    Each document gets its own initial state (or zeros) and returns its own final state; outputs
    are concatenated back along T.
    """
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (start, end) in enumerate(pairwise(bounds)):
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
