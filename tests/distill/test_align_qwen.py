"""Byte-offset alignment (`distill.teachers.align`) between the real Qwen3 tokenizer (teacher, 151K)
and the real Qwen3.5 tokenizer (student, 248K) on English, code, Chinese, Japanese, Russian, emoji and
numbers. The teacher is an `OracleTeacher` (probability p on the true next teacher token, the rest on
byte-prefix guesses), so every expected row follows from the two vocabularies alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distill.teachers.align import AlignedTeacher
from distill.tiny import OracleTeacher
from distill.types import MISSING_ID, Teacher, TopK
from tests.conftest import multiscript_texts

P, SPREAD, K = 0.9, 0.08, 8
CHAT = (
    "<|im_start|>user\nTranslate «ледоход» and 東京 into English, please 🙏<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nRussian, then Japanese.\n</think>\n\n"
    'Ice drift; Tokyo.<|im_end|>\n<tool_call>{"x": 1.5}</tool_call>'
)


class Recording:
    """Passes calls to a teacher and keeps what it was asked and answered."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.name, self.vocab_size = teacher.name, teacher.vocab_size
        self.calls: list[tuple[list[list[int]], list[TopK]]] = []

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        rows = self.teacher.topk(sequences, k)
        self.calls.append(([list(s) for s in sequences], rows))
        return rows

    def close(self) -> None:
        self.teacher.close()


@pytest.fixture(scope="module")
def teacher(qwen3_tokenizer) -> Recording:
    return Recording(OracleTeacher(qwen3_tokenizer, p=P, spread=SPREAD))


@pytest.fixture(scope="module")
def aligned(teacher, qwen3_tokenizer, qwen35_tokenizer) -> AlignedTeacher:
    return AlignedTeacher(teacher, qwen3_tokenizer, qwen35_tokenizer)


def _bytes_table(tokenizer) -> list[bytes | None]:
    """Each id's bytes, read independently of `token_bytes`: the GPT-2 byte alphabet undone on the
    BPE pieces; added tokens stand for their content unless special (then for no bytes)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    backend = tokenizer.backend_tokenizer
    table: list[bytes | None] = [None] * len(tokenizer)
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        table[i] = bytes(byte_of[c] for c in piece)
    for i, tok in backend.get_added_tokens_decoder().items():
        table[i] = None if tok.special else tok.content.encode()
    return table


@pytest.fixture(scope="module")
def vocab(qwen3_tokenizer, qwen35_tokenizer):
    """Lookups for the expected rows: bytes of every id, and each side's added tokens."""
    t_added = {i: t.content for i, t in qwen3_tokenizer.backend_tokenizer.get_added_tokens_decoder().items()}
    s_added = {i: t.content for i, t in qwen35_tokenizer.backend_tokenizer.get_added_tokens_decoder().items()}
    s_bytes = _bytes_table(qwen35_tokenizer)
    return {
        "t_bytes": _bytes_table(qwen3_tokenizer),
        "s_bytes": s_bytes,
        "t_added": t_added,
        "s_by_content": {c: i for i, c in s_added.items()},
        "s_by_bytes": {b: i for i, b in enumerate(s_bytes) if b and i not in s_added},
    }


def _documents(tokenizer) -> dict[str, list[list[int]]]:
    """Each script's paragraphs as student sequences ending in EOS, plus a chat with added tokens."""
    docs = {
        name: [tokenizer(p)["input_ids"] + [tokenizer.eos_token_id] for p in text.split("\n\n") if p.strip()]
        for name, text in multiscript_texts().items()
    }
    docs["chat"] = [tokenizer(CHAT)["input_ids"]]
    return docs


def _offsets(seq: list[int], tb: list[bytes | None]) -> list[int]:
    out, pos = [], 0
    for i in seq:
        out.append(pos)
        pos += 1 if tb[i] is None else len(tb[i])
    return out


def _student_id(teacher_id: int, v) -> int | None:
    """The student token a teacher token stands for: added tokens by content, the rest by bytes."""
    if teacher_id in v["t_added"]:
        return v["s_by_content"].get(v["t_added"][teacher_id])
    return v["s_by_bytes"].get(v["t_bytes"][teacher_id])


def _expected(s_seq, t_seq, t_rows: TopK, v) -> dict[int, tuple[int, dict[int, float]] | None]:
    """{student position: (teacher row, {student id: log-prob}) or None where no target is due}."""
    s_off, t_off = _offsets(s_seq, v["s_bytes"]), _offsets(t_seq, v["t_bytes"])
    t_at = {off: u for u, off in enumerate(t_off)}
    out: dict[int, tuple[int, dict[int, float]] | None] = {}
    for t in range(1, len(s_seq)):
        u = t_at.get(s_off[t])
        if not u:
            out[t] = None
            continue
        cands: dict[int, float] = {}
        for i, lp in zip(t_rows.token_ids[u].tolist(), t_rows.logprobs[u].tolist()):
            sid = _student_id(i, v) if i >= 0 else None
            if sid is not None:
                cands[sid] = float(np.logaddexp(cands.get(sid, -np.inf), lp))
        out[t] = (u, cands)
    return out


def _check_rows(rows: TopK, k: int) -> None:
    lp = rows.logprobs
    assert (np.diff(np.where(np.isfinite(lp), lp, -1e30), axis=1) <= 0).all(), "rows must be sorted"
    assert ((rows.token_ids == MISSING_ID) == ~np.isfinite(lp)).all()
    total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(rows.tail_logprob.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert rows.token_ids.shape[1] == k


def test_rows_are_the_teachers_where_the_tokenisations_agree(aligned, teacher, qwen35_tokenizer, vocab):
    aligned.reset_stats()
    docs = _documents(qwen35_tokenizer)
    maps = agrees = 0  # aligned positions whose true teacher token is a student token / the true one
    for name, seqs in docs.items():
        teacher.calls.clear()
        out = aligned.topk(seqs, K)
        ((sent, t_rows),) = teacher.calls
        assert len(out) == len(sent) == len(seqs)
        for s_seq, t_seq, rows, tr in zip(seqs, sent, out, t_rows):
            _check_rows(rows, K)
            # the teacher was asked about the same text, in its own tokens
            s_text = b"".join(vocab["s_bytes"][i] or b"" for i in s_seq)
            assert b"".join(vocab["t_bytes"][i] or b"" for i in t_seq) == s_text
            for t, want in _expected(s_seq, t_seq, tr, vocab).items():
                got = {int(i): float(lp) for i, lp in zip(rows.token_ids[t], rows.logprobs[t]) if i >= 0}
                if want is None:
                    assert not got and rows.tail_logprob[t] == 0, (name, t)
                    continue
                u, cands = want
                assert got == pytest.approx(cands, abs=1e-6), (name, t)
                # The oracle's top-1 is the true next teacher token: where it is one student token,
                # that token is the student target's top-1 at log p; where the tokenisations agree
                # there, it is the true next student token.
                sid = _student_id(t_seq[u], vocab)
                if sid is not None:
                    maps += 1
                    assert rows.token_ids[t, 0] == sid, (name, t)
                    assert rows.logprobs[t, 0] == pytest.approx(math.log(P), abs=1e-6)
                    agrees += sid == s_seq[t]
    stats = aligned.stats
    print(f"\nalignment (Qwen3 oracle teacher -> Qwen3.5 student), all texts: {stats.as_dict()}")
    assert stats.sequences == sum(len(s) for s in docs.values()) and stats.skipped_sequences == 0
    assert stats.positions == sum(len(s) - 1 for seqs in docs.values() for s in seqs)
    assert stats.dropped_special == 0  # every added token in these texts exists on both sides
    assert maps >= agrees > 0.7 * stats.aligned
    assert 0.8 < stats.aligned_fraction <= 1.0
    # at least the true token's p where it maps, never more than the oracle put on its k candidates
    assert 0.8 < stats.mean_mapped_mass <= P + SPREAD + 1e-6


def test_added_tokens_cross_by_content(aligned, teacher, qwen35_tokenizer, qwen3_tokenizer):
    aligned.reset_stats()
    seq = qwen35_tokenizer(CHAT)["input_ids"]
    teacher.calls.clear()
    (rows,) = aligned.topk([seq], K)
    ((sent,), _) = teacher.calls[-1]
    assert (
        sent == qwen3_tokenizer(CHAT)["input_ids"]
    )  # <|im_start|>, <think>, <tool_call> as the teacher's own
    for content in ("<|im_end|>", "</think>", "</tool_call>"):
        t = seq.index(qwen35_tokenizer.convert_tokens_to_ids(content))
        assert rows.token_ids[t, 0] == seq[t] and rows.logprobs[t, 0] == pytest.approx(math.log(P))

    # <|audio_start|> is Qwen3.5-only and special: left out of the teacher's input, no target there.
    audio = qwen35_tokenizer.convert_tokens_to_ids("<|audio_start|>")
    seq = qwen35_tokenizer("Listen:")["input_ids"] + [audio] + qwen35_tokenizer(" done")["input_ids"]
    aligned.reset_stats()
    (rows,) = aligned.topk([seq], K)
    ((sent,), _) = teacher.calls[-1]
    assert sent == qwen3_tokenizer("Listen: done")["input_ids"]
    assert aligned.stats.dropped_special == 1
    assert (rows.token_ids[seq.index(audio)] == MISSING_ID).all()


def test_any_cut_aligns_without_raising(aligned, qwen35_tokenizer, vocab):
    """Windows at arbitrary token offsets, many starting or ending inside a multi-byte character
    (emoji sequences, CJK split by byte-level merges), as a packed training stream cuts them."""
    ids = [i for seqs in _documents(qwen35_tokenizer).values() for s in seqs for i in s]
    windows = [ids[start : start + 48] for start in range(0, len(ids) - 48, 13)]
    s_bytes = vocab["s_bytes"]
    cut = sum(1 for w in windows if s_bytes[w[0]] and (s_bytes[w[0]][0] & 0xC0) == 0x80)
    assert cut > 0  # some windows really start inside a character
    aligned.reset_stats()
    for rows in aligned.topk(windows, K):
        _check_rows(rows, K)
    assert aligned.stats.sequences == len(windows) and aligned.stats.skipped_sequences == 0
    assert aligned.stats.aligned_fraction > 0.8
