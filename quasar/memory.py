"""Persistent latent memory of a Quasar block: segment compression, saliency-gated writes, causal reads.

The memory bank M [slots, dim] starts from a learned parameter and is carried per sequence like
any other recurrent state. Tokens are grouped into segments of `segment_size` by their absolute
position in the stream. Each segment is compressed to one vector by saliency-weighted attention
pooling and written into the slots it is most similar to:

    e_t = sigmoid(w . x_t + b)                         per-token saliency
    pool_t = softmax_t(p . z_t / sqrt(m) + log e_t)      over the tokens of the segment
    z = sum_t pool_t z_t,  e = sum_t pool_t e_t          segment summary and its write strength
    A = softmax(z M^T / sqrt(m) * temperature)           slot assignment
    w = rate * e * A;  M <- (1 - w) M + w z              per-slot interpolation: M stays bounded

Causality: a token of segment s reads M as it was after segment s-1 was written,
c_t = softmax(q_t M^T / sqrt(m)) M; the read is projected to the hidden size and added through a
gate that starts almost closed. Nothing a token reads depends on its own segment or later ones.

The state holds the bank and the raw per-token values of the unfinished segment (at most
segment_size - 1 rows), so a stream cut at any position continues exactly.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from quasar.configuration import QuasarConfig

State = dict[str, torch.Tensor]


class LatentMemory(nn.Module):
    def __init__(self, config: QuasarConfig):
        super().__init__()
        d, m = config.hidden_size, config.memory_dim
        self.slots, self.dim, self.segment_size = config.memory_slots, m, config.memory_segment_size
        self.memory_init = nn.Parameter(torch.empty(self.slots, m))
        self.saliency = nn.Linear(d, 1, bias=True)
        self.summary_proj = nn.Linear(d, m, bias=False)
        self.pool_query = nn.Parameter(torch.empty(m))
        # Shape [1], not a 0-d scalar: FSDP2 cannot shard 0-d parameters.
        self.slot_log_temperature = nn.Parameter(torch.zeros(1))
        self.write_rate_logit = nn.Parameter(torch.empty(1))
        self.query_proj = nn.Linear(d, m, bias=False)
        self.out_proj = nn.Linear(m, d, bias=False)
        self.read_gate = nn.Linear(d, 1, bias=True)

    @torch.no_grad()
    def reset_parameters(
        self, config: QuasarConfig, out_std: float, init=nn.init, closed_read: bool = False
    ) -> None:
        """Fresh values for the memory's own tensors (its saliency, summary and query projections are
        plain linears, initialised as every linear is). `init` is torch.nn.init or transformers'
        initialization module (same functions). The read enters through a gate that starts almost
        closed; `closed_read` also zeroes the read projection, so the memory adds exactly nothing to
        the block until training moves it (how a memory is added to an already trained model)."""
        init.normal_(self.memory_init, mean=0.0, std=self.dim**-0.5)
        init.normal_(self.pool_query, mean=0.0, std=self.dim**-0.5)
        init.zeros_(self.slot_log_temperature)
        rate = config.memory_write_rate_init
        init.constant_(self.write_rate_logit, math.log(rate / (1.0 - rate)))
        if closed_read:
            init.zeros_(self.out_proj.weight)
        else:
            init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        init.zeros_(self.read_gate.weight)
        init.constant_(self.read_gate.bias, config.memory_read_gate_bias_init)

    def initial_state(self, batch_size: int, device, dtype=torch.float32) -> State:
        m = self.dim
        return {
            "bank": self.memory_init.float().to(device).expand(batch_size, -1, -1).clone(),
            "partial_z": torch.zeros(batch_size, 0, m, device=device, dtype=dtype),
            "partial_pool_logit": torch.zeros(batch_size, 0, device=device, dtype=torch.float32),
            "partial_log_saliency": torch.zeros(batch_size, 0, device=device, dtype=torch.float32),
        }

    def forward(
        self, x: torch.Tensor, state: State | None, doc_offsets: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, State]:
        """x: pre-normed hidden states [B, T, d]. Returns (gated read [B, T, d], new state).

        doc_offsets: cumulative offsets of packed documents (B = 1, no state): each document gets a
        fresh memory of its own, exactly as if it were run alone. The returned state is empty."""
        if doc_offsets is not None:
            if state is not None:
                raise ValueError("packed documents (doc_offsets) start from a fresh memory: pass state=None")
            parts = [self(x[:, a:b], None)[0] for a, b in pairwise(doc_offsets) if b > a]
            return (torch.cat(parts, dim=1) if parts else x.new_zeros(x.shape)), {}
        B, T, _ = x.shape
        S, m = self.segment_size, self.dim
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        bank = state["bank"]

        # Per-token write inputs, appended to the unfinished segment carried in the state.
        z_tok = self.summary_proj(x)
        pool_logit = (z_tok.float() @ self.pool_query.float()) / math.sqrt(m)
        log_saliency = F.logsigmoid(self.saliency(x).float().squeeze(-1))
        r = state["partial_z"].shape[1]
        z_all = torch.cat((state["partial_z"].to(z_tok.dtype), z_tok), dim=1)
        logit_all = torch.cat((state["partial_pool_logit"], pool_logit), dim=1)
        logsal_all = torch.cat((state["partial_log_saliency"], log_saliency), dim=1)
        n_full = (r + T) // S

        # Compress every complete segment at once, then write them in order (the only sequential part).
        banks = [bank]
        if n_full:
            zs = z_all[:, : n_full * S].float().reshape(B, n_full, S, m)
            pool = torch.softmax(
                (logit_all[:, : n_full * S] + logsal_all[:, : n_full * S]).reshape(B, n_full, S), -1
            )
            z_seg = (pool[..., None] * zs).sum(2)  # [B, n_full, m]
            e_seg = (pool * logsal_all[:, : n_full * S].exp().reshape(B, n_full, S)).sum(-1)  # [B, n_full]
            temperature = self.slot_log_temperature.float().exp() / math.sqrt(m)
            rate = torch.sigmoid(self.write_rate_logit.float())
            for s in range(n_full):
                z = z_seg[:, s]
                assign = torch.softmax(torch.einsum("bm,bnm->bn", z, bank) * temperature, dim=-1)
                w = (rate * e_seg[:, s, None] * assign)[..., None]  # [B, slots, 1], in [0, 1)
                bank = bank + w * (z[:, None, :] - bank)
                banks.append(bank)

        # Reads: token at combined index j (j >= r) belongs to segment j // S and reads banks[j // S].
        n_seg = -(-(r + T) // S)
        q = self.query_proj(x).float()
        q = F.pad(q, (0, 0, r, n_seg * S - r - T)).reshape(B, n_seg, S, m)
        read_banks = torch.stack(banks[:n_seg], dim=1)  # [B, n_seg, slots, m]
        attn = torch.softmax(q @ read_banks.transpose(-1, -2) / math.sqrt(m), dim=-1)
        c = (attn @ read_banks).reshape(B, n_seg * S, m)[:, r : r + T]
        gate = torch.sigmoid(self.read_gate(x).float())
        out = (gate * self.out_proj(c.to(x.dtype)).float()).to(x.dtype)

        new_state = {
            "bank": bank,
            "partial_z": z_all[:, n_full * S :],
            "partial_pool_logit": logit_all[:, n_full * S :],
            "partial_log_saliency": logsal_all[:, n_full * S :],
        }
        return out, new_state
