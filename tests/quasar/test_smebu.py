"""SMEBU routing and bias balancing."""

import math

import torch

from tests.conftest import tiny_model


def reference_smebu(bias, momentum, counts, kappa=2.0, lam=2e-3, beta=0.5, clamp=10.0):
    """The update rule written out element by element from the specification (float64)."""
    new_b, new_m = [], []
    for b_row, m_row, c_row in zip(bias, momentum, counts):
        E = len(c_row)
        mean = sum(c_row) / E
        v = [(mean - c) / mean for c in c_row]
        d = [lam * math.tanh(kappa * x) for x in v]
        d = [x - sum(d) / E for x in d]
        m = [beta * mi + (1 - beta) * di for mi, di in zip(m_row, d)]
        b = [min(max(bi + mi, -clamp), clamp) for bi, mi in zip(b_row, m)]
        b = [x - sum(b) / E for x in b]
        new_b.append(b)
        new_m.append(m)
    return new_b, new_m


def test_bias_update_matches_the_formula_on_hand_made_counts():
    model = tiny_model()
    balance = model.model.router_balance
    counts = torch.tensor([[10.0, 0.0, 5.0, 25.0]])  # one MoE layer in the tiny preset, 4 experts
    b, m = [[0.0] * 4], [[0.0] * 4]
    for step_counts in (counts, counts.flip(-1), torch.tensor([[7.0, 8.0, 9.0, 16.0]])):
        model.update_router_bias(step_counts)
        b, m = reference_smebu(b, m, step_counts.tolist())
        torch.testing.assert_close(
            balance.bias.double(), torch.tensor(b, dtype=torch.float64), rtol=0, atol=1e-9
        )
        torch.testing.assert_close(
            balance.momentum.double(), torch.tensor(m, dtype=torch.float64), rtol=0, atol=1e-9
        )
    # Overloaded expert 3 ends below under-loaded expert 1 after the first update.
    model2 = tiny_model()
    model2.update_router_bias(counts)
    assert model2.model.router_balance.bias[0, 1] > 0 > model2.model.router_balance.bias[0, 3]


def test_bias_stays_bounded_and_centred():
    # Clamped to [-10, 10] and then centred, as specified, so |b| <= 20 always; and sum(b) = 0.
    model = tiny_model(0, smebu_lambda=5.0)
    b, m = [[0.0] * 4], [[0.0] * 4]
    for _ in range(50):
        model.update_router_bias(torch.tensor([[1000.0, 0.0, 0.0, 0.0]]))
        b, m = reference_smebu(b, m, [[1000.0, 0.0, 0.0, 0.0]], lam=5.0)
    bias = model.model.router_balance.bias
    assert bias.abs().max() <= 20.0
    assert bias[0, 0] < -9.0, "a permanently overloaded expert is pushed to the clamp"
    assert abs(bias.sum().item()) < 1e-4
    torch.testing.assert_close(bias.double(), torch.tensor(b, dtype=torch.float64), rtol=0, atol=1e-5)


def test_layer_with_no_tokens_is_left_alone():
    model = tiny_model()
    model.update_router_bias(torch.zeros(1, 4))
    assert torch.equal(model.model.router_balance.bias, torch.zeros(1, 4))


def test_bias_is_a_buffer_outside_the_optimizer_and_in_the_checkpoint():
    model = tiny_model().train()
    params = dict(model.named_parameters())
    assert not any("router_balance" in name for name in params)
    state = model.state_dict()
    assert "model.router_balance.bias" in state and "model.router_balance.momentum" in state
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.model.router_balance.bias.copy_(torch.tensor([[0.5, -0.5, 0.25, -0.25]]))
    before = model.model.router_balance.bias.clone()
    model(torch.randint(0, 256, (1, 16)), labels=torch.randint(0, 256, (1, 16))).loss.backward()
    opt.step()
    assert torch.equal(model.model.router_balance.bias, before)


def test_bias_and_momentum_stay_fp32_when_the_model_is_cast():
    model = tiny_model()
    model.update_router_bias(torch.tensor([[10.0, 0.0, 5.0, 25.0]]))
    exact = model.model.router_balance.bias.clone()
    model = model.to(torch.bfloat16)
    assert model.model.router_balance.bias.dtype == torch.float32
    assert torch.equal(model.model.router_balance.bias, exact)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_bias_changes_the_choice_but_not_the_mixing_weights():
    model = tiny_model()
    moe = model.model.blocks[1].ffn
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    chosen0, weights0, scores0 = moe.route(x, torch.zeros(4))
    push = torch.tensor([0.0, 0.0, 0.0, 5.0])  # bias strongly toward expert 3
    chosen1, weights1, scores1 = moe.route(x, push)
    assert torch.equal(scores0, scores1), "router scores must not depend on the bias"
    assert (chosen1 == 3).any(-1).all(), "a large bias must put expert 3 in every token's top-k"
    assert not (chosen0 == 3).any(-1).all()
    for chosen, weights in ((chosen0, weights0), (chosen1, weights1)):
        picked = scores0.gather(-1, chosen)
        torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True))


def test_a_sequence_output_does_not_depend_on_the_rest_of_the_batch():
    model = tiny_model(1)
    g = torch.Generator().manual_seed(1)
    alone = torch.randint(0, 256, (1, 40), generator=g)
    others = torch.randint(0, 256, (3, 40), generator=g)
    batch = torch.cat((others[:1], alone, others[1:]))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            a = model(alone).logits[0]
            b = model(batch).logits[1]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_and_eval_compute_the_same_function():
    model = tiny_model(2)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        train_logits = model.train()(ids).logits
        eval_logits = model.eval()(ids).logits
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=0)


def test_token_counts_accumulate_in_training_only_and_reset_when_popped():
    model = tiny_model(3)
    cfg = model.config
    ids = torch.randint(0, 256, (2, 10))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert model.pop_router_token_counts() is None
    model.train()
    model(ids)
    model(ids)
    counts = model.pop_router_token_counts()
    n_moe = len(cfg.moe_block_indices)
    assert counts.shape == (n_moe, cfg.num_experts)
    # every token routes to top_k experts once per loop, in each of two forwards
    assert counts.sum().item() == 2 * 2 * 10 * cfg.num_experts_per_tok * cfg.num_loops * n_moe
    assert model.pop_router_token_counts() is None
