"""bench/trainer_input.py at toy size: a real cache, training with and without prefetch gives the
same weights, and the section reports both modes."""

from __future__ import annotations

from bench import trainer_input as bench


def test_the_bench_runs_and_both_modes_train_the_same_weights(tmp_path, capsys) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert (
        bench.main(["--steps", "4", "--seq-len", "128", "--k", "16", "--presets", "tiny", "--out", str(out)])
        == 0
    )
    text = out.read_text()
    assert "<!-- trainer_input:start -->" in text and "<!-- trainer_input:end -->" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) in (2, 4) and "(baseline)" in rows[0]  # every core, and one fewer where there are 2+
    assert all(row.rstrip().endswith("| yes |") for row in rows)  # prefetch changes nothing trained
