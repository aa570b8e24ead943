"""Every Triton kernel compiles for A100 (sm_80), RTX 4090 / L40 (sm_89) and H100 (sm_90) and fits their shared memory.

The interpreter tests prove the kernels compute the right thing; this proves they would launch on
those GPUs. It compiles ahead of time with Triton's bundled ptxas, so no GPU is needed.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS = [
    "_efla_prepare", "_efla_state", "_efla_output", "_efla_state_bwd", "_efla_chunk_bwd_v", "_efla_chunk_bwd_k",
    "_gla_cumsum", "_gla_intra_scores", "_gla_state", "_gla_output", "_gla_state_bwd", "_gla_dA", "_gla_dv",
    "_gla_dqk",
]  # fmt: skip


def test_every_kernel_compiles_for_sm80_sm89_sm90_within_shared_memory():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.compile_check",
            "--arch",
            "80,89,90",
            "--dtype",
            "bf16",
            "--dim",
            "128",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for arch in (80, 89, 90):
        for kernel in KERNELS:
            assert f"| sm_{arch} | {kernel} |" in proc.stdout, f"{kernel} was not compiled for sm_{arch}"
    assert "compile error" not in proc.stdout
