"""Inputs, runners and comparisons shared by the kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import gla_attention, quasar_attention

OPS = {"quasar": quasar_attention, "gla": gla_attention}
GATE = {"quasar": "beta", "gla": "g"}


def assert_rel_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """Assert ||got - ref|| / ||ref|| <= tol (Frobenius norms, computed in float64), and that got is finite."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}"
    ref64, got64 = ref.detach().double(), got.detach().double()
    n_bad = (~torch.isfinite(got64)).sum().item()
    assert n_bad == 0, f"{name}: {n_bad} non-finite values of {got64.numel()}"
    err, ref_norm = (got64 - ref64).norm().item(), ref64.norm().item()
    if ref_norm == 0.0:
        assert err <= tol, f"{name}: reference is exactly zero but ||got|| = {err:.3e} > {tol:.1e}"
        return
    rel = err / ref_norm
    assert rel <= tol, (
        f"{name}: relative error {rel:.3e} > tol {tol:.1e} (||ref|| = {ref_norm:.3e}, ||got - ref|| = {err:.3e})"
    )


def make_inputs(
    op: str,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    with_state: bool,
    normaliser: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random inputs for `op`, keyed by argument name; call torch.manual_seed first."""
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    if op == "quasar":
        # Unnormalised keys (beta |k|^2 up to ~100, the closed-form branch of the step size) and about
        # one token in ten with a tiny key (beta |k|^2 < 1e-3, the series branch).
        tiny = torch.rand(B, T, H, 1) < 0.1
        k = torch.where(tiny, k * 1e-3, k)
        gate = 2.0 * torch.rand(B, T, H, dtype=dtype)
    else:
        gate = F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype)) / normaliser
    inputs = {"q": q, "k": k, "v": v, GATE[op]: gate}
    if with_state:
        inputs["initial_state"] = torch.randn(B, H, K, V, dtype=dtype)
    return inputs


def run_op(op: str, backend: str, inputs: dict[str, torch.Tensor], **kwargs):
    return OPS[op](
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs[GATE[op]],
        initial_state=inputs.get("initial_state"),
        backend=backend,
        **kwargs,
    )


def forward_backward(op: str, backend: str, inputs: dict[str, torch.Tensor], do, dS, **kwargs):
    """Output, final state and d/d(every input) of the loss (o * do).sum() + (S * dS).sum().

    kwargs go to the op (e.g. cu_seqlens)."""
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.items()}
    o, S = run_op(op, backend, leaves, output_final_state=True, **kwargs)
    loss = (o * do).sum() + (S * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))


def check_backends_agree(
    op: str,
    inputs: dict[str, torch.Tensor],
    tol: float,
    grad_tols: dict[str, float] | None = None,
    backend: str = "torch",
    grad_tol: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> None:
    """Naive vs `backend` on `inputs`: output and final state within `tol`, every gradient within
    `grad_tol` (default `tol`) or grad_tols[name] for the gradient with respect to input `name`.
    With cu_seqlens, inputs are packed documents and there is one final state per document."""
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    dtype = inputs["q"].dtype
    device = inputs["q"].device
    do = torch.randn(B, T, H, V, dtype=dtype, device=device)
    dS = torch.randn(N, H, K, V, dtype=dtype, device=device)
    o_ref, S_ref, g_ref = forward_backward(op, "naive", inputs, do, dS, cu_seqlens=cu_seqlens)
    o, S, g = forward_backward(op, backend, inputs, do, dS, cu_seqlens=cu_seqlens)
    assert o.dtype == dtype
    assert S.shape == (N, H, K, V)
    assert S.dtype == torch.promote_types(dtype, torch.float32)
    assert_rel_close(f"{op} output", o_ref, o, tol)
    assert_rel_close(f"{op} final state", S_ref, S, tol)
    assert set(g) == set(inputs)
    for name in inputs:
        default = tol if grad_tol is None else grad_tol
        assert_rel_close(
            f"{op} d loss / d {name}", g_ref[name], g[name], (grad_tols or {}).get(name, default)
        )
