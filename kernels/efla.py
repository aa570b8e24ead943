"""Quasar attention (EFLA) in chunked form, in plain PyTorch.

Within a chunk of C tokens the delta-rule recurrence is solved in closed (WY/UT) form, as in
DeltaNet's chunk algorithm with EFLA's step `a_t` in place of beta. With incoming state S0:

    L = I + tril(diag(a) K K^T, -1)            (unit lower triangular, inverted by block doubling)
    W = L^-1 diag(a) K,   U = L^-1 diag(a) V
    U' = U - W S0
    O  = scale * (Q S0 + (Q K^T masked causally, diagonal included) U')
    S1 = S0 + K^T U'

Everything inside a chunk is parallel; only the [Dk, Dv] state moves from chunk to chunk.
Autograd differentiates it, including through `a_t`'s dependence on |k_t|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import accumulation_dtype, efla_step_size

EFLA_CHUNK_SIZE = 64


def _diagonal_blocks(M: torch.Tensor, size: int) -> torch.Tensor:
    """[..., C, C] -> its C/size diagonal blocks [..., C/size, size, size]."""
    n = M.shape[-1] // size
    blocks = M.reshape(*M.shape[:-2], n, size, n, size).diagonal(dim1=-4, dim2=-2)  # [..., size, size, n]
    return blocks.movedim(-1, -3)


def invert_unit_lower_triangular(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower triangular A [..., C, C].

    Block forward substitution by doubling: the inverses of the 2s-blocks on the diagonal are built
    from those of the s-blocks, [[X, 0], [-Y L21 X, Y]]. log2(C) rounds of batched matmuls; much
    faster than a batched triangular solve on CPU, and differentiable. Falls back to the solver
    when C is not a power of two.
    """
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    if C & (C - 1):
        return torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    inv = torch.ones(*A.shape[:-2], C, 1, 1, dtype=A.dtype, device=A.device)
    size = 1
    while size < C:
        pairs = inv.reshape(*A.shape[:-2], C // (2 * size), 2, size, size)
        X, Y = pairs[..., 0, :, :], pairs[..., 1, :, :]
        L21 = _diagonal_blocks(A, 2 * size)[..., size:, :size]
        lower = -(Y @ L21 @ X)
        top = torch.cat((X, torch.zeros_like(X)), dim=-1)
        bottom = torch.cat((lower, Y), dim=-1)
        inv = torch.cat((top, bottom), dim=-2)
        size *= 2
    return inv.squeeze(-3)


def chunk_efla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = EFLA_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    acc = accumulation_dtype(q.dtype)
    N = -(-T // C)
    pad = N * C - T

    # [B, T, H, D] -> [B, H, N, C, D] in fp32. Zero-padded tokens have k = 0, so they neither read
    # nor write the state: padding is exact, and any T works.
    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q_c, k_c, v_c = blocks(q) * scale, blocks(k), blocks(v)
    b = beta.to(acc).transpose(1, 2)
    if pad:
        b = F.pad(b, (0, pad))
    a = efla_step_size(b.reshape(B, H, N, C), (k_c * k_c).sum(-1))  # [B, H, N, C]

    ka = k_c * a[..., None]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    L = (ka @ k_c.transpose(-1, -2)).masked_fill(~strictly_lower, 0.0)
    L_inv = invert_unit_lower_triangular(L)
    W = L_inv @ ka
    U = L_inv @ (v_c * a[..., None])
    qk = (q_c @ k_c.transpose(-1, -2)).masked_fill(~causal, 0.0)

    S = (
        torch.zeros(B, H, K, V, dtype=acc, device=q.device)
        if initial_state is None
        else initial_state.to(acc)
    )
    # Sequential part: only the state and the corrected values u move chunk to chunk. `unbind` (not
    # per-chunk indexing) keeps the backward linear in T: indexing a slice in a loop makes autograd
    # scatter each chunk's gradient into a full-size zero tensor.
    states, corrected = [], []
    for U_n, W_n, k_n in zip(U.unbind(2), W.unbind(2), k_c.unbind(2)):
        u = U_n - W_n @ S
        states.append(S)
        corrected.append(u)
        S = S + k_n.transpose(-1, -2) @ u
    if N:
        S_in, u_all = torch.stack(states, dim=2), torch.stack(corrected, dim=2)  # [B, H, N, K|C, V]
        o = q_c @ S_in + qk @ u_all
    else:  # T = 0: no chunks
        o = q_c.new_zeros(B, H, 0, C, V)
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)
