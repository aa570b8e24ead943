"""The whole model on the Triton kernels (compiled on CUDA, interpreted on CPU) against the torch path."""

import torch

from tests.conftest import tiny_model


def test_model_on_triton_kernels_matches_torch_kernels_in_logits_gradients_and_streaming():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = tiny_model(0, attention_backend="torch").to(device)
    model = tiny_model(0, attention_backend="triton").to(device)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(0)).to(device)

    losses = []
    for m in (reference, model):
        m.zero_grad()
        out = m(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        err = (p.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)
        assert err <= 8e-3, f"gradient of {name}: relative error {err:.2e}"

    # streaming with the cache through the Triton kernels equals one pass on the torch kernels
    with torch.no_grad():
        full = reference(ids).logits
        cache, parts = None, []
        for chunk in ids.split(30, dim=1):
            out = model(chunk, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits)
    streamed = torch.cat(parts, dim=1)
    err = (streamed - full).norm() / full.norm()
    assert err <= 5e-3, f"streamed logits on triton vs one pass on torch: relative error {err:.2e}"
