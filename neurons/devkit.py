"""The embedded default's local assets: a tokenizer, a tiny trained Qwen3 teacher and a text corpus,
built once from text every Python installation carries (nothing is downloaded) and shared by every
node under the same root.

Several nodes may start at once: the first builds the kit under a file lock while the others wait,
and a kit is only used once its completion marker exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from quasar.files import atomic_write

log = logging.getLogger(__name__)

KIT_VERSION = 1
VOCAB_SIZE = 512
TEACHER_STEPS = 150


@dataclass(frozen=True)
class DevKit:
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def corpus(self) -> Path:
        """A directory holding corpus.jsonl (one {"text": ...} document per line)."""
        return self.root / "text"

    @property
    def marker(self) -> Path:
        return self.root / "complete.json"


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_devkit(root: str | Path) -> DevKit:
    """The kit under `root/devkit`, built on first use (about 15 s on two CPU cores)."""
    kit = DevKit(Path(root).expanduser() / "devkit")
    with file_lock(kit.root.parent / ".devkit.lock", "the dev kit"):
        if kit.marker.exists():
            recorded = json.loads(kit.marker.read_text())
            if recorded.get("version") == KIT_VERSION:
                return kit
            log.info("dev kit at %s is version %s; rebuilding", kit.root, recorded.get("version"))
        _build(kit)
    return kit


def _build(kit: DevKit) -> None:
    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    started = time.monotonic()
    log.info("building the dev kit (tokenizer, tiny teacher, corpus) in %s", kit.root)
    shutil.rmtree(kit.root, ignore_errors=True)
    kit.root.mkdir(parents=True)
    corpus = local_corpus()
    tokenizer = train_tokenizer(corpus, VOCAB_SIZE, kit.tokenizer)
    build_qwen3_teacher(tokenizer, kit.teacher, train_texts=corpus, train_steps=TEACHER_STEPS, seed=0)
    kit.corpus.mkdir()
    atomic_write(kit.corpus / "corpus.jsonl", "".join(json.dumps({"text": doc}) + "\n" for doc in corpus))
    atomic_write(
        kit.marker,
        json.dumps({"version": KIT_VERSION, "documents": len(corpus), "vocab_size": len(tokenizer)}) + "\n",
    )
    log.info("dev kit ready in %.0fs", time.monotonic() - started)
