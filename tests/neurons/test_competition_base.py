"""`--competition.base`: the published model as the competition's starting point and architecture.

The base here is the tiny published-format fixture (`../shared/fixtures/published-quasar-tiny/`):
validators take their fixed fields from it, miners import it once and start from it, and the
imported checkpoint passes the validator's pre-checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.cliconfig import ConfigError
from neurons import node
from neurons.commitment import Commitment
from neurons.competition_base import BaseError, base_checkpoint, base_config, imported_dir
from neurons.config import MinerConfig, ValidatorConfig, parse_config
from neurons.store import content_hash
from neurons.verify import verify_checkpoint
from quasar import QuasarConfig
from quasar.checkpoint import config_differences, load_checkpoint
from tests.fixtures import PUBLISHED_TINY

FIXTURE = PUBLISHED_TINY  # tests/fixtures: a copy of ../shared/fixtures


def settings(model, tmp_path: Path, *extra: str):
    return parse_config(
        model, ["--root", str(tmp_path / "root"), "--competition.base", str(FIXTURE), *extra], "prog", "t"
    )


def test_validator_takes_its_fixed_fields_from_the_base(tmp_path):
    cfg = settings(ValidatorConfig, tmp_path)
    reference = node.reference_config(cfg, tokenizer_size=200)
    assert (
        reference.vocab_size,
        reference.hidden_size,
        reference.num_hidden_layers,
        reference.layer_pattern,
    ) == (256, 64, 6, "QQQQGG")
    competition = node.competition(cfg, 200)
    assert competition.fixed_fields == {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "layer_pattern": "QQQQGG",
    }
    assert not (tmp_path / "root" / "base").exists()  # a validator reads the config, imports nothing


def test_a_tokenizer_larger_than_the_base_vocabulary_is_refused(tmp_path):
    cfg = settings(ValidatorConfig, tmp_path)
    with pytest.raises(BaseError, match="257 tokens but the base's vocabulary has 256 rows"):
        node.reference_config(cfg, tokenizer_size=257)


def test_miner_imports_the_base_once_and_it_passes_the_validators_prechecks(tmp_path):
    cfg = settings(MinerConfig, tmp_path)
    path = base_checkpoint(cfg)
    assert path == imported_dir(cfg) and path.parent == tmp_path / "root" / "base"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert base_checkpoint(cfg) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    model = load_checkpoint(path)
    assert config_differences(model.config, base_config(cfg)) == []

    validator = settings(ValidatorConfig, tmp_path)
    competition = node.competition(validator, 200)
    commitment = Commitment.for_checkpoint("local", "m", "0" * 40, content_hash(path), "5A")
    verdict = verify_checkpoint(path, commitment, "5A", competition)
    assert verdict.ok, verdict.reason
    assert verdict.parameters == model.parameter_counts()["total"]


def test_an_own_format_base_is_used_as_is(tmp_path):
    ours = tmp_path / "ours"
    from quasar import QuasarForCausalLM
    from quasar.checkpoint import save_checkpoint

    save_checkpoint(QuasarForCausalLM(QuasarConfig.from_preset("tiny")), ours)
    cfg = parse_config(
        MinerConfig, ["--root", str(tmp_path / "root"), "--competition.base", str(ours)], "prog", "t"
    )
    assert base_checkpoint(cfg) == ours and base_config(cfg).layer_pattern == "QG"


def test_hub_bases_need_a_pinned_revision_and_bad_bases_say_why(tmp_path):
    cfg = parse_config(
        MinerConfig,
        ["--root", str(tmp_path), "--competition.base", "silx-ai/Quasar-3B-A1B-Preview"],
        "p",
        "t",
    )
    with pytest.raises(BaseError, match="base_revision with the full 40-character commit sha"):
        base_config(cfg)
    cfg = parse_config(
        MinerConfig, ["--root", str(tmp_path), "--competition.base", str(tmp_path / "nowhere")], "p", "t"
    )
    with pytest.raises(BaseError, match="no such directory"):
        base_config(cfg)
    cfg = parse_config(
        MinerConfig,
        [
            "--root",
            str(tmp_path),
            "--competition.base",
            str(FIXTURE),
            "--competition.base_revision",
            "0" * 40,
        ],
        "p",
        "t",
    )
    with pytest.raises(BaseError, match="local directory"):
        base_config(cfg)


def test_presets_grow_their_vocabulary_to_the_tokenizer(tmp_path):
    # Real vocabularies are padded: Qwen3.5's 248,077 tokens in the presets' 248,320 rows.
    assert QuasarConfig.for_tokenizer("published-3b-a1b", 248_077).vocab_size == 248_320
    assert QuasarConfig.for_tokenizer("tiny", 512).vocab_size == 512  # the dev kit's tokenizer
    cfg = parse_config(ValidatorConfig, ["--root", str(tmp_path), "--competition.preset", "3b-a1b"], "p", "t")
    assert node.competition(cfg, 248_077).fixed_fields["vocab_size"] == 248_320


def test_off_the_embedded_chain_the_tokenizer_defaults_to_qwen35(qwen35_dir, tmp_path):
    flags = [
        "--root",
        str(tmp_path),
        "--subtensor.network",
        "finney",
        "--teacher.kind",
        "hf",
        "--teacher.model",
        "t",
    ]
    cfg = parse_config(MinerConfig, flags, "prog", "t")
    assert Path(node.competition_tokenizer(cfg, None)) == qwen35_dir
    named = parse_config(MinerConfig, [*flags, "--competition.tokenizer", "qwen3"], "prog", "t")
    assert (Path(node.competition_tokenizer(named, None)) / "tokenizer.json").is_file()
    (tmp_path / "tok").mkdir()
    given = parse_config(MinerConfig, [*flags, "--competition.tokenizer", str(tmp_path / "tok")], "prog", "t")
    assert node.competition_tokenizer(given, None) == str(tmp_path / "tok")
    absent = parse_config(MinerConfig, [*flags, "--competition.tokenizer", str(tmp_path / "no")], "prog", "t")
    with pytest.raises(ConfigError, match="does not exist"):
        node.competition_tokenizer(absent, None)
