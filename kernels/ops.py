"""Public entry points: validate inputs once, then dispatch to a backend.

Backends: "naive" (the recurrent definition in `kernels.reference`), "torch" (chunked, parallel
within a chunk, differentiable by autograd) and "triton" (fused GPU kernels). "auto" picks the
fastest one available for the tensors' device.
"""

from __future__ import annotations

import os

import torch

from kernels.efla import chunk_efla
from kernels.gla import chunk_gla
from kernels.reference import naive_recurrent_efla, naive_recurrent_gla
from kernels.varlen import batch_offsets, check_cu_seqlens, check_state_count, per_document

BACKENDS = ("auto", "triton", "torch", "naive")
TRITON_MAX_HEAD_DIM = 256


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, for tests and debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_function(op: str):
    """The autograd Function of `op`'s Triton kernels, or None when Triton cannot be imported."""
    try:
        if op == "quasar_attention":
            from kernels.efla_triton import EflaTritonFunction as fn
        else:
            from kernels.gla_triton import GlaTritonFunction as fn
    except ImportError:
        return None
    return fn


def _resolve_backend(backend: str, op: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_function(op) is not None else "torch"
    if backend == "triton":
        # The device check comes first: Triton decides between compiling and interpreting a kernel
        # when its module is imported, so nothing may import it before TRITON_INTERPRET is settled.
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); use backend='torch' on CPU, "
                "or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
            )
        if _triton_function(op) is None:
            raise ValueError(
                f"{op}: backend='triton' needs the triton package; install it or use backend='torch'"
            )
    return backend


def _run_triton(op, q, k, v, gate, scale, initial_state, output_final_state, offsets):
    """Flatten [B, T] into one packed sequence (B documents when no cu_seqlens) and run the kernels."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: backend='triton' keeps a whole key row in one tile, so Dk must be <= {TRITON_MAX_HEAD_DIM}, "
            f"got {K}; use backend='torch' or split the heads"
        )
    scale = K**-0.5 if scale is None else float(scale)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = _triton_function(op).apply(
        q.reshape(B * T, H, K).contiguous(),
        k.reshape(B * T, H, K).contiguous(),
        v.reshape(B * T, H, V).contiguous(),
        gate.reshape(B * T, *gate.shape[2:]).contiguous(),
        scale,
        h0,
        output_final_state,
        offsets,
    )
    return o.reshape(B, T, H, V), ht


def _dispatch(
    op, reference, chunked, q, k, v, gate, scale, initial_state, output_final_state, cu_seqlens, backend
):
    chosen = _resolve_backend(backend, op, q.device)
    packed = cu_seqlens is not None
    B, T = q.shape[:2]
    offsets = check_cu_seqlens(op, cu_seqlens, B, T) if packed else batch_offsets(B, T)
    check_state_count(op, initial_state, len(offsets) - 1)
    if chosen == "triton":
        return _run_triton(op, q, k, v, gate, scale, initial_state, output_final_state, offsets)
    fn = reference if chosen == "naive" else chunked
    if packed:
        return per_document(fn, q, k, v, gate, scale, initial_state, output_final_state, offsets)
    return fn(q, k, v, gate, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _check_common(op: str, q, k, v, initial_state) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, T, H, D], got {getattr(x, 'shape', x)}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(
            f"{op}: q and k must have the same shape [B, T, H, Dk], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v must be [B, T, H, Dv] matching q's [B, T, H], got {tuple(v.shape)} vs {tuple(q.shape)}"
        )
    if initial_state is not None:
        _, _, H, K = q.shape
        expected = (H, K, v.shape[-1])
        if initial_state.dim() != 4 or tuple(initial_state.shape[1:]) != expected:
            raise ValueError(
                f"{op}: initial_state must be [N, H, Dk, Dv] with (H, Dk, Dv) = {expected} and N the batch size "
                f"(or the number of cu_seqlens documents), got {tuple(initial_state.shape)}"
            )


def quasar_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quasar attention (EFLA): the exact delta rule with a key-norm-adaptive step.

    S_t = (I - a_t k_t k_t^T) S_{t-1} + a_t k_t v_t^T, a_t = (1 - exp(-beta_t |k_t|^2)) / |k_t|^2,
    o_t = scale * S_t^T q_t (scale defaults to Dk^-1/2).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: [B, T, H] (>= 0); initial_state: [B, H, Dk, Dv].
    cu_seqlens: optional cumulative document offsets [N + 1] for a packed batch (B = 1); each
    document then starts from initial_state[n] (or zeros), and states are [N, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv] fp32 or None).
    """
    _check_common("quasar_attention", q, k, v, initial_state)
    if beta.shape != q.shape[:3]:
        raise ValueError(
            f"quasar_attention: beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}"
        )
    return _dispatch(
        "quasar_attention", naive_recurrent_efla, chunk_efla,
        q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, backend,
    )  # fmt: skip


def gla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

    q, k, g: [B, T, H, Dk] (g are log forget gates, <= 0); v: [B, T, H, Dv];
    initial_state: [B, H, Dk, Dv]; cu_seqlens as for `quasar_attention`.
    Returns (o in v's dtype, final state fp32 or None).
    """
    _check_common("gla_attention", q, k, v, initial_state)
    if g.shape != q.shape:
        raise ValueError(f"gla_attention: g must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    return _dispatch(
        "gla_attention", naive_recurrent_gla, chunk_gla,
        q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend,
    )  # fmt: skip
