"""One node per node directory (`NodeLock`, in this process and across processes) and the clean-up of
interrupted writes at start (`clean_temporary_files`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neurons.chain import ChainError
from neurons.lock import NodeDirectoryLocked, NodeLock, clean_temporary_files

REPO = Path(__file__).resolve().parents[2]


def test_a_second_lock_on_the_same_directory_is_refused_until_the_first_is_released(tmp_path) -> None:
    directory = tmp_path / "miners" / "alice.default"  # created as needed
    first = NodeLock(directory, "miner", "miner alice/default on test")
    assert (directory / ".lock").read_text().splitlines() == [str(os.getpid()), "miner alice/default on test"]
    with pytest.raises(NodeDirectoryLocked) as caught:
        NodeLock(directory, "miner", "the second one")
    message = str(caught.value)
    assert isinstance(caught.value, ChainError)  # how start-up errors reach the operator
    assert str(directory) in message and f"pid {os.getpid()} (miner alice/default on test)" in message
    assert "another miner with this wallet and hotkey is running on this --root; stop it, or give" in message
    assert message.endswith("its own --root or --wallet.hotkey")
    first.close()
    first.close()  # twice: fine
    assert (directory / ".lock").read_text() == ""  # no pid of a stopped node left behind
    with NodeLock(directory, "miner", "the second one"):
        pass
    with NodeLock(directory, "miner", "a third one"):  # released by the context manager
        pass


def test_different_directories_do_not_conflict(tmp_path) -> None:
    # the README demo: miners and a validator with different wallets on one --root
    with (
        NodeLock(tmp_path / "miners" / "alice.default", "miner", "alice"),
        NodeLock(tmp_path / "miners" / "bob.default", "miner", "bob"),
        NodeLock(tmp_path / "validators" / "alice.default", "validator", "validator"),
    ):
        pass


def test_a_lock_held_by_another_process_blocks_until_it_exits(tmp_path) -> None:
    directory = tmp_path / "validators" / "val.default"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from neurons.lock import NodeLock; "
            "lock = NodeLock(sys.argv[1], 'validator', 'the child'); print('locked', flush=True); "
            "sys.stdin.read()",
            str(directory),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits for the child, however slow
        with pytest.raises(NodeDirectoryLocked, match=f"pid {holder.pid} \\(the child\\): another validator"):
            NodeLock(directory, "validator", "the parent")
    finally:
        holder.stdin.close()  # the child reads end of input and exits, and the kernel drops its lock
        holder.wait(timeout=60)
    assert holder.returncode == 0
    with NodeLock(directory, "validator", "the parent"):
        pass


def test_an_unwritten_lock_file_names_no_pid(tmp_path) -> None:
    import fcntl

    (tmp_path / ".lock").touch()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, but the holder has not written yet
        with pytest.raises(NodeDirectoryLocked, match="in use by pid unknown"):
            NodeLock(tmp_path, "miner", "late")
    finally:
        os.close(fd)


def test_clean_temporary_files_removes_leftovers_of_interrupted_writes_only(tmp_path) -> None:
    node = tmp_path / "node"
    keep = [
        node / "state.json",
        node / "tmp-notes",
        node / "notes.tmp.txt",
        node / "publish" / "step-00000002" / "model.safetensors",
        node / "downloads" / f"alice@{'a' * 40}" / "config.json",
        node / "run" / "checkpoints" / "step-00000004" / "config.json",
        node / ".lock",
    ]
    leftovers = [
        node / ".tmp-state.json-k2j3",  # quasar.files.atomic_write
        node / "rounds" / "000001" / ".tmp-scores.json-x8",
        node / "downloads" / f"alice@{'b' * 40}.partial" / "model.safetensors",  # the validator's
        node / "publish" / "step-00000006.tmp" / "config.json",  # the miner's snapshot
        node / "run" / "checkpoints" / ".tmp-step-00000006" / "config.json",  # the trainer's
        node / "store" / ".upload-abc" / "config.json",
    ]
    for path in keep + leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    outside = tmp_path / "elsewhere.tmp"
    outside.mkdir()
    (node / "linked.tmp").symlink_to(outside, target_is_directory=True)  # not ours to remove
    assert clean_temporary_files(node) == len(leftovers)
    assert all(path.exists() for path in keep), [p for p in keep if not p.exists()]
    assert not any(path.exists() for path in leftovers)
    assert not (node / "downloads" / f"alice@{'b' * 40}.partial").exists()
    assert (node / "linked.tmp").is_symlink() and outside.is_dir()
    assert clean_temporary_files(node) == 0


class _Chain:
    hotkey = "alice/default"

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def light_node(monkeypatch):
    """NodeBase without a dev kit, tokenizer or chain: what is left is the directory's handling."""
    import threading

    from neurons import node
    from neurons.config import MinerConfig

    monkeypatch.setattr(node, "devkit", lambda cfg: None)
    monkeypatch.setattr(node, "competition_tokenizer", lambda cfg, kit: "no-tokenizer")
    monkeypatch.setattr("distill.cli.load_tokenizer", lambda path: None)

    class Node(node.NodeBase):
        role = "miner"
        fail = False

        def setup(self) -> None:
            if self.fail:
                raise RuntimeError("setup failed")

    def make(root: Path, wallet: str = "alice", chain=None):
        cfg = MinerConfig.model_validate(
            {"root": str(root), "wallet": {"name": wallet}, "telemetry": {"port": -1}}
        )
        return Node(cfg, chain=chain or _Chain(), store=object(), stopper=node.Stopper(threading.Event()))

    return Node, make


def test_a_node_holds_its_directory_from_start_to_close(tmp_path, light_node) -> None:
    Node, make = light_node
    leftover = tmp_path / "miners" / "alice.default" / "downloads" / "x.partial"
    leftover.mkdir(parents=True)
    first = make(tmp_path)
    assert first.dir == tmp_path / "miners" / "alice.default" and not leftover.exists()
    second_chain = _Chain()
    with pytest.raises(NodeDirectoryLocked, match="another miner with this wallet and hotkey"):
        make(tmp_path, chain=second_chain)
    assert second_chain.closed == 0  # refused before it was handed the chain
    make(tmp_path, wallet="bob").close()  # another wallet on the same root: its own directory
    first.close()
    make(tmp_path).close()  # released by close

    Node.fail = True
    chain = _Chain()
    with pytest.raises(RuntimeError, match="setup failed"):
        make(tmp_path, chain=chain)
    assert chain.closed == 1
    Node.fail = False
    make(tmp_path).close()  # a failed start released the directory


def test_closing_a_half_built_node_is_fine(tmp_path, light_node) -> None:
    Node, _ = light_node
    Node.__new__(Node).close()  # nothing was opened: nothing to release
