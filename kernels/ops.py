"""Public entry points: validate inputs once, then dispatch to a backend.

Backends: "naive" (the recurrent definition in `kernels.reference`), "torch" (chunked, parallel
within a chunk, differentiable by autograd) and "triton" (fused GPU kernels). "auto" picks the
fastest one available for the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.efla import chunk_efla
from kernels.gla import chunk_gla
from kernels.reference import naive_recurrent_efla, naive_recurrent_gla

BACKENDS = ("auto", "triton", "torch", "naive")


def _triton_backend(op: str) -> Callable | None:
    """The Triton implementation of `op`, or None when this build has none."""
    return None


def _resolve_backend(backend: str, op: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_backend(op) is not None else "torch"
    if backend == "triton" and _triton_backend(op) is None:
        raise ValueError(
            f"{op}: backend='triton' is not available in this build; use backend='torch' or 'auto'"
        )
    return backend


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
        B, _, H, K = q.shape
        expected = (B, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"{op}: initial_state must be [B, H, Dk, Dv] = {expected}, got {tuple(initial_state.shape)}"
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quasar attention (EFLA): the exact delta rule with a key-norm-adaptive step.

    S_t = (I - a_t k_t k_t^T) S_{t-1} + a_t k_t v_t^T, a_t = (1 - exp(-beta_t |k_t|^2)) / |k_t|^2,
    o_t = scale * S_t^T q_t (scale defaults to Dk^-1/2).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: [B, T, H] (>= 0); initial_state: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv] fp32 or None).
    """
    _check_common("quasar_attention", q, k, v, initial_state)
    if beta.shape != q.shape[:3]:
        raise ValueError(
            f"quasar_attention: beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}"
        )
    impl = {"naive": naive_recurrent_efla, "torch": chunk_efla}
    chosen = _resolve_backend(backend, "quasar_attention", q.device)
    fn = impl.get(chosen) or _triton_backend("quasar_attention")
    return fn(q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

    q, k, g: [B, T, H, Dk] (g are log forget gates, <= 0); v: [B, T, H, Dv];
    initial_state: [B, H, Dk, Dv]. Returns (o in v's dtype, final state fp32 or None).
    """
    _check_common("gla_attention", q, k, v, initial_state)
    if g.shape != q.shape:
        raise ValueError(f"gla_attention: g must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    impl = {"naive": naive_recurrent_gla, "torch": chunk_gla}
    chosen = _resolve_backend(backend, "gla_attention", q.device)
    fn = impl.get(chosen) or _triton_backend("gla_attention")
    return fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
