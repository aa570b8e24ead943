"""bench/kernels.py: without a GPU it says so and times the CPU paths; its GPU table renders every case."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import kernels as kernels_bench

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_script_says_so_and_times_the_cpu_paths(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "bench/kernels.py", "--lengths", "64", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stderr
    text = out.read_text()
    assert "<!-- kernels_cpu:start -->" in text and "<!-- kernels_cpu:end -->" in text
    # both ops, both CPU backends, at the requested length
    for op in ("quasar_attention", "gla_attention"):
        for backend in ("torch", "naive"):
            assert f"| {op} | {backend} | 64 |" in text


def test_gpu_table_renders_peers_missing_peers_and_out_of_memory():
    rows = [
        {"op": "gla_attention", "impl": "ours (triton)", "B": 1, "T": 4096, "fwd_s": 0.001, "fwdbwd_s": 0.004,
         "rel_err": 2e-3, "speedup_fwd": 1.5, "speedup_fwdbwd": 0.8},
        {"op": "gla_attention", "impl": "fla chunk_gla", "B": 1, "T": 4096, "fwd_s": 0.0015, "fwdbwd_s": 0.0032},
        {"op": "quasar_attention", "impl": "ours (triton)", "B": 4, "T": 65536, "fwd_s": math.nan,
         "fwdbwd_s": math.nan, "rel_err": None},
    ]  # fmt: skip
    table = kernels_bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| 1.50x | 0.80x | 2.0e-03 |" in lines[2]
    assert "| 4,096,000 |" in lines[2]  # tokens/s = 4096 / 1 ms
    assert lines[3].endswith("| – | – | – |")
    assert "| – | – | – | – |" in lines[4]  # out of memory: no times, no rates


def test_bad_op_is_rejected_with_the_choices():
    with pytest.raises(SystemExit):
        kernels_bench.parse_args(["--ops", "softmax"])
