"""Gated linear attention in chunked form, in plain PyTorch.

Chunks of C = 64 tokens pass the state; inside a chunk, with G the within-chunk cumulative log-gate:

    o_t = scale * [ (q_t * exp(G_t)) S + sum_{s <= t} A_ts v_s ],  A_ts = sum_d q_td k_sd exp(G_td - G_sd)
    S'  = exp(G_last) * S + sum_t (k_t * exp(G_last - G_t))^T v_t

Every exponent above is <= 0, so nothing overflows however strong the decay. The score matrix A
is built from 16-token sub-chunks: blocks below the diagonal are matmuls with both factors
re-referenced to the sub-chunk boundary (exponents <= 0), the diagonal blocks are formed
element-wise in log space. This is the same scheme as flash-linear-attention's chunk_gla.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import accumulation_dtype

GLA_CHUNK_SIZE = 64
GLA_SUB_CHUNK_SIZE = 16


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = GLA_CHUNK_SIZE,
    sub_chunk_size: int = GLA_SUB_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, c = chunk_size, sub_chunk_size
    if C % c:
        raise ValueError(f"chunk_size {C} must be a multiple of sub_chunk_size {c}")
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    acc = accumulation_dtype(q.dtype)
    N = -(-T // C)
    pad = N * C - T

    # Padded tokens: k = 0 (no write) and g = 0 (no decay), so the final state is exact for any T.
    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q_c, k_c, v_c, g_c = blocks(q) * scale, blocks(k), blocks(v), blocks(g)
    G = g_c.cumsum(dim=3)  # [B, H, N, C, K], inclusive, non-increasing along the chunk
    G_last = G[:, :, :, -1:]  # [B, H, N, 1, K]

    # Intra-chunk scores A [B, H, N, C, C], sub-chunk by sub-chunk.
    n_sub = C // c
    qs = q_c.reshape(B, H, N, n_sub, c, K)
    ks = k_c.reshape(B, H, N, n_sub, c, K)
    Gs = G.reshape(B, H, N, n_sub, c, K)
    rows = []
    diag_mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    for i in range(n_sub):
        row = []
        if i > 0:
            # Reference: the cumulative gate just before sub-chunk i (end of sub-chunk i-1).
            ref = Gs[:, :, :, i - 1, -1:]  # [B, H, N, 1, K]
            q_ref = qs[:, :, :, i] * (Gs[:, :, :, i] - ref).exp()
            k_prev = ks[:, :, :, :i].reshape(B, H, N, i * c, K)
            G_prev = Gs[:, :, :, :i].reshape(B, H, N, i * c, K)
            k_ref = k_prev * (ref - G_prev).exp()
            row.append(q_ref @ k_ref.transpose(-1, -2))  # [B, H, N, c, i*c]
        # Diagonal block, element-wise: exponent G_t - G_s <= 0 wherever s <= t; masked elsewhere.
        diff = Gs[:, :, :, i, :, None, :] - Gs[:, :, :, i, None, :, :]  # [B, H, N, c(t), c(s), K]
        decay = diff.masked_fill(~diag_mask[:, :, None], float("-inf")).exp()
        row.append(torch.einsum("bhntd,bhnsd,bhntsd->bhnts", qs[:, :, :, i], ks[:, :, :, i], decay))
        if i < n_sub - 1:
            row.append(q_c.new_zeros(B, H, N, c, C - (i + 1) * c))
        rows.append(torch.cat(row, dim=-1))
    A = torch.cat(rows, dim=-2)  # [B, H, N, C, C]
    o_intra = A @ v_c

    # Inter-chunk: each chunk's contribution to the state, then a short scan over chunks.
    kv = (k_c * (G_last - G).exp()).transpose(-1, -2) @ v_c  # [B, H, N, K, V]
    chunk_decay = G_last.squeeze(3).exp()[..., None]  # [B, H, N, K, 1]
    S = (
        torch.zeros(B, H, K, V, dtype=acc, device=q.device)
        if initial_state is None
        else initial_state.to(acc)
    )
    states = []
    # `unbind`, not per-chunk indexing, keeps the backward linear in T (see kernels/efla.py).
    for decay_n, kv_n in zip(chunk_decay.unbind(2), kv.unbind(2)):
        states.append(S)
        S = decay_n * S + kv_n
    # [B, H, N, K, V], the state entering each chunk (N = 0 when T = 0)
    S_in = torch.stack(states, dim=2) if states else S.new_zeros(B, H, 0, K, V)
    o = (q_c * G.exp()) @ S_in + o_intra
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)
