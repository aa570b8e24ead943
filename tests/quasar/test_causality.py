"""Whole-model causality: tokens after position t never change a logit at or before t."""

import pytest
import torch
import torch.nn.functional as F

from quasar.memory import LatentMemory
from tests.conftest import tiny_model

SEGMENT = 16  # tiny preset's memory segment size


def past_and_future_change(model, ids: torch.Tensor, t: int) -> tuple[float, float]:
    changed = ids.clone()
    g = torch.Generator().manual_seed(t)
    changed[:, t + 1 :] = (ids[:, t + 1 :] + torch.randint(1, 255, ids[:, t + 1 :].shape, generator=g)) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    diff = (a - b).abs()
    return diff[:, : t + 1].max().item(), diff[:, t + 1 :].max().item()


@pytest.mark.parametrize("t", [0, 5, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT - 1, 2 * SEGMENT, 45])
def test_future_tokens_do_not_change_past_logits(t):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 3 * SEGMENT + 5), generator=torch.Generator().manual_seed(1))
    past, future = past_and_future_change(model, ids, t)
    assert past <= 1e-6, f"logits at or before t={t} changed by {past:.3e} when only later tokens changed"
    assert future > 1e-4, "later logits must react to the changed tokens (otherwise the test proves nothing)"


def test_causality_holds_in_training_mode_with_grad():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    past, _ = past_and_future_change(model, ids, SEGMENT)
    assert past <= 1e-6


def test_the_check_catches_a_memory_that_reads_before_it_should(monkeypatch):
    causal_forward = LatentMemory.forward

    def leaky_forward(self, x, state):
        """The published defect: write the whole sequence into memory, then read the final bank."""
        _, new_state = causal_forward(self, x, state)
        bank = new_state["bank"]
        c = torch.softmax(self.query_proj(x).float() @ bank.transpose(-1, -2) / self.dim**0.5, -1) @ bank
        gate = torch.sigmoid(self.read_gate(x).float())
        return (gate * self.out_proj(c.to(x.dtype)).float()).to(x.dtype), new_state

    monkeypatch.setattr(LatentMemory, "forward", leaky_forward)
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 3 * SEGMENT), generator=torch.Generator().manual_seed(3))
    past, _ = past_and_future_change(model, ids, SEGMENT - 1)
    assert past > 1e-5, "a memory written over the whole sequence before reading must be detected as a leak"


def test_loss_gradient_at_a_position_ignores_later_tokens():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (1, 2 * SEGMENT + 3), generator=torch.Generator().manual_seed(4))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    t = SEGMENT + 2
    F.cross_entropy(logits[0, t : t + 1], ids[0, t + 1 : t + 2]).backward()
    assert embeds.grad[0, t + 1 :].abs().max().item() == 0.0
    assert embeds.grad[0, : t + 1].abs().max().item() > 0.0
