"""Checkpoint stores: content hash, the local store's round trip and its checks (symlinks, special
files, sizes), stage-then-publish on both stores, and the Hub store's size and file checks before any
download (through stand-ins for `HfApi`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

from neurons.store import (
    HubStore,
    LocalStore,
    NotPublished,
    StoreError,
    StoreUnavailable,
    content_hash,
    store_for,
)


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
    with pytest.raises(NotPublished, match="no miner-2 at revision"):
        store.download("miner-2", rev, tmp_path / "x", max_bytes=10**6)
    for repo in ("../../etc", "/etc", ".staged/miner-1", "miner-1/", ""):
        with pytest.raises(StoreError, match="escapes the store") as caught:
            store.download(repo, rev, tmp_path / "x", max_bytes=10**6)
        assert not isinstance(caught.value, NotPublished)
    assert all((out / name).stat().st_mode & 0o777 == 0o644 for name in os.listdir(out))
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


# -- stage, then publish ----------------------------------------------------------------------------


def test_a_staged_local_revision_is_pinned_but_not_served_until_published(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    ckpt = _checkpoint(tmp_path / "ckpt", extra={"trainer_state.pt": b"pickle"})
    rev = store.stage(ckpt, "alice")
    assert rev == content_hash(ckpt)[:40] and store.stage(ckpt, "alice") == rev  # idempotent
    staged = tmp_path / "store" / ".staged" / "alice" / rev
    assert sorted(p.name for p in staged.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not store.available("alice", rev)
    with pytest.raises(NotPublished, match="no alice at revision"):
        store.download("alice", rev, tmp_path / "early", max_bytes=10**6)
    with pytest.raises(StoreError, match="escapes the store"):  # the staging area is not a repository
        store.download(".staged/alice", rev, tmp_path / "early", max_bytes=10**6)

    store.publish("alice", rev)
    assert store.available("alice", rev) and not staged.exists()
    store.publish("alice", rev)  # again: fine
    assert store.stage(ckpt, "alice") == rev and not staged.exists()  # already published: nothing staged
    out = store.download("alice", rev, tmp_path / "out", max_bytes=10**6)
    assert content_hash(out) == content_hash(ckpt)
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name.startswith(".upload-")]

    # staged again beside a published copy (another process published it): publishing drops ours
    _checkpoint(staged)
    store.publish("alice", rev)
    assert not staged.exists() and store.available("alice", rev)

    other = _checkpoint(tmp_path / "other", value=2.0)
    with pytest.raises(
        StoreError, match=r"nothing staged for alice at revision .*: stage the checkpoint first"
    ):
        store.publish("alice", content_hash(other)[:40])
    assert not store.available("bob", rev)


def test_a_failed_local_stage_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    import errno
    import shutil

    def disk_full(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StoreError, match=r"cannot write .* in the local store: .*No space left on device"):
        store.stage(_checkpoint(tmp_path / "ckpt"), "alice")
    assert [p.name for p in (tmp_path / "store").rglob("*")] == [".staged", "alice"]  # no temporary dir


# -- the local store serves regular files only -----------------------------------------------------


def _published(tmp_path: Path) -> tuple[LocalStore, str, Path]:
    store = LocalStore(tmp_path / "store")
    rev = store.upload(_checkpoint(tmp_path / "ckpt"), "mallory")
    return store, rev, tmp_path / "store" / "mallory" / rev


def test_the_local_store_refuses_a_symlink_to_a_private_file(tmp_path) -> None:
    store, rev, published = _published(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"key": "do not serve"}')
    secret.chmod(0o600)
    (published / "tokenizer.json").unlink()
    (published / "tokenizer.json").symlink_to(secret)
    with pytest.raises(
        StoreError, match=r"tokenizer\.json is a symlink; a checkpoint holds regular files only"
    ):
        store.download("mallory", rev, tmp_path / "out", max_bytes=10**6)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_the_local_store_refuses_a_symlinked_revision_or_repository(tmp_path) -> None:
    store, rev, published = _published(tmp_path)
    (tmp_path / "store" / "eve").mkdir()
    (tmp_path / "store" / "eve" / rev).symlink_to(published, target_is_directory=True)
    with pytest.raises(StoreError, match=f"eve/{rev} is a symlink"):
        store.download("eve", rev, tmp_path / "out", max_bytes=10**6)
    (tmp_path / "store" / "trent").symlink_to(tmp_path / "store" / "mallory", target_is_directory=True)
    with pytest.raises(StoreError, match="trent is a symlink"):
        store.download("trent", rev, tmp_path / "out", max_bytes=10**6)
    with pytest.raises(StoreError, match="trent is a symlink"):
        store.available("trent", rev)


def test_the_local_store_refuses_special_files(tmp_path) -> None:
    store, rev, published = _published(tmp_path)
    os.mkfifo(published / "tokenizer_config.json")  # reading it would wait forever for a writer
    with pytest.raises(StoreError, match=r"tokenizer_config\.json is not a regular file"):
        store.download("mallory", rev, tmp_path / "out", max_bytes=10**6)
    (published / "tokenizer_config.json").unlink()
    (published / "nested").mkdir()
    with pytest.raises(StoreError, match="nested is not a regular file"):
        store.download("mallory", rev, tmp_path / "out", max_bytes=10**6)


def test_a_huge_sparse_file_is_refused_before_copying(tmp_path) -> None:
    store, rev, published = _published(tmp_path)
    with open(published / "model-00002-of-00002.safetensors", "wb") as f:
        f.truncate(2**30)  # 1 GiB that takes no disk: only its listed size can stop it
    with pytest.raises(StoreError, match="over the limit"):
        store.download("mallory", rev, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "out" / "model-00002-of-00002.safetensors").exists()


def test_a_file_that_grows_while_it_is_copied_is_refused(tmp_path, monkeypatch) -> None:
    import neurons.store as store_module

    store, rev, published = _published(tmp_path)
    limit = sum(p.stat().st_size for p in published.iterdir()) + 10
    real_check = store_module._check_listing

    def grow_after_listing(files, where, max_bytes):  # the file grows between the listing and the copy
        real_check(files, where, max_bytes)
        with open(published / "tokenizer.json", "ab") as f:
            f.write(b" " * 100)

    monkeypatch.setattr(store_module, "_check_listing", grow_after_listing)
    with pytest.raises(StoreError, match=r"tokenizer\.json grew past the size limit while being copied"):
        store.download("mallory", rev, tmp_path / "out", max_bytes=limit)


class StagingHub:
    """The Hub as the staging store sees it: repositories with a visibility, commits, and
    huggingface_hub's error classes (by name, as the store compares them)."""

    class RepositoryNotFoundError(Exception):
        pass

    class RevisionNotFoundError(Exception):
        pass

    class GatedRepoError(Exception):
        pass

    def __init__(self, public: set[str] = frozenset(), commits: dict[str, list[str]] | None = None):
        self.private = {repo: False for repo in public}
        self.commits = commits or {repo: ["0" * 40] for repo in public}
        self.calls: list[tuple] = []
        self.down = False
        self.reader = "owner"

    def create_repo(self, *, repo_id, repo_type, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        if repo_id not in self.private:
            self.private[repo_id] = bool(private)
            self.commits[repo_id] = []

    def update_repo_settings(self, repo_id, *, private=None):
        self.calls.append(("update_repo_settings", repo_id, private))
        if repo_id not in self.private:
            raise self.RepositoryNotFoundError(f"404 {repo_id}")
        self.private[repo_id] = private

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, commit_message):
        self.calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
        oid = f"{len(self.commits[repo_id]) + 1:040x}"
        self.commits[repo_id].append(oid)
        return SimpleNamespace(oid=oid)

    def model_info(self, repo, revision=None, files_metadata=False):
        if self.down:
            raise ConnectionError("502 Bad Gateway")
        # the miner's token reads its private repository; to a validator it does not exist
        if repo not in self.private or (self.private[repo] and self.reader != "owner"):
            raise self.RepositoryNotFoundError(f"404 {repo}")
        if revision is not None and revision not in self.commits[repo]:
            raise self.RevisionNotFoundError(f"404 {repo}@{revision}")
        siblings = [SimpleNamespace(rfilename=n, size=10) for n in ("config.json", "model.safetensors")]
        return SimpleNamespace(private=self.private[repo], sha=revision, siblings=siblings)

    def as_validator(self) -> StagingHub:
        self.reader = "validator"
        return self


def test_hub_stage_uploads_to_a_private_repository_and_publish_makes_it_public(tmp_path, caplog) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", extra={"trainer_state.pt": b"pickle"})
    hub = StagingHub()
    store = HubStore(api=hub)
    rev = store.stage(ckpt, "alice/q")
    assert rev == f"{1:040x}" and hub.private["alice/q"] is True
    assert hub.calls[0] == ("create_repo", "alice/q", True)
    assert hub.calls[1] == (
        "upload_folder",
        "alice/q",
        ["config.json", "model.safetensors", "tokenizer.json"],
    )
    assert not any(c[0] == "update_repo_settings" for c in hub.calls)  # new and private already: no warning
    assert "hidden" not in caplog.text

    validator = HubStore(api=hub.as_validator())
    assert not validator.available("alice/q", rev)
    with pytest.raises(NotPublished, match="404 alice/q"):
        validator.download("alice/q", rev, tmp_path / "d", max_bytes=10**6)

    store.publish("alice/q", rev)
    store.publish("alice/q", rev)  # again: fine
    assert hub.private["alice/q"] is False and validator.available("alice/q", rev)
    assert not validator.available("alice/q", "f" * 40)
    with pytest.raises(NotPublished, match="404 alice/q@f"):
        validator.download("alice/q", "f" * 40, tmp_path / "d", max_bytes=10**6)


def test_hub_stage_hides_a_public_repository_until_publish(tmp_path, caplog) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    hub = StagingHub(public={"alice/q"})
    rev = HubStore(api=hub).stage(ckpt, "alice/q")
    assert hub.private["alice/q"] is True and rev in hub.commits["alice/q"]
    assert [c[0] for c in hub.calls] == ["create_repo", "update_repo_settings", "upload_folder"]
    assert "previous version is hidden too until the new one is published" in caplog.text


def test_hub_stage_publish_and_available_failures(tmp_path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")

    class Down(StagingHub):
        def upload_folder(self, **kw):
            raise ConnectionError("network down")

    with pytest.raises(StoreError, match=r"staging .* in the Hub repository alice/q failed: network down"):
        HubStore(api=Down()).stage(ckpt, "alice/q")
    with pytest.raises(StoreError, match=r"\(was it staged\?\): 404 bob/q") as caught:
        HubStore(api=StagingHub()).publish("bob/q", "a" * 40)
    assert type(caught.value) is StoreError  # the caller's mistake: neither retried nor "not yet"

    class SettingsDown(StagingHub):
        def update_repo_settings(self, repo_id, *, private=None):
            raise ConnectionError("502 Bad Gateway")

    with pytest.raises(StoreUnavailable, match="502"):
        HubStore(api=SettingsDown()).publish("alice/q", "a" * 40)

    hub = StagingHub(public={"alice/q"})
    hub.down = True
    with pytest.raises(StoreUnavailable, match="502 Bad Gateway"):
        HubStore(api=hub).available("alice/q", "0" * 40)

    class Gated(StagingHub):
        def model_info(self, *a, **kw):
            raise self.GatedRepoError("403 gated")

    assert not HubStore(api=Gated()).available("alice/q", "0" * 40)
    with pytest.raises(StoreError, match="403 gated") as caught:  # gated is the miner's doing: no retry
        HubStore(api=Gated()).download("alice/q", "0" * 40, tmp_path / "d", max_bytes=10**6)
    assert not isinstance(caught.value, NotPublished | StoreUnavailable)
