"""Checkpoint stores: where miners publish and validators fetch pinned checkpoints.

- `HubStore`: the Hugging Face Hub. Upload a checkpoint folder (only the allowed files) and get
  the commit sha to pin; download a pinned revision after checking, from the Hub's file metadata,
  that it holds only allowed files and is not larger than the caller's limit.
- `LocalStore`: a directory, content-addressed (the revision is derived from the content hash), for
  the embedded default and tests. Same contract, same checks.

Commit, then publish: a miner `stage`s a checkpoint (pinned but not readable by validators), commits
the revision on chain, then `publish`es it, so nobody can copy the weights and commit them first.
Until then `download` raises `NotPublished`, which a validator retries for a while.

Only these files ever travel: the config, safetensors weights (and their index), the generation
config and tokenizer files. Never pickles, never code. `content_hash` identifies the model itself
(config + weights), the same on every machine, and is what a commitment binds to the hotkey.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

ALLOWED_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MODEL_FILES = ("config.json", "*.safetensors")  # what content_hash covers: the model, not its packaging
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """A checkpoint that cannot be published or fetched; the message says why."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a server error: trying again later may work,
    so a validator must not hold it against the submission."""


class NotPublished(StoreError):
    """The repository or revision does not exist or is not readable yet: a miner commits before it
    publishes, so a validator retries this for a while before holding it against the submission."""


# Hub answers that are about the submission itself, not the connection to it.
_PERMANENT_HUB_ERRORS = (
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "GatedRepoError",
)
# What the Hub says for a private repository (or one not pushed yet): it may become readable.
_NOT_PUBLISHED_HUB_ERRORS = ("RepositoryNotFoundError", "RevisionNotFoundError")
# What `available` reads as "not readable now" rather than as an outage.
_UNREADABLE_HUB_ERRORS = (*_NOT_PUBLISHED_HUB_ERRORS, "GatedRepoError")


def _hub_failure(message: str, error: Exception) -> StoreError:
    name = type(error).__name__
    if name in _NOT_PUBLISHED_HUB_ERRORS:
        kind = NotPublished
    elif name in _PERMANENT_HUB_ERRORS:
        kind = StoreError
    else:
        kind = StoreUnavailable
    return kind(f"{message}: {error}")


def _allowed(name: str, patterns=ALLOWED_FILES) -> bool:
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def content_hash(checkpoint: str | Path) -> str:
    """sha256 over (name, sha256) of config.json and every *.safetensors file, sorted by name."""
    checkpoint = Path(checkpoint)
    files = sorted(p for p in checkpoint.iterdir() if p.is_file() and _allowed(p.name, MODEL_FILES))
    if not any(p.name == "config.json" for p in files) or not any(p.suffix == ".safetensors" for p in files):
        raise StoreError(f"{checkpoint}: a checkpoint needs config.json and *.safetensors weights")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def publishable_files(checkpoint: str | Path) -> list[Path]:
    """The files of `checkpoint` that are published (allowed names, plain files, no symlinks)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise StoreError(f"checkpoint directory {str(checkpoint)!r} does not exist")
    return sorted(p for p in checkpoint.iterdir() if p.is_file() and not p.is_symlink() and _allowed(p.name))


def _check_listing(files: dict[str, int], where: str, max_bytes: int) -> None:
    """Refuse before downloading: disallowed or nested files, no weights, or too many bytes."""
    refused = sorted(name for name in files if not _allowed(name) and not name.startswith("."))
    if refused:
        raise StoreError(
            f"{where} holds files that are not allowed: {', '.join(refused[:5])} (only {', '.join(ALLOWED_FILES)})"
        )
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        raise StoreError(f"{where} has no config.json or no *.safetensors weights")
    total = sum(files.values())
    if total > max_bytes:
        raise StoreError(
            f"{where} is {total / 2**20:,.1f} MiB, over the limit of {max_bytes / 2**20:,.1f} MiB"
        )


class CheckpointStore(Protocol):
    kind: str

    def upload(self, checkpoint: str | Path, repo: str) -> str:
        """Publish the allowed files of `checkpoint` to `repo`; returns the pinned revision (40 hex)."""
        ...

    def stage(self, checkpoint: str | Path, repo: str) -> str:
        """Put the allowed files of `checkpoint` in `repo` under a pinned revision (40 hex) that
        validators cannot read yet; returns the revision. Staging the same content again is fine."""
        ...

    def publish(self, repo: str, revision: str) -> None:
        """Make a staged `revision` readable; publishing it again is fine."""
        ...

    def available(self, repo: str, revision: str) -> bool:
        """Whether `download` could find `repo` at `revision` now (no file is transferred)."""
        ...

    def download(self, repo: str, revision: str, dest: str | Path, *, max_bytes: int) -> Path:
        """Fetch `repo` at `revision` into `dest` after checking its files and size; returns `dest`.
        Raises `NotPublished` while the revision does not exist or is not readable yet."""
        ...


# ------------------------------------------------------------------------------------------------


def _copy_into(files: list[Path], final: Path) -> None:
    """Copy `files` into the new directory `final` atomically: a fsynced temporary directory beside
    it, renamed into place. Someone else writing the same `final` first is fine (same content)."""
    from quasar.files import fsync_dir  # here, not at the top: quasar imports transformers

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=final.parent))
    try:
        for f in files:
            shutil.copyfile(f, tmp / f.name)
            with open(tmp / f.name, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to its owner
        fsync_dir(tmp)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # a full disk, permissions: the caller keeps the checkpoint pending
            raise StoreError(f"cannot write {final} in the local store: {e}") from e
        # else another process put the same content-addressed revision there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def _copy_regular_file(source: Path, dest: Path, budget: int, where: str) -> int:
    """Copy `source` to `dest` (mode 0644) without following a symlink and refusing anything but a
    regular file, in case it was swapped since it was listed; returns the bytes copied. More than
    `budget` bytes (a file growing during the copy) is refused."""
    try:
        # O_NONBLOCK: opening a FIFO swapped in must not wait for a writer (no effect on files)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(
            f"{where}: cannot open {source.name} ({e}); a checkpoint holds regular files only"
        ) from e
    copied = 0
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(
                f"{where}: {source.name} is not a regular file; a checkpoint holds regular files only"
            )
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(out, "wb") as dst:
            os.fchmod(out, 0o644)  # whatever the source's mode and the umask
            while block := src.read(_CHUNK):
                copied += len(block)
                if copied > budget:
                    raise StoreError(f"{where}: {source.name} grew past the size limit while being copied")
                dst.write(block)
    return copied


class LocalStore:
    """`root/<repo>/<revision>/`, revision = the first 40 hex digits of the content hash. Writes are
    atomic (a temporary directory renamed into place) and a revision, once written, never changes.
    Staged revisions wait in `root/.staged/<repo>/<revision>/`, which `download` never serves."""

    kind = "local"
    STAGING = ".staged"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _parts(self, repo: str, revision: str) -> list[str]:
        """The path components of `repo`/`revision` below a store directory; a component that is
        empty, absolute or hidden (`..`, `.staged`) could reach outside the published revisions."""
        parts = [*repo.split("/"), revision]
        if any(not part or part.startswith(".") for part in parts):
            raise StoreError(
                f"repository {repo!r} at revision {revision!r} escapes the store: names may not be empty "
                "or start with '.'"
            )
        return parts

    def _path(self, repo: str, revision: str) -> Path:
        """The published directory, refusing a symlink anywhere below the root: the store serves
        what was written into it, never what a link points at."""
        path = self.root
        for part in self._parts(repo, revision):
            path = path / part
            if path.is_symlink():
                raise StoreError(f"{path} is a symlink; the local store holds real directories only")
        return path

    def _staged(self, repo: str, revision: str) -> Path:
        return self.root.joinpath(self.STAGING, *self._parts(repo, revision))

    def stage(self, checkpoint: str | Path, repo: str) -> str:
        files = publishable_files(checkpoint)
        revision = content_hash(checkpoint)[:40]
        staged = self._staged(repo, revision)
        if not (self._path(repo, revision).is_dir() or staged.is_dir()):  # content-addressed: done
            _copy_into(files, staged)
        return revision

    def publish(self, repo: str, revision: str) -> None:
        from quasar.files import fsync_dir  # here, not at the top: quasar imports transformers

        staged, final = self._staged(repo, revision), self._path(repo, revision)
        if not final.is_dir():
            if not staged.is_dir():
                raise StoreError(
                    f"local store has nothing staged for {repo} at revision {revision}: stage the "
                    "checkpoint first"
                )
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, final)
            except OSError:
                if not final.is_dir():
                    raise
                # published by another process in the meantime: same content, drop ours below
            fsync_dir(final.parent)
        shutil.rmtree(staged, ignore_errors=True)

    def upload(self, checkpoint: str | Path, repo: str) -> str:
        revision = self.stage(checkpoint, repo)
        self.publish(repo, revision)
        return revision

    def available(self, repo: str, revision: str) -> bool:
        return self._path(repo, revision).is_dir()

    def download(self, repo: str, revision: str, dest: str | Path, *, max_bytes: int) -> Path:
        where = f"{repo}@{revision[:12]}"
        source = self._path(repo, revision)
        if not source.is_dir():
            raise NotPublished(f"local store has no {repo} at revision {revision} (not published yet?)")
        listing = {}
        for entry in os.scandir(source):
            if entry.is_symlink():
                raise StoreError(f"{where}: {entry.name} is a symlink; a checkpoint holds regular files only")
            if not entry.is_file(follow_symlinks=False):
                raise StoreError(
                    f"{where}: {entry.name} is not a regular file; a checkpoint holds regular files only"
                )
            listing[entry.name] = entry.stat(follow_symlinks=False).st_size
        _check_listing(listing, where, max_bytes)  # sizes as listed: a huge (sparse) file stops here
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        budget = max_bytes
        for name in sorted(n for n in listing if _allowed(n)):
            budget -= _copy_regular_file(source / name, dest / name, budget, where)
        if content_hash(dest)[:40] != revision:
            raise StoreError(f"{where}: the files do not match their revision (the store is corrupt)")
        return dest


# ------------------------------------------------------------------------------------------------


class HubStore:
    """The Hugging Face Hub through `huggingface_hub.HfApi` (injected for tests). Staging uploads
    to the repository made private; publishing makes the whole repository public."""

    kind = "hf"

    def __init__(self, token: str | None = None, api=None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.api = api

    def _upload_folder(self, checkpoint: str | Path, repo: str, files: list[Path]) -> str:
        info = self.api.upload_folder(
            repo_id=repo,
            folder_path=str(checkpoint),
            allow_patterns=[f.name for f in files],
            commit_message="Quasar checkpoint",
        )
        revision = getattr(info, "oid", None)
        if not isinstance(revision, str) or len(revision) != 40:
            raise StoreError(
                f"the Hub did not return a commit id for the upload to {repo} (got {revision!r})"
            )
        return revision

    def upload(self, checkpoint: str | Path, repo: str) -> str:
        files = publishable_files(checkpoint)
        content_hash(checkpoint)  # refuses a folder without config and weights
        try:
            self.api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
            return self._upload_folder(checkpoint, repo, files)
        except StoreError:
            raise
        except Exception as e:  # network, auth, quota: the caller must not commit this checkpoint
            raise StoreError(f"upload of {checkpoint} to the Hub repository {repo} failed: {e}") from e

    def stage(self, checkpoint: str | Path, repo: str) -> str:
        files = publishable_files(checkpoint)
        content_hash(checkpoint)  # refuses a folder without config and weights
        try:
            self.api.create_repo(repo_id=repo, repo_type="model", private=True, exist_ok=True)
            if getattr(self.api.model_info(repo), "private", None) is not True:
                # an existing public repository: the new weights must not be readable before the
                # commitment lands, so the repository goes private until `publish`
                self.api.update_repo_settings(repo_id=repo, private=True)
                log.warning(
                    "made the Hub repository %s private to stage a new checkpoint: its previous version "
                    "is hidden too until the new one is published",
                    repo,
                )
            return self._upload_folder(checkpoint, repo, files)
        except StoreError:
            raise
        except Exception as e:  # network, auth, quota: the caller must not commit this checkpoint
            raise StoreError(f"staging {checkpoint} in the Hub repository {repo} failed: {e}") from e

    def publish(self, repo: str, revision: str) -> None:
        # visibility is per repository on the Hub: every revision of `repo` becomes readable
        try:
            self.api.update_repo_settings(repo_id=repo, private=False)
        except Exception as e:  # a missing repository is the caller's mistake; anything else, retry
            kind = StoreError if type(e).__name__ in _PERMANENT_HUB_ERRORS else StoreUnavailable
            raise kind(
                f"cannot make the Hub repository {repo} public to publish {revision[:12]} (was it "
                f"staged?): {e}"
            ) from e

    def available(self, repo: str, revision: str) -> bool:
        try:
            self.api.model_info(repo, revision=revision)
        except Exception as e:
            if type(e).__name__ in _UNREADABLE_HUB_ERRORS:
                return False
            raise StoreUnavailable(f"cannot ask the Hub about {repo}@{revision[:12]}: {e}") from e
        return True

    def download(self, repo: str, revision: str, dest: str | Path, *, max_bytes: int) -> Path:
        try:
            info = self.api.model_info(repo, revision=revision, files_metadata=True)
        except Exception as e:
            raise _hub_failure(f"cannot read {repo}@{revision[:12]} on the Hub", e) from e
        listing = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        listing = {k: v for k, v in listing.items() if k not in (".gitattributes", "README.md")}
        _check_listing(listing, f"{repo}@{revision[:12]}", max_bytes)
        if getattr(info, "sha", revision) != revision:
            raise StoreError(f"{repo}: the Hub answered for revision {info.sha}, not the pinned {revision}")
        dest = Path(dest)
        try:
            self.api.snapshot_download(
                repo_id=repo, revision=revision, local_dir=str(dest), allow_patterns=list(ALLOWED_FILES)
            )
        except Exception as e:
            raise _hub_failure(f"download of {repo}@{revision[:12]} failed", e) from e
        got = {p.name: p.stat().st_size for p in dest.iterdir() if p.is_file()}
        if sum(got.values()) > max_bytes:
            raise StoreError(f"{repo}@{revision[:12]}: downloaded more than the limit")
        return dest


def store_for(
    kind: str, *, local_root: str | Path | None = None, token: str | None = None
) -> CheckpointStore:
    if kind == "local":
        if local_root is None:
            raise StoreError("the local store needs a root directory")
        return LocalStore(local_root)
    if kind == "hf":
        return HubStore(token=token)
    raise StoreError(f"unknown store {kind!r}; expected hf or local")
