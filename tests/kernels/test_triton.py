"""The Triton kernels against the naive recurrent definitions.

On a machine without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small shapes; on a CUDA machine the same tests run the compiled kernels.
Tolerances are RMS(error) / RMS(reference): 5e-3 for outputs and states, 8e-3 for gradients in
fp32, 2e-2 in fp16.
"""

from __future__ import annotations

import pytest
import torch

from kernels import gla_attention, quasar_attention
from kernels.reference import naive_recurrent_efla, naive_recurrent_gla
from tests.kernels.common import (
    GATE,
    assert_rel_close,
    check_backends_agree,
    forward_backward,
    make_inputs,
    run_op,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL, GRAD_TOL, HALF_TOL = 5e-3, 8e-3, 2e-2

# (seed, B, T, H, Dk, Dv): lengths within one chunk, across chunk boundaries, never a multiple of 64
# except one; head dims that are and are not powers of two, wider than one 64-wide block.
SHAPES = [
    (0, 1, 1, 1, 16, 16),
    (1, 2, 37, 2, 16, 32),
    (2, 1, 64, 1, 32, 16),
    (3, 1, 150, 2, 24, 20),
    (4, 1, 70, 1, 72, 80),  # several 64-wide K and V blocks, the last one partial
]
SHAPE_IDS = [f"B{b}-T{t}-H{h}-K{k}-V{v}" for _, b, t, h, k, v in SHAPES]


def to_device(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: x.to(DEVICE) for name, x in inputs.items()}


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_matches_naive_fp32(op, shape, with_state):
    seed, B, T, H, K, V = shape
    torch.manual_seed(seed)
    inputs = to_device(make_inputs(op, B, T, H, K, V, with_state=with_state))
    check_backends_agree(op, inputs, tol=OUT_TOL, grad_tol=GRAD_TOL, backend="triton")


def test_triton_gla_with_strong_and_weak_decay():
    # log-gates from ~-160 per token (cumulative gates far beyond exp's range within a chunk) to ~0
    torch.manual_seed(5)
    inputs = make_inputs("gla", 1, 90, 2, 16, 16, with_state=True)
    inputs["g"] = torch.cat((inputs["g"][:, :45] * 160.0, inputs["g"][:, 45:] / 64.0), dim=1)
    check_backends_agree("gla", to_device(inputs), tol=OUT_TOL, grad_tol=GRAD_TOL, backend="triton")


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_varlen_matches_naive(op, with_state):
    # documents shorter than, equal to and longer than a chunk, and an empty one
    lengths = [5, 64, 0, 83, 1]
    torch.manual_seed(7)
    inputs = make_inputs(op, 1, sum(lengths), 2, 16, 16, with_state=False)
    if with_state:
        inputs["initial_state"] = torch.randn(len(lengths), 2, 16, 16)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    check_backends_agree(
        op, to_device(inputs), tol=OUT_TOL, grad_tol=GRAD_TOL, backend="triton", cu_seqlens=cu.to(DEVICE)
    )


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_fp16_matches_naive(op):
    torch.manual_seed(11)
    inputs = make_inputs(op, 1, 80, 2, 16, 16, with_state=True)
    if op == "quasar":
        inputs["k"] = torch.nn.functional.normalize(inputs["k"], dim=-1)  # keep fp16 products in range
    half = {name: x.half() for name, x in inputs.items()}
    B, T, H, K = inputs["q"].shape
    do = torch.randn(B, T, H, 16)
    dS = torch.randn(B, H, K, 16)
    # reference: the naive definition in fp32 on the same fp16-rounded inputs
    o_ref, S_ref, g_ref = forward_backward(op, "naive", {n: x.float() for n, x in half.items()}, do, dS)
    o, S, g = forward_backward(op, "triton", to_device(half), do.half().to(DEVICE), dS.to(DEVICE))
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    assert_rel_close("fp16 output", o_ref, o.float().cpu(), HALF_TOL)
    assert_rel_close("fp16 final state", S_ref, S.cpu(), HALF_TOL)
    for name in half:
        assert g[name].dtype == half[name].dtype
        assert_rel_close(f"fp16 d/d{name}", g_ref[name], g[name].float().cpu(), HALF_TOL)


@pytest.mark.parametrize("t", [0, 20, 63, 64, 100])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_is_causal(op, t):
    torch.manual_seed(3)
    T = 130
    inputs = to_device(make_inputs(op, 1, T, 2, 16, 16, with_state=True))
    with torch.no_grad():
        o, _ = run_op(op, "triton", inputs)
    perturbed = {}
    for name, x in inputs.items():
        y = x.clone()
        if name != "initial_state":
            later = y[:, t + 1 :]
            if name == "beta":
                later = 2.0 * torch.rand_like(later)
            elif name == "g":
                later = -0.1 * torch.rand_like(later)
            else:
                later = torch.randn_like(later)
            y[:, t + 1 :] = later
        perturbed[name] = y
    with torch.no_grad():
        o2, _ = run_op(op, "triton", perturbed)
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1]), "outputs at or before t changed with later inputs"
    assert not torch.equal(o[:, t + 1 :], o2[:, t + 1 :]), "the perturbation did not reach later outputs"


def tiny_float64_inputs(op: str, seed: int = 0):
    torch.manual_seed(seed)
    T, H, D = 6, 1, 3
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64) for _ in range(3))
    gate = (
        torch.rand(1, T, H, dtype=torch.float64) + 0.2
        if op == "quasar"
        else -torch.rand(1, T, H, D, dtype=torch.float64) - 0.05
    )
    h0 = torch.randn(1, H, D, D, dtype=torch.float64)
    return q, k, v, gate, h0


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_gradients_are_nonzero_and_match_the_gradchecked_reference(op):
    naive = naive_recurrent_efla if op == "quasar" else naive_recurrent_gla
    args = tuple(x.requires_grad_(True) for x in tiny_float64_inputs(op))

    def reference(q, k, v, gate, h0):
        o, S = naive(q, k, v, gate, initial_state=h0, output_final_state=True)
        return o, S

    # the reference's gradients are right (finite differences in float64) ...
    assert torch.autograd.gradcheck(reference, args, eps=1e-6, atol=1e-7)
    # ... and the Triton kernels' gradients equal them
    names = ["q", "k", "v", GATE[op], "initial_state"]
    inputs = dict(zip(names, (x.detach() for x in args)))
    torch.manual_seed(1)
    do, dS = torch.randn(1, 6, 1, 3, dtype=torch.float64), torch.randn(1, 1, 3, 3, dtype=torch.float64)
    _, _, g_ref = forward_backward(op, "naive", inputs, do, dS)
    f32 = to_device({n: x.float() for n, x in inputs.items()})
    _, _, g = forward_backward(op, "triton", f32, do.float().to(DEVICE), dS.float().to(DEVICE))
    for name in names:
        assert g[name].abs().sum() > 0, f"the Triton gradient for {name} is zero"
        assert_rel_close(f"d/d{name}", g_ref[name].float(), g[name].cpu(), 1e-4)


def test_triton_efla_zero_and_huge_keys_stay_finite():
    torch.manual_seed(2)
    inputs = make_inputs("quasar", 1, 70, 1, 16, 16, with_state=True)
    inputs["k"][:, :10] = 0.0  # a = beta exactly, no 0/0
    inputs["k"][:, 10:20] *= 1e4  # beta |k|^2 ~ 1e9: a ~ 1/|k|^2
    inputs["beta"][:, 20:30] = 1e6
    check_backends_agree("quasar", to_device(inputs), tol=OUT_TOL, grad_tol=GRAD_TOL, backend="triton")


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_rejects_head_dims_beyond_one_tile(op):
    inputs = to_device(make_inputs(op, 1, 4, 1, 264, 8, with_state=False))
    fn = quasar_attention if op == "quasar" else gla_attention
    with pytest.raises(ValueError, match=r"Dk must be <= 256, got 264"):
        fn(inputs["q"], inputs["k"], inputs["v"], inputs[GATE[op]], backend="triton")
