"""The validator's judgement of one submission: every kind of bad upload is rejected with its code
and a reason the miner can act on (and never raises), copies are attributed to the earliest
committer, a slow model times out, a good one is scored; rejections are remembered per commitment
and the state survives a restart."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from neurons import node
from neurons.chain import ChainUnavailable
from neurons.commitment import Commitment
from neurons.config import ValidatorConfig
from neurons.state import StateError, StateStore
from neurons.store import content_hash
from neurons.validator_loop import Validator
from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import save_checkpoint
from tests.neurons.devkit_cache import install_devkit

PROMPTS = 4


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    root = tmp_path_factory.mktemp("validator-root")
    install_devkit(root, tmp_path_factory)
    cfg = ValidatorConfig.model_validate(
        {
            "root": str(root),
            "wallet": {"name": "val"},
            "device": "cpu",
            "kl": {"prompts": PROMPTS, "prompt_tokens": 32, "score_from": 4},
            "longctx": {"samples": 1, "lengths": "1k", "tasks": "niah_single"},
            "telemetry": {"port": -1},
        }
    )
    v = Validator(cfg, stopper=node.Stopper(threading.Event()))
    v.start_round()
    yield v
    v.close()


@pytest.fixture(scope="module")
def prompts(validator):
    return validator.round_prompts(validator.state.current)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def _model(vocab: int, seed: int, **overrides) -> QuasarForCausalLM:
    torch.manual_seed(seed)
    return QuasarForCausalLM(QuasarConfig.from_preset("tiny", **{"vocab_size": vocab, **overrides}))


def _checkpoint(v: Validator, workdir, name: str, seed: int, **overrides):
    return save_checkpoint(_model(len(v.tokenizer), seed, **overrides), workdir / name)


def _edit_weights(path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _publish(v: Validator, path, hotkey: str, repo: str | None = None) -> str:
    """Upload `path` to the validator's local store and return `hotkey`'s commitment string."""
    repo = repo or hotkey
    revision = v.store.upload(path, repo)
    return Commitment.for_checkpoint("local", repo, revision, content_hash(path), hotkey).encode()


def _judge(v: Validator, prompts, hotkey: str, data: str, block: int = 10, uid: int = 1):
    return v.judge(v.state.current, hotkey, uid, block, data, prompts)


def _rejected(result, code: str, words: str) -> None:
    assert (result.status, result.code) == ("rejected", code), result
    assert words in result.reason, result.reason
    assert result.kl == [] and result.longctx == []


# -- rejections --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("hello", "does not start with 'q24:'"),
        ("q24:9:local:a:b:c", "unsupported q24 protocol version"),
        ("q24:1:local:a:b:c", "version 1 is retired"),
        ("q24:2:local:alice", "expected 6 ':'-separated fields"),
        ("q24:2:local:alice:" + "z" * 40 + ":" + "0" * 32, "revision must be 40 lowercase hex"),
        ("q24:2:hf:alice/q:" + "a" * 40 + ":" + "0" * 32, "points at a hf store; this subnet uses local"),
    ],
)
def test_a_malformed_commitment_is_rejected_as_format(validator, prompts, data, words) -> None:
    result = _judge(validator, prompts, "5Format", data)
    _rejected(result, "FORMAT", words)
    assert result.hotkey == "5Format" and result.data == data


def test_a_revision_never_published_is_pending_within_the_grace_then_rejected(validator, prompts) -> None:
    data = Commitment("local", "5Ghost", "a" * 40, "0" * 32).encode()
    now = validator.chain.current_block()
    grace = validator.cfg.scoring.publish_grace_blocks
    fresh = _judge(validator, prompts, "5Ghost", data, block=now)
    assert (fresh.status, fresh.code) == ("pending", "UNPUBLISHED"), fresh
    assert f"5Ghost|{data}" not in validator.state.verdicts  # committed before publishing: retried
    late = _judge(validator, prompts, "5Ghost", data, block=now - grace - 1)
    _rejected(late, "DOWNLOAD", f"still not downloadable {grace + 1} blocks after its commitment")


def test_an_oversized_checkpoint_is_rejected_before_download(
    validator, prompts, workdir, monkeypatch
) -> None:
    data = _publish(validator, _checkpoint(validator, workdir, "big", seed=11), "5Big")
    monkeypatch.setattr(
        validator, "competition", dataclasses.replace(validator.competition, max_download_bytes=10_000)
    )
    _rejected(_judge(validator, prompts, "5Big", data), "DOWNLOAD", "over the limit of 0.0 MiB")
    revision = data.split(":")[4]
    assert not list((validator.dir / "downloads").glob(f"*{revision}*"))  # nothing was fetched


def test_a_pickle_instead_of_safetensors_is_rejected(validator, prompts, workdir) -> None:
    path = _checkpoint(validator, workdir, "pickled", seed=12)
    torch.save(_model(len(validator.tokenizer), 12).state_dict(), path / "pytorch_model.bin")
    # only pickles: the store refuses to serve the folder
    (path / "model.safetensors").unlink()
    revision = "b" * 40
    shutil.copytree(path, validator.store.root / "5Pickle" / revision)
    data = Commitment("local", "5Pickle", revision, "0" * 32).encode()
    _rejected(_judge(validator, prompts, "5Pickle", data), "DOWNLOAD", "not allowed: pytorch_model.bin")
    # safetensors with a pickle beside them: refused as well, before anything is loaded
    revision = "c" * 40
    shutil.copytree(path, validator.store.root / "5Pickle2" / revision)
    save_checkpoint(_model(len(validator.tokenizer), 12), workdir / "pickled-st")
    shutil.copy(workdir / "pickled-st" / "model.safetensors", validator.store.root / "5Pickle2" / revision)
    data = Commitment("local", "5Pickle2", revision, "0" * 32).encode()
    _rejected(_judge(validator, prompts, "5Pickle2", data), "DOWNLOAD", "not allowed: pytorch_model.bin")


def test_nan_weights_are_rejected(validator, prompts, workdir) -> None:
    path = _checkpoint(validator, workdir, "nan", seed=13)
    _edit_weights(path, lambda s: s["model.norm.weight"].fill_(float("nan")))
    _rejected(
        _judge(validator, prompts, "5Nan", _publish(validator, path, "5Nan")), "WEIGHTS", "NaN or infinite"
    )


def test_a_wrongly_shaped_tensor_is_rejected(validator, prompts, workdir) -> None:
    path = _checkpoint(validator, workdir, "shape", seed=14)
    _edit_weights(path, lambda s: s.__setitem__("model.norm.weight", torch.ones(3)))
    _rejected(
        _judge(validator, prompts, "5Shape", _publish(validator, path, "5Shape")), "WEIGHTS", "has shape"
    )


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"vocab_size": 1024}, "vocab_size is 1024, the competition requires 512"),
        ({"hidden_size": 128}, "hidden_size is 128, the competition requires 64"),
        ({"num_hidden_layers": 4}, "num_hidden_layers is 4, the competition requires 2"),
    ],
)
def test_a_config_of_another_architecture_is_rejected(validator, prompts, workdir, overrides, words) -> None:
    name = "config-" + "-".join(overrides)
    path = _checkpoint(validator, workdir, name, seed=15, **overrides)
    _rejected(_judge(validator, prompts, "5Config", _publish(validator, path, name)), "CONFIG", words)


def test_a_model_over_the_parameter_budget_is_rejected(validator, prompts, workdir, monkeypatch) -> None:
    budget = _model(len(validator.tokenizer), 0).parameter_counts()["total"]
    monkeypatch.setattr(
        validator, "competition", dataclasses.replace(validator.competition, max_parameters=budget)
    )
    path = _checkpoint(validator, workdir, "wide", seed=16, intermediate_size=512)  # not a fixed field
    _rejected(
        _judge(validator, prompts, "5Wide", _publish(validator, path, "5Wide")), "BUDGET", "over the budget"
    )


def test_a_binding_for_another_hotkey_is_rejected(validator, prompts, workdir) -> None:
    path = _checkpoint(validator, workdir, "bound", seed=17)
    data = _publish(validator, path, "5Owner")  # bound to 5Owner, committed by 5Mallory
    _rejected(_judge(validator, prompts, "5Mallory", data), "BINDING", "not committed by this hotkey")


def test_an_evaluation_crash_scores_zero_and_does_not_raise(validator, prompts, workdir, monkeypatch) -> None:
    data = _publish(validator, _checkpoint(validator, workdir, "crash", seed=18), "5Crash")

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("neurons.validator_loop.verify_checkpoint", boom)
    result = _judge(validator, prompts, "5Crash", data)
    assert (result.status, result.code, result.reason) == ("error", "EVAL_ERROR", "RuntimeError: kaboom")
    assert f"5Crash|{data}" not in validator.state.verdicts  # not held against the miner next round

    def unavailable(*args, **kwargs):
        raise ChainUnavailable("node gone")

    monkeypatch.setattr("neurons.validator_loop.verify_checkpoint", unavailable)
    with pytest.raises(ChainUnavailable):  # the validator's own trouble is not the miner's fault
        _judge(validator, prompts, "5Crash", data)


# -- scoring, copies, timeouts -----------------------------------------------------------------------


def test_a_good_checkpoint_is_scored_and_copies_belong_to_the_earliest(validator, prompts, workdir) -> None:
    original = _checkpoint(validator, workdir, "original", seed=0)
    good = _judge(validator, prompts, "5Alice", _publish(validator, original, "5Alice"), block=10)
    assert good.status == "ok" and good.code == "" and good.copy_of is None, good
    assert len(good.kl) == PROMPTS and np.isfinite(good.kl).all() and min(good.kl) > 0
    assert good.mean_kl < validator.cfg.kl.max_kl
    assert len(good.longctx) == 1 and 0.0 <= good.longctx[0] <= 1.0
    assert good.content_hash == content_hash(original)

    # the same files under another hotkey (its own binding, its own repo): a copy
    exact = _judge(validator, prompts, "5Bob", _publish(validator, original, "5Bob"), block=20)
    assert (exact.status, exact.code, exact.copy_of) == ("copy", "COPY", "5Alice"), exact
    assert "block 10" in exact.reason and exact.kl == []

    # the weights plus 1e-5 noise: another content hash, the same fingerprint
    noisy = workdir / "noisy"
    shutil.copytree(original, noisy)
    gen = torch.Generator().manual_seed(5)
    _edit_weights(
        noisy, lambda s: s.update({k: v + 1e-5 * torch.randn(v.shape, generator=gen) for k, v in s.items()})
    )
    assert content_hash(noisy) != content_hash(original)
    near = _judge(validator, prompts, "5Carol", _publish(validator, noisy, "5Carol"), block=30)
    assert (near.status, near.code, near.copy_of) == ("copy", "COPY", "5Alice"), near


def test_copy_attribution_does_not_depend_on_the_judging_order(
    validator, prompts, workdir, monkeypatch
) -> None:
    monkeypatch.setattr(validator.cfg.longctx, "samples", 0)  # KL is enough here
    path = _checkpoint(validator, workdir, "erin", seed=21)
    copier, owner = _publish(validator, path, "5Finn"), _publish(validator, path, "5Erin")
    # the later copy is seen first (nothing to compare it with yet), then its earlier original
    assert _judge(validator, prompts, "5Finn", copier, block=50).status == "ok"
    first = _judge(validator, prompts, "5Erin", owner, block=40)
    assert first.status == "ok" and first.copy_of is None
    again = _judge(validator, prompts, "5Finn", copier, block=50)
    assert (again.status, again.copy_of) == ("copy", "5Erin"), again
    assert _judge(validator, prompts, "5Erin", owner, block=40).status == "ok"  # the owner stays the owner


def test_a_slow_model_times_out(validator, prompts, workdir, monkeypatch) -> None:
    data = _publish(validator, _checkpoint(validator, workdir, "slow", seed=22), "5Slow")
    monkeypatch.setattr(validator.cfg.scoring, "time_budget_s", 1e-4)
    result = _judge(validator, prompts, "5Slow", data)
    assert (result.status, result.code) == ("timeout", "SLOW"), result
    assert "time budget" in result.reason or "did not finish" in result.reason
    assert f"5Slow|{data}" not in validator.state.verdicts  # may be faster on another round


@pytest.mark.parametrize(
    ("suite_status", "message", "status"),
    [
        ("error", "RuntimeError: shape mismatch in the worker", "error"),
        ("load_error", "worker died (exit code -9)", "error"),
        ("timeout", "time budget of 3s spent", "timeout"),
    ],
)
def test_a_long_context_failure_keeps_the_kl_and_says_what_happened(
    validator, prompts, workdir, monkeypatch, suite_status, message, status
) -> None:
    from types import SimpleNamespace

    def suite(predictor, tokenizer, cfg, **kwargs):
        samples = [SimpleNamespace(score=1.0)]
        return SimpleNamespace(status=suite_status, message=message, samples=samples, score=1.0)

    monkeypatch.setattr("validator_tasks.runner.evaluate", suite)
    hotkey = f"5Long-{suite_status}"
    data = _publish(validator, _checkpoint(validator, workdir, hotkey, seed=30 + len(suite_status)), hotkey)
    result = _judge(validator, prompts, hotkey, data)
    assert (result.status, result.code) == (status, "LONGCTX"), result
    assert result.reason == f"long-context suite {suite_status}: {message}"
    assert len(result.kl) == PROMPTS and result.longctx == [1.0]


# -- memory ------------------------------------------------------------------------------------------


def test_a_rejection_is_remembered_per_commitment_without_downloading_again(
    validator, prompts, workdir, monkeypatch
) -> None:
    path = _checkpoint(validator, workdir, "remembered", seed=23)
    _edit_weights(path, lambda s: s["model.norm.weight"].fill_(float("inf")))
    data = _publish(validator, path, "5Again")
    first = _judge(validator, prompts, "5Again", data, block=60, uid=3)
    _rejected(first, "WEIGHTS", "NaN or infinite")
    assert validator.state.verdicts[f"5Again|{data}"] == first
    # the upload and the validator's copy are gone, and downloading would fail: the verdict stands
    shutil.rmtree(validator.store.root / "5Again")
    shutil.rmtree(validator.dir / "downloads" / f"5Again@{data.split(':')[4]}")
    calls, download = [], validator.store.download

    def spy(repo, revision, *args, **kwargs):
        calls.append((repo, revision))
        return download(repo, revision, *args, **kwargs)

    monkeypatch.setattr(validator.store, "download", spy)
    again = _judge(validator, prompts, "5Again", data, block=61, uid=4)
    assert calls == []
    assert (again.status, again.code, again.reason) == (first.status, first.code, first.reason)
    assert (again.uid, again.block) == (4, 61)
    # another commitment of the same hotkey is judged afresh
    fresh = Commitment("local", "5Again", "d" * 40, "0" * 32).encode()
    assert _judge(validator, prompts, "5Again", fresh).code == "UNPUBLISHED"  # not there yet
    assert calls == [("5Again", "d" * 40)]


def test_the_state_file_round_trips(validator, prompts, workdir, tmp_path, monkeypatch) -> None:
    _judge(validator, prompts, "5Format", "garbage")
    monkeypatch.setattr(validator.cfg.scoring, "time_budget_s", 1e-4)  # checked and owned, not scored
    _judge(
        validator, prompts, "5Kept", _publish(validator, _checkpoint(validator, workdir, "kept", 24), "5Kept")
    )
    validator.save()
    store = StateStore(validator.dir)
    loaded = store.load(validator.cfg.netuid, validator.chain.hotkey)
    assert loaded == validator.state
    assert loaded.current is not None and loaded.current.seed == validator.state.current.seed
    assert "5Format|garbage" in loaded.verdicts  # rejections survive
    assert any(o.hotkey == "5Kept" for o in loaded.origins.values())  # and so do the owners of weights
    with pytest.raises(StateError, match="belongs to hotkey"):
        store.load(validator.cfg.netuid, "someone-else")
    broken = StateStore(tmp_path)
    tmp_path.joinpath("state.json").write_text(json.dumps({"format": "q24-validator-state/1", "netuid": "x"}))
    with pytest.raises(StateError, match="move it away"):
        broken.load(24, "v")
    assert StateStore(tmp_path / "fresh").load(24, "v").moving_average == {}


def test_a_store_outage_is_an_uncached_error_not_a_rejection(
    validator, prompts, workdir, monkeypatch
) -> None:
    from neurons.store import StoreUnavailable

    data = _publish(validator, _checkpoint(validator, workdir, "outage", seed=31), "5Outage")

    def down(*args, **kwargs):
        raise StoreUnavailable("download of 5Outage failed: 503 Service Unavailable")

    monkeypatch.setattr(validator.store, "download", down)
    result = _judge(validator, prompts, "5Outage", data)
    assert (result.status, result.code) == ("error", "DOWNLOAD") and "503" in result.reason
    assert f"5Outage|{data}" not in validator.state.verdicts  # judged afresh next round
    monkeypatch.undo()
    assert _judge(validator, prompts, "5Outage", data).status == "ok"
