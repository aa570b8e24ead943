"""Anchor injection: forward unchanged, gradient into the anchor P scaled by exactly 1/num_loops."""

import pytest
import torch

from tests.conftest import tiny_model


def anchor_gradients(model, ids):
    """(total gradient on the anchor P, gradient arriving at the injection's output)."""
    captured = {}

    def keep_anchor(module, args, output):
        output.retain_grad()
        captured["anchor"] = output

    def keep_injected(module, args, output):
        output.register_hook(lambda g: captured.__setitem__("injected_grad", g.clone()))

    hooks = [
        model.model.embed_norm.register_forward_hook(keep_anchor),
        model.model.anchor_grad_scale.register_forward_hook(keep_injected),
    ]
    try:
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return captured["anchor"].grad.clone(), captured["injected_grad"], out.loss.detach()


@pytest.mark.parametrize("num_loops", [2, 3])
def test_anchor_gradient_is_scaled_by_exactly_one_over_num_loops(num_loops):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    scaled = tiny_model(0, num_loops=num_loops).train()
    unscaled = tiny_model(0, num_loops=num_loops, scale_injection_grad=False).train()
    unscaled.load_state_dict(scaled.state_dict())

    g_on, injected_on, loss_on = anchor_gradients(scaled, ids)
    g_off, injected_off, loss_off = anchor_gradients(unscaled, ids)

    assert torch.equal(loss_on, loss_off), "the scaling must not change the forward pass"
    torch.testing.assert_close(injected_on, injected_off, rtol=0, atol=0)
    assert injected_on.abs().max() > 0
    # Only the injection path differs: g_off - g_on = (1 - 1/L) * (gradient arriving at the injection).
    torch.testing.assert_close(g_off - g_on, (1 - 1 / num_loops) * injected_on, rtol=1e-5, atol=1e-8)


def test_grad_scale_module_scales_exactly():
    model = tiny_model(0, num_loops=4)
    scale = model.model.anchor_grad_scale
    assert scale.scale == 0.25
    x = torch.randn(3, 5, requires_grad=True)
    scale(x).backward(torch.full((3, 5), 2.0))
    assert torch.equal(x.grad, torch.full((3, 5), 0.5))


def test_injection_can_be_disabled_by_config():
    model = tiny_model(0, num_loops=1, use_looped_injection=False)
    assert model.model.injection_logits is None
    assert "model.injection_logits" not in model.state_dict()
