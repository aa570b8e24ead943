"""Cross-tokenizer distillation by byte-offset alignment (`distill.teachers.align`).

Two genuinely different locally trained tokenizers stand in for a GLM teacher and a Qwen-vocabulary
student; a tiny Qwen3 gives exact top-k for the teacher's vocabulary. Hand-written vocabularies check
exact output rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.implementations import SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from distill.teachers.align import AlignedTeacher, TokenizerMismatchError, token_bytes
from distill.tiny import EOS_TOKEN, build_qwen3_teacher, local_corpus, train_tokenizer
from distill.types import MISSING_ID, Teacher, TopK

# Multi-byte characters, so tokens split characters and sequence cuts can land inside one.
UNICODE_TEXTS = [
    "Café naïve — 日本語のテキスト, an emoji 🎉 and umlauts: größer, Ünïcödé ☃ → arrow.",
    "Größe: 12 µm ± 3; 東京 and 大阪 are cities; «quoted» text — with dashes…",
] * 4


class ExactTeacher:
    """Exact top-k from a causal LM's log-softmax (row t predicts token t; row 0 empty).
    Records what it was asked, so tests can compare against it."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model
        self.name = name
        self.vocab_size = model.config.vocab_size
        self.calls: list[tuple[list[list[int]], list[TopK]]] = []

    @torch.no_grad()
    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        out = []
        for seq in sequences:
            logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].double(), -1)[:-1]
            values, ids = logp.topk(k, -1)
            rows = TopK.empty_rows(len(seq), k)
            rows.token_ids[1:] = ids.numpy()
            rows.logprobs[1:] = values.float().numpy()
            with np.errstate(divide="ignore"):  # the tail from the full float64 softmax
                rows.tail_logprob[1:] = torch.log1p(-values.exp().sum(-1).clamp(max=1.0)).float().numpy()
            out.append(rows)
        self.calls.append(([list(s) for s in sequences], out))
        return out

    def close(self) -> None:
        pass


class FixedTeacher:
    """Hand-written rows: {row index: ([(teacher id, prob), ...], tail prob)} for one expected input."""

    def __init__(self, expect_ids: list[int], rows: dict[int, tuple[list[tuple[int, float]], float]]) -> None:
        self.name = "fixed"
        self.vocab_size = 64
        self.expect_ids = expect_ids
        self.rows = rows
        self.closed = False

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        assert sequences == [self.expect_ids], f"teacher got {sequences}, expected {[self.expect_ids]}"
        out = TopK.empty_rows(len(self.expect_ids), k)
        for r, (cands, tail) in self.rows.items():
            for c, (i, p) in enumerate(cands[:k]):
                out.token_ids[r, c], out.logprobs[r, c] = i, math.log(p)
            out.tail_logprob[r] = math.log(tail)
        return [out]

    def close(self) -> None:
        self.closed = True


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return local_corpus()


@pytest.fixture(scope="module")
def student_tok(corpus):
    return train_tokenizer(corpus + UNICODE_TEXTS, 700)


@pytest.fixture(scope="module")
def teacher_tok(corpus):
    return train_tokenizer(corpus[::2] + UNICODE_TEXTS, 520)


@pytest.fixture(scope="module")
def sp_tok(corpus):
    """A SentencePiece-style tokenizer (Metaspace, prefix space, NFKC), trained locally."""
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=600, special_tokens=["<unk>", EOS_TOKEN], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, eos_token=EOS_TOKEN, unk_token="<unk>")


@pytest.fixture(scope="module")
def teacher(teacher_tok) -> ExactTeacher:
    # Untrained: the checks are exact whatever the distribution, and training costs tens of seconds
    # on a shared CPU.
    model = build_qwen3_teacher(teacher_tok, seed=1)
    return ExactTeacher(model, "tiny-teacher")


def _encode(tok, texts: list[str], eos: bool = True) -> list[list[int]]:
    return [tok(t)["input_ids"] + ([tok.eos_token_id] if eos else []) for t in texts]


def _student_seqs(student_tok, corpus) -> list[list[int]]:
    return _encode(student_tok, corpus[200:212] + UNICODE_TEXTS[:2])


# -- token_bytes ----------------------------------------------------------------------------------


def test_token_bytes_round_trip(student_tok, teacher_tok, sp_tok, corpus):
    for tok in (student_tok, teacher_tok):
        tb = token_bytes(tok)
        assert tb[tok.eos_token_id] is None
        for text in corpus[:40] + UNICODE_TEXTS[:2]:
            ids = tok(text)["input_ids"]
            joined = b"".join(tb[i] for i in ids)
            assert joined == text.encode("utf-8")
            assert joined == tok.decode(ids).encode("utf-8")
    tb = token_bytes(sp_tok)
    assert tb[sp_tok.unk_token_id] is None and tb[sp_tok.eos_token_id] is None
    for text in corpus[:40]:
        ids = sp_tok(text)["input_ids"]
        # Metaspace prepends one space when encoding and strips it when decoding.
        assert b"".join(tb[i] for i in ids) == b" " + sp_tok.decode(ids).encode("utf-8")


def test_token_bytes_rejects_unsupported():
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="cannot map this tokenizer"):
        token_bytes(wordpiece)
    with pytest.raises(TypeError, match="fast tokenizer"):
        token_bytes(object())


# -- a real teacher across two different tokenizers -----------------------------------------------


def _reference_rows(s_seq, t_seq, t_rows, s_tok, t_tok):
    """Independent, loop-by-loop alignment: {student position: (teacher row, {student id: logprob})},
    or (None, None) where the position has no shared boundary."""
    s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
    s_by_bytes = {b: i for i, b in enumerate(s_bytes) if b}
    eos_pair = {t_tok.eos_token_id: s_tok.eos_token_id}

    def offsets(seq, tb):
        out, pos = [], 0
        for i in seq:
            out.append(pos)
            pos += 1 if tb[i] is None else len(tb[i])
        return out

    s_off, t_off = offsets(s_seq, s_bytes), offsets(t_seq, t_bytes)
    s_text = b"".join(s_bytes[i] or b"" for i in s_seq)
    if b"".join(t_bytes[i] or b"" for i in t_seq) == b" " + s_text:
        # A SentencePiece teacher put a space in front: its first token starts before the text.
        t_off = [-1] + [off - 1 for off in t_off[1:]]
    t_at = {off: u for u, off in enumerate(t_off)}
    expected = {}
    for t in range(1, len(s_seq)):
        u = t_at.get(s_off[t])
        if not u:
            expected[t] = (None, None)
            continue
        cands: dict[int, float] = {}
        for i, lp in zip(t_rows.token_ids[u], t_rows.logprobs[u]):
            if i < 0 or not np.isfinite(lp):
                continue
            sid = eos_pair.get(int(i)) if t_bytes[i] is None else s_by_bytes.get(t_bytes[i])
            if sid is not None:
                cands[sid] = float(np.logaddexp(cands.get(sid, -np.inf), lp))
        expected[t] = (u, cands)
    return expected


def _check_rows(rows: TopK, k: int) -> None:
    assert rows.token_ids.shape[1] == k and rows.token_ids.dtype == np.int32
    assert rows.logprobs.dtype == np.float32 and rows.tail_logprob.dtype == np.float32
    lp = rows.logprobs
    assert (np.diff(np.where(np.isfinite(lp), lp, -1e30), axis=1) <= 0).all(), "rows must be sorted"
    assert ((rows.token_ids == MISSING_ID) == ~np.isfinite(lp)).all(), "empty slots: MISSING_ID and -inf"
    total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(rows.tail_logprob.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_different_tokenizers(teacher, teacher_tok, student_tok, corpus):
    k = 8
    aligned = AlignedTeacher(teacher, teacher_tok, student_tok)
    assert isinstance(aligned, Teacher)
    assert aligned.vocab_size == len(student_tok)
    seqs = _student_seqs(student_tok, corpus)
    texts = corpus[200:212] + UNICODE_TEXTS[:2]
    teacher.calls.clear()
    out = aligned.topk(seqs, k)
    (sent, t_rows) = teacher.calls[-1]
    # The teacher saw its own tokenisation of the same text, EOS carried across by content.
    assert sent == _encode(teacher_tok, texts)

    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    n_aligned = n_positions = 0
    for s_seq, t_seq, rows, tr in zip(seqs, sent, out, t_rows):
        assert rows.length == len(s_seq)
        _check_rows(rows, k)
        assert (rows.token_ids[0] == MISSING_ID).all() and rows.tail_logprob[0] == 0
        expected = _reference_rows(s_seq, t_seq, tr, student_tok, teacher_tok)
        for t, (u, cands) in expected.items():
            n_positions += 1
            got = {int(i): float(lp) for i, lp in zip(rows.token_ids[t], rows.logprobs[t]) if i >= 0}
            if cands is None:  # no shared boundary: empty row
                assert not got and rows.tail_logprob[t] == 0
                continue
            n_aligned += 1
            assert got == pytest.approx(cands, abs=1e-6)  # mapped log-probs are the teacher's
            # every mapped candidate is a teacher candidate with exactly that student token's bytes
            u_cands = {t_bytes[i] for i in tr.token_ids[u]}
            for sid in got:
                assert s_bytes[sid] in u_cands or sid == student_tok.eos_token_id
    fraction = n_aligned / n_positions
    stats = aligned.stats.as_dict()
    print(f"\nalignment (BPE 520 teacher -> BPE 700 student): {stats}")
    assert stats["aligned"] == n_aligned and stats["positions"] == n_positions
    assert fraction > 0.75, f"alignment fraction {fraction:.3f} is too low"
    assert 0 < stats["mean_mapped_mass"] <= 1
    # the EOS position (its text ends at a boundary on both sides) is aligned and maps EOS
    assert all(np.isfinite(r.logprobs[-1]).any() for r in out)


def test_k_teacher_wider_and_narrower(teacher, teacher_tok, student_tok, corpus):
    seqs = _student_seqs(student_tok, corpus)[:3]
    for k, kt in ((4, 16), (8, 3)):
        aligned = AlignedTeacher(teacher, teacher_tok, student_tok, k_teacher=kt)
        for rows in aligned.topk(seqs, k):
            _check_rows(rows, k)
            assert np.isfinite(rows.logprobs).sum(1).max() <= min(k, kt)
        assert f"kt{kt}" in aligned.name


def test_identical_tokenizers_equal_teacher(student_tok, corpus):
    model = build_qwen3_teacher(student_tok, seed=2)
    exact = ExactTeacher(model, "same-vocab")
    seqs = _student_seqs(student_tok, corpus)[:4]
    direct = exact.topk(seqs, 6)
    aligned = AlignedTeacher(exact, student_tok, student_tok)
    slow = AlignedTeacher(exact, student_tok, student_tok)
    slow._same_vocab = False  # also through re-tokenisation: canonical ids come back unchanged
    for a in (aligned, slow):
        for want, got in zip(direct, a.topk(seqs, 6)):
            np.testing.assert_array_equal(got.token_ids, want.token_ids)
            np.testing.assert_array_equal(got.logprobs, want.logprobs)
            np.testing.assert_array_equal(got.tail_logprob, want.tail_logprob)
        assert a.stats.aligned_fraction == 1.0


def test_sentencepiece_sides(sp_tok, student_tok, teacher, teacher_tok, corpus):
    """A SentencePiece student under a byte-level teacher, and the reverse (the teacher adds a
    leading space to each text, which alignment must absorb)."""
    texts = corpus[300:306]
    sp_model = ExactTeacher(build_qwen3_teacher(sp_tok, seed=3), "sp-teacher")
    for t_model, t_tok, s_tok in ((teacher, teacher_tok, sp_tok), (sp_model, sp_tok, student_tok)):
        aligned = AlignedTeacher(t_model, t_tok, s_tok)
        seqs = _encode(s_tok, texts)
        out = aligned.topk(seqs, 6)
        sent, t_rows = t_model.calls[-1]
        for s_seq, t_seq, rows, tr in zip(seqs, sent, out, t_rows):
            _check_rows(rows, 6)
            for t, (_, cands) in _reference_rows(s_seq, t_seq, tr, s_tok, t_tok).items():
                got = {int(i): float(lp) for i, lp in zip(rows.token_ids[t], rows.logprobs[t]) if i >= 0}
                assert got == pytest.approx(cands or {}, abs=1e-6)
        print(f"\nalignment ({t_model.name} -> {len(s_tok)}-token student): {aligned.stats.as_dict()}")
        assert aligned.stats.aligned_fraction > 0.6


def test_cut_characters_and_specials(teacher, teacher_tok, student_tok):
    """A sequence that starts inside a multi-byte character still aligns (the cut bytes go to the
    teacher as single-byte tokens), and the teacher's input spells the student's bytes exactly."""
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    ids = student_tok(UNICODE_TEXTS[0])["input_ids"]
    cut = next(j for j in range(1, len(ids)) if s_bytes[ids[j]][0] & 0xC0 == 0x80)
    seq = [*ids[cut:], student_tok.eos_token_id, *ids[: cut + 1]]  # cut at both ends, EOS inside
    aligned = AlignedTeacher(teacher, teacher_tok, student_tok)
    (rows,) = aligned.topk([seq], 8)
    (sent,), _ = teacher.calls[-1]
    eos = sent.index(teacher_tok.eos_token_id)
    assert b"".join(t_bytes[i] for i in sent[:eos]) == b"".join(s_bytes[i] for i in ids[cut:])
    assert b"".join(t_bytes[i] for i in sent[eos + 1 :]) == b"".join(s_bytes[i] for i in ids[: cut + 1])
    _check_rows(rows, 8)
    assert aligned.stats.aligned_fraction > 0.5


def test_text_mismatch(teacher, teacher_tok, student_tok, corpus):
    lowercasing = Tokenizer.from_str(teacher_tok.backend_tokenizer.to_str())
    lowercasing.normalizer = normalizers.Lowercase()
    seqs = _student_seqs(student_tok, corpus)[:2]
    with pytest.raises(TokenizerMismatchError, match=r"does not reproduce.*Lowercase.*differ at byte"):
        AlignedTeacher(teacher, lowercasing, student_tok).topk(seqs, 4)
    lenient = AlignedTeacher(teacher, lowercasing, student_tok, on_mismatch="skip")
    out = lenient.topk([*seqs, student_tok("lower case only")["input_ids"]], 4)
    for rows in out[:2]:
        assert (rows.token_ids == MISSING_ID).all() and (rows.tail_logprob == 0).all()
    assert lenient.stats.skipped_sequences == 2 and lenient.stats.aligned > 0
    with pytest.raises(ValueError, match="outside the student tokenizer"):
        lenient.topk([[len(student_tok) + 5]], 4)


# -- hand-written vocabularies with known answers -------------------------------------------------


def _byte_level(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: tuple[str, ...] = (),
    special: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, *special])
    tok.add_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)


# Student: "abc ab" -> "ab" "c" " ab" (byte offsets 0, 2, 3), then EOS at unit 6.
STUDENT_VOCAB = {EOS_TOKEN: 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5, "Ġa": 6, "Ġab": 7}
STUDENT_MERGES = [("Ġ", "a"), ("a", "b"), ("Ġa", "b")]
# Teacher: "abc ab" -> "a" "bc" " ab" (offsets 0, 1, 3), then EOS: shared boundaries at 3 and 6.
TEACHER_VOCAB = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "bc": 4, "Ġab": 5, "Ġa": 6, EOS_TOKEN: 7, "ab": 8, "Ġc": 9}
TEACHER_MERGES = [("b", "c"), ("Ġ", "a"), ("Ġa", "b"), ("a", "b")]


def _rows_as_lists(rows: TopK, r: int) -> tuple[list[int], list[float], float]:
    return rows.token_ids[r].tolist(), np.exp(rows.logprobs[r]).tolist(), float(np.exp(rows.tail_logprob[r]))


def test_hand_built_byte_level():
    student = _byte_level(STUDENT_VOCAB, STUDENT_MERGES)
    teacher_tok = _byte_level(TEACHER_VOCAB, TEACHER_MERGES)
    assert student("abc ab")["input_ids"] == [5, 3, 7]
    assert teacher_tok("abc ab")["input_ids"] == [0, 4, 5]
    fixed_rows = {
        1: ([(4, 0.5), (1, 0.3)], 0.2),  # predicts "bc" at offset 1: no student position starts there
        # predicts " ab" at offset 3: " ab" -> 7, " a" -> 6, "c" -> 3 map; " c" has no student token
        2: ([(5, 0.4), (9, 0.2), (6, 0.15), (2, 0.05)], 0.2),
        # predicts EOS: EOS -> 0 by content, "ab" -> 5, "b" -> 2 map; "bc" does not
        3: ([(7, 0.5), (8, 0.3), (4, 0.1), (1, 0.05)], 0.05),
    }
    fixed = FixedTeacher([0, 4, 5, 7], fixed_rows)
    aligned = AlignedTeacher(fixed, teacher_tok, student, name="hand")
    assert aligned.name == "hand"
    (rows,) = aligned.topk([[5, 3, 7, 0]], 4)
    for r in (0, 1):  # row 0, and "c" at offset 2 (inside the teacher's "bc"): no target
        assert _rows_as_lists(rows, r)[0] == [MISSING_ID] * 4 and rows.tail_logprob[r] == 0
    ids, probs, tail = _rows_as_lists(rows, 2)
    assert (
        ids == [7, 6, 3, MISSING_ID]
        and probs == pytest.approx([0.4, 0.15, 0.05, 0.0])
        and tail == pytest.approx(0.4)
    )
    ids, probs, tail = _rows_as_lists(rows, 3)
    assert (
        ids == [0, 5, 2, MISSING_ID]
        and probs == pytest.approx([0.5, 0.3, 0.05, 0.0])
        and tail == pytest.approx(0.15)
    )
    assert aligned.stats.aligned == 2 and aligned.stats.positions == 3
    assert aligned.stats.mean_mapped_mass == pytest.approx((0.6 + 0.85) / 2)

    # k = 2: truncated candidates' mass joins the tail too.
    (rows,) = AlignedTeacher(fixed, teacher_tok, student, k_teacher=4).topk([[5, 3, 7, 0]], 2)
    ids, probs, tail = _rows_as_lists(rows, 2)
    assert ids == [7, 6] and probs == pytest.approx([0.4, 0.15]) and tail == pytest.approx(0.45)
    ids, probs, tail = _rows_as_lists(rows, 3)
    assert ids == [0, 5] and probs == pytest.approx([0.5, 0.3]) and tail == pytest.approx(0.2)
    aligned.close()
    assert fixed.closed


def test_hand_built_sentencepiece_teacher():
    """A Llama-style teacher (prefix space, <0xNN> byte tokens): two teacher candidates with the
    same bytes ("a" and <0x61>) combine into one student token, and the row is re-sorted."""
    vocab = {"<unk>": 0, "<0x61>": 1, "<0x20>": 2, "a": 3, "b": 4, "c": 5, "▁": 6, "▁ab": 7, "▁a": 8, "bc": 9}
    sp = Tokenizer(
        models.BPE(vocab, [("▁", "a"), ("▁a", "b"), ("b", "c")], unk_token="<unk>", byte_fallback=True)
    )
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tb = token_bytes(sp)
    assert tb[:4] == [None, b"a", b" ", b"a"] and tb[7] == b" ab"
    assert sp.encode("abc ab").ids == [7, 5, 7]  # " ab" "c" " ab": a space is added in front

    student = _byte_level(STUDENT_VOCAB, STUDENT_MERGES)
    fixed = FixedTeacher(
        [7, 5, 7],
        {
            1: ([(5, 0.3), (3, 0.25), (9, 0.2), (1, 0.1)], 0.15),  # predicts "c" at offset 2
            2: ([(7, 0.6), (6, 0.2), (2, 0.1)], 0.1),  # predicts " ab" at offset 3
        },
    )
    (rows,) = AlignedTeacher(fixed, sp, student).topk([[5, 3, 7]], 4)
    assert rows.token_ids[0].tolist() == [MISSING_ID] * 4  # the teacher's first token starts before the text
    ids, probs, tail = _rows_as_lists(rows, 1)
    assert ids == [1, 3, MISSING_ID, MISSING_ID]  # "a" 0.25 + <0x61> 0.1 = 0.35 now ranks first
    assert probs == pytest.approx([0.35, 0.3, 0, 0]) and tail == pytest.approx(0.35)
    ids, probs, tail = _rows_as_lists(rows, 2)
    assert ids == [7, 4, MISSING_ID, MISSING_ID]  # "▁" and <0x20> are both the student's " "
    assert probs == pytest.approx([0.6, 0.3, 0, 0]) and tail == pytest.approx(0.1)


def test_hand_built_added_tokens():
    """Added tokens travel by content: "<t>" (plain added in the student, special in the teacher)
    goes as the teacher's marker and maps back; "<u>" (student only, not special) goes as text;
    "<|x|>" (student only, special) is left out of the teacher's input and gets no target."""
    student = _byte_level(STUDENT_VOCAB, STUDENT_MERGES, added=("<t>", "<u>"), special=("<|x|>",))
    teacher_vocab = {**TEACHER_VOCAB, "<": 10, "u": 11, ">": 12}
    teacher_tok = _byte_level(teacher_vocab, TEACHER_MERGES, special=("<t>",))
    s_t, s_u, s_x = (student.convert_tokens_to_ids(c) for c in ("<t>", "<u>", "<|x|>"))
    t_t = teacher_tok.convert_tokens_to_ids("<t>")
    assert token_bytes(student)[s_u] == b"<u>" and token_bytes(student)[s_x] is None
    # units: "ab" 0-1, <t> 2, "c" 3, "<u>" 4-6, <|x|> 7 (dropped), "a" 8, EOS 9
    seq = [5, s_t, 3, s_u, s_x, 1, 0]
    # the teacher reads "ab" <t> "c" "<" "u" ">" "a" EOS, starting at 0, 2, 3, 4, 5, 6, 8, 9
    fixed = FixedTeacher(
        [8, t_t, 2, 10, 11, 12, 0, 7],
        {
            1: ([(t_t, 0.7), (8, 0.2)], 0.1),  # predicts <t>
            3: ([(10, 0.6), (t_t, 0.3)], 0.1),  # predicts "<": the student has no "<" token
            6: ([(0, 0.9)], 0.1),  # predicts "a"
        },
    )
    aligned = AlignedTeacher(fixed, teacher_tok, student)
    (rows,) = aligned.topk([seq], 3)
    assert _rows_as_lists(rows, 1)[0] == [s_t, 5, MISSING_ID]
    assert _rows_as_lists(rows, 1)[1] == pytest.approx([0.7, 0.2, 0.0])
    ids, probs, tail = _rows_as_lists(rows, 3)
    assert (
        ids == [s_t, MISSING_ID, MISSING_ID] and probs[0] == pytest.approx(0.3) and tail == pytest.approx(0.7)
    )
    assert _rows_as_lists(rows, 4)[0] == [MISSING_ID] * 3 and rows.tail_logprob[4] == 0  # <|x|>: none
    ids, probs, tail = _rows_as_lists(rows, 5)
    assert (
        ids == [1, MISSING_ID, MISSING_ID] and probs[0] == pytest.approx(0.9) and tail == pytest.approx(0.1)
    )
    assert aligned.stats.aligned == 5 and aligned.stats.positions == 6 and aligned.stats.dropped_special == 1
