"""bench/longctx_eval.py end to end at toy size: both models through the real runner, one process per
(model, length), the JSON, the plot and an in-place update of its BENCHMARKS.md section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_longctx_bench_measures_both_models_and_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nkept\n\n<!-- longctx_eval:start -->\nold\n<!-- longctx_eval:end -->\nafter\n"
    )
    argv = ["--lengths", "256", "--quasar-lengths", "512", "--tasks", "variable_tracking"]
    argv += ["--threads", "1", "--results-dir", str(tmp_path / "results"), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "bench/longctx_eval.py", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "longctx_eval.json").read_text())
    quasar, qwen3 = report["rows"]["quasar"], report["rows"]["qwen3"]
    assert [r["length"] for r in quasar] == [256, 512] and [r["length"] for r in qwen3] == [256]
    for r in quasar + qwen3:
        assert r["status"] == "ok" and r["answered"] == 1 and r["seconds_per_sample"] > 0
        assert abs(r["prompt_tokens"] - r["length"]) <= max(1, 0.01 * r["length"])
        assert r["peak_rss_bytes"] > 0 and r["cache_bytes"] > 0
    assert quasar[0]["parameters"]["active"] < quasar[0]["parameters"]["total"]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n") and text.endswith("after\n") and "\nold\n" not in text
    assert (
        "| 256 | quasar | ok |" in text and "| 256 | qwen3 | ok |" in text and "| 512 | quasar | ok |" in text
    )
    assert (tmp_path / "results" / "longctx_eval.png").read_bytes()[:4] == b"\x89PNG"
