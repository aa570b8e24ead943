"""Small building blocks shared by the Quasar blocks: norms, rotary embedding, short convolution, FFNs."""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Packing(NamedTuple):
    """Documents packed end to end in one row (B = 1): every mixer restarts at each boundary.

    cu_seqlens: [N + 1] cumulative offsets on the model's device (what the kernels take);
    offsets: the same as host integers (read once per forward, not once per layer);
    doc_positions: [T] position of each token within its own document (RoPE, short conv)."""

    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    doc_positions: torch.Tensor

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, length: int, device: torch.device) -> Packing:
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.dim() != 1
            or cu_seqlens.is_floating_point()
        ):
            raise ValueError(
                "cu_seqlens must be a 1-D integer tensor of cumulative document offsets [0, ..., T]"
            )
        offsets = tuple(int(o) for o in cu_seqlens.tolist())
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != length:
            raise ValueError(f"cu_seqlens must run from 0 to T={length}, got {list(offsets)}")
        if any(b < a for a, b in pairwise(offsets)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {list(offsets)}")
        lengths = torch.tensor([b - a for a, b in pairwise(offsets)], dtype=torch.long)
        starts = torch.repeat_interleave(torch.tensor(offsets[:-1], dtype=torch.long), lengths).to(device)
        positions = torch.arange(length, device=device) - starts
        return Packing(cu_seqlens.to(device=device, dtype=torch.int32), offsets, positions)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Per-head RMSNorm of an attention output, multiplied by an activated gate."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "sigmoid"):
        super().__init__(dim, eps)
        if activation not in ("sigmoid", "swish"):
            raise ValueError(f"unknown gate activation {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).float()
        g = gate.float()
        g = torch.sigmoid(g) if self.activation == "sigmoid" else F.silu(g)
        return (y * g).to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, dim/2] for absolute positions; angles are formed in float64 so that
    positions in the millions keep their precision."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, T, H, D] by position (half-split convention); cos/sin are [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU.

    Streaming: `tail` holds the last `kernel_size - 1` inputs of the previous call (zeros at the
    start of a stream), so chunked calls equal one full call.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))

    def forward(
        self, x: torch.Tensor, tail: torch.Tensor | None, doc_positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """doc_positions: [T] position of each token within its document, for packed documents
        (B = 1, no tail): taps that would reach into the previous document read zeros instead."""
        B, _, C = x.shape
        if doc_positions is not None:
            return self._packed(x, doc_positions), x.new_zeros(B, 0, C)
        if tail is None:
            tail = x.new_zeros(B, self.kernel_size - 1, C)
        xx = torch.cat((tail.to(x.dtype), x), dim=1)  # [B, K-1+T, C]
        y = F.conv1d(xx.transpose(1, 2), self.weight[:, None, :].to(x.dtype), groups=C)
        new_tail = xx[:, xx.shape[1] - (self.kernel_size - 1) :]
        return F.silu(y.transpose(1, 2)), new_tail

    def _packed(self, x: torch.Tensor, doc_positions: torch.Tensor) -> torch.Tensor:
        K, T = self.kernel_size, x.shape[1]
        w = self.weight.to(x.dtype)
        y = x * w[:, K - 1]
        for shift in range(1, min(K, T + 1)):
            shifted = F.pad(x[:, : T - shift], (0, 0, shift, 0))
            keep = (doc_positions >= shift).to(x.dtype)[None, :, None]
            y = y + shifted * keep * w[:, K - 1 - shift]
        return F.silu(y)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
