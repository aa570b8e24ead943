"""One dev kit per test process, copied into each test's root.

Building the kit trains a tiny teacher; the node tests only need its files (a tokenizer, a
teacher that loads, a corpus), not a good teacher, so the shared copy trains it for a few steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import neurons.devkit as devkit

TEST_TEACHER_STEPS = 10
_built: Path | None = None


def install_devkit(root: str | Path, tmp_path_factory) -> devkit.DevKit:
    """`root/devkit`, complete (no rebuild when a node opens it), from the process's shared build."""
    global _built
    if _built is None:
        source = tmp_path_factory.mktemp("devkit-source")
        saved = devkit.TEACHER_STEPS
        devkit.TEACHER_STEPS = TEST_TEACHER_STEPS
        try:
            devkit.ensure_devkit(source)
        finally:
            devkit.TEACHER_STEPS = saved
        _built = source / "devkit"
    target = Path(root) / "devkit"
    if not target.exists():
        shutil.copytree(_built, target)
    kit = devkit.ensure_devkit(root)
    assert kit.marker.exists()
    return kit
