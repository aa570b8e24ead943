"""The forward cost model: what a validator bounds besides parameters (quasar.cost)."""

from __future__ import annotations

import pytest

from quasar import QuasarConfig
from quasar.cost import forward_cost


def _tiny(**overrides) -> QuasarConfig:
    return QuasarConfig.from_preset("tiny", vocab_size=512, **overrides)


def test_loops_multiply_block_work_and_state_but_not_the_head() -> None:
    one, two = forward_cost(_tiny(num_loops=1)), forward_cost(_tiny(num_loops=2))
    head = 2 * 512 * 64
    assert two.flops_per_token - head == pytest.approx(2 * (one.flops_per_token - head))
    assert two.state_bytes == 2 * one.state_bytes
    assert two.activation_bytes_per_token == 2 * one.activation_bytes_per_token


def test_memory_and_head_width_show_up_where_parameters_do_not() -> None:
    base = forward_cost(_tiny())
    wide = forward_cost(_tiny(memory_slots=16 * 64, memory_segment_size=1))
    assert wide.activation_bytes_per_token > 100 * base.activation_bytes_per_token
    one_head = forward_cost(_tiny(num_heads=1, head_dim=64))  # same projections, 2x the state per head
    assert one_head.state_bytes > base.state_bytes
    ratios = wide.ratios(base)
    assert ratios["activation_bytes_per_token"] > 100 and set(ratios) == {
        "flops_per_token", "state_bytes", "activation_bytes_per_token",
    }  # fmt: skip


def test_the_3b_shape_costs_about_twice_its_active_parameters_per_token() -> None:
    import torch

    from quasar import QuasarForCausalLM

    config = QuasarConfig.from_preset("3b-a1b")
    with torch.device("meta"):
        counts = QuasarForCausalLM(config).parameter_counts()
    cost = forward_cost(config)
    assert 1.8 * counts["active"] < cost.flops_per_token < 2.6 * counts["active"]
