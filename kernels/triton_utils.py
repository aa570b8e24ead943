"""Launch settings shared by the Triton kernels of `efla_triton` and `gla_triton`."""

from __future__ import annotations

import torch
import triton

# 8 warps spread the [64, Dk] fp32 tiles over more registers, and one stage (no software pipelining
# of the loads) keeps shared memory within what an A100, RTX 4090 or H100 block may use
# (checked by `python -m kernels.compile_check`).
LAUNCH = {"num_warps": 8, "num_stages": 1}


def block_size(n: int) -> int:
    """The tile width covering a head dimension of n: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision products; 16-bit inputs may use TF32 tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
