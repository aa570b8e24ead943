"""The chunked `torch` backend against the recurrent `naive` definition, for both sequence-mixing ops.

Outputs, final states and the gradient with respect to every input are compared, over shapes whose
lengths are and are not multiples of the 64-token chunk, with and without an initial state. The
tests also cover float64 gradchecks, input validation, streaming and empty sequences.
"""

from __future__ import annotations

import pytest
import torch

from kernels.efla import chunk_efla
from kernels.gla import chunk_gla
from tests.kernels.common import (
    GATE,
    OPS,
    assert_rel_close,
    check_backends_agree,
    forward_backward,
    make_inputs,
    run_op,
)

# (seed, B, T, H, Dk, Dv): T = 1, within one chunk, exactly one chunk, and several partial chunks.
SHAPES = [
    (0, 1, 1, 1, 8, 8),
    (1, 2, 37, 2, 16, 32),
    (2, 1, 64, 3, 32, 8),
    (3, 2, 130, 1, 8, 16),
    (4, 1, 200, 2, 32, 24),
]
SHAPE_IDS = [f"B{b}-T{t}-H{h}-K{k}-V{v}" for _, b, t, h, k, v in SHAPES]


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_quasar_torch_matches_naive(shape, with_state):
    seed, B, T, H, K, V = shape
    torch.manual_seed(seed)
    inputs = make_inputs("quasar", B, T, H, K, V, with_state=with_state)
    check_backends_agree("quasar", inputs, tol=1e-4)


@pytest.mark.parametrize("normaliser", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gla_torch_matches_naive(shape, with_state, normaliser):
    seed, B, T, H, K, V = shape
    torch.manual_seed(seed)
    inputs = make_inputs("gla", B, T, H, K, V, with_state=with_state, normaliser=normaliser)
    check_backends_agree("gla", inputs, tol=1e-4)


def test_gla_extreme_decay_stays_finite_and_matches():
    # g ~ -160 per token: the cumulative log-gate reaches ~ -10^4 within a chunk, far beyond exp's range.
    torch.manual_seed(5)
    inputs = make_inputs("gla", 2, 150, 2, 16, 16, with_state=True, normaliser=0.005)
    assert inputs["g"][:, :64].sum(dim=1).max() < -5000
    # d/dg of the chunked form goes through a cumulative sum whose terms cancel, so in fp32 its
    # relative error grows as the decay strengthens (vs fp64: ~1e-5 at normaliser 0.1, ~3e-4 here;
    # in fp64 it is ~1e-12, so this is rounding, not a different function).
    check_backends_agree("gla", inputs, tol=1e-4, grad_tols={"g": 2e-3})


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_torch_matches_naive_in_float64(op):
    # fp64 removes rounding noise, so any difference in the math itself shows up far above 1e-10.
    torch.manual_seed(6)
    inputs = make_inputs(op, 2, 100, 2, 8, 12, with_state=True, dtype=torch.float64)
    check_backends_agree(op, inputs, tol=1e-10)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_auto_backend_on_cpu_is_torch(op):
    torch.manual_seed(7)
    inputs = make_inputs(op, 1, 70, 2, 8, 8, with_state=True)
    o_auto, S_auto = run_op(op, "auto", inputs, output_final_state=True)
    o_torch, S_torch = run_op(op, "torch", inputs, output_final_state=True)
    assert torch.equal(o_auto, o_torch)
    assert torch.equal(S_auto, S_torch)


# ----------------------------------------------------------------------------------------------------
# float64 gradchecks


def gradcheck_inputs(op: str, T: int = 5, H: int = 1, D: int = 3) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(8)
    inputs = make_inputs(op, 1, T, H, D, D, with_state=True, dtype=torch.float64)
    if op == "quasar":
        # Keep beta |k|^2 well away from the series threshold (1e-3) so finite differences never
        # straddle the switch between the two forms of the step size.
        inputs["k"] = torch.randn(1, T, H, D, dtype=torch.float64)
        inputs["beta"] = 0.3 + torch.rand(1, T, H, dtype=torch.float64)
    return tuple(x.requires_grad_(True) for x in inputs.values())


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_gradcheck_float64(op, backend):
    args = gradcheck_inputs(op)

    def fn(q, k, v, gate, s0):
        return OPS[op](q, k, v, gate, initial_state=s0, output_final_state=True, backend=backend)

    o, S = fn(*args)
    assert o.dtype == torch.float64 and S.dtype == torch.float64, "fp64 inputs must accumulate in fp64"
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, 6])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_gradcheck_float64_across_chunks(op, chunk_size):
    # Tiny chunks, so that T = 10 crosses chunk (and, for GLA, sub-chunk) boundaries and a partial chunk.
    # Chunk size 6 is not a power of two: EFLA then inverts L by triangular solve instead of doubling.
    args = gradcheck_inputs(op, T=10)

    def fn(q, k, v, gate, s0):
        kwargs = dict(initial_state=s0, output_final_state=True, chunk_size=chunk_size)
        if op == "quasar":
            return chunk_efla(q, k, v, gate, **kwargs)
        return chunk_gla(q, k, v, gate, sub_chunk_size=2, **kwargs)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_chunked_path_gives_every_gate_a_gradient(op):
    torch.manual_seed(9)
    B, T, H, D = 2, 130, 2, 16
    inputs = make_inputs(op, B, T, H, D, D, with_state=True)
    if op == "quasar":
        inputs["k"] = torch.randn(B, T, H, D) / D**0.5  # |k|^2 ~ 1, so da/dbeta = exp(-beta |k|^2) is O(1)
        inputs["beta"] = 0.1 + torch.rand(B, T, H)
    _, _, grads = forward_backward(op, "torch", inputs, torch.randn(B, T, H, D), torch.randn(B, H, D, D))
    name = GATE[op]
    grad = grads[name]
    assert torch.isfinite(grad).all(), f"non-finite d loss / d {name}"
    n_zero = (grad == 0).sum().item()
    assert n_zero == 0, f"{n_zero} of {grad.numel()} entries of d loss / d {name} are exactly zero"
    for other, other_grad in grads.items():
        assert torch.isfinite(other_grad).all() and other_grad.abs().sum() > 0, f"d loss / d {other} is zero"


# ----------------------------------------------------------------------------------------------------
# Streaming and empty sequences


@pytest.mark.parametrize("split", [1, 37, 64, 199])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_streaming_equals_one_pass(op, split):
    torch.manual_seed(10)
    inputs = make_inputs(op, 2, 200, 2, 16, 8, with_state=True)
    o_full, S_full = run_op(op, "torch", inputs, output_final_state=True)
    first = {name: x if name == "initial_state" else x[:, :split] for name, x in inputs.items()}
    o_a, S_a = run_op(op, "torch", first, output_final_state=True)
    second = {name: x[:, split:] for name, x in inputs.items() if name != "initial_state"}
    second["initial_state"] = S_a
    o_b, S_b = run_op(op, "torch", second, output_final_state=True)
    assert_rel_close(f"{op} streamed output", o_full, torch.cat([o_a, o_b], dim=1), 1e-5)
    assert_rel_close(f"{op} streamed final state", S_full, S_b, 1e-5)


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_empty_sequence(op, backend, with_state):
    torch.manual_seed(11)
    inputs = make_inputs(op, 2, 0, 3, 8, 4, with_state=with_state)
    o, S = run_op(op, backend, inputs, output_final_state=True)
    assert o.shape == (2, 0, 3, 4)
    expected = inputs["initial_state"] if with_state else torch.zeros(2, 3, 8, 4)
    assert torch.equal(S, expected)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_final_state_only_when_asked(op):
    torch.manual_seed(12)
    inputs = make_inputs(op, 1, 10, 1, 4, 4, with_state=False)
    for backend in ("naive", "torch"):
        _, S = run_op(op, backend, inputs)
        assert S is None


# ----------------------------------------------------------------------------------------------------
# Input validation


def valid_inputs(op: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(13)
    return make_inputs(op, 2, 5, 3, 4, 6, with_state=True)


BAD_INPUTS = {
    "q/k shapes": (lambda d: d.update(k=torch.randn(2, 5, 3, 5)), r"q and k must have the same shape"),
    "q not 4-D": (lambda d: d.update(q=torch.randn(2, 5, 12)), r"q must be a 4-D tensor"),
    "v length": (lambda d: d.update(v=torch.randn(2, 4, 3, 6)), r"v must be \[B, T, H, Dv\]"),
    "state shape": (
        lambda d: d.update(initial_state=torch.randn(2, 3, 6, 4)),
        r"initial_state must be \[N, H, Dk, Dv\] with \(H, Dk, Dv\) = \(3, 4, 6\).*got \(2, 3, 6, 4\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_bad_shapes_are_rejected(op, case):
    mutate, message = BAD_INPUTS[case]
    inputs = valid_inputs(op)
    mutate(inputs)
    with pytest.raises(ValueError, match=message):
        run_op(op, "torch", inputs)


@pytest.mark.parametrize("bad_shape", [(2, 5), (2, 5, 3, 1), (2, 5, 2)])
def test_bad_beta_shape_is_rejected(bad_shape):
    inputs = valid_inputs("quasar")
    inputs["beta"] = torch.rand(*bad_shape)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\] = \(2, 5, 3\)"):
        run_op("quasar", "torch", inputs)


@pytest.mark.parametrize("bad_shape", [(2, 5, 3), (2, 5, 3, 6)])
def test_bad_g_shape_is_rejected(bad_shape):
    inputs = valid_inputs("gla")
    inputs["g"] = -torch.rand(*bad_shape)
    with pytest.raises(ValueError, match=r"g must have q's shape"):
        run_op("gla", "torch", inputs)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_unknown_backend_is_rejected(op):
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        run_op(op, "cuda", valid_inputs(op))


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_triton_backend_on_cpu_without_the_interpreter_is_rejected(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        run_op(op, "triton", valid_inputs(op))


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_packed_documents_equal_a_batch_of_the_same_documents(op, backend):
    # Two documents of 70 tokens packed along T with cu_seqlens behave exactly like a batch of two.
    torch.manual_seed(8)
    inputs = make_inputs(op, 2, 70, 2, 8, 8, with_state=True)
    o_batch, S_batch = run_op(op, backend, inputs, output_final_state=True)
    packed = {n: (x if n == "initial_state" else x.reshape(1, 140, *x.shape[2:])) for n, x in inputs.items()}
    cu = torch.tensor([0, 70, 140])
    o_packed, S_packed = run_op(op, backend, packed, output_final_state=True, cu_seqlens=cu)
    torch.testing.assert_close(o_packed, o_batch.reshape(1, 140, *o_batch.shape[2:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_packed, S_batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_packed_torch_matches_packed_naive_with_gradients(op):
    torch.manual_seed(9)
    lengths = [3, 64, 0, 90]
    inputs = make_inputs(op, 1, sum(lengths), 2, 8, 8, with_state=False)
    inputs["initial_state"] = torch.randn(len(lengths), 2, 8, 8)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    check_backends_agree(op, inputs, tol=1e-4, cu_seqlens=cu)


BAD_CU_SEQLENS = {
    "float": (torch.tensor([0.0, 5.0]), r"1-D integer tensor"),
    "2-D": (torch.tensor([[0, 5]]), r"1-D integer tensor"),
    "does not start at 0": (torch.tensor([1, 5]), r"start at 0 and end at T=5"),
    "does not end at T": (torch.tensor([0, 4]), r"start at 0 and end at T=5"),
    "decreasing": (torch.tensor([0, 4, 3, 5]), r"non-decreasing"),
    "single offset": (torch.tensor([0]), r"at least two offsets"),
}


@pytest.mark.parametrize("case", list(BAD_CU_SEQLENS))
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_bad_cu_seqlens_are_rejected(op, backend, case):
    cu, message = BAD_CU_SEQLENS[case]
    inputs = {n: (x[:1] if n != "initial_state" else x) for n, x in valid_inputs(op).items()}
    with pytest.raises(ValueError, match=message):
        run_op(op, backend, inputs, cu_seqlens=cu)


@pytest.mark.parametrize("op", ["quasar", "gla"])
def test_cu_seqlens_need_batch_size_one_and_one_state_per_document(op):
    inputs = valid_inputs(op)  # B = 2
    with pytest.raises(ValueError, match=r"batch size must be 1"):
        run_op(op, "torch", inputs, cu_seqlens=torch.tensor([0, 5]))
    packed = {n: x[:1] for n, x in inputs.items()}
    packed["initial_state"] = torch.zeros(3, *valid_inputs(op)["initial_state"].shape[1:])
    with pytest.raises(ValueError, match=r"initial_state has 3 states, but there are 2 sequences"):
        run_op(op, "torch", packed, cu_seqlens=torch.tensor([0, 2, 5]))
