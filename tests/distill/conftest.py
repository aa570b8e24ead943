"""Session fixtures for the distillation tests: a local corpus, a student tokenizer, a tiny trained
Qwen3 teacher and a small logit cache built from them (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

STUDENT_VOCAB = 512


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return local_corpus()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, corpus) -> Path:
    """tokenizer/, teacher/ (trained 150 steps), text/corpus.jsonl (training) and text-heldout/."""
    root = tmp_path_factory.mktemp("distill")
    tokenizer = train_tokenizer(corpus, STUDENT_VOCAB, root / "tokenizer")
    build_qwen3_teacher(tokenizer, root / "teacher", train_texts=corpus, train_steps=150, seed=0)
    (root / "text").mkdir()
    with open(root / "text" / "corpus.jsonl", "w") as f:
        for doc in corpus:
            f.write(json.dumps({"text": doc}) + "\n")
    return root


@pytest.fixture(scope="session")
def cache_dir(workspace) -> Path:
    """A logit cache of 240 samples of <= 64 tokens at k = 32 from the tiny teacher."""
    from distill.cli import main

    out = workspace / "cache"
    code = main(cache_args(workspace, out, k=32, max_samples=240))
    assert code == 0
    return out


def cache_args(workspace, out, *, k: int, max_samples: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m distill cache` arguments scoring the workspace's text with its tiny HF teacher."""
    return [
        "cache",
        "--cache_dir", str(out),
        "--teacher.kind", "hf",
        "--teacher.model", str(workspace / "teacher"),
        "--teacher.device", "cpu",
        "--data.tokenizer", str(workspace / "tokenizer"),
        "--data.sources", str(workspace / "text"),
        "--data.sample_len", "64",
        "--k", str(k),
        "--max_samples", str(max_samples),
        "--no-progress",
        *extra,
    ]  # fmt: skip
