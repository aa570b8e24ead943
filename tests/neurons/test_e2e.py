"""The subnet end to end on the embedded chain, through the real miner and validator code.

Bob (2 training steps) commits first, Alice (30 steps) after him, so Alice must win the paired test
as the challenger. Carol commits a noise-injected copy of Alice's checkpoint, Dave a NaN-filled one,
Eve a string that is not a commitment. The validator runs as its own process (the real entry
point): one full round, then a second round that is SIGKILLed after its first score is saved and
restarted; the restarted validator finishes the same round without redoing or losing any score.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from neurons.chain import EmbeddedChain
from neurons.commitment import Commitment
from neurons.config import MinerConfig
from neurons.miner_loop import Miner
from neurons.node import Stopper
from neurons.state import StateStore
from neurons.store import LocalStore, content_hash
from quasar.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
NETUID = 24
VALIDATOR = "val/default"


def run_miner(root: Path, name: str, steps: int) -> dict:
    cfg = MinerConfig(
        root=str(root),
        wallet={"name": name},
        device="cpu",
        max_rounds=1,
        telemetry={"port": -1},
        train={"steps_per_round": steps, "eval_samples": 16},
        publish={"longctx_samples": 0},
    )
    Miner(cfg, stopper=Stopper(threading.Event())).run()
    state = json.loads((root / "miners" / f"{name}.default" / "miner_state.json").read_text())
    assert state["committed"] is not None, f"{name} committed nothing"
    return state["committed"]


def commit_as(root: Path, hotkey: str, checkpoint: Path) -> str:
    """A hand-made miner: publish `checkpoint` to the local store and commit it, bound to `hotkey`."""
    repo = hotkey.replace("/", ".")
    revision = LocalStore(root / "store").upload(checkpoint, repo)
    data = Commitment.for_checkpoint("local", repo, revision, content_hash(checkpoint), hotkey).encode()
    commit_raw(root, hotkey, data)
    return data


def commit_raw(root: Path, hotkey: str, data: str) -> None:
    with EmbeddedChain(root / "chain.sqlite", NETUID, hotkey) as chain:
        chain.register(hotkey, f"{hotkey.split('/')[0]}-coldkey")
        chain.advance(1)
        chain.commit(data)


def validator_cmd(root: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "neurons" / "validator.py"),
        "--root", str(root), "--wallet.name", "val", "--device", "cpu", "--max_rounds", "1",
        "--interval_blocks", "1", "--telemetry.port", "0",
        "--kl.prompts", "12", "--kl.prompt_tokens", "64",
        "--longctx.tasks", "niah_single", "--longctx.lengths", "1k", "--longctx.samples", "2",
    ]  # fmt: skip


def run_validator(root: Path, timeout: float = 300) -> None:
    proc = subprocess.run(validator_cmd(root), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def subnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("subnet")
    bob = run_miner(root, "bob", 2)
    alice = run_miner(root, "alice", 30)

    work = root / "handmade"
    model = load_checkpoint(alice["checkpoint"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-5)
    save_checkpoint(model, work / "carol")
    commit_as(root, "carol/default", work / "carol")

    broken = load_checkpoint(bob["checkpoint"])
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    save_checkpoint(broken, work / "dave")
    commit_as(root, "dave/default", work / "dave")

    commit_raw(root, "eve/default", "my model is the best, trust me")
    return root


def read_state(root: Path):
    return StateStore(root / "validators" / "val.default").load(NETUID, VALIDATOR)


def chain_weights(root: Path) -> dict[str, float]:
    with EmbeddedChain(root / "chain.sqlite", NETUID) as chain:
        metagraph, records = chain.metagraph(), chain.weights()
    uid = metagraph.uid_of(VALIDATOR)
    (record,) = [r for r in records if r.validator_uid == uid]
    return {metagraph.neuron(u).hotkey: w / 65535 for u, w in record.weights.items()}


def test_better_miner_wins_copies_and_garbage_get_nothing(subnet):
    run_validator(subnet)
    state = read_state(subnet)
    results = state.last.results
    assert results["alice/default"].status == "ok" and results["bob/default"].status == "ok"
    assert results["alice/default"].mean_kl < 0.5 * results["bob/default"].mean_kl
    assert results["carol/default"].status == "copy"
    assert results["carol/default"].copy_of == "alice/default"
    assert results["dave/default"].status == "rejected" and results["dave/default"].code == "WEIGHTS"
    assert "finite" in results["dave/default"].reason
    assert results["eve/default"].status == "rejected" and results["eve/default"].code == "FORMAT"
    assert state.last.win_rates == {"alice/default": 1.0, "bob/default": 0.0}
    weights = chain_weights(subnet)
    assert weights["alice/default"] == 1.0
    assert weights.get("bob/default", 0.0) < 0.01
    for hotkey in ("carol/default", "dave/default", "eve/default", VALIDATOR):
        assert hotkey not in weights


def test_sigkilled_validator_resumes_the_round_and_loses_no_score(subnet):
    before = read_state(subnet)
    assert before.rounds_completed == 1, "runs after the first test"
    proc = subprocess.Popen(
        validator_cmd(subnet), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    path = subnet / "validators" / "val.default" / "state.json"
    killed_with: dict = {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                current = json.loads(path.read_text()).get("current")
            except (json.JSONDecodeError, FileNotFoundError):
                current = None
            judged = [h for h in (current or {}).get("planned", []) if h in current["results"]]
            if current and current["number"] == 2 and 1 <= len(judged) < len(current["planned"]):
                os.kill(proc.pid, signal.SIGKILL)
                killed_with = current
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_with, "the validator finished round 2 before it could be killed mid-round"
    mid = read_state(subnet)
    assert mid.current is not None and mid.current.number == 2 and not mid.current.scored
    assert mid.moving_average == before.moving_average  # round 1's scores survive the kill

    run_validator(subnet)
    after = read_state(subnet)
    assert after.rounds_completed == 2 and after.current is None and after.last.number == 2
    assert after.last.block_hash == killed_with["block_hash"]  # the same round, the same prompts
    for hotkey, saved in killed_with["results"].items():  # judged once, not redone
        assert after.last.results[hotkey].model_dump() == saved
    assert set(after.last.results) == {f"{n}/default" for n in ("alice", "bob", "carol", "dave", "eve")}
    # The moving average folds round 2 into round 1's: nothing was lost or counted twice.
    ema = 0.5
    for hotkey, value in after.moving_average.items():
        expected = ema * after.last.round_weights.get(hotkey, 0.0) + (1 - ema) * before.moving_average.get(
            hotkey, 0.0
        )
        assert value == pytest.approx(expected, rel=1e-9)
    assert after.moving_average["alice/default"] == pytest.approx(0.75, abs=1e-3)  # 0.5 * 1 + 0.5 * 0.5
    assert after.last.weights_block is not None


def test_demo_summary_table_and_plot(subnet, tmp_path):
    from neurons.__main__ import _table, plot, summary

    rows = {r["hotkey"]: r for r in summary(subnet, wallet="val")}
    assert set(rows) == {f"{n}/default" for n in ("alice", "bob", "carol", "dave", "eve")}
    assert rows["alice/default"]["weight"] > 0.99 and rows["carol/default"]["weight"] == 0.0
    assert rows["dave/default"]["status"] == "rejected" and rows["dave/default"]["mean_kl"] is None
    table = _table(list(rows.values()))
    assert "alice/default" in table and "copy" in table
    plot(list(rows.values()), tmp_path / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
