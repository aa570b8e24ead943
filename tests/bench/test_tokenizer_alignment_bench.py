"""bench/tokenizer_alignment.py at toy size: the measuring function on a few lines per script with
the real Qwen3 (teacher) and Qwen3.5 (student) tokenizers and the oracle teacher, and its table."""

from __future__ import annotations

import pytest

from bench import tokenizer_alignment as bench
from bench.common import write_section
from distill.tiny import OracleTeacher


@pytest.fixture(scope="module")
def rows(qwen3_tokenizer, qwen35_tokenizer):
    corpus = bench.load_corpus()
    assert list(corpus) == list(bench.SCRIPTS)
    texts = {name: "\n\n".join(bench.paragraphs(text)[:2]) for name, text in corpus.items()}
    oracle = OracleTeacher(qwen3_tokenizer, p=0.9, spread=0.08)
    return bench.measure(texts, qwen3_tokenizer, qwen35_tokenizer, {"oracle": oracle}, k=8, sample_len=64)


def test_rows_per_script_and_all_together(rows):
    assert [r["script"] for r in rows] == [*bench.SCRIPTS, "all"]
    *scripts, total = rows
    for key in ("chars", "teacher_tokens", "student_tokens", "positions", "aligned", "sequences"):
        assert total[key] == sum(r[key] for r in scripts)
    mass = sum(r["teachers"]["oracle"]["mean_mapped_mass"] * r["aligned"] for r in scripts) / total["aligned"]
    assert total["teachers"]["oracle"]["mean_mapped_mass"] == pytest.approx(mass)
    for r in rows:
        assert r["skipped_sequences"] == 0 and r["dropped_special"] == 0
        assert 0.5 < r["aligned_fraction"] <= 1 and r["aligned"] <= r["positions"]
        oracle = r["teachers"]["oracle"]
        # p on the true token wherever it maps; never more than the oracle puts on its candidates
        assert 0.5 < oracle["mean_mapped_mass"] <= 0.98 + 1e-9
        assert 0.9 - 1e-9 <= oracle["teacher_topk_mass"] <= 0.98 + 1e-9
        assert r["teacher_tokens_per_1k_chars"] == pytest.approx(1000 * r["teacher_tokens"] / r["chars"])
    by_script = {r["script"]: r for r in rows}
    # CJK takes far more tokens per character than English on both sides
    for side in ("teacher_tokens_per_1k_chars", "student_tokens_per_1k_chars"):
        assert by_script["chinese"][side] > 2 * by_script["english"][side]


def test_table_and_section(rows, tmp_path):
    table = bench.format_table(rows, ["oracle"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| text | chars | Qwen3 tokens / 1K chars | Qwen3.5 tokens / 1K chars |")
    assert lines[2].startswith("| English |") and lines[-1].startswith("| **all together** |")
    report = {
        "args": {"k": 8, "p": 0.9, "spread": 0.08, "sample_len": 64},
        "meta": {"argv": [], "date": "today", "wall_s": 1.0, "load_start": "0", "load_end": "0"},
        "machine": {
            "platform": "p",
            "cpu": "c",
            "cpu_count": "2",
            "memory": "m",
            "torch": "t",
            "torch_threads": "2",
            "python": "3",
        },
        "info": {"build_s": 5.0, "tokenizer_json_bytes": 2**25},
        "teachers": {"oracle": {}},
        "rows": rows,
    }
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n")
    write_section(out, bench.SECTION, bench.render_section(report))
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "<!-- tokenizer_alignment:end -->" in text
    assert "5.0 s; tokenizer.json 32.0 MiB" in text and "No sequence was skipped" in text
