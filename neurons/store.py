"""Checkpoint stores: where miners publish and validators fetch pinned checkpoints.

- `HubStore`: the Hugging Face Hub. Upload a checkpoint folder (only the allowed files) and get
  the commit sha to pin; download a pinned revision after checking, from the Hub's file metadata,
  that it holds only allowed files and is not larger than the caller's limit.
- `LocalStore`: a directory, content-addressed (the revision is derived from the content hash), for
  the embedded default and tests. Same contract, same checks.

Only these files ever travel: the config, safetensors weights (and their index), the generation
config and tokenizer files. Never pickles, never code. `content_hash` identifies the model itself
(config + weights), the same on every machine, and is what a commitment binds to the hotkey.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

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


# Hub answers that are about the submission itself, not the connection to it.
_PERMANENT_HUB_ERRORS = (
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "GatedRepoError",
)


def _hub_failure(message: str, error: Exception) -> StoreError:
    kind = StoreError if type(error).__name__ in _PERMANENT_HUB_ERRORS else StoreUnavailable
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

    def download(self, repo: str, revision: str, dest: str | Path, *, max_bytes: int) -> Path:
        """Fetch `repo` at `revision` into `dest` after checking its files and size; returns `dest`."""
        ...


# ------------------------------------------------------------------------------------------------


class LocalStore:
    """`root/<repo>/<revision>/`, revision = the first 40 hex digits of the content hash. Writes are
    atomic (a temporary directory renamed into place) and a revision, once written, never changes."""

    kind = "local"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, repo: str, revision: str) -> Path:
        path = (self.root / repo / revision).resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"repository {repo!r} escapes the store")
        return path

    def upload(self, checkpoint: str | Path, repo: str) -> str:
        files = publishable_files(checkpoint)
        revision = content_hash(checkpoint)[:40]
        final = self._path(repo, revision)
        if final.exists():
            return revision  # content-addressed: the same content is already there
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=final.parent))
        try:
            for f in files:
                shutil.copyfile(f, tmp / f.name)
                with open(tmp / f.name, "rb") as handle:
                    os.fsync(handle.fileno())
            os.rename(tmp, final)
        except FileExistsError:  # another process published the same content first
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return revision

    def download(self, repo: str, revision: str, dest: str | Path, *, max_bytes: int) -> Path:
        source = self._path(repo, revision)
        if not source.is_dir():
            raise StoreError(f"local store has no {repo} at revision {revision}")
        listing = {p.name: p.stat().st_size for p in source.iterdir() if p.is_file()}
        _check_listing(listing, f"{repo}@{revision[:12]}", max_bytes)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name in listing:
            shutil.copyfile(source / name, dest / name)
        if content_hash(dest)[:40] != revision:
            raise StoreError(
                f"{repo}@{revision[:12]}: the files do not match their revision (the store is corrupt)"
            )
        return dest


# ------------------------------------------------------------------------------------------------


class HubStore:
    """The Hugging Face Hub through `huggingface_hub.HfApi` (injected for tests)."""

    kind = "hf"

    def __init__(self, token: str | None = None, api=None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.api = api

    def upload(self, checkpoint: str | Path, repo: str) -> str:
        files = publishable_files(checkpoint)
        content_hash(checkpoint)  # refuses a folder without config and weights
        try:
            self.api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
            info = self.api.upload_folder(
                repo_id=repo,
                folder_path=str(checkpoint),
                allow_patterns=[f.name for f in files],
                commit_message="Quasar checkpoint",
            )
        except Exception as e:  # network, auth, quota: the caller must not commit this checkpoint
            raise StoreError(f"upload of {checkpoint} to the Hub repository {repo} failed: {e}") from e
        revision = getattr(info, "oid", None)
        if not isinstance(revision, str) or len(revision) != 40:
            raise StoreError(
                f"the Hub did not return a commit id for the upload to {repo} (got {revision!r})"
            )
        return revision

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
