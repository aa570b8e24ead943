"""`python -m quasar demo`: the README's main job runs end to end, and bad flags fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quasar.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_as_a_module():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "quasar",
            "demo",
            "--preset",
            "tiny",
            "--tokens",
            "300",
            "--chunk",
            "128",
            "--generate",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "streamed 300 tokens" in proc.stdout
    assert "tokens/s" in proc.stdout and "peak RSS" in proc.stdout
    generated = [line for line in proc.stdout.splitlines() if line.startswith("generated 3 tokens")]
    assert len(generated) == 1, proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--tokens", "0"], "--tokens"),
        (["--chunk", "-5"], "--chunk"),
        (["--dtype", "float8"], "dtype must be"),
        (["--tokens", "many"], "invalid int value"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
