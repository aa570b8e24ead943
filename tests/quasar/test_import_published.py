"""`python -m quasar import-published`: the published silx-ai checkpoint format becomes ours.

The reference is `../shared/fixtures/published-quasar-tiny/` (copied into tests/fixtures): a tiny checkpoint in the published
format and the logits the published modeling code computes for it (its README says how).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import CheckpointError, config_differences, load_checkpoint, save_checkpoint
from quasar.cli import main
from quasar.importer import (
    PUBLISHED_DEFAULTS,
    REPORT_KEY,
    ImportRefused,
    import_published,
    plan_import,
    published_config,
)
from tests.fixtures import PUBLISHED_TINY, PUBLISHED_TINY_ORIGINAL
from tests.quasar.published_layout import published_tensor_shapes

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = PUBLISHED_TINY  # tests/fixtures: a copy of ../shared/fixtures
PUBLISHED_3B_PARAMETERS = 2_901_843_184


def reference():
    ref = load_file(FIXTURE / "reference.safetensors")
    return ref["input_ids"], ref["logits"]


def logit_agreement(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    logits, ref = logits.double(), ref.double()
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "rel_l2": float((logits - ref).norm() / ref.norm()),
        "mean_kl": float(kl.mean()),
        "top1": float((logits.argmax(-1) == ref.argmax(-1)).double().mean()),
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The fixture imported in fp32 through the real command line."""
    out = tmp_path_factory.mktemp("imported") / "tiny"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "quasar",
            "import-published",
            str(FIXTURE),
            str(out),
            "--dtype",
            "fp32",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "134 tensors written" in proc.stdout
    # The report says what it left out and why.
    assert (
        "dropped 30 tensor(s): published latent memory" in proc.stdout and "reads the future" in proc.stdout
    )
    assert "dropped 6 tensor(s): looped-injection gate" in proc.stdout
    assert "dropped 5 tensor(s): monitoring buffer" in proc.stdout
    return out


def published_copy(tmp_path: Path, *, config=None, tensors=None) -> Path:
    """A copy of the fixture with its config.json edited by `config(dict)` and/or its tensors by `tensors(dict)`."""
    out = tmp_path / "published"
    out.mkdir()
    raw = json.loads((FIXTURE / "config.json").read_text())
    if config is not None:
        config(raw)
    (out / "config.json").write_text(json.dumps(raw))
    if tensors is None:
        shutil.copy(FIXTURE / "model.safetensors", out / "model.safetensors")
    else:
        state = load_file(FIXTURE / "model.safetensors")
        tensors(state)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


# ---- equivalence with the published forward pass ---------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_imported_fixture_matches_the_published_logits(imported, backend):
    model = QuasarForCausalLM.from_pretrained(imported).eval()
    for block in model.model.blocks:
        block.mixer.backend = backend
    ids, ref = reference()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    got = logit_agreement(logits, ref)
    # The remaining error is the published code's bf16 rounding of the mixing weights (its README: 1.6e-4).
    assert got["rel_l2"] <= 1e-3, got
    assert got["mean_kl"] <= 1e-5, got
    assert got["top1"] == 1.0, got


def test_imported_config_is_the_published_architecture(imported):
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "quasar" and "auto_map" not in config
    cfg = QuasarConfig.from_pretrained(imported)
    assert (cfg.position_mode, cfg.data_dependent_beta, cfg.use_memory) == ("none", False, False)
    assert (cfg.quasar_attention_scale, cfg.router_mixing, cfg.gla_norm_eps) == (1.0, "softmax", 1e-5)
    assert (cfg.layer_pattern, cfg.num_hidden_layers, cfg.dense_layers) == ("QQQQGG", 6, 2)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_latent_size, cfg.expert_intermediate_size) == (
        8,
        2,
        16,
        64,
    )
    with safe_open(imported / "model.safetensors", "pt") as f:
        report = json.loads(f.metadata()[REPORT_KEY])
    assert report["source"] == str(FIXTURE) and report["add_memory"] is False


def test_moe_output_halving_is_folded_into_the_output_projections(imported):
    src = load_file(FIXTURE / "model.safetensors")
    ours = load_file(imported / "model.safetensors")
    torch.testing.assert_close(
        ours["model.blocks.2.ffn.latent_up.weight"], src["model.layers.2.ffn.w_up_proj.weight"] / 2
    )
    torch.testing.assert_close(
        ours["model.blocks.2.ffn.shared_expert.down_proj.weight"],
        src["model.layers.2.ffn.shared_experts.0.down.weight"] / 2,
    )
    torch.testing.assert_close(
        ours["model.blocks.0.mixer.q_conv.weight"], src["model.layers.0.attn.q_conv1d.weight"][:, 0]
    )
    torch.testing.assert_close(ours["model.router_balance.bias"], src["model.all_moe_bias"])
    torch.testing.assert_close(ours["model.router_balance.momentum"], src["model.all_moe_momentum"])


def test_bf16_import_keeps_the_smebu_state_in_fp32(tmp_path):
    out = tmp_path / "bf16"
    assert main(["import-published", str(FIXTURE), str(out), "--no-progress"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.blocks.0.mixer.q_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.router_balance.bias").get_dtype() == "F32"
        assert f.get_slice("model.router_balance.momentum").get_dtype() == "F32"
    model = load_checkpoint(out, dtype=torch.float32)
    ids, ref = reference()
    with torch.no_grad():
        got = logit_agreement(model(ids, use_cache=False).logits, ref)
    assert got["rel_l2"] <= 2e-2 and got["top1"] >= 0.95, got  # bf16 weights


# ---- --add-memory -----------------------------------------------------------------------------------


def test_add_memory_leaves_the_logits_unchanged_and_the_memory_trainable(imported, tmp_path):
    out = tmp_path / "with-memory"
    assert (
        main(["import-published", str(FIXTURE), str(out), "--dtype", "fp32", "--add-memory", "--no-progress"])
        == 0
    )
    plain = load_checkpoint(imported)
    model = load_checkpoint(out)
    cfg = model.config
    assert cfg.use_memory and (cfg.memory_slots, cfg.memory_dim, cfg.memory_segment_size) == (16, 32, 64)
    assert all(block.memory is not None for block in model.model.blocks if block.kind == "quasar")
    ids, _ = reference()
    ids = torch.cat([ids, ids, ids], dim=1)  # 120 tokens: the memory writes a segment and is read
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, use_cache=False).logits, plain(ids, use_cache=False).logits, rtol=0, atol=0
        )

    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    grad = model.model.blocks[0].memory.out_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # distillation moves it from the first step


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(moe_type="grouped"), "moe_type='grouped'"),
        (lambda c: c.update(num_shared_experts=2), "num_shared_experts=2"),
        (lambda c: c.update(use_short_conv=False), "use_short_conv=False"),
        (lambda c: c.update(conv_bias=True), "conv_bias=True"),
        (lambda c: c.update(use_looped_injection=True), "use_looped_injection=True"),
        (lambda c: c.update(use_gla_first=True), "use_gla_first=True"),
        (lambda c: c.update(allow_neg_eigval=True), "allow_neg_eigval=True"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda c: c.update(brand_new_knob=3), "unknown field(s) brand_new_knob"),
        (lambda c: c.update(hidden_size=128), "hidden_size=128: disagrees with d_model=64"),
        (lambda c: c.update(quasar_layers=3), "hybrid_layer_types"),
    ],
)
def test_refuses_configurations_it_cannot_reproduce(tmp_path, edit, expected, capsys):
    src = published_copy(tmp_path, config=edit)
    with pytest.raises(ImportRefused, match=r"published config\.json") as err:
        import_published(str(src), tmp_path / "out", progress=False)
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["import-published", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s.update({"model.layers.0.attn.q_norm.weight": torch.ones(32)}),
            "model.layers.0.attn.q_norm.weight",
        ),
        (
            lambda s: s.pop("model.layers.3.ffn.experts_w3"),
            "missing from the checkpoint: model.layers.3.ffn.experts_w3",
        ),
        (lambda s: s.pop("lm_head.weight"), "missing from the checkpoint: lm_head.weight"),
        (
            lambda s: s.update({"model.layers.1.attn.o_proj.weight": torch.zeros(64, 32)}),
            "'model.layers.1.attn.o_proj.weight' has shape (64, 32)",
        ),
        (
            lambda s: s.update({"model.layers.5.ffn.experts_w12": torch.zeros(8, 16, 96)}),
            "'model.layers.5.ffn.experts_w12' has shape (8, 16, 96)",
        ),
    ],
)
def test_refuses_unknown_missing_and_misshaped_tensors(tmp_path, edit, expected):
    src = published_copy(tmp_path, tensors=edit)
    with pytest.raises(ImportRefused) as err:
        import_published(str(src), tmp_path / "out", progress=False)
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_non_finite_weights_and_leaves_no_partial_output(tmp_path):
    def poison(s):
        s["model.layers.5.attn.o_proj.weight"][0, 0] = float("nan")

    src = published_copy(tmp_path, tensors=poison)
    with pytest.raises(ImportRefused, match="NaN or infinite"):
        import_published(str(src), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published"]  # the temporary directory is gone


def test_refuses_to_overwrite_and_hub_ids_without_a_pinned_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ImportRefused, match="--force"):
        import_published(str(FIXTURE), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    for revision in (None, "main", "abc123"):
        with pytest.raises(ImportRefused, match="40-character commit sha"):
            import_published(
                "silx-ai/Quasar-3B-A1B-Preview", tmp_path / "hub", revision=revision, progress=False
            )
    with pytest.raises(ImportRefused, match="no such directory"):
        import_published(str(tmp_path / "absent"), tmp_path / "x", progress=False)


def test_hub_download_asks_for_config_and_safetensors_only(tmp_path, monkeypatch):
    """The Hub path fetches the pinned commit's config.json and safetensors, never code."""
    import huggingface_hub

    calls = {}
    sha = "0123456789abcdef0123456789abcdef01234567"

    class Info:
        siblings = [
            type("S", (), {"rfilename": n, "size": 1000})()
            for n in ("config.json", "model.safetensors", "modeling_quasar.py")
        ]

    class Api:
        def model_info(self, repo, revision, files_metadata):
            calls["info"] = (repo, revision)
            return Info()

    def snapshot_download(repo_id, revision, allow_patterns, cache_dir):
        calls["download"] = (repo_id, revision, allow_patterns)
        return str(FIXTURE)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    report = import_published("silx-ai/Quasar-3B-A1B-Preview", tmp_path / "out", revision=sha, progress=False)
    assert calls["info"] == ("silx-ai/Quasar-3B-A1B-Preview", sha)
    repo, revision, patterns = calls["download"]
    assert (repo, revision) == ("silx-ai/Quasar-3B-A1B-Preview", sha)
    assert not any(p.endswith(".py") or p == "*" for p in patterns)
    assert report.revision == sha and (tmp_path / "out" / "model.safetensors").is_file()


# ---- the wrong loader -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load",
    [
        QuasarForCausalLM.from_pretrained,
        AutoModelForCausalLM.from_pretrained,
        load_checkpoint,
        QuasarConfig.from_pretrained,
    ],
    ids=["QuasarForCausalLM", "AutoModelForCausalLM", "load_checkpoint", "QuasarConfig"],
)
def test_published_directories_are_refused_by_our_loaders_with_the_importer_named(load):
    with pytest.raises(ValueError, match="import-published") as err:
        load(str(FIXTURE))
    assert "published" in str(err.value)


# ---- strict from_pretrained on our own checkpoints ------------------------------------------------------


def our_checkpoint(tmp_path: Path, *, config=None, tensors=None) -> Path:
    model = QuasarForCausalLM(QuasarConfig.from_preset("tiny"))
    out = save_checkpoint(model, tmp_path / "ours")
    if config is not None:
        raw = json.loads((out / "config.json").read_text())
        config(raw)
        (out / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        state = load_file(out / "model.safetensors")
        tensors(state)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("loader", [QuasarForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("field", "no field(s) 'attention_heads_typo'"),
        ("missing", "missing tensors ['model.norm.weight']"),
        ("unexpected", "unexpected tensors ['model.extra.weight']"),
        ("shape", "'model.norm.weight' has shape (3,)"),
        ("nan", "NaN or infinite"),
        ("pickle", "no *.safetensors"),
    ],
)
def test_from_pretrained_is_strict(tmp_path, loader, kind, expected):
    edits = {
        "field": dict(config=lambda c: c.update(attention_heads_typo=4)),
        "missing": dict(tensors=lambda s: s.pop("model.norm.weight")),
        "unexpected": dict(tensors=lambda s: s.update({"model.extra.weight": torch.zeros(2)})),
        "shape": dict(tensors=lambda s: s.update({"model.norm.weight": torch.ones(3)})),
        "nan": dict(tensors=lambda s: s["model.norm.weight"].fill_(float("inf"))),
        "pickle": {},
    }
    path = our_checkpoint(tmp_path, **edits[kind])
    if kind == "pickle":
        state = load_file(path / "model.safetensors")
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        loader(str(path))
    assert expected in str(err.value)


def test_from_pretrained_still_loads_good_checkpoints(tmp_path):
    path = our_checkpoint(tmp_path)
    a, b = QuasarForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ref = load_checkpoint(path)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        for m in (a, b):
            torch.testing.assert_close(m.eval()(ids).logits, ref(ids).logits)


# ---- the full-size published shape ----------------------------------------------------------------------


def test_layout_generator_reproduces_the_fixture():
    """The dummy generator knows the published format: it gives the fixture's names and shapes exactly."""
    raw = json.loads((FIXTURE / "config.json").read_text())
    with safe_open(FIXTURE / "model.safetensors", "pt") as f:
        fixture = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert published_tensor_shapes(raw) == fixture


def test_full_size_published_checkpoint_maps_every_tensor():
    raw = {"model_type": "quasar", **PUBLISHED_DEFAULTS}
    shapes = published_tensor_shapes(raw)  # names and shapes only: nothing allocated
    buffers = {n for n in shapes if n.startswith("model.all_moe_") or n.endswith(".max_vio")}
    assert sum(math.prod(s) for n, s in shapes.items() if n not in buffers) == PUBLISHED_3B_PARAMETERS
    config = published_config(raw)
    assert config_differences(config, QuasarConfig.from_preset("published-3b-a1b")) == []
    plan = plan_import(config, shapes)  # raises on any unknown, missing or mis-shaped tensor
    mapped = {src for _, src, _, _ in plan.writes}
    assert mapped | set(plan.dropped) == set(shapes) and not mapped & set(plan.dropped)
    written = sum(math.prod(shape) for *_, shape in plan.writes)
    dropped = sum(math.prod(shapes[n]) for n in plan.dropped)
    with torch.device("meta"):
        ours = QuasarForCausalLM(QuasarConfig.from_preset("published-3b-a1b"))
    smebu = 2 * 20 * 64  # SMEBU bias and momentum: buffers [20 MoE layers, 64 experts], in both formats
    assert written == ours.parameter_counts()["total"] + smebu == 2_890_518_720 + smebu
    dropped_parameters = sum(math.prod(shapes[n]) for n in plan.dropped if n not in buffers)
    assert (
        dropped_parameters == 8 * 1_415_555 + 24
    )  # the published memory of 8 GLA layers, 24 injection gates
    assert written - smebu + dropped_parameters == PUBLISHED_3B_PARAMETERS
    assert dropped - dropped_parameters == 20 + 20  # monitoring buffers (max_vio)

    with_memory = plan_import(published_config(raw, add_memory=True), shapes)
    added = [t for t, src, _, _ in with_memory.writes if src is None]
    assert added and all(".memory." in t for t in added)


# ---- the imported model is a normal model of ours ------------------------------------------------------


def test_imported_model_streams_with_the_cache_and_round_trips(imported, tmp_path):
    model = load_checkpoint(imported)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, parts = None, []
        for chunk in ids.split([1, 63, 50, 36], dim=1):  # boundaries that are not conv- or chunk-aligned
            out = model(chunk, past_key_values=cache, use_cache=True)
            cache, parts = out.past_key_values, [*parts, out.logits]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)

    again = save_checkpoint(model, tmp_path / "again")
    reloaded = QuasarForCausalLM.from_pretrained(again).eval()
    assert config_differences(reloaded.config, model.config) == []
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, full, rtol=0, atol=0)
    generated = reloaded.generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 15)


# ---- the tokenizer beside the weights -------------------------------------------------------------------


def test_the_published_vocabulary_gets_the_qwen35_tokenizer_and_its_token_ids(qwen35_cache):
    from quasar.importer import QWEN35_ROWS, _tokenizer_for

    name, directory, ids = _tokenizer_for("auto", QWEN35_ROWS)
    assert name == "qwen3.5" and (directory / "tokenizer.json").is_file()
    # Not the published config's placeholders (bos 1, eos 2: the Qwen3.5 tokens '"' and '#').
    assert ids == {"bos_token_id": None, "eos_token_id": 248_046, "pad_token_id": 248_044}
    assert _tokenizer_for("auto", 256) == (None, None, {})


def test_a_given_tokenizer_is_written_beside_the_weights(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 20,
        trainers.BpeTrainer(vocab_size=100, special_tokens=["<eos>", "<unk>"], show_progress=False),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "import-published",
                str(FIXTURE),
                str(out),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "tokenizer.json").is_file()
    config = QuasarConfig.from_pretrained(out)
    assert (config.eos_token_id, config.bos_token_id) == (0, None)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, qwen35_cache, capsys):
    assert (
        main(
            ["import-published", str(FIXTURE), str(tmp_path / "o"), "--tokenizer", "qwen3.5", "--no-progress"]
        )
        == 2
    )
    assert "248,077 tokens do not fit the model's 256 embedding rows" in capsys.readouterr().err


@pytest.mark.skipif(
    not PUBLISHED_TINY_ORIGINAL.is_dir(), reason="the shared original is not beside this checkout"
)
def test_the_fixture_copy_is_the_original():
    import hashlib

    names = sorted(p.name for p in PUBLISHED_TINY_ORIGINAL.iterdir())
    assert sorted(p.name for p in FIXTURE.iterdir()) == names
    for name in names:
        a, b = (
            hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (FIXTURE, PUBLISHED_TINY_ORIGINAL)
        )
        assert a == b, name
