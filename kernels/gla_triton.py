"""Gated linear attention as chunked Triton kernels, forward and backward.

Same algorithm as `kernels/gla.py`: chunks of C = 64 tokens pass the [Dk, Dv] state; inside a
chunk, with G the within-chunk cumulative log-gate, the intra-chunk scores
A[t, s] = scale sum_d q_td k_sd e^{G_td - G_sd} (s <= t) are built in fp32 with every exponent <= 0:

- against earlier 16-token sub-blocks: both factors re-referenced to the start of the query
  sub-block (q e^{G - r}, k e^{r - G}), then a matmul;
- the diagonal 16 x 16 sub-blocks: element-wise in log space, one key at a time.

forward
  1. `_gla_cumsum`        per (chunk, head): G = cumsum of g within the chunk (fp32).
  2. `_gla_intra_scores`  per (chunk, head): A, stored as [T, H, C] fp32 (kept for the backward).
  3. `_gla_state`         per (document, head, K block, V block), sequential over chunks: stores
                          the entering state, S = e^{G_last} S + (K e^{G_last - G})^T V.
  4. `_gla_output`        per (chunk, head, V block): o = scale (Q e^G) S + A V.
backward
  5. `_gla_state_bwd`     per (document, head, K block, V block), chunks in reverse: the gradient
                          of each chunk's leaving state and of the initial state.
  6. `_gla_dA`            per (chunk, head): dA = tril(dO V^T).
  7. `_gla_dv`            per (chunk, head, V block): dv = A^T dO + (K e^{G_last - G}) dS_next.
  8. `_gla_dqk`           per (chunk, head), 16-row sub-blocks: dq and dk through the states and
                          the scores (same referencing as the forward).
  dg comes from dq and dk without another pass over the scores: writing q~ = q e^Γ and
  k~ = k e^{-Γ} (Γ the cumulative log-gate of the document), dL/dΓ_t = q_t dq_t - k_t dk_t,
  plus dht * ht at the document's last token; dg is its reverse cumulative sum per document.

Tiles are at most [64, 64] except the full-Dk rows of q, k and G (Dk <= 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import LAUNCH, block_size, dot_precision
from kernels.varlen import chunk_table

GLA_TRITON_CHUNK = 64
GLA_TRITON_SUB = 16


@triton.jit
def _gla_cumsum(
    g, G, chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    ck = tl.arange(0, BK)
    m = (rows[:, None] < eos) & (ck[None, :] < K)
    offsets = (rows[:, None] * H + i_h) * K + ck[None, :]
    b_g = tl.load(g + offsets, mask=m, other=0.0).to(tl.float32)
    tl.store(G + offsets, tl.cumsum(b_g, 0), mask=m)


@triton.jit
def _gla_state(
    k, v, G, h0, hs, ht,
    cu_seqlens, seq_chunk_offset,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    first_chunk = tl.load(seq_chunk_offset + i_n)
    n_chunks = tl.cdiv(eos - bos, C)
    ck = i_k * BK + tl.arange(0, BK)
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
        last = tl.minimum(bos + i_c * C + C, eos) - 1
        mk = row_ok[:, None] & (ck[None, :] < K)
        b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(
            v + (rows[:, None] * H + i_h) * V + cv[None, :],
            mask=row_ok[:, None] & (cv[None, :] < V),
            other=0.0,
        ).to(tl.float32)
        b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b_Glast = tl.load(G + (last * H + i_h) * K + ck, mask=ck < K, other=0.0)
        b_kd = b_k * tl.exp(tl.where(mk, b_Glast[None, :] - b_G, float("-inf")))
        b_h = b_h * tl.exp(b_Glast)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PRECISION)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh * K * V + state_offsets, b_h, mask=state_mask)


@triton.jit
def _gla_intra_scores(
    q, k, G, A, scale,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """A[t, s] = scale sum_d q_td k_sd e^{G_td - G_sd} for s <= t in the chunk (0 above the diagonal)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    ck = tl.arange(0, BK)
    s = tl.arange(0, S)
    NEG_INF = float("-inf")
    for i in tl.static_range(C // S):
        rows = bos + i * S + s
        mk = (rows[:, None] < eos) & (ck[None, :] < K)
        b_q = (
            tl.load(q + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
            * scale
        )
        b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        # earlier sub-blocks: both factors re-referenced to the end of sub-block i - 1 (clamped to the
        # chunk; when clamped, this whole sub-block lies past the chunk's end and is masked)
        ref = tl.maximum(tl.minimum(bos + i * S, eos) - 1, bos)
        b_r = tl.load(G + (ref * H + i_h) * K + ck, mask=ck < K, other=0.0)
        b_qr = b_q * tl.exp(tl.where(mk, b_G - b_r[None, :], NEG_INF))
        for j in tl.static_range(C // S):
            cols = bos + j * S + s
            b_A = tl.zeros([S, S], dtype=tl.float32)
            if j < i:
                mkj = (cols[:, None] < eos) & (ck[None, :] < K)
                b_k = tl.load(k + (cols[:, None] * H + i_h) * K + ck[None, :], mask=mkj, other=0.0).to(
                    tl.float32
                )
                b_Gj = tl.load(G + (cols[:, None] * H + i_h) * K + ck[None, :], mask=mkj, other=0.0)
                b_kr = b_k * tl.exp(tl.where(mkj, b_r[None, :] - b_Gj, NEG_INF))
                b_A = tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
            elif j == i:
                # the diagonal sub-block, one key at a time: exponents G_t - G_s <= 0 for s <= t
                for t in range(S):
                    col = bos + i * S + t
                    ok = col < eos
                    b_ks = tl.load(k + (col * H + i_h) * K + ck, mask=ck < tl.where(ok, K, 0), other=0.0)
                    b_Gs = tl.load(G + (col * H + i_h) * K + ck, mask=ck < tl.where(ok, K, 0), other=0.0)
                    keep = (s[:, None] >= t) & mk
                    b_e = tl.exp(tl.where(keep, b_G - b_Gs[None, :], NEG_INF))
                    b_col = tl.sum(b_q * b_ks.to(tl.float32)[None, :] * b_e, 1)
                    b_A = tl.where(s[None, :] == t, b_col[:, None], b_A)
            tl.store(A + (rows[:, None] * H + i_h) * C + j * S + s[None, :], b_A, mask=rows[:, None] < eos)


@triton.jit
def _gla_output(
    q, v, G, A, hs, o, scale,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """o = scale (Q e^G) S + A V, one V block per program."""
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
    b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
    b_v = tl.load(v + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    b_A = tl.load(A + (rows[:, None] * H + i_h) * C + r[None, :], mask=row_ok[:, None], other=0.0)
    b_h = tl.load(
        hs + (i_c * H + i_h) * K * V + ck[:, None] * V + cv[None, :],
        mask=(ck[:, None] < K) & (cv[None, :] < V),
        other=0.0,
    )
    b_o = tl.dot(b_q * tl.exp(b_G), b_h, input_precision=PRECISION) + tl.dot(
        b_A, b_v, input_precision=PRECISION
    )
    tl.store(o + (rows[:, None] * H + i_h) * V + cv[None, :], b_o.to(o.dtype.element_ty), mask=mv)


@triton.jit
def _gla_state_bwd(
    q, G, do, dht, dh0, dhs, scale,
    cu_seqlens, seq_chunk_offset,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    first_chunk = tl.load(seq_chunk_offset + i_n)
    n_chunks = tl.cdiv(eos - bos, C)
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck[:, None] < K) & (cv[None, :] < V)
    state_offsets = ck[:, None] * V + cv[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    for i_rev in range(n_chunks):
        i_c = n_chunks - 1 - i_rev
        tl.store(dhs + ((first_chunk + i_c) * H + i_h) * K * V + state_offsets, b_dh, mask=state_mask)
        rows = bos + i_c * C + tl.arange(0, C)
        row_ok = rows < eos
        last = tl.minimum(bos + i_c * C + C, eos) - 1
        mk = row_ok[:, None] & (ck[None, :] < K)
        b_q = (
            tl.load(q + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
            * scale
        )
        b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        b_Glast = tl.load(G + (last * H + i_h) * K + ck, mask=ck < K, other=0.0)
        b_do = tl.load(
            do + (rows[:, None] * H + i_h) * V + cv[None, :],
            mask=row_ok[:, None] & (cv[None, :] < V),
            other=0.0,
        ).to(tl.float32)
        b_dh = b_dh * tl.exp(b_Glast)[:, None] + tl.dot(
            tl.trans(b_q * tl.exp(b_G)), b_do, input_precision=PRECISION
        )
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh * K * V + state_offsets, b_dh, mask=state_mask)


@triton.jit
def _gla_dA(
    v, do, dA,
    chunk_start, chunk_end,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dA[t, s] = do_t . v_s for s <= t in the chunk (the gradient of the scores A)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    rows = bos + tl.arange(0, C)
    row_ok = rows < eos
    r = tl.arange(0, C)
    b_dA = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        mv = row_ok[:, None] & (cv[None, :] < V)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_do = tl.load(do + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_dA = tl.where(r[:, None] >= r[None, :], b_dA, 0.0)
    tl.store(dA + (rows[:, None] * H + i_h) * C + r[None, :], b_dA, mask=row_ok[:, None])


@triton.jit
def _gla_dv(
    k, G, A, do, dhs, dv,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dv = A^T do + (K e^{G_last - G}) dS_next, one V block per program."""
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
    b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
    b_Glast = tl.load(G + ((eos - 1) * H + i_h) * K + ck, mask=ck < K, other=0.0)
    b_A = tl.load(A + (rows[:, None] * H + i_h) * C + r[None, :], mask=row_ok[:, None], other=0.0)
    b_do = tl.load(do + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    b_dh = tl.load(
        dhs + (i_c * H + i_h) * K * V + ck[:, None] * V + cv[None, :],
        mask=(ck[:, None] < K) & (cv[None, :] < V),
        other=0.0,
    )
    b_kd = b_k * tl.exp(tl.where(mk, b_Glast[None, :] - b_G, float("-inf")))
    b_dv = tl.dot(tl.trans(b_A), b_do, input_precision=PRECISION) + tl.dot(
        b_kd, b_dh, input_precision=PRECISION
    )
    tl.store(dv + (rows[:, None] * H + i_h) * V + cv[None, :], b_dv.to(dv.dtype.element_ty), mask=mv)


@triton.jit
def _gla_dqk(
    q, k, v, G, dA, hs, dhs, do, dq, dk, scale,
    chunk_start, chunk_end,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq and dk (fp32), sub-block by sub-block: through the states, then through the scores."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos = tl.load(chunk_start + i_c)
    eos = tl.load(chunk_end + i_c)
    ck = tl.arange(0, BK)
    s = tl.arange(0, S)
    NEG_INF = float("-inf")
    b_Glast = tl.load(G + ((eos - 1) * H + i_h) * K + ck, mask=ck < K, other=0.0)
    for i in tl.static_range(C // S):
        rows = bos + i * S + s
        row_ok = rows < eos
        mk = row_ok[:, None] & (ck[None, :] < K)
        b_G = tl.load(G + (rows[:, None] * H + i_h) * K + ck[None, :], mask=mk, other=0.0)
        # through the states: o = (Qs e^G) S + ...,  S_next = e^{G_last} S + (K e^{G_last - G})^T V
        b_dq = tl.zeros([S, BK], dtype=tl.float32)
        b_dk = tl.zeros([S, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            cv = i_v * BV + tl.arange(0, BV)
            mv = row_ok[:, None] & (cv[None, :] < V)
            state_offsets = (i_c * H + i_h) * K * V + ck[:, None] * V + cv[None, :]
            state_mask = (ck[:, None] < K) & (cv[None, :] < V)
            b_do = tl.load(do + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(
                tl.float32
            )
            b_v = tl.load(v + (rows[:, None] * H + i_h) * V + cv[None, :], mask=mv, other=0.0).to(tl.float32)
            b_h = tl.load(hs + state_offsets, mask=state_mask, other=0.0)
            b_dh = tl.load(dhs + state_offsets, mask=state_mask, other=0.0)
            b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)
            b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision=PRECISION)
        b_dq = b_dq * scale * tl.exp(b_G)
        b_dk = b_dk * tl.exp(tl.where(mk, b_Glast[None, :] - b_G, NEG_INF))

        # through the scores A[t, s] = sum_d qs_td k_sd e^{G_td - G_sd}
        # dq: keys of earlier sub-blocks, referenced to the end of sub-block i - 1
        ref = tl.maximum(tl.minimum(bos + i * S, eos) - 1, bos)
        b_r = tl.load(G + (ref * H + i_h) * K + ck, mask=ck < K, other=0.0)
        b_acc = tl.zeros([S, BK], dtype=tl.float32)
        for j in tl.static_range(i):
            cols = bos + j * S + s
            mkj = (cols[:, None] < eos) & (ck[None, :] < K)
            b_kj = tl.load(k + (cols[:, None] * H + i_h) * K + ck[None, :], mask=mkj, other=0.0).to(
                tl.float32
            )
            b_Gj = tl.load(G + (cols[:, None] * H + i_h) * K + ck[None, :], mask=mkj, other=0.0)
            b_dAij = tl.load(
                dA + (rows[:, None] * H + i_h) * C + j * S + s[None, :], mask=row_ok[:, None], other=0.0
            )
            b_kr = b_kj * tl.exp(tl.where(mkj, b_r[None, :] - b_Gj, NEG_INF))
            b_acc += tl.dot(b_dAij, b_kr, input_precision=PRECISION)
        b_dq += b_acc * scale * tl.exp(tl.where(mk, b_G - b_r[None, :], NEG_INF))
        # dk: queries of later sub-blocks, referenced to the end of sub-block i
        ref_end = tl.minimum(bos + i * S + S, eos) - 1
        ref_end = tl.maximum(ref_end, bos)
        b_re = tl.load(G + (ref_end * H + i_h) * K + ck, mask=ck < K, other=0.0)
        b_acc = tl.zeros([S, BK], dtype=tl.float32)
        for j in tl.static_range(i + 1, C // S):
            qrows = bos + j * S + s
            mkq = (qrows[:, None] < eos) & (ck[None, :] < K)
            b_qj = tl.load(q + (qrows[:, None] * H + i_h) * K + ck[None, :], mask=mkq, other=0.0).to(
                tl.float32
            )
            b_Gq = tl.load(G + (qrows[:, None] * H + i_h) * K + ck[None, :], mask=mkq, other=0.0)
            b_dAji = tl.load(
                dA + (qrows[:, None] * H + i_h) * C + i * S + s[None, :], mask=qrows[:, None] < eos, other=0.0
            )
            b_qr = b_qj * tl.exp(tl.where(mkq, b_Gq - b_re[None, :], NEG_INF))
            b_acc += tl.dot(tl.trans(b_dAji), b_qr, input_precision=PRECISION)
        b_dk += b_acc * scale * tl.exp(tl.where(mk, b_re[None, :] - b_G, NEG_INF))
        # the diagonal sub-block, element-wise in log space
        for t in range(S):
            pos = bos + i * S + t
            ok = pos < eos
            kmask = ck < tl.where(ok, K, 0)
            b_kt = tl.load(k + (pos * H + i_h) * K + ck, mask=kmask, other=0.0).to(tl.float32)
            b_qt = tl.load(q + (pos * H + i_h) * K + ck, mask=kmask, other=0.0).to(tl.float32) * scale
            b_Gt = tl.load(G + (pos * H + i_h) * K + ck, mask=kmask, other=0.0)
            # token t as the key of this sub-block's queries (rows s >= t) ...
            b_dA_col = tl.load(dA + (rows * H + i_h) * C + i * S + t, mask=row_ok, other=0.0)
            b_e = tl.exp(tl.where((s[:, None] >= t) & mk, b_G - b_Gt[None, :], NEG_INF))
            b_dq += b_dA_col[:, None] * scale * b_kt[None, :] * b_e
            # ... and as the query of this sub-block's keys (rows s <= t)
            b_dA_row = tl.load(dA + (pos * H + i_h) * C + i * S + s, mask=s <= tl.where(ok, t, -1), other=0.0)
            b_e = tl.exp(tl.where((s[:, None] <= tl.where(ok, t, -1)) & mk, b_Gt[None, :] - b_G, NEG_INF))
            b_dk += b_dA_row[:, None] * b_qt[None, :] * b_e
        tl.store(dq + (rows[:, None] * H + i_h) * K + ck[None, :], b_dq, mask=mk)
        tl.store(dk + (rows[:, None] * H + i_h) * K + ck[None, :], b_dk, mask=mk)


def gla_fwd(q, k, v, g, scale, initial_state, output_final_state, offsets):
    """Packed inputs [T, H, D], documents at host `offsets`; returns o [T, H, V], final state, and
    what the backward needs."""
    T, H, K = k.shape
    V = v.shape[-1]
    C, S = GLA_TRITON_CHUNK, GLA_TRITON_SUB
    BK = block_size(K)
    BKs, BV = min(64, BK), min(64, block_size(V))
    table = chunk_table(offsets, C, k.device)
    N = table.num_sequences
    NC = table.num_chunks
    precision = dot_precision(k.dtype)
    f32 = dict(device=k.device, dtype=torch.float32)
    G = torch.empty(T, H, K, **f32)
    A = torch.empty(T, H, C, **f32)
    if NC:
        _gla_cumsum[(NC, H)](g, G, table.chunk_start, table.chunk_end, H=H, K=K, C=C, BK=BK, **LAUNCH)
        _gla_intra_scores[(NC, H)](
            q, k, G, A, scale, table.chunk_start, table.chunk_end,
            H=H, K=K, C=C, S=S, BK=BK, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    hs = torch.empty(NC, H, K, V, **f32)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    _gla_state[(triton.cdiv(K, BKs), triton.cdiv(V, BV), N * H)](
        k, v, G, initial_state, hs, ht, table.cu_seqlens, table.seq_chunk_offset,
        H=H, K=K, V=V, C=C, BK=BKs, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        PRECISION=precision, **LAUNCH,
    )  # fmt: skip
    o = torch.empty(T, H, V, device=v.device, dtype=v.dtype)
    if NC:
        _gla_output[(triton.cdiv(V, BV), NC, H)](
            q, v, G, A, hs, o, scale, table.chunk_start, table.chunk_end,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    return o, ht, (G, A, hs, table)


def gla_bwd(q, k, v, g, scale, initial_state, saved, do, dht, ht):
    T, H, K = k.shape
    V = v.shape[-1]
    C, S = GLA_TRITON_CHUNK, GLA_TRITON_SUB
    BK = block_size(K)
    BKs, BV = min(64, BK), min(64, block_size(V))
    G, A, hs, table = saved
    N = table.num_sequences
    NC = table.num_chunks
    precision = dot_precision(k.dtype)
    f32 = dict(device=k.device, dtype=torch.float32)
    dhs = torch.empty(NC, H, K, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    _gla_state_bwd[(triton.cdiv(K, BKs), triton.cdiv(V, BV), N * H)](
        q, G, do, dht, dh0, dhs, scale, table.cu_seqlens, table.seq_chunk_offset,
        H=H, K=K, V=V, C=C, BK=BKs, BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=initial_state is not None,
        PRECISION=precision, **LAUNCH,
    )  # fmt: skip
    dq32 = torch.empty(T, H, K, **f32)
    dk32 = torch.empty(T, H, K, **f32)
    dv = torch.empty_like(v)
    if NC:
        dA = torch.empty(T, H, C, **f32)
        chunks = (table.chunk_start, table.chunk_end)
        _gla_dA[(NC, H)](v, do, dA, *chunks, H=H, V=V, C=C, BV=BV, PRECISION=precision, **LAUNCH)
        _gla_dv[(triton.cdiv(V, BV), NC, H)](
            k, G, A, do, dhs, dv, *chunks, H=H, K=K, V=V, C=C, BK=BK, BV=BV, PRECISION=precision, **LAUNCH
        )
        _gla_dqk[(NC, H)](
            q, k, v, G, dA, hs, dhs, do, dq32, dk32, scale, *chunks,
            H=H, K=K, V=V, C=C, S=S, BK=BK, BV=BV, PRECISION=precision, **LAUNCH,
        )  # fmt: skip
    dg = gate_gradient(q, k, dq32, dk32, table.cu_seqlens, dht, ht)
    return dq32.to(q.dtype), dk32.to(k.dtype), dv, dg.to(g.dtype), dh0


def gate_gradient(q, k, dq, dk, cu_seqlens, dht, ht):
    """dg from dq and dk: the reverse cumulative sum, per document, of q dq - k dk (+ dht ht at the end)."""
    d_cum = (q.float() * dq - k.float() * dk).double()  # fp64: the per-document suffix sums subtract
    offsets = cu_seqlens.long()
    if dht is not None and ht is not None:
        lengths = offsets[1:] - offsets[:-1]
        nonempty = lengths > 0
        last = (offsets[1:] - 1)[nonempty]
        d_cum.index_add_(0, last, (dht.double() * ht.double()).sum(-1)[nonempty])
    suffix = d_cum.flip(0).cumsum(0).flip(0)  # suffix[t] = sum over tokens >= t
    suffix = torch.cat((suffix, suffix.new_zeros(1, *suffix.shape[1:])))
    T = q.shape[0]
    doc_end = torch.repeat_interleave(offsets[1:], offsets[1:] - offsets[:-1], output_size=T)
    return suffix[:T] - suffix[doc_end]


class GlaTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, offsets):
        o, ht, (G, A, hs, table) = gla_fwd(q, k, v, g, scale, initial_state, output_final_state, offsets)
        ctx.save_for_backward(q, k, v, g, initial_state, G, A, hs, ht)
        ctx.table = table
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, G, A, hs, ht = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = gla_bwd(
            q, k, v, g, ctx.scale, initial_state, (G, A, hs, ctx.table),
            do.contiguous(), None if dht is None else dht.contiguous(), ht,
        )  # fmt: skip
        return dq, dk, dv, dg, None, dh0, None, None
