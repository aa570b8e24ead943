"""Naive recurrent definitions of the sequence-mixing ops.

These loops over time are the ground truth every faster backend is tested against. They are
written for clarity, not speed: fp32 state, one token per step, no chunking.

Layout everywhere: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, state `[B, H, Dk, Dv]` (fp32).
"""

from __future__ import annotations

import torch

# Below this value of beta * |k|^2 the closed form (1 - exp(-x)) / |k|^2 is replaced by its series;
# the dropped term is x^3 / 24 relative, under 1e-10 here.
_EFLA_SERIES_THRESHOLD = 1e-3


def efla_step_size(beta: torch.Tensor, k_sq_norm: torch.Tensor) -> torch.Tensor:
    """EFLA's key-norm-adaptive step `a = (1 - exp(-beta |k|^2)) / |k|^2`, with limit `a = beta` at k = 0.

    Finite for any key norm and beta >= 0, and its gradient is finite too: the division only ever
    sees a denominator bounded away from zero.
    """
    x = beta * k_sq_norm
    small = x < _EFLA_SERIES_THRESHOLD
    safe_norm = torch.where(small, torch.ones_like(k_sq_norm), k_sq_norm)
    exact = -torch.expm1(-x) / safe_norm
    # The series only ever sees small x: with x itself, x * x overflows to inf for x > ~1.8e19 in
    # fp32, and the discarded branch's gradient for beta then becomes 0 * inf = NaN.
    x_small = torch.where(small, x, torch.zeros_like(x))
    series = beta * (1.0 - x_small / 2.0 + x_small * x_small / 6.0)
    return torch.where(small, series, exact)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and sums are kept in fp32 (fp64 when the inputs are fp64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _init_state(initial_state, B, H, K, V, device, dtype):
    if initial_state is None:
        return torch.zeros(B, H, K, V, device=device, dtype=dtype)
    return initial_state.to(dtype)


def naive_recurrent_efla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quasar attention (EFLA), token by token.

    S_t = (I - a_t k_t k_t^T) S_{t-1} + a_t k_t v_t^T,   o_t = scale * S_t^T q_t.
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    acc = accumulation_dtype(q.dtype)
    q, k, v, beta = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    S = _init_state(initial_state, B, H, K, V, q.device, acc)
    outputs = []
    # unbind, not q[:, t]: per-step indexing would make the backward quadratic in T.
    for q_t, k_t, v_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1)):
        a_t = efla_step_size(beta_t, (k_t * k_t).sum(-1))  # [B, H]
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + torch.einsum("bhk,bhv->bhkv", a_t[..., None] * k_t, v_t - prediction)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, token by token.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,   g_t <= 0 (log forget gates).
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    acc = accumulation_dtype(q.dtype)
    q, k, v, g = q.to(acc), k.to(acc), v.to(acc), g.to(acc)
    S = _init_state(initial_state, B, H, K, V, q.device, acc)
    outputs = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), g.unbind(1)):
        S = S * g_t.exp()[..., None] + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)
