import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It is chosen when a kernel is
# defined, so this must happen before `kernels.efla_triton` / `kernels.gla_triton` are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import quasar


def tiny_model(seed: int = 0, **overrides) -> quasar.QuasarForCausalLM:
    """The `tiny` preset with every part switched on and the memory read gate open, so that the
    memory visibly affects the logits (at its near-closed init a leak could hide under tolerance)."""
    torch.manual_seed(seed)
    settings = dict(memory_read_gate_bias_init=0.0, memory_write_rate_init=0.5)
    settings.update(overrides)
    return quasar.QuasarForCausalLM(quasar.QuasarConfig.from_preset("tiny", **settings)).eval()


@pytest.fixture
def model() -> quasar.QuasarForCausalLM:
    return tiny_model()
