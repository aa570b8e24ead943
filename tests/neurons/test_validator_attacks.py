"""Hostile miners against a real validator round on the embedded chain (tiny models, the real
worker processes): nothing a submission does stalls, starves or robs the round.

- Stall: configurations whose forward costs far more than their parameters say are refused before
  anything is loaded; one that slips through (cost checks off) is killed at the time budget or at
  the memory cap, and the honest miner is judged in the same round.
- Starve: 32 and 254 garbage commitments take no slot; the honest miner is judged in round 1.
- Rob: commit-then-publish makes the author the owner, however fast a watcher copies the upload.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from neurons import node
from neurons.chain import EmbeddedChain
from neurons.commitment import Commitment
from neurons.config import ValidatorConfig
from neurons.state import MAX_ATTEMPTS
from neurons.store import LocalStore, content_hash
from neurons.validator_loop import Validator
from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import save_checkpoint
from tests.neurons.devkit_cache import install_devkit

NETUID = 24


def make_root(tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    install_devkit(root, tmp_path_factory)
    return root


def make_validator(root: Path, **scoring) -> Validator:
    cfg = ValidatorConfig.model_validate(
        {
            "root": str(root),
            "wallet": {"name": "val"},
            "device": "cpu",
            "kl": {"prompts": 4, "prompt_tokens": 32, "score_from": 4},
            "longctx": {"samples": 0},
            "telemetry": {"port": -1},
            "scoring": {"time_budget_s": 120, **scoring.pop("scoring", {})},
            **scoring,
        }
    )
    return Validator(cfg, stopper=node.Stopper(threading.Event()))


def tiny_checkpoint(root: Path, name: str, seed: int = 0, **overrides) -> Path:
    from distill.cli import load_tokenizer

    vocab = len(load_tokenizer(str(root / "devkit" / "tokenizer")))
    torch.manual_seed(seed)
    model = QuasarForCausalLM(QuasarConfig.for_tokenizer("tiny", vocab, **overrides))
    return save_checkpoint(model, root / "handmade" / name)


def chain_for(root: Path, hotkey: str) -> EmbeddedChain:
    chain = EmbeddedChain(root / "chain.sqlite", NETUID, hotkey)
    chain.register(hotkey, f"{hotkey.split('/')[0]}-coldkey")
    return chain


def commit(root: Path, hotkey: str, data: str) -> int:
    with chain_for(root, hotkey) as chain:
        chain.advance(1)
        return chain.commit(data)


def publish_and_commit(root: Path, hotkey: str, checkpoint: Path) -> str:
    """A miner doing it the right way: stage, commit, publish."""
    store = LocalStore(root / "store")
    repo = hotkey.replace("/", ".")
    revision = store.stage(checkpoint, repo)
    data = Commitment.for_checkpoint("local", repo, revision, content_hash(checkpoint), hotkey).encode()
    commit(root, hotkey, data)
    store.publish(repo, revision)
    return data


def one_round(validator: Validator):
    try:
        validator.start_round()
        validator.run_round()
    finally:
        validator.close()
    return validator.state.last


# -- stall -------------------------------------------------------------------------------------------


def test_costly_configurations_are_refused_before_loading_and_the_honest_miner_is_judged(
    tmp_path_factory,
) -> None:
    root = make_root(tmp_path_factory, "stall-config")
    publish_and_commit(root, "loops/default", tiny_checkpoint(root, "loops", num_loops=500_000))
    memory = tiny_checkpoint(root, "memory", memory_slots=200_000, memory_dim=1, memory_segment_size=1)
    publish_and_commit(root, "memory/default", memory)
    publish_and_commit(root, "honest/default", tiny_checkpoint(root, "honest"))
    validator = make_validator(root)
    last = one_round(validator)
    results = last.results
    for hotkey, words in (("loops/default", "num_loops 500000"), ("memory/default", "memory_slots 200000")):
        r = results[hotkey]
        assert (r.status, r.code) == ("rejected", "BUDGET"), r
        assert words in r.reason and r.content_hash is None, r  # refused before hashing or loading
    # only the honest model ever ran (its fingerprint is the only one computed)
    assert [p.stem for p in validator.states.fingerprints.iterdir()] == [
        results["honest/default"].content_hash
    ]
    assert results["honest/default"].status == "ok", results["honest/default"]
    assert last.weights_block is not None


def test_a_model_that_slips_past_the_cost_check_is_stopped_at_the_budget_and_the_cap(
    tmp_path_factory,
) -> None:
    root = make_root(tmp_path_factory, "stall-worker")
    publish_and_commit(root, "slow/default", tiny_checkpoint(root, "slow", num_loops=20_000))
    hungry = tiny_checkpoint(root, "hungry", memory_slots=400_000, memory_dim=32, memory_segment_size=1)
    publish_and_commit(root, "hungry/default", hungry)
    publish_and_commit(root, "honest/default", tiny_checkpoint(root, "honest"))
    budget = 30.0
    validator = make_validator(
        root,
        scoring={"time_budget_s": budget, "worker_memory_gb": 3.0},
        competition={"max_cost_ratio": 1e12},  # the cost check off: only the worker's limits remain
    )
    results = one_round(validator).results
    slow, hungry_result = results["slow/default"], results["hungry/default"]
    assert (slow.status, slow.code) == ("timeout", "SLOW"), slow
    assert "the model process was stopped" in slow.reason
    # killed at the deadline plus the worker's grace; the rest is start-up and bookkeeping
    assert slow.seconds < budget + 5 + 30, slow.seconds
    assert (hungry_result.status, hungry_result.code) == ("rejected", "MEMORY"), hungry_result
    assert "memory cap of 3.00 GiB" in hungry_result.reason
    assert results["honest/default"].status == "ok", results["honest/default"]


def test_a_submission_the_validator_died_on_is_not_retried_forever(tmp_path_factory) -> None:
    root = make_root(tmp_path_factory, "stall-restart")
    data = publish_and_commit(root, "honest/default", tiny_checkpoint(root, "honest"))
    validator = make_validator(root)
    try:
        validator.start_round()
        current = validator.state.current
        prompts = validator.round_prompts(current)
        key = f"honest/default|{data}"
        # two earlier processes started judging it and died (the counter is saved before any work)
        current.attempts[key] = MAX_ATTEMPTS
        result = validator.judge(current, "honest/default", 1, 5, data, prompts)
        assert (result.status, result.code) == ("timeout", "STALL") and "2 times" in result.reason
        assert key not in validator.state.verdicts  # a new round tries it again, once
        current.attempts[key] = MAX_ATTEMPTS - 1
        assert validator.judge(current, "honest/default", 1, 5, data, prompts).status == "ok"
        assert key not in current.attempts  # finished: the counter is cleared
    finally:
        validator.close()


# -- starve ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sybils", [32, 254])
def test_garbage_commitments_take_no_slot(tmp_path_factory, sybils) -> None:
    root = make_root(tmp_path_factory, f"starve-{sybils}")
    for i in range(sybils):  # all committed before the honest miner
        with chain_for(root, f"sybil{i:03d}/default") as chain:
            chain.commit("garbage")
    publish_and_commit(root, "honest/default", tiny_checkpoint(root, "honest"))
    validator = make_validator(root, scoring={"max_models": 2})
    last = one_round(validator)
    assert last.planned == ["honest/default"]
    assert last.results["honest/default"].status == "ok"
    garbage = [r for h, r in last.results.items() if h.startswith("sybil")]
    assert len(garbage) == sybils and all((r.status, r.code) == ("rejected", "FORMAT") for r in garbage)
    assert last.weights_block is not None


# -- rob ---------------------------------------------------------------------------------------------


def test_commit_then_publish_makes_the_author_the_owner_of_its_weights(tmp_path_factory) -> None:
    root = make_root(tmp_path_factory, "rob")
    store = LocalStore(root / "store")
    checkpoint = tiny_checkpoint(root, "victim", seed=3)
    # the victim stages and commits; nothing is readable yet
    revision = store.stage(checkpoint, "victim")
    digest = content_hash(checkpoint)
    victim_data = Commitment.for_checkpoint("local", "victim", revision, digest, "victim/default").encode()
    commit(root, "victim/default", victim_data)
    assert not store.available("victim", revision)
    # a validator round now finds it committed but unpublished: pending, not a rejection
    validator = make_validator(root)
    first = one_round(validator)
    assert (first.results["victim/default"].status, first.results["victim/default"].code) == (
        "pending",
        "UNPUBLISHED",
    )
    assert not validator.state.verdicts
    # published; a watcher reads the weights at once and commits a pointer with its own binding
    store.publish("victim", revision)
    thief_data = Commitment.for_checkpoint("local", "victim", revision, digest, "thief/default").encode()
    commit(root, "thief/default", thief_data)
    second = one_round(make_validator(root))
    victim, thief = second.results["victim/default"], second.results["thief/default"]
    assert victim.status == "ok", victim
    assert (thief.status, thief.copy_of) == ("copy", "victim/default"), thief
    assert second.win_rates == {"victim/default": 1.0}


# -- shared root, hostile files ----------------------------------------------------------------------


def test_a_second_validator_on_the_same_root_and_hotkey_refuses_to_start(tmp_path_factory) -> None:
    from neurons.lock import NodeDirectoryLocked

    root = make_root(tmp_path_factory, "shared")
    first = make_validator(root)
    try:
        with pytest.raises(NodeDirectoryLocked, match="another validator with this wallet and hotkey"):
            make_validator(root)
        leftover = first.dir / ".tmp-state.json-abc123"
        leftover.write_text("{")
    finally:
        first.close()
    again = make_validator(root)  # the first one is gone: the directory is free, leftovers cleaned
    try:
        assert not leftover.exists()
    finally:
        again.close()


def test_a_symlink_in_a_submission_is_refused_and_nothing_is_read_through_it(tmp_path_factory) -> None:
    import os

    root = make_root(tmp_path_factory, "symlink")
    secret = root / "wallet-key"
    secret.write_text("do not leak")
    os.chmod(secret, 0o600)
    store = LocalStore(root / "store")
    checkpoint = tiny_checkpoint(root, "linked")
    revision = store.upload(checkpoint, "linked")
    (root / "store" / "linked" / revision / "tokenizer.json").symlink_to(secret)
    data = Commitment.for_checkpoint("local", "linked", revision, content_hash(checkpoint), "linked/default")
    commit(root, "linked/default", data.encode())
    validator = make_validator(root)
    last = one_round(validator)
    r = last.results["linked/default"]
    assert (r.status, r.code) == ("rejected", "DOWNLOAD") and "symlink" in r.reason, r
    assert not any(p.name == "tokenizer.json" for p in (validator.dir / "downloads").rglob("*"))
