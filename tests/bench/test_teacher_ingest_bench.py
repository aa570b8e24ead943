"""bench/teacher_ingest.py end to end at toy size: realistic replies in vLLM's layout, the parse and
end-to-end rows for today's client and the new one (in-process and with a parse worker), and an
in-place update of its BENCHMARKS.md section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import teacher_ingest as bench
from distill.teachers._reference import reference_parse_completion_response

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_realistic_reply_has_vllms_layout():
    vocab = bench.Vocab("synthetic", seed=1)
    rng = np.random.default_rng(0)
    prompts = bench.realistic_prompts(rng, vocab, 2, 30)
    raw = bench.realistic_reply(rng, vocab, prompts, 20)
    assert raw.startswith(b'{"id":"cmpl-') and b'"prompt_logprobs":[null,{"' in raw and b" " not in raw[:200]
    body = json.loads(raw)
    for choice, prompt in zip(body["choices"], prompts):
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(prompt)
        for t, entry in enumerate(plp[1:], 1):
            first, *rest = entry.items()
            assert int(first[0]) == prompt[t]  # the actual token first, with its true rank
            assert [v["rank"] for _, v in rest] == sorted(v["rank"] for _, v in rest)
            assert len(entry) in (20, 21) and all(v["logprob"] <= 0 for v in entry.values())
    assert len(reference_parse_completion_response(body, prompts, 20)) == 2


def test_replies_for_any_prompt_have_vllms_layout_and_parse_alike():
    """The synthesising server's replies (bench/cache_pipeline.py): every prompt token listed once,
    first, with its rank; k or k + 1 distinct candidates; both parsers agree."""
    from distill.teachers import vllm_parse

    k = 20
    pool = bench._PositionPool(bench.Vocab("synthetic", seed=1), k, 16, seed=0)
    prompts = [[5, 5, 9, 1000, 17, 5], [3, 4], [int(t) for t in pool.ids[0]][:7]]  # repeats, pool ids
    raw = pool.reply(prompts)
    body = json.loads(raw)
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(prompt)
        for t, entry in enumerate(plp[1:], 1):
            keys = list(entry)
            assert keys[0] == str(prompt[t]) and len(keys) in (k, k + 1)
            ranks = sorted(v["rank"] for v in entry.values())
            assert ranks[:k] == list(range(1, k + 1))
    new = vllm_parse.parse_reply(raw, prompts, k)
    old = reference_parse_completion_response(body, prompts, k)
    for (ids, lps, tail), ref in zip(new, old, strict=True):
        assert np.array_equal(ids, ref.token_ids) and np.array_equal(lps, ref.logprobs)
        assert np.array_equal(tail, ref.tail_logprob)


def test_teacher_ingest_bench_records_results(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nkept before\n\n<!-- teacher_ingest:start -->\nold\n<!-- teacher_ingest:end -->\nkept after\n"
    )
    args = [
        "--k",
        "20,3",
        "--replies",
        "2",
        "--request-batch",
        "2",
        "--sample-len",
        "24",
        "--teacher-batch",
        "2",
    ]
    args += [
        "--vocab",
        "synthetic",
        "--parse-workers",
        "0,1",
        "--cycles",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "bench/teacher_ingest.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n") and text.endswith("kept after\n")
    assert "\nold\n" not in text
    assert text.count("<!-- teacher_ingest:start -->") == 1
    assert "- Command: `python bench/teacher_ingest.py --k 20,3" in text and "- Machine: " in text
    for k in (20, 3):
        assert f"| {k} | vllm engine (FlatLogprobs lists) | – |" in text
        assert f"| {k} | today (baseline) | cache calls | 8 | 0 |" in text
        assert f"| {k} | new | one call | 4 | 1 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 20 | ") and "x |" in line]
    assert len(rows) >= 2
