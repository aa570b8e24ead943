"""bench/cache.py end to end at toy size: every data set and format measured (the version-1 baseline
included), the compact-against-lossless training comparison (caches filled by `python -m distill cache
--cache_precision ...`), the JSON and an in-place update of its BENCHMARKS.md section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cache_bench_measures_every_format_and_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nkept before\n\n<!-- cache:start -->\nOLD SECTION BODY\n<!-- cache:end -->\nkept after\n"
    )
    results = tmp_path / "cache.json"
    proc = subprocess.run(
        [
            sys.executable, "bench/cache.py", "--sequences", "3", "--seq-len", "64", "--k", "16",
            "--teacher-vocab", "512", "--train-steps", "5", "--repeats", "1", "--distill-steps", "2",
            "--distill-k", "16", "--distill-teacher-steps", "2", "--distill-samples", "40",
            "--json", str(results), "--out", str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(results.read_text())
    rows = {(r["data"], r["format"]): r for r in report["rows"]}
    formats = ["v1 (baseline)", "lossless", "compact", "compact, drop 5%"]
    for data in ("realistic ids", "uniform ids"):
        for fmt in formats:
            r = rows[(data, fmt)]
            assert r["bytes_per_token"] > 0 and r["id_bits"] > 0 and 1 <= r["kept"] <= 16
    real = {fmt: rows[("realistic ids", fmt)] for fmt in formats}
    assert real["lossless"]["kept"] == 16 and real["compact"]["kept"] <= 16
    assert real["compact, drop 5%"]["bytes_per_token"] < real["lossless"]["bytes_per_token"]
    assert 8 < report["info"]["realistic"]["entropy_bits"] < 18
    variants = report["distill"]["variants"]
    assert list(variants) == formats[1:]
    assert variants["lossless"]["loss_rel_err"] == 0 and variants["lossless"]["max_err"] == 0
    for name in formats[2:]:
        v = variants[name]
        assert v["max_err"] <= 1 / 32 + 1e-9 and v["max_err_rank0"] <= 1 / 32 + 1e-9  # the documented bound
        assert -1e-3 <= v["moved_mean"] <= v["moved_max"] + 1e-12  # float16 rounding of the tail aside
        assert v["kl"] > 0 and -1 < v["kl_rel"] < 1 and 0 < v["grad_cos"] <= 1 + 1e-9
    assert report["distill"]["spread_kl"] > 0

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n\n<!-- cache:start -->")
    assert text.rstrip().endswith("<!-- cache:end -->\nkept after")
    assert "OLD SECTION BODY" not in text.split("<!-- cache:start -->")[1]
    assert "| realistic ids | v1 (baseline) | zlib 6 |" in text
    assert "Lossless <= 300 bytes/token" in text and "Compact <= 150 bytes/token" in text
    assert "| compact, drop 5% |" in text and "Run-to-run spread" in text
