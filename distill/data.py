"""Text sources, tokenised samples and packing into fixed-size training windows.

    texts (files, JSONL, HF datasets streaming) -> tokenize -> samples (<= sample_len tokens each)
    -> teacher top-k (live or from the cache) -> pack whole samples into windows of seq_len tokens
    -> batches: `batch_size` windows laid end to end in one row with their `cu_seqlens`

A sample is the unit the teacher scores, so teacher and student always see exactly the same
context (a sample is never split across windows). The stream of samples is deterministic, so a
position in it (the index of the next sample) is all a resumed run needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.types import KDTargets

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A data source that cannot be read; the message says which and why."""


def iter_texts(sources: list[str], text_field: str = "text") -> Iterator[str]:
    """Documents from local files and directories, or `hf:NAME[:CONFIG][@SPLIT]` (Hugging Face
    `datasets` streaming, when installed and online). A .txt/.md file is one document; a .jsonl
    file holds one JSON object per line with the text under `text_field`; directories are read
    recursively in sorted order."""
    for source in sources:
        if source.startswith("hf:"):
            yield from _iter_hf_dataset(source[3:], text_field)
            continue
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"data source {source!r} does not exist (expected a file, a directory or hf:NAME)"
            )
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix in JSONL_SUFFIXES:
                yield from _iter_jsonl(file, text_field)
            elif file.suffix in TEXT_SUFFIXES or not path.is_dir():
                text = file.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield text


def _iter_jsonl(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{line_no}: not valid JSON ({e.msg})") from e
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f"{file}:{line_no}: no string field {text_field!r} (fields: "
                    f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                    "set --data.text_field"
                )
            if text.strip():
                yield text


def _iter_hf_dataset(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"hf:{spec} needs the Hugging Face `datasets` package (pip install datasets); "
            "or use local text/JSONL files"
        ) from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown dataset, ...: say which and why
        raise DataError(f"cannot stream Hugging Face dataset {spec!r}: {e}") from e
    for record in stream:
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text


def split_tokens(ids: list[int], sample_len: int) -> Iterator[np.ndarray]:
    """Cut one document's tokens into samples of at most `sample_len` tokens (at least 2, so each
    sample has a next-token target)."""
    for start in range(0, len(ids), sample_len):
        piece = ids[start : start + sample_len]
        if len(piece) >= 2:
            yield np.asarray(piece, dtype=np.int32)


def iter_samples(
    texts: Iterable[str], tokenizer, sample_len: int, append_eos: bool = True
) -> Iterator[np.ndarray]:
    """Token samples from documents, in order: each document ends with EOS and is cut into
    `sample_len` pieces."""
    if sample_len < 2:
        raise ValueError(f"sample_len must be at least 2, got {sample_len}")
    eos = tokenizer.eos_token_id
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if append_eos and eos is not None:
            ids.append(eos)
        yield from split_tokens(ids, sample_len)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """Whole samples packed into exactly seq_len tokens; the unused tail is a padding document
    without targets, so every window (and batch) has the same shape."""

    tokens: np.ndarray  # int32 [seq_len]
    offsets: list[int]  # document boundaries [0, ..., seq_len], padding included as a document
    targets: KDTargets  # [seq_len] rows aligned with student positions


def pack_windows(
    items: Iterable[tuple[int, np.ndarray]], seq_len: int
) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Greedy in-order packing of (stream index, tokens) samples into groups whose total length fits
    seq_len; the last, partial group is yielded when a finite input ends. Deterministic, so packing
    the same stream from the same position gives the same windows on every rank and after a resume."""
    window: list[tuple[int, np.ndarray]] = []
    used = 0
    for index, tokens in items:
        if len(tokens) > seq_len:
            raise ValueError(
                f"sample {index} has {len(tokens)} tokens, more than seq_len={seq_len}; lower sample_len"
            )
        if used + len(tokens) > seq_len:
            yield window
            window, used = [], 0
        window.append((index, tokens))
        used += len(tokens)
    if window:
        yield window


def make_window(samples: list[tuple[np.ndarray, KDTargets]], seq_len: int, pad_id: int) -> Window:
    tokens = [s for s, _ in samples]
    targets = [t for _, t in samples]
    used = sum(len(t) for t in tokens)
    offsets = [0, *np.cumsum([len(t) for t in tokens]).tolist()]
    pad = seq_len - used
    if pad < 0:
        raise ValueError(f"samples hold {used} tokens, more than seq_len={seq_len}")
    if pad:
        k = targets[0].token_ids.shape[1] if targets else 1
        tokens.append(np.full(pad, pad_id, dtype=np.int32))
        targets.append(
            KDTargets(
                torch.zeros(pad, k, dtype=torch.long),
                torch.full((pad, k), float("-inf")),
                torch.zeros(pad),
                torch.zeros(pad, dtype=torch.bool),
                torch.full((pad,), -100, dtype=torch.long),
            )
        )
        offsets.append(seq_len)
    return Window(np.concatenate(tokens), offsets, KDTargets.cat(targets))


@dataclass
class Batch:
    """`batch_size` windows in one row [1, batch_size * seq_len] with their document offsets."""

    input_ids: torch.Tensor  # int64 [1, L]
    cu_seqlens: torch.Tensor  # int32 [num_docs + 1]
    targets: KDTargets

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.cu_seqlens.to(device), self.targets.to(device))


def collate(windows: list[Window]) -> Batch:
    offsets: list[int] = [0]
    for i, w in enumerate(windows):
        base = i * len(w.tokens)
        offsets.extend(base + o for o in w.offsets[1:])
    return Batch(
        torch.from_numpy(np.concatenate([w.tokens for w in windows]).astype(np.int64))[None],
        torch.tensor(offsets, dtype=torch.int32),
        KDTargets.cat([w.targets for w in windows]),
    )
