"""One node per node directory, and the directory's clean-up at start.

Two miners (or validators) with the same wallet and hotkey on the same --root would share one
state file, one run directory and one download cache, and overwrite each other's writes. The
first to start holds an exclusive `flock` on `<node dir>/.lock` until it stops; the kernel drops
the lock when the process dies, however it dies, so there is never a stale lock to remove by hand.
The file only names the holder, for the message the second one prints.

Once the lock is held nobody else writes in the directory, so whatever temporary files and
directories are there are leftovers of writes that a kill interrupted: `clean_temporary_files`
removes them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from neurons.chain import ChainError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class NodeDirectoryLocked(ChainError):
    """Another node holds this node directory."""


class NodeLock:
    """An exclusive lock on `directory` (created as needed), held until `close()`; `role` and
    `describe` (who is holding it: role, hotkey, host, start time) go into the messages."""

    def __init__(self, directory: str | Path, role: str, describe: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.directory.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a program the node starts must not inherit, and so keep, the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise NodeDirectoryLocked(
                f"{self.directory} is in use by pid {holder}: another {role} with this wallet and hotkey "
                f"is running on this --root; stop it, or give this one its own --root or --wallet.hotkey"
            ) from None
        except OSError as e:  # ENOLCK: a file system (some network mounts) without locks
            os.close(fd)
            raise ChainError(f"cannot lock {self.path} ({e}): put --root on a local file system") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{describe}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def close(self) -> None:
        """Release the lock; closing twice is fine. The file stays: removing it would race with a
        node that has opened it but not locked it yet, and two nodes could hold locks on two files."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no pid of a stopped node left behind to mislead anyone
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> NodeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holder(fd: int) -> str:
    """`<pid> (<description>)` of the holder, from the lock file, or `unknown` if it has not
    written it yet."""
    lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        return "unknown"
    return f"{lines[0].strip()} ({lines[1].strip()})" if len(lines) > 1 else lines[0].strip()


# Names of interrupted writes: quasar.files.atomic_write's and the trainer's `.tmp-` prefix, the
# store's `.upload-` temporary directories, the validator's `*.partial` downloads and the miner's
# `*.tmp` snapshot directories.
TMP_FILE_PREFIX = ".tmp-"
TMP_DIR_PREFIXES = (".tmp-", ".upload-")
TMP_DIR_SUFFIXES = (".partial", ".tmp")


def clean_temporary_files(directory: str | Path) -> int:
    """Remove leftovers of interrupted writes anywhere under `directory`; returns how many. Call
    it only while holding the directory's `NodeLock`: a live writer's files look the same."""
    removed = 0
    for parent, dirnames, filenames in os.walk(directory):  # never follows symlinks
        here = Path(parent)
        for name in list(dirnames):
            path = here / name
            temporary = name.startswith(TMP_DIR_PREFIXES) or name.endswith(TMP_DIR_SUFFIXES)
            if not temporary or path.is_symlink():
                continue
            shutil.rmtree(path)
            dirnames.remove(name)  # gone: nothing to walk into
            removed += 1
        for name in filenames:
            if name.startswith(TMP_FILE_PREFIX):
                (here / name).unlink()
                removed += 1
    level = logging.INFO if removed else logging.DEBUG
    log.log(level, "removed %d temporary file(s) left by interrupted writes under %s", removed, directory)
    return removed
