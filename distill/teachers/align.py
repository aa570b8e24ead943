"""Distil from a teacher whose tokenizer differs from the student's, by byte-offset alignment.

`AlignedTeacher` wraps a `Teacher` that speaks its own vocabulary (a GLM teacher, say) and answers in
the student's vocabulary (Qwen3.5 for Quasar):

1. The student's token ids are turned into the bytes of their text, with each token's start offset.
2. The same text is tokenised with the teacher's tokenizer; the teacher tokens' bytes must
   concatenate to exactly that text (checked, never assumed), so both tokenisations share offsets.
3. The wrapped teacher scores its own token ids.
4. At every student position whose start offset is also a teacher token boundary (a shared
   boundary), the teacher row that predicts the teacher token starting there is translated: each
   top-k candidate whose bytes are exactly one student token becomes that token; the rest of the
   mass (unmatched candidates and the teacher's own tail) goes to the tail. Other positions get an
   empty row (no target). This is lossy where the tokenisations diverge, never wrong where they agree.

Added tokens (EOS, chat markers, <think>) are matched by their content string: a student added token
goes to the teacher as the teacher's added token with the same content, as one "marker", and a
teacher candidate added token maps to the student's added token with the same content. A student
added token the teacher lacks goes as text if it is not special (its content is text, like Qwen's
<tool_call>); a special one (no bytes) is left out of the teacher's input (the teacher sees the text
around it) and its position gets no target.

Offsets are in "units": one per text byte and one per marker.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from distill.types import MISSING_ID, Teacher, TopK

ALIGN_VERSION = 1  # part of the default name (the logit cache key): bump when the rules change
SPACE_MARK = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SURROGATES = re.compile("[\udc80-\udcff]+")  # invalid UTF-8 bytes after decode(errors="surrogateescape")

# Preference when two ids of one vocabulary stand for the same bytes: the id the tokenizer itself
# would produce (added text tokens match first; SentencePiece prefers a piece over its <0xNN> bytes).
_PRIO_ADDED, _PRIO_NORMAL, _PRIO_BYTE_FALLBACK = 0, 1, 2


class TokenizerMismatchError(ValueError):
    """The teacher's tokenizer does not reproduce the student's text byte for byte."""


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level map: printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, 0x7F-0xA0, soft hyphen) take code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL_CHARS = _byte_level_alphabet()


def _backend(tokenizer: Any):
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the object itself)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        f"cannot map the tokens of a {type(tokenizer).__name__} to bytes: it has no `tokenizers` backend. "
        "Load the tokenizer as a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True)), "
        "or pass a tokenizers.Tokenizer."
    )


def _components(node: Any) -> Iterator[dict]:
    """Every typed component in a tokenizer.json subtree (walks Sequence wrappers)."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for item in node:
            yield from _components(item)


@dataclass(frozen=True)
class _Scheme:
    kind: Literal["byte_level", "sentencepiece"]
    space: str  # the character that stands for a space (SentencePiece only)
    byte_fallback: bool  # <0xNN> tokens stand for raw bytes
    prefix_space: bool  # encoding text may add one leading space


def _scheme(config: dict) -> _Scheme:
    decoder = list(_components(config.get("decoder")))
    pre = list(_components(config.get("pre_tokenizer")))
    norm = list(_components(config.get("normalizer")))
    types = {c["type"] for c in decoder + pre}
    model = config.get("model") or {}
    if "ByteLevel" in types:
        prefix = any(c["type"] == "ByteLevel" and c.get("add_prefix_space") for c in pre)
        return _Scheme("byte_level", " ", bool(model.get("byte_fallback")), prefix)
    space = None
    for c in pre + decoder:
        if c["type"] == "Metaspace":
            space = c.get("replacement", SPACE_MARK)
    for c in decoder:  # Llama / Gemma style: Replace("▁" -> " ") in the decoder
        if c["type"] == "Replace" and c.get("content") == " ":
            space = (c.get("pattern") or {}).get("String", space)
    if space is not None:
        prefix = any(c["type"] == "Prepend" for c in norm) or any(
            c["type"] == "Metaspace"
            and (c.get("prepend_scheme", "always") in ("always", "first") or c.get("add_prefix_space"))
            for c in pre
        )
        fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
        return _Scheme("sentencepiece", space, fallback, prefix)
    found = sorted(types) or ["none"]
    raise ValueError(
        f"cannot map this tokenizer's tokens to bytes: decoder/pre-tokenizer types {found}, model "
        f"{model.get('type')}. Supported: byte-level BPE (a ByteLevel decoder or pre-tokenizer, as in "
        "GPT-2, Qwen, GLM) and SentencePiece style (a Metaspace, or a Replace('▁', ' ') decoder, with "
        "optional <0xNN> byte tokens). For others, align with a tokenizer of one of these kinds."
    )


@dataclass
class _Vocab:
    """One tokenizer's vocabulary as bytes, plus what alignment needs from it."""

    scheme: _Scheme
    text: list[bytes | None]  # bytes each id adds to a text; None for special tokens
    keys: list[bytes | str | None]  # mapping key: text bytes, or the content str of a special token
    special: np.ndarray  # bool [V]: stands for no bytes (special tokens, unknown, unmappable pieces)
    content: dict[int, str]  # added token id -> content (special or not)
    by_content: dict[str, int]  # the inverse
    length: np.ndarray  # int64 [V], len(text), 0 for None
    by_key: dict[bytes | str, int]  # preferred id for each key
    backend: Any  # a private copy of the tokenizers.Tokenizer (special tokens encoded as text)
    normalizer: str | None

    @property
    def size(self) -> int:
        return len(self.keys)


def _vocab(tokenizer: Any) -> _Vocab:
    from tokenizers import Tokenizer

    backend = _backend(tokenizer)
    config = json.loads(backend.to_str())
    scheme = _scheme(config)
    added = backend.get_added_tokens_decoder()
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    model = config.get("model") or {}
    unk = model.get("unk_token")

    text: list[bytes | None] = [None] * size
    keys: list[bytes | str | None] = [None] * size
    prio = [_PRIO_BYTE_FALLBACK + 1] * size
    special = np.zeros(size, dtype=bool)
    for piece, i in vocab.items():
        tok = added.get(i)
        if tok is not None:
            if tok.special:
                special[i] = True
                keys[i] = tok.content
            else:  # an added text token (Qwen's <think>): it stands for its content
                text[i] = keys[i] = tok.content.encode("utf-8")
                prio[i] = _PRIO_ADDED
            continue
        if piece == unk:
            continue  # stands for whatever was unknown: no bytes
        if scheme.kind == "byte_level":
            try:
                text[i] = bytes(_BYTE_LEVEL_CHARS[c] for c in piece)
            except KeyError:
                continue  # a piece outside the byte alphabet can never come out of encoding
            prio[i] = _PRIO_NORMAL
        else:
            m = _BYTE_TOKEN.match(piece) if scheme.byte_fallback else None
            if m:
                text[i] = bytes([int(m.group(1), 16)])
                prio[i] = _PRIO_BYTE_FALLBACK
            else:
                text[i] = piece.replace(scheme.space, " ").encode("utf-8")
                prio[i] = _PRIO_NORMAL
        keys[i] = text[i]
    special |= np.array([b is None for b in text], dtype=bool)
    content = {i: tok.content for i, tok in added.items() if i < size}

    by_key: dict[bytes | str, int] = {}
    for i, key in enumerate(keys):
        if key is None or key == b"":
            continue
        j = by_key.get(key)
        if j is None or prio[i] < prio[j]:
            by_key[key] = i
    length = np.fromiter((len(b) if b is not None else 0 for b in text), dtype=np.int64, count=size)

    # Literal special-token text in a document must stay text, so the private copy encodes it as text.
    private = Tokenizer.from_str(backend.to_str())
    private.encode_special_tokens = True
    private.no_truncation()
    private.no_padding()
    norm = config.get("normalizer")
    return _Vocab(
        scheme,
        text,
        keys,
        special,
        content,
        {c: i for i, c in content.items()},
        length,
        by_key,
        private,
        norm.get("type") if norm else None,
    )


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The exact bytes each token id stands for; None for special tokens and ids without bytes.

    Supports byte-level BPE tokenizers (the GPT-2 byte-to-unicode map: GPT-2, Qwen, GLM) and
    SentencePiece-style ones ('▁' for a space, <0xNN> byte tokens). Added tokens that are not special
    (Qwen's <think>) stand for their content's UTF-8 bytes. Raises for other tokenizer kinds.
    """
    return _vocab(tokenizer).text


@dataclass
class AlignStats:
    """Running alignment counts, for logging (`AlignedTeacher.stats`)."""

    sequences: int = 0
    skipped_sequences: int = 0  # text the teacher tokenizer could not reproduce (on_mismatch="skip")
    positions: int = 0  # student positions that could carry a target (t >= 1)
    aligned: int = 0  # of those, positions at a shared boundary
    mapped_mass: float = 0.0  # summed over aligned positions: teacher probability kept on student ids
    dropped_special: int = 0  # student tokens without bytes that the teacher has no counterpart for

    @property
    def aligned_fraction(self) -> float:
        return self.aligned / self.positions if self.positions else 0.0

    @property
    def mean_mapped_mass(self) -> float:
        return self.mapped_mass / self.aligned if self.aligned else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "sequences": self.sequences,
            "skipped_sequences": self.skipped_sequences,
            "positions": self.positions,
            "aligned": self.aligned,
            "aligned_fraction": self.aligned_fraction,
            "mean_mapped_mass": self.mean_mapped_mass,
            "dropped_special": self.dropped_special,
        }


@dataclass
class _Plan:
    """One student sequence, ready for the teacher tokenizer."""

    ids: np.ndarray  # int64 [n] student ids
    starts: np.ndarray  # int64 [n] unit offset of each student token
    lengths: np.ndarray  # int64 [n] units of each student token
    units: int  # total units
    # ("text", run index, start, raw bytes, starts a segment) | ("tok", teacher id, start)
    # | ("byte", byte value, start): a byte that is not valid UTF-8, sent as a single-byte token
    pieces: list[tuple]
    dropped: int = 0
    teacher_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    teacher_pos: np.ndarray | None = None  # unit offset -> teacher index starting there, -1 if none
    error: str | None = None


class AlignedTeacher:
    """A `Teacher` in the student's vocabulary on top of a teacher with a different tokenizer.

    teacher:           a `Teacher` taking and returning teacher-vocabulary ids.
    teacher_tokenizer: the teacher's (fast) tokenizer; student_tokenizer: the student's.
    name:              cache identity; by default the teacher's name plus a digest of both vocabularies.
    k_teacher:         top-k asked of the teacher (default: the k asked of this object). More than k
                       leaves room for candidates that do not map.
    on_mismatch:       "raise" (default) when the teacher tokenizer cannot reproduce a sequence's text
                       (a normaliser changed it, an unknown character); "skip" gives that sequence
                       empty rows and counts it in `stats.skipped_sequences`.

    `stats` accumulates alignment counts across calls (`reset_stats()` clears them).
    """

    def __init__(
        self,
        teacher: Teacher,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        name: str | None = None,
        k_teacher: int | None = None,
        on_mismatch: Literal["raise", "skip"] = "raise",
    ) -> None:
        if on_mismatch not in ("raise", "skip"):
            raise ValueError(f"on_mismatch must be 'raise' or 'skip', got {on_mismatch!r}")
        if k_teacher is not None and k_teacher < 1:
            raise ValueError(f"k_teacher must be at least 1, got {k_teacher}")
        self.teacher = teacher
        self.k_teacher = k_teacher
        self.on_mismatch = on_mismatch
        self._t = _vocab(teacher_tokenizer)
        self._s = _vocab(student_tokenizer)
        self.vocab_size = self._s.size
        self.stats = AlignStats()

        s, t = self._s, self._t
        # teacher id -> student id: added tokens by content, the rest by bytes (MISSING_ID: none).
        t_size = max(t.size, int(getattr(teacher, "vocab_size", 0) or 0))
        to_student = np.full(t_size, MISSING_ID, dtype=np.int64)
        for i, key in enumerate(t.keys):
            j = s.by_content.get(t.content[i], MISSING_ID) if i in t.content else MISSING_ID
            if j < 0 and isinstance(key, bytes):
                j = s.by_key.get(key, MISSING_ID)
            to_student[i] = j
        self._to_student = to_student
        # Student tokens sent as one marker unit: no bytes, or an added token the teacher also has
        # (sent as the teacher's id for that content; -1 where the teacher lacks it: left out).
        self._marker = s.special.copy()
        self._marker_to_teacher = np.full(s.size, -1, dtype=np.int64)
        for i, c in s.content.items():
            j = t.by_content.get(c, -1)
            if j >= 0:
                self._marker[i] = True
                self._marker_to_teacher[i] = j
        # teacher id of each single byte, to carry bytes that are not valid UTF-8 (a cut character)
        self._t_byte = {
            key[0]: i
            for key, i in t.by_key.items()
            if isinstance(key, bytes) and len(key) == 1 and i not in t.content
        }
        # Same bytes for every id: the student's ids are the teacher's, no re-tokenisation needed.
        self._same_vocab = self._t.keys == self._s.keys

        if name is None:
            # Everything that changes the rows: both tokenizers in full (vocabulary, merges,
            # normaliser, added tokens), k_teacher and this module's alignment rules.
            digest = hashlib.sha256(f"align-v{ALIGN_VERSION}".encode())
            for tok in (teacher_tokenizer, student_tokenizer):
                digest.update(_backend(tok).to_str().encode("utf-8"))
            suffix = f",kt{k_teacher}" if k_teacher else ""
            name = f"{teacher.name}+align[{digest.hexdigest()[:12]}{suffix}]"
        self.name = name

    # -- Teacher protocol -----------------------------------------------------------------------

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        kt = self.k_teacher or k
        plans = [self._plan(seq) for seq in sequences]
        if not self._same_vocab:
            self._tokenize_for_teacher(plans)
        query = [i for i, p in enumerate(plans) if p.error is None and len(p.teacher_ids)]
        rows = self.teacher.topk([plans[i].teacher_ids.tolist() for i in query], kt) if query else []
        if len(rows) != len(query):
            raise RuntimeError(f"the teacher returned {len(rows)} results for {len(query)} sequences")
        by_plan = dict(zip(query, rows))
        return [self._align(p, by_plan.get(i), k) for i, p in enumerate(plans)]

    def close(self) -> None:
        self.teacher.close()

    def reset_stats(self) -> None:
        self.stats = AlignStats()

    # -- steps ----------------------------------------------------------------------------------

    def _plan(self, seq: list[int]) -> _Plan:
        s = self._s
        ids = np.asarray(seq, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= s.size):
            bad = ids[(ids < 0) | (ids >= s.size)][0]
            raise ValueError(
                f"student token id {bad} is outside the student tokenizer's {s.size} ids; "
                "pass ids produced by the student tokenizer given to AlignedTeacher"
            )
        marker = self._marker[ids]
        units = np.where(marker, 1, s.length[ids])
        ends = np.cumsum(units)
        plan = _Plan(ids, ends - units, units, int(ends[-1]) if len(ends) else 0, [])
        if self._same_vocab:
            plan.teacher_ids = ids
            plan.teacher_pos = np.full(plan.units + 1, -1, dtype=np.int64)
            keep = units > 0
            plan.teacher_pos[plan.starts[keep]] = np.flatnonzero(keep)
            return plan
        # Split at markers; the text between them is one segment, tokenised on its own.
        cuts = np.flatnonzero(marker).tolist()
        begin = 0
        for c in [*cuts, len(ids)]:
            if c > begin:
                raw = b"".join([s.text[i] for i in ids[begin:c].tolist()])
                if raw:
                    plan.pieces.append(("text", -1, int(plan.starts[begin]), raw, True))
            if c < len(ids):
                j = int(self._marker_to_teacher[ids[c]])
                if j >= 0:
                    plan.pieces.append(("tok", j, int(plan.starts[c])))
                else:
                    plan.dropped += 1
            begin = c + 1
        return plan

    def _tokenize_for_teacher(self, plans: list[_Plan]) -> None:
        """Tokenise every text segment with the teacher tokenizer in one batch, then lay out each
        plan's teacher ids and the unit offset where each teacher token starts."""
        texts: list[str] = []
        for plan in plans:
            expanded: list[tuple] = []
            for piece in plan.pieces:
                if piece[0] != "text":
                    expanded.append(piece)
                    continue
                _, _, start, raw, _ = piece
                text = raw.decode("utf-8", errors="surrogateescape")
                pos = 0  # character index in `text`; bytes before it: start offset below
                offset = start
                for m in _SURROGATES.finditer(text):
                    if m.start() > pos:
                        chunk = text[pos : m.start()]
                        expanded.append(("text", len(texts), offset, chunk.encode("utf-8"), pos == 0))
                        texts.append(chunk)
                        offset += len(expanded[-1][3])
                    for ch in m.group():  # bytes that are not valid UTF-8 go as single-byte tokens
                        expanded.append(("byte", ord(ch) - 0xDC00, offset))
                        offset += 1
                    pos = m.end()
                if pos < len(text):
                    chunk = text[pos:]
                    expanded.append(("text", len(texts), offset, chunk.encode("utf-8"), pos == 0))
                    texts.append(chunk)
            plan.pieces = expanded
        backend = self._t.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets needed: faster
        encodings = encode(texts, add_special_tokens=False) if texts else []
        for plan in plans:
            try:
                self._layout(plan, encodings)
            except TokenizerMismatchError as err:
                if self.on_mismatch == "raise":
                    raise
                plan.error = str(err)

    def _layout(self, plan: _Plan, encodings: list) -> None:
        t = self._t
        ids: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        for piece in plan.pieces:
            kind = piece[0]
            if kind == "tok":
                ids.append(np.array([piece[1]], dtype=np.int64))
                starts.append(np.array([piece[2]], dtype=np.int64))
                continue
            if kind == "byte":
                j = self._t_byte.get(piece[1])
                if j is None:
                    raise TokenizerMismatchError(
                        f"the text has byte 0x{piece[1]:02x} that is not valid UTF-8 (a character cut by "
                        "the sequence boundary?) and the teacher vocabulary has no token for that single "
                        "byte; cut sequences at character boundaries or use on_mismatch='skip'"
                    )
                ids.append(np.array([j], dtype=np.int64))
                starts.append(np.array([piece[2]], dtype=np.int64))
                continue
            _, run, start, raw, seg_start = piece
            tids = np.asarray(encodings[run].ids, dtype=np.int64)
            pieces = [t.text[i] for i in tids.tolist()]
            got = None if any(b is None for b in pieces) else b"".join(pieces)
            shift = 0
            if got != raw:
                # A SentencePiece teacher adds a space at the start of a text (after the sequence
                # start or a special token, not after a cut byte): accepted, that token has no boundary.
                if got is not None and t.scheme.prefix_space and seg_start and got == b" " + raw:
                    shift = 1
                else:
                    raise TokenizerMismatchError(self._mismatch_message(raw, got, tids))
            lens = t.length[tids]
            tok_starts = start - shift + np.concatenate([[0], np.cumsum(lens)[:-1]])
            # The token that carries an added leading space starts before the text: no boundary there.
            tok_starts[(tok_starts < start) | (lens == 0)] = -1
            ids.append(tids)
            starts.append(tok_starts)
        plan.teacher_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        all_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        plan.teacher_pos = np.full(plan.units + 1, -1, dtype=np.int64)
        keep = np.flatnonzero(all_starts >= 0)
        plan.teacher_pos[all_starts[keep]] = keep

    def _mismatch_message(self, raw: bytes, got: bytes | None, tids: np.ndarray) -> str:
        if got is None:
            bad = [int(i) for i in tids if self._t.text[int(i)] is None][:3]
            what = f"it produced tokens without bytes (unknown or special ids {bad})"
        else:
            at = next((i for i, (a, b) in enumerate(zip(raw, got)) if a != b), min(len(raw), len(got)))
            what = (
                f"the texts differ at byte {at}: student {raw[max(0, at - 20) : at + 20]!r} vs teacher "
                f"{got[max(0, at - 20) : at + 20]!r}"
            )
        norm = (
            f" (its normalizer, {self._t.normalizer}, may have changed the text)"
            if self._t.normalizer
            else ""
        )
        return (
            f"the teacher tokenizer does not reproduce the student's text{norm}: {what}. Byte-offset "
            "alignment needs both tokenizers to give the same bytes; pass on_mismatch='skip' to give "
            "such sequences empty rows instead."
        )

    def _align(self, plan: _Plan, res: TopK | None, k: int) -> TopK:
        n = len(plan.ids)
        out = TopK.empty_rows(n, k)
        self.stats.sequences += 1
        self.stats.positions += max(n - 1, 0)
        self.stats.dropped_special += plan.dropped
        if plan.error is not None:
            self.stats.skipped_sequences += 1
            return out
        if res is None or n < 2:
            return out
        if res.length != len(plan.teacher_ids):
            raise RuntimeError(
                f"the teacher returned {res.length} rows for a sequence of {len(plan.teacher_ids)} tokens"
            )
        # Student position t >= 1 reads the teacher row u that predicts the teacher token starting at
        # the same offset; u = 0 has no prediction, and a zero-length student token has no boundary.
        t_pos = np.arange(1, n)
        u = plan.teacher_pos[plan.starts[1:]]
        ok = (u >= 1) & (plan.lengths[1:] > 0)
        t_pos, u = t_pos[ok], u[ok]
        if len(u):
            ids, lp, tail, mass = self._map_rows(res, u, k)
            out.token_ids[t_pos], out.logprobs[t_pos], out.tail_logprob[t_pos] = ids, lp, tail
            self.stats.aligned += len(u)
            self.stats.mapped_mass += float(mass.sum())
        return out

    def _map_rows(self, res: TopK, u: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Teacher rows `u` in student ids: mapped, duplicates combined, sorted, cut/padded to k."""
        tid = res.token_ids[u].astype(np.int64)
        tlp = res.logprobs[u].astype(np.float32)
        in_range = (tid >= 0) & (tid < len(self._to_student))
        sid = np.where(in_range, self._to_student[np.where(in_range, tid, 0)], MISSING_ID)
        sid[~np.isfinite(tlp)] = MISSING_ID
        lp = np.where(sid >= 0, tlp, np.float32(-np.inf)).astype(np.float32)

        # Two teacher ids with the same bytes (a piece and its <0xNN> spelling) become one student id
        # carrying their summed probability. Rare, so only rows that need it take this path.
        dup = np.zeros(len(u), dtype=bool)
        if sid.shape[1] > 1:
            srt = np.sort(sid, axis=1)
            dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1)
        if dup.any():
            sid[dup], lp[dup] = _combine_duplicates(sid[dup], lp[dup])

        if not dup.any() and (tlp[:, 1:] <= tlp[:, :-1]).all():
            # Teacher rows come sorted and mapping keeps their order: moving the unmapped slots to
            # the back (a stable sort of booleans) is enough, and much cheaper than sorting floats.
            order = np.argsort(~np.isfinite(lp), axis=1, kind="stable")[:, :k]
        else:
            order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(sid, order, 1)
        lp = np.take_along_axis(lp, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=MISSING_ID)
            lp = np.pad(lp, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids[~np.isfinite(lp)] = MISSING_ID

        mass = np.exp(lp.astype(np.float64)).sum(1)
        with np.errstate(divide="ignore"):
            tail = np.log1p(-np.clip(mass, 0.0, 1.0))
        # Where every teacher candidate survived unchanged, the teacher's own tail is the exact answer.
        kept_all = (np.isfinite(tlp) <= (sid >= 0)).all(1) & ~dup & (np.isfinite(tlp).sum(1) <= k)
        tail = np.where(kept_all, res.tail_logprob[u].astype(np.float64), tail)
        return ids.astype(np.int32), lp.astype(np.float32), tail.astype(np.float32), mass


def _combine_duplicates(sid: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, merge entries with the same id (>= 0) into one carrying the summed probability;
    the others become MISSING_ID / -inf. Order is not kept (rows are re-sorted afterwards)."""
    order = np.argsort(sid, axis=1, kind="stable")
    s = np.take_along_axis(sid, order, 1)
    p = np.exp(np.take_along_axis(lp, order, 1).astype(np.float64))
    first = np.ones_like(s, dtype=bool)  # the first entry of each run of equal ids in a row
    first[:, 1:] = (s[:, 1:] != s[:, :-1]) | (s[:, 1:] < 0)
    group = np.cumsum(first.ravel()) - 1  # rows start a new run at column 0, so runs never span rows
    total = np.bincount(group, weights=p.ravel())[group].reshape(s.shape)
    with np.errstate(divide="ignore"):
        merged = np.where(first, np.log(total), -np.inf).astype(np.float32)
    return np.where(first, s, MISSING_ID), merged
