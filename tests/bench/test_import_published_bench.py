"""bench/import_published.py end to end at toy size: the dummy in the published layout, both
converters in their own processes, identical outputs, and an in-place update of its section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_bench_compares_both_converters_and_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nkept\n\n<!-- import_published:start -->\nold\n<!-- import_published:end -->\n"
    )
    argv = ["--d-model", "256", "--layers", "6", "--vocab", "1024", "--experts", "4"]
    argv += [
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "bench/import_published.py", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "import_published.json").read_text())
    rows = result["rows"]
    assert rows["identical_outputs"] is True
    for kind in ("streaming", "load-all"):
        assert rows[kind]["seconds"] > 0 and rows[kind]["peak_rss_bytes"] > 0
    assert result["dummy"]["tensors"] == 175 and not (tmp_path / "work").exists()
    text = out.read_text()
    assert "\nold\n" not in text and "| `import-published` (streaming) |" in text and "kept" in text
