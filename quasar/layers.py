"""Small building blocks shared by the Quasar blocks: norms, rotary embedding, short convolution, FFNs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, C = x.shape
        if tail is None:
            tail = x.new_zeros(B, self.kernel_size - 1, C)
        xx = torch.cat((tail.to(x.dtype), x), dim=1)  # [B, K-1+T, C]
        y = F.conv1d(xx.transpose(1, 2), self.weight[:, None, :].to(x.dtype), groups=C)
        new_tail = xx[:, xx.shape[1] - (self.kernel_size - 1) :]
        return F.silu(y.transpose(1, 2)), new_tail


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
