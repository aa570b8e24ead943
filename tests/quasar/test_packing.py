"""Packed documents (cu_seqlens): every document runs exactly as if it were alone."""

import pytest
import torch

from tests.conftest import tiny_model


def _separate_and_packed(model, lengths, seed=0):
    torch.manual_seed(seed)
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = model(torch.cat(docs, dim=1), cu_seqlens=cu).logits
    separate = torch.cat([model(d, use_cache=False).logits for d in docs if d.shape[1]], dim=1)
    return separate, packed


@pytest.mark.parametrize("position_mode", ["rope", "none"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_packed_equals_separate(position_mode, backend):
    # Lengths cross memory segments (16) and include 1-token and empty documents.
    model = tiny_model(position_mode=position_mode, attention_backend=backend)
    separate, packed = _separate_and_packed(model, [37, 1, 0, 16, 50])
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=2e-5)


def test_packed_gradients_equal_separate():
    model = tiny_model().train()
    lengths = [20, 33, 11]
    torch.manual_seed(1)
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, 20, 53, 64])
    model(torch.cat(docs, 1), cu_seqlens=cu).logits.square().mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(model(d, use_cache=False).logits.square().sum() for d in docs) / (
        64 * model.config.vocab_size
    )
    total.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_activation_checkpointing_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    cu = torch.tensor([0, 30, 48])
    model(ids, cu_seqlens=cu).logits.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts_plain = model.pop_router_token_counts()
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(ids, cu_seqlens=cu).logits.square().mean().backward()
    counts_ckpt = model.pop_router_token_counts()
    torch.testing.assert_close(counts_ckpt, counts_plain)  # recomputation must not count twice
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(plain[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_packed_labels_skip_document_starts():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    cu = torch.tensor([0, 10, 30])
    loss = model(ids, cu_seqlens=cu, labels=ids).loss
    a = model(ids[:, :10], use_cache=False, labels=ids[:, :10]).loss
    b = model(ids[:, 10:], use_cache=False, labels=ids[:, 10:]).loss
    torch.testing.assert_close(loss, (a * 9 + b * 19) / 28, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        (torch.tensor([0, 5, 12]), "from 0 to T"),
        (torch.tensor([0, 9, 5, 10]), "non-decreasing"),
        (torch.tensor([0.0, 10.0]), "integer"),
    ],
)
def test_bad_cu_seqlens_rejected(cu, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 10, dtype=torch.long), cu_seqlens=cu)


def test_packed_rejects_batch_and_cache():
    model = tiny_model()
    with pytest.raises(ValueError, match="batch size must be 1"):
        model(torch.zeros(2, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cannot use a cache"):
        model(torch.zeros(1, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 10]), use_cache=True)
