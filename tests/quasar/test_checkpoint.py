"""Checkpoints: identical logits after a round trip, strict and clear rejection of anything else."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(7)
    model.update_router_bias(torch.tensor([[10.0, 0.0, 5.0, 25.0]]))
    path = save_checkpoint(model, tmp_path / "ckpt")
    return model, path


def logits(model, seed=0):
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_gives_identical_logits_and_router_state(saved):
    model, path = saved
    loaded = load_checkpoint(path, model.config)
    assert torch.equal(logits(model), logits(loaded))
    assert torch.equal(loaded.model.router_balance.bias, model.model.router_balance.bias)
    assert torch.equal(loaded.model.router_balance.momentum, model.model.router_balance.momentum)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(hf, QuasarForCausalLM)
    assert torch.equal(logits(model), logits(hf))


def test_only_safetensors_and_config_are_written(saved):
    _, path = saved
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


@pytest.mark.parametrize(
    ("field", "value"), [("hidden_size", 128), ("num_experts", 8), ("layer_pattern", "GQ"), ("num_loops", 3)]
)
def test_config_mismatch_names_the_field(saved, field, value):
    _, path = saved
    expected = QuasarConfig.from_preset("tiny", **{field: value})
    with pytest.raises(CheckpointError, match=f"{field}: checkpoint has"):
        load_checkpoint(path, expected)


def test_runtime_fields_may_differ(saved):
    model, path = saved
    expected = QuasarConfig.from_preset("tiny", **{"attention_backend": "naive"})
    expected_arch = model.config.to_dict()
    expected_arch.update(attention_backend="naive")
    for key in ("model_type", "transformers_version", "architectures"):
        expected_arch.pop(key, None)
    loaded = load_checkpoint(path, QuasarConfig(**expected_arch))
    assert loaded.config.attention_backend == "naive"
    assert expected.attention_backend == "naive"


def _edit_weights(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


def test_wrong_shape_missing_extra_and_nan_tensors_are_rejected(saved, tmp_path):
    _, _path = saved
    name = "model.blocks.0.mixer.q_proj.weight"
    cases = {
        "has shape": lambda s: s.__setitem__(name, torch.zeros(3, 3)),
        "missing tensors": lambda s: s.pop(name),
        "unexpected tensors": lambda s: s.__setitem__("model.extra", torch.zeros(1)),
        "NaN or infinite": lambda s: s[name].__setitem__((0, 0), float("nan")),
    }
    for message, edit in cases.items():
        model = tiny_model(7)
        case_path = save_checkpoint(model, tmp_path / message.replace(" ", "_"))
        _edit_weights(case_path, edit)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(case_path, model.config)


def test_bad_configs_and_pickles_are_rejected(saved):
    _model, path = saved
    cfg_file = path / "config.json"
    original = cfg_file.read_text()

    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    cfg_file.write_text(json.dumps({**json.loads(original), "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        load_checkpoint(path)
    cfg_file.write_text(json.dumps({**json.loads(original), "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(CheckpointError, match="auto_map"):
        load_checkpoint(path)
    cfg_file.write_text(json.dumps({**json.loads(original), "num_loops": 0}))
    with pytest.raises(CheckpointError, match="num_loops"):
        load_checkpoint(path)
    cfg_file.write_text(original)

    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle-based formats are refused"):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    _model, path = saved
    before = logits(load_checkpoint(path))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(QuasarForCausalLM, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(8), path)
    assert torch.equal(logits(load_checkpoint(path)), before)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary directories left behind"
