"""SMEBU mixture of experts: sigmoid router, bias-only balancing, dropless routing.

Routing: scores s = sigmoid(W_r x) in fp32. Experts are *chosen* by top-k of s + b, where b is the
SMEBU bias of this layer; the chosen experts are *mixed* with s of the chosen experts normalised
to sum 1 (`router_mixing="sigmoid"`), or with a softmax over their raw logits W_r x
(`router_mixing="softmax"`, the published model's rule); never with b. The same function runs in training and evaluation (no train-only scale),
and no token is ever dropped, so a token's output never depends on the rest of its batch.

Balancing: b and its momentum live in `RouterBalance`, buffers outside the optimizer, one row per
MoE layer. After each optimizer step the trainer passes the step's token counts (summed across
data-parallel ranks) to `RouterBalance.update`, one vectorised update for all layers:

    v = (mean_load - count) / mean_load;  d = lam * tanh(kappa * v), centred
    m <- beta * m + (1 - beta) * d;       b <- clamp(b + m, -clamp, clamp), centred
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quasar.configuration import QuasarConfig
from quasar.layers import SwiGLU


class RouterBalance(nn.Module):
    """SMEBU router biases [n_moe_layers, E] and their momentum; fp32 whatever the model's dtype."""

    _fp32_buffers = ("bias", "momentum")

    def __init__(self, config: QuasarConfig):
        super().__init__()
        n, E = len(config.moe_block_indices), config.num_experts
        self.kappa, self.lam, self.beta = config.smebu_kappa, config.smebu_lambda, config.smebu_beta
        self.clamp = config.router_bias_clamp
        self.register_buffer("bias", torch.zeros(n, E, dtype=torch.float32))
        self.register_buffer("momentum", torch.zeros(n, E, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16/fp16 must not round the biases: a 2e-3 update vanishes in bf16.
        kept = {name: self._buffers[name] for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32 and old is not None:
                self._buffers[name] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def update(self, token_counts: torch.Tensor) -> None:
        """One SMEBU step for all MoE layers from token counts [n_moe_layers, E] (already summed over ranks)."""
        if token_counts.shape != self.bias.shape:
            raise ValueError(
                f"token_counts must be [n_moe_layers, num_experts] = {tuple(self.bias.shape)}, "
                f"got {tuple(token_counts.shape)}"
            )
        counts = token_counts.to(device=self.bias.device, dtype=torch.float32)
        mean_load = counts.mean(-1, keepdim=True)
        # A layer that saw no tokens this step has no violation to correct.
        violation = torch.where(mean_load > 0, (mean_load - counts) / mean_load.clamp_min(1e-12), 0.0)
        delta = self.lam * torch.tanh(self.kappa * violation)
        delta = delta - delta.mean(-1, keepdim=True)
        self.momentum.mul_(self.beta).add_((1.0 - self.beta) * delta)
        bias = (self.bias + self.momentum).clamp_(-self.clamp, self.clamp)
        self.bias.copy_(bias - bias.mean(-1, keepdim=True))


class SMEBUMoE(nn.Module):
    """Shared SwiGLU expert + routed SwiGLU experts, optionally in a down-projected latent space
    (the published "BigMac" layout: d -> latent, experts in latent space, latent -> d)."""

    def __init__(self, config: QuasarConfig):
        super().__init__()
        d, E = config.hidden_size, config.num_experts
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.mixing = config.router_mixing
        latent = config.moe_latent_size or d
        hidden = config.expert_intermediate_size
        self.router = nn.Linear(d, E, bias=False)
        self.latent_down = nn.Linear(d, latent, bias=False) if config.moe_latent_size else None
        self.latent_up = nn.Linear(latent, d, bias=False) if config.moe_latent_size else None
        # Expert weights stacked: gate and up fused [E, latent, 2*hidden], down [E, hidden, latent].
        self.experts_gate_up = nn.Parameter(torch.empty(E, latent, 2 * hidden))
        self.experts_down = nn.Parameter(torch.empty(E, hidden, latent))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = SwiGLU(d, shared) if shared > 0 else None

    def route(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (chosen experts [N, k], mixing weights [N, k] fp32, scores [N, E] fp32)."""
        logits = self.router(x).float()
        scores = torch.sigmoid(logits)
        chosen = torch.topk(scores + bias.float(), self.top_k, dim=-1).indices
        if self.mixing == "softmax":
            weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
        else:
            weights = scores.gather(-1, chosen)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return chosen, weights, scores

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d], bias [E] -> (output [B, T, d], tokens per expert [E])."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        chosen, weights, _ = self.route(xf, bias)
        h = self.latent_down(xf) if self.latent_down is not None else xf

        # Sort the (token, slot) pairs by expert, run each expert on its rows, then put the rows back.
        # Each token's k outputs are summed in slot order, so nothing depends on the rest of the batch.
        N, k = chosen.shape
        flat_expert = chosen.reshape(-1)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        order = torch.argsort(flat_expert, stable=True)
        h_sorted = h[order // k]
        y_sorted = torch.empty(N * k, h.shape[-1], dtype=h.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = (h_sorted[start : start + n] @ self.experts_gate_up[e]).chunk(2, dim=-1)
                y_sorted[start : start + n] = (F.silu(gate) * up) @ self.experts_down[e]
                start += n
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        routed = (y.view(N, k, -1).float() * weights[..., None]).sum(1)
        routed = routed.to(x.dtype)
        out = self.latent_up(routed) if self.latent_up is not None else routed
        if self.shared_expert is not None:
            out = out + self.shared_expert(xf)
        return out.reshape(shape), counts
