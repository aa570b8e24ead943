"""Our top-level package `kernels` shares its name with a Hugging Face package that transformers
probes for. Prove that transformers does not mistake ours for it and still builds, saves and loads
ordinary models."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import import_utils

import kernels


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    assert hasattr(kernels, "quasar_attention"), "the `kernels` on the path must be ours"
    assert not import_utils.is_kernels_available()


def test_transformers_builds_saves_and_loads_a_model_normally(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        out = loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16)
