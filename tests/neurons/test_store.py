"""Checkpoint stores: content hash, the local store's round trip and its checks, and the Hub store's
size and file checks before any download (through a stand-in for `HfApi`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

from neurons.store import HubStore, LocalStore, StoreError, StoreUnavailable, content_hash, store_for


def _checkpoint(path: Path, value: float = 1.0, extra: dict[str, bytes] | None = None) -> Path:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "quasar", "hidden_size": 8}))
    save_file({"w": torch.full((4, 4), value)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)
    return path


def test_content_hash_covers_the_model_only(tmp_path) -> None:
    a = _checkpoint(tmp_path / "a")
    b = _checkpoint(tmp_path / "b", extra={"notes.txt": b"hello", "trainer_state.pt": b"pickle"})
    assert content_hash(a) == content_hash(b)  # packaging and extra files do not count
    (b / "tokenizer.json").write_text('{"x": 1}')
    assert content_hash(a) == content_hash(b)
    c = _checkpoint(tmp_path / "c", value=1.0001)
    assert content_hash(c) != content_hash(a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"needs config\.json and"):
        content_hash(tmp_path / "empty")


def test_local_store_round_trip_is_content_addressed_and_drops_other_files(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    ckpt = _checkpoint(tmp_path / "ckpt", extra={"trainer_state.pt": b"pickle", "run.py": b"import os"})
    rev = store.upload(ckpt, "miner-1")
    assert rev == content_hash(ckpt)[:40] and store.upload(ckpt, "miner-1") == rev
    out = store.download("miner-1", rev, tmp_path / "out", max_bytes=10**6)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert content_hash(out) == content_hash(ckpt)
    with pytest.raises(StoreError, match="over the limit"):
        store.download("miner-1", rev, tmp_path / "small", max_bytes=100)
    with pytest.raises(StoreError, match="no miner-2 at revision"):
        store.download("miner-2", rev, tmp_path / "x", max_bytes=10**6)
    with pytest.raises(StoreError, match="escapes the store"):
        store.download("../../etc", rev, tmp_path / "x", max_bytes=10**6)
    # tampering with a published revision is caught on download
    (tmp_path / "store" / "miner-1" / rev / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(StoreError, match="do not match their revision"):
        store.download("miner-1", rev, tmp_path / "y", max_bytes=10**6)
    with pytest.raises(StoreError, match="does not exist"):
        store.upload(tmp_path / "nope", "miner-1")


class FakeHub:
    """Speaks the part of HfApi the store uses; records calls."""

    def __init__(self, files: dict[str, int], sha: str = "a" * 40):
        self.files, self.sha, self.calls = files, sha, []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return SimpleNamespace(oid=self.sha)

    def model_info(self, repo, revision=None, files_metadata=False):
        assert files_metadata
        siblings = [SimpleNamespace(rfilename=k, size=v) for k, v in self.files.items()]
        return SimpleNamespace(siblings=siblings, sha=self.sha)

    def snapshot_download(self, **kw):
        self.calls.append(("snapshot_download", kw))
        dest = Path(kw["local_dir"])
        dest.mkdir(parents=True, exist_ok=True)
        for name, size in self.files.items():
            (dest / name).write_bytes(b"\0" * size)
        return str(dest)


def test_hub_store_checks_files_and_size_before_downloading(tmp_path) -> None:
    ok = {"config.json": 100, "model.safetensors": 5000, ".gitattributes": 10, "README.md": 10}
    hub = FakeHub(ok)
    HubStore(api=hub).download("alice/q", "a" * 40, tmp_path / "d", max_bytes=10_000)
    assert [c[0] for c in hub.calls] == ["snapshot_download"]
    for files, max_bytes, reason in (
        ({"config.json": 100, "model.safetensors": 50_000}, 10_000, "over the limit"),
        ({"config.json": 100, "pytorch_model.bin": 500}, 10_000, "not allowed: pytorch_model.bin"),
        ({"config.json": 100, "model.safetensors": 5, "modeling_quasar.py": 5}, 10_000, "not allowed"),
        ({"config.json": 100, "sub/model.safetensors": 5}, 10_000, "not allowed"),
        ({"config.json": 100}, 10_000, "no config.json or no"),
    ):
        hub = FakeHub(files)
        with pytest.raises(StoreError, match=reason):
            HubStore(api=hub).download("alice/q", "a" * 40, tmp_path / "e", max_bytes=max_bytes)
        assert not any(c[0] == "snapshot_download" for c in hub.calls)  # refused before downloading
    with pytest.raises(StoreError, match="not the pinned"):
        HubStore(api=FakeHub(ok, sha="b" * 40)).download("alice/q", "a" * 40, tmp_path / "f", max_bytes=10**6)


def test_hub_store_upload_sends_only_allowed_files_and_returns_the_commit(tmp_path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", extra={"trainer_state.pt": b"pickle"})
    hub = FakeHub({})
    assert HubStore(api=hub).upload(ckpt, "alice/q") == "a" * 40
    (_, upload) = hub.calls[1]
    assert sorted(upload["allow_patterns"]) == ["config.json", "model.safetensors", "tokenizer.json"]

    class Failing(FakeHub):
        def upload_folder(self, **kw):
            raise ConnectionError("network down")

    with pytest.raises(StoreError, match=r"upload of .* failed: network down"):
        HubStore(api=Failing({})).upload(ckpt, "alice/q")
    with pytest.raises(StoreError, match="unknown store"):
        store_for("s3")


def test_hub_outage_is_transient_but_a_missing_repo_is_not(tmp_path) -> None:
    class RepositoryNotFoundError(Exception):  # named as huggingface_hub names it
        pass

    class Down(FakeHub):
        def model_info(self, *a, **kw):
            raise ConnectionError("502 Bad Gateway")

    class Gone(FakeHub):
        def model_info(self, *a, **kw):
            raise RepositoryNotFoundError("404 alice/q")

    with pytest.raises(StoreUnavailable, match="502 Bad Gateway"):
        HubStore(api=Down({})).download("alice/q", "a" * 40, tmp_path / "d", max_bytes=10)
    with pytest.raises(StoreError, match="404") as caught:
        HubStore(api=Gone({})).download("alice/q", "a" * 40, tmp_path / "d", max_bytes=10)
    assert not isinstance(caught.value, StoreUnavailable)
