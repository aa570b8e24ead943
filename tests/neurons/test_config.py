"""The neurons' settings: Bittensor-style flags, defaults that need no flags on the embedded chain,
defaults < YAML < environment < flags, and errors that name the flag or variable at fault."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cliconfig import ConfigError, build_layered_config
from neurons.config import ENV_PREFIX, MinerConfig, ValidatorConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
BITTENSOR_FLAGS = (
    "--netuid",
    "--wallet.name",
    "--wallet.hotkey",
    "--wallet.path",
    "--subtensor.network",
    "--subtensor.chain_endpoint",
    "--logging.debug",
)


@pytest.fixture(autouse=True)
def no_q24_environment(monkeypatch):
    """The tests see only the Q24_ variables they set themselves."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _parse(model, argv):
    return parse_config(model, argv, "prog", "test")


def _exit_message(model, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        _parse(model, argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_defaults_need_no_flags_on_the_embedded_chain() -> None:
    miner = _parse(MinerConfig, [])
    assert miner.netuid == 24 and miner.subtensor.network == "embedded" and miner.subtensor.embedded
    assert (miner.wallet.name, miner.wallet.hotkey) == ("default", "default")
    assert miner.teacher is None and miner.competition.tokenizer is None  # the dev kit stands in
    assert miner.store_kind == "local" and miner.max_rounds is None
    assert miner.root_path == Path("~/.quasar-sn24").expanduser()
    validator = _parse(ValidatorConfig, [])
    assert validator.subtensor.embedded and validator.store_kind == "local"
    assert (miner.telemetry.port, validator.telemetry.port) == (9100, 9200)  # both fit on one host
    # a chain endpoint leaves the embedded chain even with the default network
    assert not MinerConfig.model_validate(
        {
            "subtensor": {"chain_endpoint": "ws://127.0.0.1:9944"},
            "teacher": {"kind": "hf", "model": "t"},
            "competition": {"tokenizer": "tok"},
        }
    ).subtensor.embedded


def test_flags_beat_environment_beat_yaml_beat_defaults(tmp_path) -> None:
    yaml = tmp_path / "node.yaml"
    yaml.write_text(
        "netuid: 5\n"
        "wallet: {name: from-yaml, hotkey: hot-yaml}\n"
        "train: {steps_per_round: 7, lr: 0.5}\n"
        "logging: {debug: false}\n"
    )
    environ = {
        "Q24_NETUID": "6",
        "Q24_WALLET__NAME": "from-env",
        "Q24_TRAIN__LR": "0.25",
        "Q24_LOGGING__DEBUG": "true",
        "Q24_TRAIN__SOURCES": "[a.txt, b.txt]",
        "Q24_SUBTENSOR__NETWORK": "embedded",
        "OTHER_VARIABLE": "ignored",
    }
    flags = argparse.Namespace(**{"wallet.name": "from-flag", "train.lr": 0.125})
    cfg = build_layered_config(
        MinerConfig, flags, yaml_path=str(yaml), env_prefix=ENV_PREFIX, environ=environ
    )
    assert cfg.wallet.name == "from-flag"  # flag > env > yaml
    assert cfg.train.lr == 0.125  # flag > env > yaml
    assert cfg.netuid == 6  # env > yaml, read as an integer
    assert cfg.logging.debug is True  # env > yaml, read as a boolean
    assert cfg.train.sources == ["a.txt", "b.txt"]  # env, read as a list
    assert cfg.wallet.hotkey == "hot-yaml" and cfg.train.steps_per_round == 7  # yaml > defaults
    assert cfg.wallet.path == "~/.bittensor/wallets" and cfg.train.k == 32  # defaults
    # without the environment, YAML wins over the defaults; without either, the defaults
    cfg = build_layered_config(
        MinerConfig, argparse.Namespace(), yaml_path=str(yaml), env_prefix=ENV_PREFIX, environ={}
    )
    assert (cfg.netuid, cfg.wallet.name, cfg.train.lr) == (5, "from-yaml", 0.5)
    # a text field keeps the variable's text as is (no YAML reading of "123" or "on")
    cfg = build_layered_config(
        MinerConfig, argparse.Namespace(), env_prefix=ENV_PREFIX, environ={"Q24_WALLET__HOTKEY": "123"}
    )
    assert cfg.wallet.hotkey == "123"


def test_the_entry_point_parser_reads_yaml_environment_and_flags(tmp_path, monkeypatch) -> None:
    yaml = tmp_path / "v.yaml"
    yaml.write_text("kl: {prompts: 8}\nwallet: {name: yaml-wallet}\nscoring: {margin: 0.05}\n")
    monkeypatch.setenv("Q24_KL__PROMPTS", "12")
    monkeypatch.setenv("Q24_WALLET__HOTKEY", "env-hotkey")
    cfg = _parse(ValidatorConfig, ["--config", str(yaml), "--kl.prompts", "16", "--logging.debug"])
    assert cfg.kl.prompts == 16 and cfg.logging.debug is True
    assert cfg.wallet.hotkey == "env-hotkey" and cfg.wallet.name == "yaml-wallet"
    assert cfg.scoring.margin == 0.05
    monkeypatch.delenv("Q24_KL__PROMPTS")
    assert _parse(ValidatorConfig, ["--config", str(yaml)]).kl.prompts == 8


def test_an_environment_variable_typo_is_an_error_naming_it(monkeypatch, capsys) -> None:
    with pytest.raises(ConfigError) as info:
        build_layered_config(
            MinerConfig, argparse.Namespace(), env_prefix=ENV_PREFIX, environ={"Q24_WALET__NAME": "alice"}
        )
    assert str(info.value).startswith("unknown environment variable(s) Q24_WALET__NAME;")
    monkeypatch.setenv("Q24_WALET__NAME", "alice")
    assert "unknown environment variable(s) Q24_WALET__NAME" in _exit_message(MinerConfig, [], capsys)
    monkeypatch.delenv("Q24_WALET__NAME")
    # a known variable with a bad value names the flag; an unreadable one names the variable
    monkeypatch.setenv("Q24_NETUID", "70000")
    assert "--netuid" in _exit_message(MinerConfig, [], capsys)
    monkeypatch.setenv("Q24_NETUID", "[1,")
    assert "Q24_NETUID" in _exit_message(MinerConfig, [], capsys)


@pytest.mark.parametrize(
    ("argv", "flag", "words"),
    [
        (["--netuid", "70000"], "--netuid", "less than or equal to 65535"),
        (["--netuid", "-1"], "--netuid", "greater than or equal to 0"),
        (["--subtensor.network", "mainnet"], "--subtensor.network", "expected one of finney"),
        (["--subtensor.chain_endpoint", "http://host:9944"], "--subtensor.chain_endpoint", "ws://"),
        (["--wallet.name", "my wallet"], "--wallet.name", "got 'my wallet'"),
        (["--wallet.hotkey", "../../etc"], "--wallet.hotkey", "letters, digits"),
        (["--train.steps_per_round", "0"], "--train.steps_per_round", "greater than or equal to 1"),
    ],
)
def test_bad_values_are_errors_naming_the_flag(argv, flag, words, capsys) -> None:
    message = _exit_message(MinerConfig, argv, capsys)
    assert f"  {flag}: " in message and words in message, message


def test_bad_yaml_is_an_error_naming_the_file_or_the_setting(tmp_path, capsys) -> None:
    assert "does not exist" in _exit_message(MinerConfig, ["--config", str(tmp_path / "no.yaml")], capsys)
    typo = tmp_path / "typo.yaml"
    typo.write_text("wallet: {nmae: alice}\n")
    assert "--wallet.nmae: Extra inputs are not permitted" in _exit_message(
        MinerConfig, ["--config", str(typo)], capsys
    )


def test_a_real_network_needs_a_teacher_and_defaults_the_tokenizer(capsys) -> None:
    message = _exit_message(ValidatorConfig, ["--subtensor.network", "finney"], capsys)
    assert "on network finney give --teacher.kind/--teacher.model (" in message
    endpoint = [
        "--subtensor.chain_endpoint",
        "wss://node:443",
        "--teacher.kind",
        "hf",
        "--teacher.model",
        "t",
    ]
    cfg = _parse(MinerConfig, endpoint)  # the tokenizer defaults to the built-in Qwen3.5 one
    assert cfg.competition.tokenizer is None and cfg.store_kind == "hf" and not cfg.subtensor.embedded
    cfg = _parse(MinerConfig, [*endpoint, "--competition.tokenizer", "/tok"])
    assert cfg.competition.tokenizer == "/tok" and cfg.teacher.model == "t"
    # the local store cannot be shared off the embedded chain
    assert "use --store.kind hf" in _exit_message(MinerConfig, [*endpoint, "--store.kind", "local"], capsys)


def test_competition_base_and_preset_are_exclusive(capsys) -> None:
    message = _exit_message(MinerConfig, ["--competition.base", "/b", "--competition.preset", "tiny"], capsys)
    assert "give --competition.base or --competition.preset, not both" in message
    message = _exit_message(MinerConfig, ["--competition.base_revision", "0" * 40], capsys)
    assert "--competition.base_revision needs --competition.base" in message
    cfg = _parse(MinerConfig, ["--competition.preset", "published-3b-a1b"])
    assert cfg.competition.preset_name == "published-3b-a1b"
    assert _parse(MinerConfig, []).competition.preset_name == "tiny"


def test_a_bad_flag_exits_2_naming_it(capsys) -> None:
    from neurons import miner, validator

    for main in (miner.main, validator.main):
        with pytest.raises(SystemExit) as info:
            main(["--wallet.nmae", "alice"])
        assert info.value.code == 2
        assert "unrecognized arguments: --wallet.nmae" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        miner.main(["--netuid", "twenty-four"])
    assert info.value.code == 2
    assert "argument --netuid: invalid int value: 'twenty-four'" in capsys.readouterr().err


def test_help_of_both_entry_points_lists_the_bittensor_flags() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    runs = {
        role: subprocess.Popen(
            [sys.executable, f"neurons/{role}.py", "--help"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("miner", "validator")
    }
    for role, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert f"usage: python neurons/{role}.py" in out
        for flag in BITTENSOR_FLAGS:
            assert flag in out, (role, flag)
        assert "--no-logging.debug" in out and "Q24_WALLET__NAME" in out
        assert ("--train.steps_per_round" in out) == (role == "miner")
        assert ("--scoring.margin" in out) == (role == "validator")


def test_validator_keeps_its_own_port_when_other_telemetry_fields_are_set() -> None:
    assert ValidatorConfig().telemetry.port == 9200
    assert ValidatorConfig(telemetry={"host": "0.0.0.0"}).telemetry.port == 9200
    assert MinerConfig(telemetry={"host": "0.0.0.0"}).telemetry.port == 9100
