"""Quasar attention (EFLA) as chunked Triton kernels, forward and backward.

The algorithm is the one in `kernels/efla.py` (the DeltaNet chunk algorithm in WY/UT form with
EFLA's key-norm-adaptive step a_t in place of beta), split into kernels the way GPU chunk
algorithms are:

forward
  1. `_efla_prepare`   one program per (chunk, head): a_t from beta_t and |k_t|^2, the strictly
                       lower matrix A = tril(diag(a) K K^T, -1), its unit-triangular inverse
                       Tm = (I + A)^-1 by forward substitution, W = Tm diag(a) K, U = Tm diag(a) V.
  2. `_efla_state`     one program per (document, head, V block), sequential over the document's
                       chunks: stores the state entering each chunk, u = U - W S, S += K^T u.
  3. `_efla_output`    one program per (chunk, head, V block): o = scale (Q S + tril(Q K^T) u).
backward
  4. `_efla_state_bwd` per (document, head, V block), chunks in reverse: the gradient of the
                       state leaving each chunk, du, and the initial state's gradient.
  5. `_efla_chunk_bwd` per (chunk, head): dq, dk, dv, dbeta, back through u, W, U, Tm, A and a_t
                       (including a_t's dependence on |k_t|).

Only chunk-boundary states ([num_chunks, H, Dk, Dv], fp32) and per-token chunk quantities
(W, U, u, Tm rows, a) are kept for the backward: nothing is O(T^2). Every sum is in fp32 whatever
the input dtype. All batches run in packed form: a [B, T] batch is B documents of length T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import _EFLA_SERIES_THRESHOLD
from kernels.triton_utils import LAUNCH, block_size, dot_precision
from kernels.varlen import chunk_table

EFLA_TRITON_CHUNK = 64


@triton.jit
def _step_size(beta, n2, THRESHOLD: tl.constexpr):
    """a = (1 - exp(-beta n2)) / n2 with the series near 0 (see kernels.reference.efla_step_size)."""
    x = beta * n2
    small = x < THRESHOLD
    safe_n2 = tl.where(small, 1.0, n2)
    exact = (1.0 - tl.exp(-x)) / safe_n2
    xs = tl.where(small, x, 0.0)
    series = beta * (1.0 - xs / 2.0 + xs * xs / 6.0)
    return tl.where(small, series, exact)


@triton.jit
def _step_size_grads(beta, n2, THRESHOLD: tl.constexpr):
    """(da/dbeta, da/dn2) of the step size, finite everywhere."""
    x = beta * n2
    small = x < THRESHOLD
    e = tl.exp(-x)
    safe_n2 = tl.where(small, 1.0, n2)
    d_n2_exact = (x * e - (1.0 - e)) / (safe_n2 * safe_n2)
    xs = tl.where(small, x, 0.0)
    d_n2_series = beta * beta * (-0.5 + xs / 3.0)
    return e, tl.where(small, d_n2_series, d_n2_exact)


@triton.jit
def _efla_prepare(
    k, v, beta, a_out, tm_out, w_out, u_out,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    THRESHOLD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    row_ok = rows < eos
    ck = tl.arange(0, BK)
    r = tl.arange(0, C)

    b_k = tl.load(
        k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=row_ok[:, None] & (ck[None, :] < K), other=0.0
    ).to(tl.float32)
    b_beta = tl.load(beta + rows * H + i_h, mask=row_ok, other=0.0).to(tl.float32)
    b_a = _step_size(b_beta, tl.sum(b_k * b_k, 1), THRESHOLD)

    b_ka = b_k * b_a[:, None]
    b_A = tl.dot(b_ka, tl.trans(b_k), input_precision=PRECISION)
    b_A = tl.where(r[:, None] > r[None, :], b_A, 0.0)
    # Tm = (I + A)^-1 row by row: Tm_i = e_i - sum_{j<i} A_ij Tm_j. Rows >= i are still identity rows
    # and A_ij = 0 for j >= i, so the sum only sees finished rows.
    b_T = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_row = tl.sum(tl.where(r[:, None] == i, b_A, 0.0), 0)
        t_row = tl.sum(a_row[:, None] * b_T, 0)
        b_T = tl.where(r[:, None] == i, b_T - t_row[None, :], b_T)

    b_w = tl.dot(b_T, b_ka, input_precision=PRECISION)
    tl.store(a_out + rows * H + i_h, b_a, mask=row_ok)
    tl.store(tm_out + (rows[:, None] * H + i_h) * C + r[None, :], b_T, mask=row_ok[:, None])
    tl.store(
        w_out + (rows[:, None] * H + i_h) * K + ck[None, :], b_w, mask=row_ok[:, None] & (ck[None, :] < K)
    )
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        mv = row_ok[:, None] & (cv[None, :] < V)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_u = tl.dot(b_T, b_v * b_a[:, None], input_precision=PRECISION)
        tl.store(u_out + (rows[:, None] * H + i_h) * V + cv[None, :], b_u, mask=mv)


@triton.jit
def _efla_state(
    k, w, u, h0, hs, v_new, ht,
    cu_seqlens, seq_chunk_offset,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    first_chunk = tl.load(seq_chunk_offset + i_n)
    n_chunks = tl.cdiv(eos - bos, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck[:, None] < K) & (cv[None, :] < V)
    state_offsets = ck[:, None] * V + cv[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    for i_c in range(n_chunks):
        tl.store(hs + ((first_chunk + i_c) * H + i_h) * K * V + state_offsets, b_h, mask=state_mask)
        rows = bos + i_c * C + tl.arange(0, C)
        row_ok = rows < eos
        mk = row_ok[:, None] & (ck[None, :] < K)
        mv = row_ok[:, None] & (cv[None, :] < V)
        b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        b_w = tl.load(w + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b_u = tl.load(u + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        b_u = b_u - tl.dot(b_w, b_h, input_precision=PRECISION)
        tl.store(v_new + (rows[:, None] * H + i_h) * V + cv[None, :], b_u, mask=mv)
        b_h += tl.dot(tl.trans(b_k), b_u, input_precision=PRECISION)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh * K * V + state_offsets, b_h, mask=state_mask)


@triton.jit
def _efla_output(
    q, k, v_new, hs, o, scale,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    row_ok = rows < eos
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = row_ok[:, None] & (ck[None, :] < K)
    mv = row_ok[:, None] & (cv[None, :] < V)
    b_q = tl.load(q + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    b_u = tl.load(v_new + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
    b_h = tl.load(
        hs + (i_c * H + i_h) * K * V + ck[:, None] * V + cv[None, :],
        mask=(ck[:, None] < K) & (cv[None, :] < V),
        other=0.0,
    )
    b_qk = tl.where(r[:, None] >= r[None, :], tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION), 0.0)
    b_o = tl.dot(b_q, b_h, input_precision=PRECISION) + tl.dot(b_qk, b_u, input_precision=PRECISION)
    tl.store(o + (rows[:, None] * H + i_h) * V + cv[None, :], b_o.to(o.dtype.element_ty), mask=mv)


@triton.jit
def _efla_state_bwd(
    q, k, w, do, dht, dh0, dhs, dv_new, scale,
    cu_seqlens, seq_chunk_offset,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    first_chunk = tl.load(seq_chunk_offset + i_n)
    n_chunks = tl.cdiv(eos - bos, C)
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck[:, None] < K) & (cv[None, :] < V)
    state_offsets = ck[:, None] * V + cv[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    for i_rev in range(n_chunks):
        i_c = n_chunks - 1 - i_rev
        # the gradient of the state leaving chunk i_c
        tl.store(dhs + ((first_chunk + i_c) * H + i_h) * K * V + state_offsets, b_dh, mask=state_mask)
        rows = bos + i_c * C + tl.arange(0, C)
        row_ok = rows < eos
        mk = row_ok[:, None] & (ck[None, :] < K)
        mv = row_ok[:, None] & (cv[None, :] < V)
        b_q = (
            tl.load(q + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
            * scale
        )
        b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        b_w = tl.load(w + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b_do = tl.load(do + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_qk = tl.where(r[:, None] >= r[None, :], tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION), 0.0)
        # u feeds the outputs (through tril(Q K^T)) and the next state (through K^T u)
        b_du = tl.dot(tl.trans(b_qk), b_do, input_precision=PRECISION) + tl.dot(
            b_k, b_dh, input_precision=PRECISION
        )
        tl.store(dv_new + (rows[:, None] * H + i_h) * V + cv[None, :], b_du, mask=mv)
        # the entering state feeds the outputs, the next state directly, and u = U - W S
        b_dh += tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION)
        b_dh -= tl.dot(tl.trans(b_w), b_du, input_precision=PRECISION)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh * K * V + state_offsets, b_dh, mask=state_mask)


@triton.jit
def _efla_chunk_bwd_v(
    q, k, v, a, tm, v_new, hs, dhs, do, dv_new,
    dq, dv, dk_u, dw, dT, da, scale,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward, the part that involves V, one V block at a time, then tril(Q K^T): dv and dq are
    stored, the partial dk and the sums over V are written (fp32) for `_efla_chunk_bwd_k`.

    o = Qs S + tril(Qs K^T) u;  S_next = S + K^T u;  u = U - W S;  U = Tm (a V)
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    row_ok = rows < eos
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    mk = row_ok[:, None] & (ck[None, :] < K)
    b_a = tl.load(a + rows * H + i_h, mask=row_ok, other=0.0)
    b_T = tl.load(tm + (rows[:, None] * H + i_h) * C + r[None, :], mask=row_ok[:, None], other=0.0)

    b_dqk = tl.zeros([C, C], dtype=tl.float32)
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    b_dw = tl.zeros([C, BK], dtype=tl.float32)
    b_dT = tl.zeros([C, C], dtype=tl.float32)
    b_da = tl.zeros([C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        mv = row_ok[:, None] & (cv[None, :] < V)
        state_mask = (ck[:, None] < K) & (cv[None, :] < V)
        state_offsets = (i_c * H + i_h) * K * V + ck[:, None] * V + cv[None, :]
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_u = tl.load(v_new + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        b_du = tl.load(dv_new + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0)
        b_do = tl.load(do + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_h = tl.load(hs + state_offsets, mask=state_mask, other=0.0)
        b_dh = tl.load(dhs + state_offsets, mask=state_mask, other=0.0)
        b_dqk += tl.dot(b_do, tl.trans(b_u), input_precision=PRECISION)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)
        b_dk += tl.dot(b_u, tl.trans(b_dh), input_precision=PRECISION)
        b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=PRECISION)
        b_dva = tl.dot(tl.trans(b_T), b_du, input_precision=PRECISION)
        b_dT += tl.dot(b_du, tl.trans(b_v * b_a[:, None]), input_precision=PRECISION)
        b_da += tl.sum(b_dva * b_v, 1)
        tl.store(
            dv + (rows[:, None] * H + i_h) * V + cv[None, :],
            (b_dva * b_a[:, None]).to(dv.dtype.element_ty),
            mask=mv,
        )
    # through tril(Qs K^T)
    row_c = (rows[:, None] * H + i_h) * C + r[None, :]
    row_k = (rows[:, None] * H + i_h) * K + ck[None, :]
    b_q = tl.load(q + row_k, mask=mk, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + row_k, mask=mk, other=0.0).to(tl.float32)
    b_dqk = tl.where(r[:, None] >= r[None, :], b_dqk, 0.0)
    b_dq += tl.dot(b_dqk, b_k, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_dqk), b_q, input_precision=PRECISION)
    tl.store(dT + row_c, b_dT, mask=row_ok[:, None])
    tl.store(dq + row_k, (b_dq * scale).to(dq.dtype.element_ty), mask=mk)
    tl.store(dk_u + row_k, b_dk, mask=mk)
    tl.store(dw + row_k, b_dw, mask=mk)
    tl.store(da + rows * H + i_h, b_da, mask=row_ok)


@triton.jit
def _efla_chunk_bwd_k(
    k, beta, a, tm, dk_u, dw, dT, da,
    dk, dbeta,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, THRESHOLD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward, the key side: dk and dbeta through W = Tm (a K), Tm = (I + A)^-1,
    A = tril(diag(a) K K^T, -1) and a = a(beta, |k|^2)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    row_ok = rows < eos
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    mk = row_ok[:, None] & (ck[None, :] < K)
    row_c = (rows[:, None] * H + i_h) * C + r[None, :]
    row_k = (rows[:, None] * H + i_h) * K + ck[None, :]

    b_k = tl.load(k + row_k, mask=mk, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + rows * H + i_h, mask=row_ok, other=0.0).to(tl.float32)
    b_a = tl.load(a + rows * H + i_h, mask=row_ok, other=0.0)
    b_T = tl.load(tm + row_c, mask=row_ok[:, None], other=0.0)
    b_dT = tl.load(dT + row_c, mask=row_ok[:, None], other=0.0)
    b_dw = tl.load(dw + row_k, mask=mk, other=0.0)
    b_da = tl.load(da + rows * H + i_h, mask=row_ok, other=0.0)

    b_dk = tl.load(dk_u + row_k, mask=mk, other=0.0)
    # W = Tm (a K)
    b_dka = tl.dot(tl.trans(b_T), b_dw, input_precision=PRECISION)
    b_dT += tl.dot(b_dw, tl.trans(b_k * b_a[:, None]), input_precision=PRECISION)
    # Tm = (I + A)^-1  =>  dA = -Tm^T dTm Tm^T, kept on A's strictly lower support
    b_dA = tl.dot(tl.trans(b_T), b_dT, input_precision=PRECISION)
    b_dA = -tl.dot(b_dA, tl.trans(b_T), input_precision=PRECISION)
    b_dA = tl.where(r[:, None] > r[None, :], b_dA, 0.0)
    # A_ij = a_i k_i . k_j
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    b_da += tl.sum(b_dA * b_kk, 1) + tl.sum(b_dka * b_k, 1)
    b_dAa = b_dA * b_a[:, None]
    b_dk += tl.dot(b_dAa + tl.trans(b_dAa), b_k, input_precision=PRECISION)
    b_dk += b_dka * b_a[:, None]
    # a = a(beta, |k|^2)
    d_beta, d_n2 = _step_size_grads(b_beta, tl.sum(b_k * b_k, 1), THRESHOLD)
    b_dk += 2.0 * b_k * (b_da * d_n2)[:, None]

    tl.store(dk + row_k, b_dk.to(dk.dtype.element_ty), mask=mk)
    tl.store(dbeta + rows * H + i_h, (b_da * d_beta).to(dbeta.dtype.element_ty), mask=row_ok)


def efla_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets):
    """Packed inputs [T, H, D], documents at host `offsets`; returns o [T, H, V], final state, and
    what the backward needs."""
    T, H, K = k.shape
    V = v.shape[-1]
    C = EFLA_TRITON_CHUNK
    BK = block_size(K)
    BV = min(64, block_size(V))
    table = chunk_table(offsets, C, k.device)
    N = table.num_sequences
    f32 = dict(device=k.device, dtype=torch.float32)
    a = torch.empty(T, H, **f32)
    tm = torch.empty(T, H, C, **f32)
    w = torch.empty(T, H, K, **f32)
    u = torch.empty(T, H, V, **f32)
    precision = dot_precision(k.dtype)
    NC = table.num_chunks
    if NC:
        _efla_prepare[(NC, H)](
            k, v, beta, a, tm, w, u, table.chunk_start, table.chunk_end,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, THRESHOLD=_EFLA_SERIES_THRESHOLD, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    hs = torch.empty(NC, H, K, V, **f32)
    v_new = torch.empty(T, H, V, **f32)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    _efla_state[(triton.cdiv(V, BV), N * H)](
        k, w, u, initial_state, hs, v_new, ht, table.cu_seqlens, table.seq_chunk_offset,
        H=H, K=K, V=V, C=C, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        PRECISION=precision, **LAUNCH,
    )  # fmt: skip
    o = torch.empty(T, H, V, device=v.device, dtype=v.dtype)
    if NC:
        _efla_output[(triton.cdiv(V, BV), NC, H)](
            q, k, v_new, hs, o, scale, table.chunk_start, table.chunk_end,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    return o, ht, (a, tm, w, v_new, hs, table)


def efla_bwd(q, k, v, beta, scale, initial_state, saved, do, dht):
    T, H, K = k.shape
    V = v.shape[-1]
    C = EFLA_TRITON_CHUNK
    BK = block_size(K)
    BV = min(64, block_size(V))
    a, tm, w, v_new, hs, table = saved
    N = table.num_sequences
    NC = table.num_chunks
    precision = dot_precision(k.dtype)
    f32 = dict(device=k.device, dtype=torch.float32)
    dhs = torch.empty(NC, H, K, V, **f32)
    dv_new = torch.empty(T, H, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    _efla_state_bwd[(triton.cdiv(V, BV), N * H)](
        q, k, w, do, dht, dh0, dhs, dv_new, scale, table.cu_seqlens, table.seq_chunk_offset,
        H=H, K=K, V=V, C=C, BK=BK, BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=initial_state is not None,
        PRECISION=precision, **LAUNCH,
    )  # fmt: skip
    dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
    if NC:
        chunks = (table.chunk_start, table.chunk_end)
        dT = torch.empty(T, H, C, **f32)
        dk_u, dw = torch.empty(T, H, K, **f32), torch.empty(T, H, K, **f32)
        da = torch.empty(T, H, **f32)
        _efla_chunk_bwd_v[(NC, H)](
            q, k, v, a, tm, v_new, hs, dhs, do, dv_new, dq, dv, dk_u, dw, dT, da, scale, *chunks,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
        _efla_chunk_bwd_k[(NC, H)](
            k, beta, a, tm, dk_u, dw, dT, da, dk, dbeta, *chunks,
            H=H, K=K, C=C, BK=BK, THRESHOLD=_EFLA_SERIES_THRESHOLD, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    return dq, dk, dv, dbeta, dh0


class EflaTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, offsets):
        o, ht, saved = efla_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets)
        ctx.save_for_backward(q, k, v, beta, initial_state, *saved[:-1])
        ctx.table = saved[-1]
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, initial_state, *saved = ctx.saved_tensors
        dq, dk, dv, dbeta, dh0 = efla_bwd(
            q, k, v, beta, ctx.scale, initial_state, (*saved, ctx.table),
            do.contiguous(), None if dht is None else dht.contiguous(),
        )  # fmt: skip
        return dq, dk, dv, dbeta, None, dh0, None, None
