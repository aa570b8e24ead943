"""bench/streaming.py end to end at toy size: per-process measurements, the baseline's time budget
(a baseline that runs out of time is recorded as stopped and skipped at longer lengths), the JSON,
the plot and an in-place update of its BENCHMARKS.md section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_streaming_bench_records_results_and_enforces_the_baseline_budget(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nkept before\n\n<!-- streaming:start -->\nold\n<!-- streaming:end -->\nkept after\n"
    )
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/streaming.py",
            "--preset",
            "tiny",
            "--lengths",
            "96,200",
            "--chunk",
            "64",
            "--baseline-budget",
            "0.05",
            "--threads",
            "1",
            "--results-dir",
            str(results),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((results / "streaming.json").read_text())
    rows = {(r["model"], r["tokens"]): r for r in report["rows"]}
    for tokens in (96, 200):
        quasar = rows[("quasar", tokens)]
        assert quasar["status"] == "ok"
        assert quasar["seconds"] > 0 and quasar["peak_rss_bytes"] > 0
    # 0.05 s is far less than the worker needs to start, so the baseline is stopped at the first
    # length and not run at the second.
    assert rows[("qwen3", 96)]["status"] == "timeout"
    assert rows[("qwen3", 200)]["status"] == "skipped"
    assert report["parameters"]["quasar"]["active"] < report["parameters"]["quasar"]["total"]
    assert report["parameters"]["qwen3"]["total"] > 0
    assert (results / "streaming.png").stat().st_size > 0

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n") and text.endswith("kept after\n")
    assert "old" not in text and text.count("<!-- streaming:start -->") == 1
    assert "| quasar | 200 | ok |" in text
    assert "did not finish 96 in 0.05 s" in text
