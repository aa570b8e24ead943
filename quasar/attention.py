"""Sequence mixers: Quasar attention (EFLA) and gated linear attention (GLA).

Both take the pre-normed hidden states [B, T, d] and a per-layer state dict (None at the start of
a stream) and return (output [B, T, d], new state dict). The states are what makes streaming
exact: chunked calls with the carried state equal one full call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from quasar.configuration import QuasarConfig
from quasar.layers import GatedRMSNorm, Packing, ShortConv, apply_rotary

State = dict[str, torch.Tensor]


class QuasarAttention(nn.Module):
    """EFLA attention: short conv + SiLU on q, k, v; RoPE on q, k (unless position_mode="none");
    per-head step beta = softplus(learned per-head value + optional data-dependent term);
    output scale `quasar_attention_scale` (head_dim^-1/2 by default);
    sigmoid-gated per-head RMSNorm on the output, then o_proj.

    Keys are not normalised: EFLA's step a = (1 - exp(-beta |k|^2)) / |k|^2 keeps the state from
    expanding for any key norm.
    """

    def __init__(self, config: QuasarConfig):
        super().__init__()
        d, H, D = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, D
        self.backend = config.attention_backend
        self.scale = config.quasar_attention_scale  # None: head_dim^-1/2
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.q_conv = ShortConv(H * D, config.conv_size)
        self.k_conv = ShortConv(H * D, config.conv_size)
        self.v_conv = ShortConv(H * D, config.conv_size)
        # beta = softplus(beta_bias[h] + beta_proj(x)[h]); beta_proj starts at zero (per-head constant).
        self.beta_bias = nn.Parameter(torch.empty(H))
        self.beta_proj = nn.Linear(d, H, bias=False) if config.data_dependent_beta else None
        self.gate_down = nn.Linear(d, config.output_gate_rank, bias=False)
        self.gate_up = nn.Linear(config.output_gate_rank, H * D, bias=True)
        self.o_norm = GatedRMSNorm(D, eps=config.rms_norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(H * D, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        state: State | None,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, State]:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        state = state or {}
        pos = packing.doc_positions if packing is not None else None
        q, q_tail = self.q_conv(self.q_proj(x), state.get("q_conv"), pos)
        k, k_tail = self.k_conv(self.k_proj(x), state.get("k_conv"), pos)
        v, v_tail = self.v_conv(self.v_proj(x), state.get("v_conv"), pos)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        beta_logit = self.beta_bias.float()
        if self.beta_proj is not None:
            beta_logit = beta_logit + self.beta_proj(x).float()
        beta = F.softplus(beta_logit).expand(B, T, H)
        o, S = kernels.quasar_attention(
            q,
            k,
            v,
            beta,
            scale=self.scale,
            initial_state=state.get("attn"),
            output_final_state=packing is None,
            cu_seqlens=packing.cu_seqlens if packing is not None else None,
            backend=self.backend,
        )
        gate = self.gate_up(self.gate_down(x)).view(B, T, H, D)
        o = self.o_norm(o, gate).reshape(B, T, H * D)
        if packing is not None:  # packed documents are whole: nothing to carry
            return self.o_proj(o), {}
        return self.o_proj(o), {"q_conv": q_tail, "k_conv": k_tail, "v_conv": v_tail, "attn": S}


class GatedLinearAttention(nn.Module):
    """GLA: log forget gates g = logsigmoid(low-rank(x)) / normaliser per key channel;
    per-head RMSNorm with a swish output gate, then o_proj. expand_k 0.5, expand_v 1 by default."""

    def __init__(self, config: QuasarConfig):
        super().__init__()
        d, H = config.hidden_size, config.gla_num_heads
        self.num_heads, self.key_dim, self.value_dim = H, config.gla_key_dim, config.gla_value_dim
        self.backend = config.attention_backend
        self.normalizer = config.gla_gate_logit_normalizer
        self.q_proj = nn.Linear(d, H * self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, H * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, H * self.value_dim, bias=False)
        self.gk_down = nn.Linear(d, config.gla_gate_rank, bias=False)
        self.gk_up = nn.Linear(config.gla_gate_rank, H * self.key_dim, bias=True)
        self.g_proj = nn.Linear(d, H * self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.value_dim, eps=config.gla_output_norm_eps, activation="swish")
        self.o_proj = nn.Linear(H * self.value_dim, d, bias=False)

    def forward(
        self, x: torch.Tensor, rope, state: State | None, packing: Packing | None = None
    ) -> tuple[torch.Tensor, State]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.key_dim, self.value_dim
        state = state or {}
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, V)
        g = (F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.normalizer).view(B, T, H, K)
        o, S = kernels.gla_attention(
            q,
            k,
            v,
            g,
            initial_state=state.get("gla"),
            output_final_state=packing is None,
            cu_seqlens=packing.cu_seqlens if packing is not None else None,
            backend=self.backend,
        )
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V)).reshape(B, T, H * V)
        return self.o_proj(o), ({} if packing is not None else {"gla": S})
