"""Crash-safe file writing, shared by checkpoints (here), the trainer, the logit cache and reports:
write a temporary file in the same directory, fsync it, rename it over the target, fsync the
directory. A reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Iterable[bytes], *, tmp_prefix: str = ".tmp-") -> Path:
    """Replace `path` with `data` (bytes, text as UTF-8, or byte chunks) atomically; the temporary
    file is named `<tmp_prefix><name>-*` so that its owner can recognise leftovers."""
    path = Path(path)
    chunks = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
