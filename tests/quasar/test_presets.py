"""Presets and config validation."""

import pytest
import torch

import quasar
from quasar import QuasarConfig, QuasarForCausalLM


def test_3b_a1b_on_meta_has_the_published_size():
    config = QuasarConfig.from_preset("3b-a1b")
    with torch.device("meta"):
        model = QuasarForCausalLM(config)
    counts = model.parameter_counts()
    assert 2.8e9 <= counts["total"] <= 3.2e9, counts
    assert 0.9e9 <= counts["active"] <= 1.3e9, counts
    assert config.block_kinds.count("quasar") == 16 and config.block_kinds.count("gla") == 8
    assert config.moe_block_indices == list(range(4, 24))
    assert config.vocab_size == 248_320 and config.rope_theta == 1e6


def test_published_3b_a1b_is_the_published_model_as_imported():
    config = QuasarConfig.from_preset("published-3b-a1b")
    with torch.device("meta"):
        model = QuasarForCausalLM(config)
    # The published checkpoint's 2,901,843,184 less what is not imported: its non-causal memory on the
    # 8 GLA layers (1,415,555 each) and its 24 looped-injection gates (tests/quasar/test_import_published.py).
    assert model.parameter_counts()["total"] == 2_890_518_720 == 2_901_843_184 - 8 * 1_415_555 - 24
    assert (config.position_mode, config.data_dependent_beta, config.use_memory) == ("none", False, False)
    assert (config.router_mixing, config.quasar_attention_scale, config.gla_norm_eps) == (
        "softmax",
        1.0,
        1e-5,
    )
    ours = QuasarConfig.from_preset("3b-a1b")
    assert (ours.position_mode, ours.router_mixing, ours.quasar_attention_scale) == ("rope", "sigmoid", None)


def test_preset_names_in_the_settings_match_the_presets():
    from typing import get_args

    from distill.config import PresetName

    assert set(get_args(PresetName)) == set(quasar.PRESETS)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("router_mixing", "relu", "router_mixing='relu': must be one of"),
        ("quasar_attention_scale", 0.0, "quasar_attention_scale=0.0: must be positive"),
        ("gla_norm_eps", -1e-5, "gla_norm_eps=-1e-05: must be positive"),
    ],
)
def test_published_options_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuasarConfig.from_preset("tiny", **{field: value})


def test_router_mixing_softmax_weighs_the_chosen_experts_by_their_raw_logits():
    from quasar.moe import SMEBUMoE

    torch.manual_seed(0)
    moe = SMEBUMoE(QuasarConfig.from_preset("tiny", router_mixing="softmax"))
    x = torch.randn(5, 64)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # forces expert 2 into every token's choice
    chosen, weights, _ = moe.route(x, bias)
    assert (chosen == 2).any(-1).all()
    logits = moe.router(x).float()
    torch.testing.assert_close(weights, torch.softmax(logits.gather(-1, chosen), -1))  # never the bias


def test_active_count_is_derived_from_the_modules():
    config = QuasarConfig.from_preset("tiny")
    model = QuasarForCausalLM(config)
    counts = model.parameter_counts()
    moe = model.model.blocks[1].ffn
    routed = moe.experts_gate_up.numel() + moe.experts_down.numel()
    expected_inactive = model.model.embed_tokens.weight.numel() + routed // 2  # top-2 of 4 experts
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] == counts["total"] - expected_inactive


def test_small_preset_is_20_to_40_million_parameters():
    with torch.device("meta"):
        model = QuasarForCausalLM(QuasarConfig.from_preset("small"))
    assert 20e6 <= model.parameter_counts()["total"] <= 40e6


def test_tiny_learns_a_repeating_pattern():
    torch.manual_seed(0)
    model = QuasarForCausalLM(QuasarConfig.from_preset("tiny")).train()
    pattern = torch.tensor([3, 17, 42, 99, 5, 64, 7, 200])
    ids = pattern.repeat(4, 8)  # [4, 64]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias(model.pop_router_token_counts())
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses
    assert model.model.router_balance.bias.abs().sum() > 0, "the SMEBU update must have run"


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    model = QuasarForCausalLM(QuasarConfig.from_preset("tiny", memory_read_gate_bias_init=0.0)).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Unchosen experts legitimately get no gradient from one batch; everything else must.
    dead = [n for n in dead if "experts_" not in n]
    assert not dead, f"parameters without gradient: {dead}"


def test_unknown_preset_and_bad_fields_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="unknown Quasar preset 'huge'"):
        QuasarConfig.from_preset("huge")
    for field, value in [
        ("layer_pattern", "QX"),
        ("num_loops", 0),
        ("num_experts_per_tok", 9),
        ("position_mode", "alibi"),
        ("gla_expand_k", 0.3),
        ("dense_layers", 5),
        ("memory_write_rate_init", 1.5),
    ]:
        with pytest.raises(ValueError, match=f"QuasarConfig.{field}="):
            QuasarConfig.from_preset("tiny", **{field: value})


def test_registered_with_the_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("quasar", **quasar.PRESETS["tiny"])
    assert isinstance(config, QuasarConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, QuasarForCausalLM)


def test_position_mode_none_removes_rope():
    torch.manual_seed(2)
    rope = QuasarForCausalLM(QuasarConfig.from_preset("tiny")).eval()
    nope = QuasarForCausalLM(QuasarConfig.from_preset("tiny", position_mode="none")).eval()
    nope.load_state_dict(rope.state_dict())
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(rope(ids).logits, nope(ids).logits), "RoPE must actually be applied"
