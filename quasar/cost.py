"""What one forward of a Quasar configuration costs per token, from its config alone (nothing is
allocated: the parameter shapes come from the meta device).

A parameter budget does not bound compute: `num_loops` multiplies every block's work but adds only
scalars, one wide attention head makes the recurrent state quadratic in its width at the same
parameter count, and the latent memory's read and write scale with `memory_slots x memory_dim`
while its bank snapshots grow with `memory_slots / memory_segment_size` per token. A validator
bounds all three, relative to the competition's own architecture (`neurons.verify`).

- flops_per_token: 2 x the active (per-token) weights each loop applies, plus the state updates
  (delta rule / gated outer products: ~4 flops per state entry), the memory's read over the slots
  and its amortised write, plus the LM head once.
- state_bytes: the recurrent state one sequence carries (fp32), every loop and block.
- activation_bytes_per_token: memory that grows with the tokens of one forward call beyond the
  hidden states, i.e. the memory banks kept per segment for the causal read (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quasar.configuration import QuasarConfig

FLOPS_PER_STATE_ENTRY = 4  # read (k^T S), update (outer product), decay/correction


@dataclass(frozen=True)
class ForwardCost:
    flops_per_token: float
    state_bytes: int
    activation_bytes_per_token: float

    def ratios(self, reference: ForwardCost) -> dict[str, float]:
        """This cost over `reference`'s, per axis (a reference of 0 on an axis counts as 1 unit)."""
        return {
            "flops_per_token": self.flops_per_token / max(reference.flops_per_token, 1.0),
            "state_bytes": self.state_bytes / max(reference.state_bytes, 1),
            "activation_bytes_per_token": self.activation_bytes_per_token
            / max(reference.activation_bytes_per_token, 1.0),
        }


def forward_cost(config: QuasarConfig) -> ForwardCost:
    from quasar.modeling import QuasarForCausalLM

    with torch.device("meta"):
        model = QuasarForCausalLM(config)
    cfg = model.config
    per_loop_flops = 0.0
    state = 0
    activations = 0.0
    for block in model.model.blocks:
        weights = 0
        for name, p in block.named_parameters():
            if name.endswith("memory_init"):
                continue  # the bank's initial value: state, not a per-token product
            weights += p.numel()
        if block.use_moe:  # only num_experts_per_tok of the routed experts act on a token
            routed = block.ffn.experts_gate_up.numel() + block.ffn.experts_down.numel()
            weights -= routed * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
        per_loop_flops += 2 * weights
        if block.kind == "quasar":
            entries = cfg.num_heads * cfg.head_dim * cfg.head_dim
        else:
            heads = cfg.gla_num_heads
            entries = heads * (cfg.gla_key_dim // heads) * (cfg.gla_value_dim // heads)
        per_loop_flops += FLOPS_PER_STATE_ENTRY * entries
        state += 4 * entries
        memory = getattr(block, "memory", None)
        if memory is not None:
            bank = cfg.memory_slots * cfg.memory_dim
            # read: scores and the weighted sum over every slot; write: once per segment
            per_loop_flops += 4 * bank + 6 * bank / cfg.memory_segment_size
            state += 4 * (bank + cfg.memory_segment_size * cfg.memory_dim)
            activations += 4 * bank / cfg.memory_segment_size
    head = 2 * model.lm_head.weight.numel()
    loops = cfg.num_loops
    return ForwardCost(
        flops_per_token=float(loops * per_loop_flops + head),
        state_bytes=int(loops * state),
        activation_bytes_per_token=float(loops * activations),
    )
