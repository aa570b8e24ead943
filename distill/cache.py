"""Teacher logit cache: top-k teacher predictions computed once, stored on disk, streamed into training.

Layout: one directory per teacher under a cache root, named `<slug>-<hash>` where the hash is a short
sha256 of the teacher fingerprint (teacher name, k, and whatever settings change the numbers)::

    <root>/<slug>-<hash12>/
        manifest.json      the fingerprint; opening the directory with another one is an error
        shard-000000.qlc   immutable shards, each written atomically (temp file, fsync, rename, fsync dir)
        shard-000001.qlc
        journal.qlj        samples added since the last shard: append-only, checksummed, fsynced records
        writer.lock        flock'ed by the single writer

A sample is one student token sequence x_0 .. x_{n-1} (int32) with its teacher `TopK`. It is keyed by
`sample_key(tokens)`, the sha256 of the tokens as little-endian int32. Rows 1 .. n-1 are stored; row 0 is
empty by convention (see `distill.types`) and rebuilt on read. The precision is the directory's (its
fingerprint records it, see `Precision`): `lossless` (the default) stores token ids and tokens exact,
log-probabilities and the tail log-mass exactly their float16 values (so -inf is kept, and values below
-65504 become -inf); `compact` (lossy) keeps the top ranks of each row (the first 32, and more until
what is left holds at most 3% of the probability, which moves to the tail) with log-probs on a 1/16-nat
grid (error <= 1/32): a third to 40% fewer bytes in bench/cache.py.

Encoding of one sample (the same in shards and in the journal; a mode byte after n and k says which).
Format version 2 (written; `_encode_rows`), lossless layout:

- plane streams, each split into byte planes (a top plane of at most 4 bits is bit-packed), each plane
  compressed on its own (zlib, or lzma when asked for): tokens [n]; tail: the float16 bit patterns of
  the tail log-mass [n-1]; first: the float16 order key of rank 0 [n-1] (the pattern of a negative
  value grows as the value falls);
- log-prob differences: each row's order keys as differences between neighbours (mod 2^16, so any
  input round-trips), rank-major, bucket-coded in rank groups (1, 2-3, 4-7, ..., 64-127) that keep
  their own symbol statistics;
- ids: in a shard, codes into a per-shard dictionary ranked by frequency or, when that would not pay
  (near-uniform ids), id + 1; the journal always uses id + 1 so that appending never depends on later
  samples. Rank-major, bucket-coded.

Bucket coding: a value below 16 is its own symbol; a larger one is the symbol of its bit length and the
3 bits under its leading one, followed by its remaining low bits verbatim. The one-byte symbols are
entropy-coded (zlib with Huffman only, or plain zlib/lzma when smaller), the low bits bit-packed: a
frequency-ranked code costs about its order-0 entropy this way (13.3 bits for real teachers' top-128
ids, which byte planes stored in 15.8). The compact layout holds the grid step, plane streams [tokens,
tail, kept slots per row, first (rows with any)], the grid-index differences of ranks 1.. (rank 1
against the grid point at or below rank 0) and the kept slots' id codes, both rank-major over kept
slots only. Format version 1 (read, never written; `_decode_rows_v1`) holds the same five quantities
of the lossless layout as plane streams.

Files (all integers little-endian):

- shard: b"QLCSHARD", u32 version (2; 1 read), u32 header length, u32 crc32 of the header, the JSON header
  (shard index, fingerprint hash, k, the byte range and crc32 of the id dictionary or null, and per
  sample its key, n, byte range and crc32; offsets count from the end of the header), then the blobs.
- journal: b"QLCJOURN", u32 version (2; 1 read: a resumed version-1 journal takes version-2 records,
  which the mode byte tells apart), u32 index of the shard it will become; then records:
  b"QREC", u32 payload length, u32 n, 32-byte key, u32 crc32 (of length, n, key and payload), payload.

Crash safety: `CacheWriter.add` writes one record to the journal before it returns, so a SIGKILL loses
at most the sample being written; it also fsyncs it (every `sync_every` adds), which covers power loss.
With `group_commit=True` the fsync moves to a background thread instead: each fsync covers every
record written before it started, `add` never waits for one, and `durable_samples` counts the records
an fsync has covered (`sync()` waits for all). The contract is then: a SIGKILL loses only samples
whose `add` had not returned; power loss or an OS crash loses at most the records written since the
last completed fsync. Either way the journal holds a prefix of the adds, in order.
Reopening the writer drops a torn tail (with a logged warning) and carries on. When the journal holds
`shard_samples` samples or `shard_bytes` bytes it is rewritten as a shard, and a fresh journal
replaces it by rename. A crash between the two leaves a journal whose shard already exists; it
is recognised by its index and discarded.

Order: the reader's global order is shards by index, samples in the order they were added, and then
the journal's samples (unless `include_journal=False`). Rolling the journal into a shard keeps that
order, so an index names the same sample before and after a roll, and a trainer can resume from one.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import lzma
import math
import os
import re
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.types import MISSING_ID, KDTargets, TopK
from quasar.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # written; version 1 (entropy coding of byte planes) is still read
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "journal.qlj"
LOCK_NAME = "writer.lock"
SHARD_SUFFIX = ".qlc"
MAX_TOKEN_ID = 1 << 24  # ids are counted in a dense array; no tokenizer comes near 16.7M entries

SHARD_MAGIC = b"QLCSHARD"
JOURNAL_MAGIC = b"QLCJOURN"
RECORD_MAGIC = b"QREC"
_SHARD_PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header crc32
_JOURNAL_HEADER = struct.Struct("<8sII")  # magic, version, index of the shard this journal becomes
_RECORD_HEADER = struct.Struct("<4sII32sI")  # magic, payload length, n, key, crc32
_SAMPLE_HEADER = struct.Struct("<IIB")  # n, k, mode: layout << 1 | (ids are shard-dictionary codes)
_SECTIONS = struct.Struct("<II")  # version-2 payload: lengths of its first two sections
_BUCKET_HEADER = struct.Struct("<BBBB")  # codec, level, mantissa bits, number of groups
_GROUP_INFO = struct.Struct("<III")  # values, compressed symbol bytes, extra-bit bytes
_CONTAINER_HEADER = struct.Struct("<BBB")  # codec, level, number of streams
_STREAM_INFO = struct.Struct("<IB")  # number of values, bits per value

_CODECS = {"zlib": 1, "lzma": 2}
_ID_RAW, _ID_DICT = 0, 1
# sample layouts (the mode byte >> 1): version 1's byte planes, version 2's lossless and compact codings
_LAYOUT_V1, _LAYOUT_LOSSLESS, _LAYOUT_COMPACT = 0, 1, 2
_MANTISSA_BITS = 3  # bucket symbols: bit length plus the 3 bits below the leading one (values < 16 as is)
_DELTA_GROUPS = (1, 2, 4, 8, 16, 32, 64)  # log-prob deltas: rank groups with their own symbol statistics
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.qlc$")
_TMP_PREFIX = ".tmp-"


class CacheError(Exception):
    """A logit cache cannot be used as asked (the message says why and what to do)."""


class CacheCorruptError(CacheError):
    """A cache file fails validation: bad magic, unknown version, checksum or structure."""


class FingerprintMismatchError(CacheError):
    """A cache directory belongs to another teacher fingerprint."""


class CacheLockedError(CacheError):
    """Another writer holds the cache directory."""


# --------------------------------------------------------------------------------------------------
# keys and fingerprints


def sample_key(tokens: Sequence[int] | np.ndarray) -> str:
    """Content key of a sample: sha256 (hex) of the student token ids as little-endian int32."""
    return hashlib.sha256(_as_tokens(tokens).astype("<i4", copy=False).tobytes()).hexdigest()


def teacher_fingerprint(
    teacher: str,
    k: int,
    settings: Mapping[str, Any] | None = None,
    precision: str | Precision | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint a cache directory is keyed on: teacher name, k, and settings that change the numbers
    (revision, dtype, backend, max length, ...). Must be JSON-serialisable. `precision` ("lossless", the
    default, or "compact", or a `Precision`): a compact cache records its parameters under "precision",
    so lossless and lossy outputs never share a directory (a lossless fingerprint has no such entry, as
    before version 2)."""
    if not isinstance(teacher, str) or not teacher:
        raise ValueError("teacher must be a non-empty string naming the model, revision and backend")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    fingerprint = {"teacher": teacher, "k": k, "settings": dict(settings or {})}
    entry = Precision.of(precision).fingerprint_entry()
    if entry is not None:
        fingerprint["precision"] = entry
    return fingerprint


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """Short (12 hex digits) sha256 of the canonical JSON of a fingerprint."""
    try:
        text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"teacher fingerprint must be JSON-serialisable (str, numbers, lists, dicts): {e}"
        ) from e
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir_name(fingerprint: Mapping[str, Any]) -> str:
    """`<slug>-<hash12>`: readable teacher name plus the fingerprint hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(fingerprint.get("teacher", "teacher"))).strip("-.")[:60]
    return f"{slug or 'teacher'}-{fingerprint_hash(fingerprint)}"


# --------------------------------------------------------------------------------------------------
# public data types


@dataclass(frozen=True)
class CachedSample:
    """One cached sequence: its key, student tokens int32 [n] and the teacher's TopK (row 0 empty)."""

    key: str
    tokens: np.ndarray
    topk: TopK

    def kd_targets(self) -> KDTargets:
        return KDTargets.from_topk(self.tokens, self.topk)


@dataclass(frozen=True)
class CacheBatch:
    """Consecutive samples [start, start + len(samples)); resume training from `next_index`."""

    start: int
    samples: list[CachedSample]

    @property
    def next_index(self) -> int:
        return self.start + len(self.samples)

    def kd_targets(self) -> KDTargets:
        """The samples' targets concatenated along positions (each sample's last position is masked)."""
        return KDTargets.cat([s.kd_targets() for s in self.samples])


@dataclass(frozen=True)
class CacheStats:
    shards: int
    shard_samples: int
    shard_tokens: int
    shard_bytes: int
    journal_samples: int
    journal_tokens: int
    journal_bytes: int

    @property
    def samples(self) -> int:
        return self.shard_samples + self.journal_samples

    @property
    def tokens(self) -> int:
        return self.shard_tokens + self.journal_tokens

    @property
    def bytes(self) -> int:
        return self.shard_bytes + self.journal_bytes

    @property
    def bytes_per_token(self) -> float:
        """All bytes on disk (shards and journal) per cached token; nan for an empty cache."""
        return self.bytes / self.tokens if self.tokens else math.nan

    @property
    def shard_bytes_per_token(self) -> float:
        return self.shard_bytes / self.shard_tokens if self.shard_tokens else math.nan


# --------------------------------------------------------------------------------------------------
# the cache directory


class LogitCache:
    """A teacher's cache directory. `LogitCache.for_teacher(root, teacher, k, settings)` picks (and creates)
    the directory for a fingerprint; `LogitCache(directory)` opens an existing one, and
    `LogitCache(directory, fingerprint)` creates it or checks that it holds that fingerprint."""

    def __init__(self, directory: str | Path, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.path = Path(directory)
        manifest_path = self.path / MANIFEST_NAME
        if fingerprint is None:
            if not manifest_path.exists():
                raise CacheError(
                    f"{self.path} is not a logit cache (no {MANIFEST_NAME}); create one with "
                    "LogitCache.for_teacher(root, teacher, k, settings)"
                )
            manifest = _read_manifest(manifest_path)
        else:
            fingerprint = json.loads(json.dumps(dict(fingerprint)))  # canonical copy: tuples become lists
            if "k" not in fingerprint:
                raise ValueError("the fingerprint needs 'k' (build it with teacher_fingerprint)")
            self.path.mkdir(parents=True, exist_ok=True)
            manifest = _create_or_read_manifest(manifest_path, fingerprint)
            if manifest["fingerprint"] != fingerprint:
                raise FingerprintMismatchError(
                    f"{self.path} holds the logit cache of fingerprint {manifest['fingerprint']}, not {fingerprint}: "
                    "the teacher or its settings differ, so its outputs do not apply. Use "
                    "LogitCache.for_teacher(root, ...), which picks the directory of each fingerprint, or "
                    "another directory"
                )
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        self.fingerprint_hash: str = manifest["fingerprint_hash"]
        self.k: int = int(self.fingerprint["k"])
        try:
            self.precision: Precision = Precision.of(self.fingerprint.get("precision"))
        except ValueError as e:
            raise CacheError(
                f"{self.path}: its fingerprint names a cache precision this code does not know ({e}): use the "
                "matching quasar-sn24 version"
            ) from e

    @classmethod
    def for_teacher(
        cls,
        root: str | Path,
        teacher: str,
        k: int,
        settings: Mapping[str, Any] | None = None,
        precision: str | Precision | None = None,
    ) -> LogitCache:
        """The directory of this teacher's fingerprint under `root` (created if new); `precision`:
        "lossless" (default) or "compact" (see `Precision`), a separate directory each."""
        fingerprint = teacher_fingerprint(teacher, k, settings, precision)
        return cls(Path(root) / cache_dir_name(fingerprint), fingerprint)

    def writer(
        self,
        *,
        shard_samples: int = 4096,
        shard_bytes: int = 64 << 20,
        codec: str = "zlib",
        level: int | None = None,
        sync_every: int = 1,
        group_commit: bool = False,
    ) -> CacheWriter:
        """The single writer of this directory; see `CacheWriter` for the options."""
        return CacheWriter(
            self,
            shard_samples=shard_samples,
            shard_bytes=shard_bytes,
            codec=codec,
            level=level,
            sync_every=sync_every,
            group_commit=group_commit,
        )

    def reader(self, *, include_journal: bool = True) -> CacheReader:
        return CacheReader(self, include_journal=include_journal)

    def keys(self) -> set[str]:
        """Keys of every stored sample (shards and journal)."""
        with self.reader() as r:
            return set(r.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.keys()  # scans the directory; a running job should ask its writer

    def stats(self) -> CacheStats:
        with self.reader() as r:
            return r.stats()

    def validate(self) -> CacheStats:
        """Read and check every sample (checksums, structure, keys); raises CacheCorruptError on damage."""
        with self.reader() as r:
            r.validate()
            return r.stats()

    def shard_paths(self) -> list[Path]:
        return [p for _, p in _list_shards(self.path)]

    def __repr__(self) -> str:
        return f"LogitCache({str(self.path)!r}, k={self.k})"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        version, fingerprint = manifest["version"], manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheCorruptError(
            f"{path}: unreadable cache manifest ({e}); restore it, or delete the directory to rebuild the cache"
        ) from e
    if version not in READ_VERSIONS:
        raise CacheError(
            f"{path}: cache format version {version}, this code handles versions {READ_VERSIONS}: use the "
            "matching quasar-sn24 version, or delete the directory to rebuild the cache"
        )
    manifest["fingerprint_hash"] = fingerprint_hash(fingerprint)
    return manifest


def _create_or_read_manifest(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        body = {
            "format": "quasar-sn24 teacher logit cache",
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
        }
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + "manifest-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            # link fails if another process created the manifest first; then theirs is compared below
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                fsync_dir(path.parent)
        finally:
            os.unlink(tmp)
    return _read_manifest(path)


# --------------------------------------------------------------------------------------------------
# low-level encoding: byte planes, compressed streams, samples


def _compress(data: bytes, codec: int, level: int) -> bytes:
    if codec == 1:
        return zlib.compress(data, level)
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": level}])


def _decompress(data: bytes, codec: int, level: int) -> bytes:
    if codec == 1:
        return zlib.decompress(data)
    if codec == 2:
        return lzma.decompress(
            data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": level}]
        )
    raise ValueError(f"unknown codec {codec}")


def _top_width(nbits: int) -> int:
    """Bits per value in the top byte plane as stored: 1, 2 or 4 when it is bit-packed, else 8."""
    top = nbits - 8 * ((nbits + 7) // 8 - 1)
    return 1 if top == 1 else 2 if top == 2 else 4 if top <= 4 else 8


def _planes(values: np.ndarray, nbits: int) -> list[np.ndarray]:
    """Byte planes (least significant first) of uint32 values that fit in `nbits` bits."""
    planes = [(values >> np.uint32(8 * p)).astype(np.uint8) for p in range((nbits + 7) // 8)]
    if planes and (width := _top_width(nbits)) < 8:
        per = 8 // width
        top = np.zeros(-(-planes[-1].size // per) * per, dtype=np.uint8)
        top[: planes[-1].size] = planes[-1]
        top = top.reshape(-1, per)
        packed = np.zeros(top.shape[0], dtype=np.uint8)
        for j in range(per):
            packed |= top[:, j] << np.uint8(width * j)
        planes[-1] = packed
    return planes


def _join_planes(planes: list[bytes], count: int, nbits: int) -> np.ndarray:
    values = np.zeros(count, dtype=np.uint32)
    for p, raw in enumerate(planes):
        plane = np.frombuffer(raw, dtype=np.uint8)
        if p == len(planes) - 1 and (width := _top_width(nbits)) < 8:
            per = 8 // width
            if plane.size != -(-count // per):
                raise ValueError(f"packed plane holds {plane.size} bytes, expected {-(-count // per)}")
            shifts = (np.arange(per, dtype=np.uint8) * np.uint8(width))[None, :]
            plane = ((plane[:, None] >> shifts) & np.uint8((1 << width) - 1)).reshape(-1)[:count]
        elif plane.size != count:
            raise ValueError(f"byte plane holds {plane.size} values, expected {count}")
        values |= plane.astype(np.uint32) << np.uint32(8 * p)
    return values


def _pack_streams(streams: Sequence[np.ndarray], codec: int, level: int) -> bytes:
    """Streams of non-negative integers (< 2^32) -> one self-describing compressed blob."""
    infos, sections = [], []
    for stream in streams:
        values = np.ascontiguousarray(stream, dtype=np.uint32).reshape(-1)
        nbits = int(values.max()).bit_length() if values.size else 0
        infos.append(_STREAM_INFO.pack(values.size, nbits))
        sections.extend(_compress(p.tobytes(), codec, level) for p in _planes(values, nbits))
    lengths = struct.pack(f"<{len(sections)}I", *(len(s) for s in sections))
    return b"".join([_CONTAINER_HEADER.pack(codec, level, len(streams)), *infos, lengths, *sections])


def _unpack_streams(buf: bytes, pos: int) -> list[np.ndarray]:
    codec, level, count = _CONTAINER_HEADER.unpack_from(buf, pos)
    pos += _CONTAINER_HEADER.size
    infos = [_STREAM_INFO.unpack_from(buf, pos + i * _STREAM_INFO.size) for i in range(count)]
    pos += count * _STREAM_INFO.size
    n_sections = sum((nbits + 7) // 8 for _, nbits in infos)
    lengths = struct.unpack_from(f"<{n_sections}I", buf, pos)
    pos += 4 * n_sections
    if pos + sum(lengths) != len(buf):
        raise ValueError(f"sections take {pos + sum(lengths)} bytes, the blob has {len(buf)}")
    streams, section = [], 0
    for size, nbits in infos:
        planes = []
        for _ in range((nbits + 7) // 8):
            planes.append(_decompress(buf[pos : pos + lengths[section]], codec, level))
            pos += lengths[section]
            section += 1
        streams.append(_join_planes(planes, size, nbits))
    return streams


def _order_key(bits: np.ndarray) -> np.ndarray:
    """float16 bit patterns -> uint16 keys that grow as the value falls (the pattern itself if negative).
    The map is its own inverse."""
    return np.where(bits & 0x8000, bits, ~bits & 0x7FFF).astype(np.uint16)


# -- version 2: bucket coding. A value v < 16 is its own symbol; a larger one is the symbol of its bit
# length and the 3 bits below its leading one, followed by its remaining low bits verbatim ("extra bits").
# Symbols (one byte each) are entropy coded (zlib: Huffman, which lands within a few percent of the
# order-0 entropy here; LZ77 matching on near-random symbols only costs), extra bits are bit-packed.
# For a frequency-ranked code this costs about the code's order-0 entropy, where byte planes cost more.


def _to_buckets(values: np.ndarray, mbits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values < 2^32 -> (uint8 symbols, int64 extra-bit widths, uint32 extra bits)."""
    v = np.asarray(values).reshape(-1)
    if v.size and int(v.max()) >= 1 << 32:
        raise ValueError("bucket coding takes values below 2^32")
    v = v.astype(np.uint32)
    direct = 1 << (mbits + 1)
    bits = np.frexp(v.astype(np.float64))[1]  # bit length (exact: float64 holds 32-bit integers)
    big = v >= direct
    widths = np.where(big, bits - 1 - mbits, 0).astype(np.int64)
    shift = widths.astype(np.uint32)
    top = (v >> shift).astype(np.int64) - (1 << mbits)  # the bits below the leading one
    symbols = np.where(big, direct + ((bits - mbits - 2) << mbits) + top, v)
    extra = v & ((np.uint32(1) << shift) - np.uint32(1))
    return symbols.astype(np.uint8), widths, extra


def _from_buckets(symbols: np.ndarray, raw_bits: bytes, mbits: int) -> np.ndarray:
    """uint8 symbols and their packed extra bits -> uint32 values (inverse of `_to_buckets` + `_pack_bits`)."""
    direct = 1 << (mbits + 1)
    values = symbols.astype(np.uint32)
    big = np.flatnonzero(symbols >= direct)
    t = values[big] - np.uint32(direct)
    widths = (t >> np.uint32(mbits)) + np.uint32(1)  # bit length - 1 - mbits
    head = np.uint32(1 << mbits) + (t & np.uint32((1 << mbits) - 1))
    values[big] = (head << widths) | _unpack_bits(raw_bits, widths)
    return values


def _pack_bits(extra: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate the low `widths[i]` bits of each `extra[i]` (LSB first) into bytes."""
    total = int(widths.sum())
    if total == 0:
        return b""
    nz = widths > 0
    x, w = extra[nz].astype(np.uint64), widths[nz]
    offsets = np.cumsum(w) - w
    word, shift = offsets >> 6, (offsets & 63).astype(np.uint64)
    out = np.zeros(total // 64 + 2, dtype=np.uint64)
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    out[word[starts]] = np.add.reduceat(x << shift, starts)  # disjoint bit fields: the sum is their OR
    spill = shift.astype(np.int64) + w > 64  # at most one value straddles each word boundary
    if spill.any():
        out[word[spill] + 1] += x[spill] >> (np.uint64(64) - shift[spill])
    return out.astype("<u8", copy=False).tobytes()[: (total + 7) // 8]


def _unpack_bits(raw: bytes, widths: np.ndarray) -> np.ndarray:
    """The uint32 values `_pack_bits` packed, given their widths (each at most 32)."""
    total = int(widths.sum(dtype=np.int64))
    if len(raw) != (total + 7) // 8:
        raise ValueError(f"extra bits take {len(raw)} bytes, the symbols need {(total + 7) // 8}")
    buf = np.zeros((total // 32 + 2) * 4, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    words = buf.view("<u4").astype(np.uint64)
    offsets = np.cumsum(widths, dtype=np.int64) - widths
    at, shift = offsets >> 5, (offsets & 31).astype(np.uint64)
    mask = (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)
    return (((words[at] | (words[at + 1] << np.uint64(32))) >> shift) & mask).astype(np.uint32)


_LZ77_BELOW_BITS = 2  # bits per symbol of the Huffman code under which LZ77 is tried too


def _compress_symbols(data: bytes, codec: int, level: int) -> bytes:
    if codec != 1 or level == 0:
        return _compress(data, codec, level)
    c = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    best = c.compress(data) + c.flush()
    if level >= 6 and len(best) * 8 < _LZ77_BELOW_BITS * len(data):
        # runs (a sparse row, a small dictionary) can still pay for LZ77: keep the smaller. Only worth
        # trying where the Huffman code is already short: near-random symbols never gain, and trying
        # costs as much as the rest of the encoding.
        alt = zlib.compress(data, level)
        best = alt if len(alt) < len(best) else best
    return best


def _pack_buckets(values: np.ndarray, bounds: Sequence[int], codec: int, level: int) -> bytes:
    """uint32 values, split at `bounds` into groups with their own symbol statistics -> one blob."""
    symbols, widths, extra = _to_buckets(values, _MANTISSA_BITS)
    infos, sections = [], []
    for a, b in itertools.pairwise(bounds):
        sym = _compress_symbols(symbols[a:b].tobytes(), codec, level)
        bits = _pack_bits(extra[a:b], widths[a:b])
        infos.append(_GROUP_INFO.pack(b - a, len(sym), len(bits)))
        sections += [sym, bits]
    return b"".join([_BUCKET_HEADER.pack(codec, level, _MANTISSA_BITS, len(infos)), *infos, *sections])


def _unpack_buckets(buf: bytes) -> np.ndarray:
    """A `_pack_buckets` blob -> its uint32 values (all groups, in order)."""
    codec, level, mbits, count = _BUCKET_HEADER.unpack_from(buf, 0)
    if mbits != _MANTISSA_BITS:
        raise ValueError(
            f"bucket coding with {mbits} mantissa bits; this code writes and reads {_MANTISSA_BITS}"
        )
    pos = _BUCKET_HEADER.size
    infos = [_GROUP_INFO.unpack_from(buf, pos + i * _GROUP_INFO.size) for i in range(count)]
    pos += count * _GROUP_INFO.size
    if pos + sum(s + x for _, s, x in infos) != len(buf):
        raise ValueError(
            f"bucket groups take {pos + sum(s + x for _, s, x in infos)} bytes, the blob has {len(buf)}"
        )
    parts = []
    for size, sym_len, bits_len in infos:
        symbols = np.frombuffer(_decompress(buf[pos : pos + sym_len], codec, level), dtype=np.uint8)
        pos += sym_len
        if symbols.size != size:
            raise ValueError(f"a bucket group holds {symbols.size} symbols, expected {size}")
        parts.append(_from_buckets(symbols, buf[pos : pos + bits_len], mbits))
        pos += bits_len
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def _group_bounds(per_rank: np.ndarray, edges: Sequence[int]) -> list[int]:
    """Offsets of rank groups in a rank-major stream holding `per_rank[j]` values at rank j."""
    ends = np.cumsum(per_rank)
    inner = [int(ends[e - 1]) for e in edges if 0 < e < len(per_rank)]
    return [0, *inner, int(ends[-1]) if len(per_rank) else 0]


def _join_sections(a: bytes, b: bytes, c: bytes) -> bytes:
    return _SECTIONS.pack(len(a), len(b)) + a + b + c


def _split_sections(payload: bytes, pos: int) -> tuple[bytes, bytes, bytes]:
    la, lb = _SECTIONS.unpack_from(payload, pos)
    pos += _SECTIONS.size
    if pos + la + lb > len(payload):
        raise ValueError(f"sections of {la} + {lb} bytes do not fit a payload of {len(payload)}")
    return payload[pos : pos + la], payload[pos + la : pos + la + lb], payload[pos + la + lb :]


@dataclass(frozen=True)
class Precision:
    """How a cache stores the teacher's log-probabilities; part of the fingerprint (see `teacher_fingerprint`),
    so caches of different precisions never share a directory.

    - `lossless` (the default): ids exact; log-probs and the tail log-mass exactly their float16 values.
    - `compact`: lossy. Each row is sorted by log-prob (descending; ties keep their order) and log-probs
      are clamped to <= 0. Kept: the first `min_keep` ranks, then further ranks until what is left (the
      dropped suffix) holds at most `drop_mass` probability; ranks below -1024 * logprob_step (mass
      < e^-64 at the default step) are dropped whatever their rank, except rank 0. The dropped slots read
      back empty (MISSING_ID, -inf) and their mass is added to the tail: tail' = log(exp(tail) + dropped),
      in float64, then stored at float16 (exact up to float16 rounding: no probability is lost). Every
      kept log-prob but rank 0's is rounded to the nearest multiple of `logprob_step` nats; rank 0 keeps
      its float16 value, raised to rank 1's rounded value when that is higher (so rows stay sorted). The
      absolute log-prob error is at most logprob_step / 2 on every kept rank (a relative probability
      error of at most e^(logprob_step / 2) - 1: 3.2% at the default 1/16); ids of kept ranks are exact.
    """

    mode: str = "lossless"
    drop_mass: float = 0.0
    logprob_step: float = 0.0
    min_keep: int = 0

    def __post_init__(self) -> None:
        if self.mode == "lossless":
            if self.drop_mass or self.logprob_step or self.min_keep:
                raise ValueError("a lossless cache has no drop_mass, logprob_step or min_keep")
            return
        if self.mode != "compact":
            raise ValueError(f"cache precision must be one of {PRECISIONS}, got {self.mode!r}")
        if not 0 <= self.drop_mass < 1:
            raise ValueError(f"drop_mass must be in [0, 1), got {self.drop_mass}")
        step = self.logprob_step
        if not (step > 0 and math.frexp(step)[0] == 0.5 and 2**-10 <= step <= 1):
            raise ValueError(f"logprob_step must be a power of two in [2^-10, 1], got {step}")
        if not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ValueError(f"min_keep must be a positive int, got {self.min_keep!r}")

    @classmethod
    def of(cls, precision: str | Precision | Mapping[str, Any] | None) -> Precision:
        """A Precision from its name ("lossless", "compact": the default parameters), its fingerprint
        entry (a dict), or itself."""
        if precision is None:
            return cls()
        if isinstance(precision, Precision):
            return precision
        if isinstance(precision, str):
            if precision == "compact":
                return cls("compact", COMPACT_DROP_MASS, COMPACT_LOGPROB_STEP, COMPACT_MIN_KEEP)
            return cls(precision)
        try:
            return cls(**dict(precision))
        except TypeError as e:
            raise ValueError(f"bad cache precision {precision!r}: {e}") from e

    def fingerprint_entry(self) -> dict[str, Any] | None:
        """What `teacher_fingerprint` records (None for lossless, so lossless fingerprints stay as they were)."""
        if self.mode == "lossless":
            return None
        return {
            "mode": self.mode,
            "drop_mass": self.drop_mass,
            "logprob_step": self.logprob_step,
            "min_keep": self.min_keep,
        }


PRECISIONS = ("lossless", "compact")
COMPACT_DROP_MASS = 0.03  # dropped probability per position, at most (bench/cache.py: held-out KL +0.5%)
COMPACT_LOGPROB_STEP = 1 / 16  # nats between the grid points of ranks 1..
COMPACT_MIN_KEEP = 32  # ranks always kept (a sharp teacher's runners-up stay, whatever their mass)


@dataclass
class _Rows:
    """A sample at storage precision: tokens int32 [n]; ids int32, lp16 (float16 bits) uint16 [n-1, k];
    tail16 uint16 [n-1]. `step`: None for lossless rows; for compact rows, the grid of ranks 1.. (each
    row then holds a prefix of kept slots, the rest MISSING_ID and -inf)."""

    tokens: np.ndarray
    ids: np.ndarray
    lp16: np.ndarray
    tail16: np.ndarray
    step: float | None = None

    def to_sample(self, key: str) -> CachedSample:
        k = self.ids.shape[1]
        head = TopK.empty_rows(1, k)
        topk = TopK(
            np.concatenate([head.token_ids, self.ids]),
            np.concatenate([head.logprobs, self.lp16.view(np.float16).astype(np.float32)]),
            np.concatenate([head.tail_logprob, self.tail16.view(np.float16).astype(np.float32)]),
        )
        return CachedSample(key, self.tokens, topk)


_NEG_INF16 = 0xFC00


def _encode_rows(rows: _Rows, lut: np.ndarray | None, codec: int, level: int) -> bytes:
    """One sample -> payload (version 2). `lut` maps id + 1 to its shard dictionary code; None stores id + 1.

    Lossless layout: plane streams [tokens, tail, first] (the float16 order key of rank 0), then the
    order-key differences between neighbouring ranks (rank-major, bucket coded in rank groups), then the
    id codes (rank-major, bucket coded). Compact layout: the log2 of the grid step as an int8, plane
    streams [tokens, tail, kept (slots per row), first (rows with kept > 0)], the differences of grid
    indices (rank 1 against ceil(-first / step), which is never larger), and the codes of kept slots,
    both rank-major over the kept slots only."""
    n, k = rows.tokens.size, rows.ids.shape[1]
    m = n - 1
    flag = _ID_RAW if lut is None else _ID_DICT
    if rows.step is None:
        u = _order_key(rows.lp16)
        delta = (np.diff(u.astype(np.int32), axis=1).T & 0xFFFF).astype(np.uint32).reshape(-1)
        values = rows.ids.T.astype(np.int64).reshape(-1) + 1
        planes = _pack_streams([rows.tokens.view(np.uint32), rows.tail16, u[:, 0]], codec, level)
        bounds = _group_bounds(np.full(k - 1, m), _DELTA_GROUPS)
        head = _SAMPLE_HEADER.pack(n, k, _LAYOUT_LOSSLESS << 1 | flag)
    else:
        step = rows.step
        finite = rows.lp16 != _NEG_INF16
        kept = finite.sum(1)
        keep = np.arange(k)[None, :] < kept[:, None]
        if not np.array_equal(keep, finite):
            raise ValueError("compact rows must hold a prefix of kept slots")
        v = rows.lp16.view(np.float16).astype(np.float64)
        inner = keep[:, 1:]
        with np.errstate(invalid="ignore"):  # -inf in empty slots, never selected
            grid = np.rint(-v / step)
            ref = np.ceil(-v[:, :1] / step)  # the grid point at or below rank 0
            d = grid[:, 1:] - np.concatenate([ref, grid[:, 1:-1]], axis=1)
        if not (-grid[:, 1:][inner] * step == v[:, 1:][inner]).all():
            raise ValueError("compact rows must hold grid values beyond rank 0")
        delta = d.T[inner.T]
        if delta.size and delta.min() < 0:
            raise ValueError("compact rows must be sorted by log-prob")
        delta = delta.astype(np.uint32)
        values = rows.ids.T[keep.T].astype(np.int64) + 1
        first = _order_key(rows.lp16[:, 0])[kept > 0]
        planes = _pack_streams(
            [rows.tokens.view(np.uint32), rows.tail16, kept.astype(np.uint32), first], codec, level
        )
        bounds = _group_bounds(inner.sum(0), _DELTA_GROUPS)
        head = _SAMPLE_HEADER.pack(n, k, _LAYOUT_COMPACT << 1 | flag) + struct.pack(
            "<b", int(math.log2(step))
        )
    codes = lut[values] if lut is not None else values
    deltas = _pack_buckets(delta, bounds, codec, level)
    ids = _pack_buckets(codes, [0, codes.size], codec, level)
    return head + _join_sections(planes, deltas, ids)


def _decode_rows(payload: bytes, dictionary: np.ndarray | None) -> _Rows:
    n, k, mode = _SAMPLE_HEADER.unpack_from(payload, 0)
    layout, id_mode = mode >> 1, mode & 1
    if n < 1 or k < 1:
        raise ValueError(f"bad sample layout (n={n}, k={k})")
    if layout == _LAYOUT_V1:
        return _decode_rows_v1(payload, dictionary)
    pos, step = _SAMPLE_HEADER.size, None
    if layout == _LAYOUT_COMPACT:
        (log2_step,) = struct.unpack_from("<b", payload, pos)
        step, pos = 2.0**log2_step, pos + 1
    elif layout != _LAYOUT_LOSSLESS:
        raise ValueError(f"unknown sample layout {layout}")
    planes, deltas, ids = _split_sections(payload, pos)
    streams = _unpack_streams(planes, 0)
    delta = _unpack_buckets(deltas)
    codes = _unpack_buckets(ids)
    m = n - 1
    if step is None:
        if len(streams) != 3:
            raise ValueError(f"bad lossless sample layout ({len(streams)} plane streams)")
        tokens, tail, first = streams
        sizes = (tokens.size, tail.size, first.size, delta.size, codes.size)
        if sizes != (n, m, m, m * (k - 1), m * k):
            raise ValueError(f"stream sizes {sizes} do not fit n={n}, k={k}")
        u = np.empty((k, m), dtype=np.uint32)
        u[0] = first
        if k > 1:
            u[1:] = first[None, :] + np.cumsum(
                delta.astype(np.uint32).reshape(k - 1, m), axis=0, dtype=np.uint32
            )
        lp16 = _order_key(np.ascontiguousarray((u & 0xFFFF).astype(np.uint16).T))
        keep = None
    else:
        if len(streams) != 4:
            raise ValueError(f"bad compact sample layout ({len(streams)} plane streams)")
        tokens, tail, kept, first = streams
        if tokens.size != n or tail.size != m or kept.size != m or (kept.size and int(kept.max()) > k):
            raise ValueError(f"compact streams do not fit n={n}, k={k}")
        keep = np.arange(k)[None, :] < kept[:, None].astype(np.int64)
        inner = keep[:, 1:]
        sizes = (first.size, delta.size, codes.size)
        if sizes != (int((kept > 0).sum()), int(inner.sum()), int(keep.sum())):
            raise ValueError(f"compact stream sizes {sizes} do not fit the kept slots")
        lp16 = np.full((m, k), _NEG_INF16, dtype=np.uint16)
        lp16[kept > 0, 0] = _order_key(first.astype(np.uint16))
        if k > 1:
            d = np.zeros((k - 1, m), dtype=np.int64)
            d[inner.T] = delta.astype(np.int64)
            ref = np.ceil(-lp16[:, 0].view(np.float16).astype(np.float64) / step)
            grid = ref[None, :] + np.cumsum(d, axis=0)
            with np.errstate(over="ignore", invalid="ignore"):
                values16 = (-(grid * step)).astype(np.float16).view(np.uint16).T
            lp16[:, 1:] = np.where(inner, values16, _NEG_INF16)
    if id_mode == _ID_DICT:
        if dictionary is None:
            raise ValueError("sample uses a shard dictionary, but none was given")
        if codes.size and int(codes.max()) >= dictionary.size:
            raise ValueError(f"id code {int(codes.max())} outside the dictionary ({dictionary.size} entries)")
        values = dictionary[codes.astype(np.int64)].astype(np.int64)
    else:
        values = codes.astype(np.int64)
    if keep is None:
        ids = np.ascontiguousarray((values - 1).astype(np.int32).reshape(k, m).T)
    else:
        ids_t = np.full((k, m), MISSING_ID, dtype=np.int32)
        ids_t[keep.T] = (values - 1).astype(np.int32)
        ids = np.ascontiguousarray(ids_t.T)
    return _Rows(tokens.view(np.int32), ids, lp16, tail.astype(np.uint16), step)


def _decode_rows_v1(payload: bytes, dictionary: np.ndarray | None) -> _Rows:
    n, k, id_mode = _SAMPLE_HEADER.unpack_from(payload, 0)
    streams = _unpack_streams(payload, _SAMPLE_HEADER.size)
    if len(streams) != 5 or n < 1 or k < 1:
        raise ValueError(f"bad sample layout (n={n}, k={k}, {len(streams)} streams)")
    tokens, tail, first, delta, codes = streams
    m = n - 1
    sizes = (tokens.size, tail.size, first.size, delta.size, codes.size)
    if sizes != (n, m, m, m * (k - 1), m * k):
        raise ValueError(f"stream sizes {sizes} do not fit n={n}, k={k}")
    u = np.empty((k, m), dtype=np.uint32)
    u[0] = first
    if k > 1:
        u[1:] = first[None, :] + np.cumsum(delta.reshape(k - 1, m), axis=0, dtype=np.uint32)
    u = np.ascontiguousarray((u & 0xFFFF).astype(np.uint16).T)
    if id_mode == _ID_DICT:
        if dictionary is None:
            raise ValueError("sample uses a shard dictionary, but none was given")
        if codes.size and int(codes.max()) >= dictionary.size:
            raise ValueError(f"id code {int(codes.max())} outside the dictionary ({dictionary.size} entries)")
        values = dictionary[codes]
    elif id_mode == _ID_RAW:
        values = codes
    else:
        raise ValueError(f"unknown id mode {id_mode}")
    ids = np.ascontiguousarray((values.astype(np.int64) - 1).astype(np.int32).reshape(k, m).T)
    return _Rows(tokens.view(np.int32), ids, _order_key(u), tail.astype(np.uint16))


def _encode_rows_v1(rows: _Rows, lut: np.ndarray | None, codec: int, level: int) -> bytes:
    """The version-1 encoder (byte planes), lossless rows only: kept for compatibility tests and for the
    benchmark's baseline (`_writing_version_1`); the writer uses `_encode_rows`."""
    if rows.step is not None:
        raise ValueError("version 1 stores lossless rows only")
    k = rows.ids.shape[1]
    u = _order_key(rows.lp16)
    first = u[:, 0]
    delta = (np.diff(u.astype(np.int32), axis=1).T & 0xFFFF).astype(np.uint32)
    values = rows.ids.T.astype(np.int64) + 1
    codes = lut[values] if lut is not None else values
    head = _SAMPLE_HEADER.pack(rows.tokens.size, k, _ID_RAW if lut is None else _ID_DICT)
    body = _pack_streams([rows.tokens.view(np.uint32), rows.tail16, first, delta, codes], codec, level)
    return head + body


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-D sequence of ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32:
        if int(arr.min()) < 0 or int(arr.max()) >= 2**31:
            raise ValueError("tokens must be non-negative int32 ids")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


def _rows_from_topk(tokens: np.ndarray, topk: TopK, k: int, precision: Precision) -> _Rows:
    """Validate a teacher output and bring it to storage precision (drops the empty row 0)."""
    n = tokens.size
    if int(tokens.min()) < 0:
        raise ValueError("tokens must be non-negative ids")
    if topk.length != n:
        raise ValueError(f"the TopK has {topk.length} rows but the sequence has {n} tokens")
    if topk.k != k:
        raise ValueError(
            f"the TopK has k={topk.k} but this cache stores k={k} (a different k is another cache)"
        )
    ids = np.asarray(topk.token_ids)
    lp = np.asarray(topk.logprobs, dtype=np.float32)
    tail = np.asarray(topk.tail_logprob, dtype=np.float32)
    if not ((ids[0] == MISSING_ID).all() and np.isneginf(lp[0]).all() and tail[0] == 0):
        raise ValueError(
            "row 0 of the TopK must be empty (ids MISSING_ID, logprobs -inf, tail 0): by convention it has "
            "no prediction and the cache does not store it; build it with TopK.empty_rows"
        )
    ids, lp, tail = ids[1:], lp[1:], tail[1:]
    if ids.size and (int(ids.min()) < MISSING_ID or int(ids.max()) >= MAX_TOKEN_ID):
        raise ValueError(
            f"teacher token ids must lie in [{MISSING_ID}, {MAX_TOKEN_ID}), got {ids.min()}..{ids.max()}"
        )
    if np.isnan(lp).any() or np.isnan(tail).any():
        raise ValueError("the teacher returned NaN log-probabilities; refusing to cache them")
    if precision.mode == "compact":
        return _compact_rows(tokens, np.ascontiguousarray(ids, dtype=np.int32), lp, tail, precision)
    with np.errstate(over="ignore"):  # below -65504 is -inf in float16, as documented
        lp16 = lp.astype(np.float16).view(np.uint16)
        tail16 = tail.astype(np.float16).view(np.uint16)
    return _Rows(tokens, np.ascontiguousarray(ids, dtype=np.int32), lp16, tail16)


def _compact_rows(
    tokens: np.ndarray, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, p: Precision
) -> _Rows:
    """The compact (lossy) storage precision; see `Precision` for what it keeps and the error bounds."""
    step = p.logprob_step
    lp64 = np.minimum(lp.astype(np.float64), 0.0)  # a log-probability is never positive
    order = np.argsort(-lp64, axis=1, kind="stable")  # descending, -inf last, ties in their order
    lp64 = np.take_along_axis(lp64, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    prob = np.exp(lp64)
    suffix = np.cumsum(prob[:, ::-1], axis=1)[:, ::-1]  # mass of ranks j.. of each row
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        first16 = lp64[:, :1].astype(np.float16)  # below -65504: -inf, as in lossless
        first_ranks = np.arange(lp64.shape[1])[None, :] < p.min_keep
        keep = ((suffix > p.drop_mass) | first_ranks) & (lp64 >= -1024 * step)  # prefixes: so is keep
        keep[:, 0] = np.isfinite(first16[:, 0])  # rank 0 always, so a row keeps its prediction
        dropped = np.where(keep, 0.0, prob).sum(axis=1)
        tail64 = np.minimum(np.log(np.exp(tail.astype(np.float64)) + dropped), 0.0)
        grid = -(np.rint(-lp64[:, 1:] / step) * step)  # exact in float16: |grid| <= 1024 * step
        if grid.shape[1]:  # rank 0 >= rank 1 (both exact float16 values, so the max is one too)
            raise_to = np.where(keep[:, 1], grid[:, 0], -np.inf)
            first16 = np.maximum(first16.astype(np.float64), raise_to[:, None]).astype(np.float16)
        lp16 = np.concatenate([first16, grid.astype(np.float16)], axis=1).view(np.uint16)
        tail16 = tail64.astype(np.float16).view(np.uint16)
    lp16 = np.where(keep, lp16, np.uint16(_NEG_INF16)).astype(np.uint16)
    ids = np.where(keep, ids, MISSING_ID).astype(np.int32)
    return _Rows(tokens, np.ascontiguousarray(ids), np.ascontiguousarray(lp16), tail16, step)


# --------------------------------------------------------------------------------------------------
# files


def _list_shards(directory: Path) -> list[tuple[int, Path]]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if m := _SHARD_RE.match(entry.name):
                found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


_REBUILD = "delete it and re-run the teacher cache job, which recomputes the missing samples"


@dataclass
class _Entry:
    """Where one sample's payload lies in a file."""

    key: str
    n: int
    offset: int
    length: int
    crc: int


class _Shard:
    def __init__(self, path: Path, expected_hash: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            prefix = f.read(_SHARD_PREFIX.size)
            if len(prefix) < _SHARD_PREFIX.size:
                raise self._corrupt(f"truncated ({len(prefix)} bytes)")
            magic, version, header_len, header_crc = _SHARD_PREFIX.unpack(prefix)
            if magic != SHARD_MAGIC:
                raise self._corrupt(f"not a logit-cache shard (magic {magic!r}, expected {SHARD_MAGIC!r})")
            if version not in READ_VERSIONS:
                raise CacheError(
                    f"{path}: shard format version {version}, this code reads versions {READ_VERSIONS}: use the "
                    "matching quasar-sn24 version, or delete the cache directory to rebuild it"
                )
            raw = f.read(header_len)
            self.size = os.fstat(f.fileno()).st_size
        if len(raw) != header_len or zlib.crc32(raw) != header_crc:
            raise self._corrupt("header checksum mismatch")
        try:
            header = json.loads(raw)
            self.index = int(header["shard_index"])
            self.k = int(header["k"])
            dictionary = header["dictionary"]
            self.entries = [
                _Entry(s["key"], s["n"], s["offset"], s["length"], s["crc"]) for s in header["samples"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise self._corrupt(f"malformed header ({e})") from e
        if header.get("fingerprint_hash") != expected_hash:
            raise self._corrupt(
                f"belongs to teacher fingerprint {header.get('fingerprint_hash')}, not this directory's "
                f"{expected_hash} (copied from another cache?)"
            )
        self.data_start = _SHARD_PREFIX.size + header_len
        self.dict_entry = (
            None
            if dictionary is None
            else _Entry("", 0, dictionary["offset"], dictionary["length"], dictionary["crc"])
        )
        for e in [*self.entries, *([self.dict_entry] if self.dict_entry else [])]:
            if e.offset < 0 or self.data_start + e.offset + e.length > self.size:
                raise self._corrupt(f"a byte range ({e.offset}+{e.length}) lies past the end of the file")
        self._dictionary: np.ndarray | None = None

    def _corrupt(self, what: str) -> CacheCorruptError:
        return CacheCorruptError(f"{self.path}: {what}; the file is damaged: {_REBUILD}")

    def read(self, e: _Entry, what: str) -> bytes:
        with open(self.path, "rb") as f:
            payload = os.pread(f.fileno(), e.length, self.data_start + e.offset)
        if len(payload) != e.length or zlib.crc32(payload) != e.crc:
            raise self._corrupt(f"{what} fails its checksum")
        return payload

    def dictionary(self) -> np.ndarray | None:
        if self.dict_entry is not None and self._dictionary is None:
            payload = self.read(self.dict_entry, "the id dictionary")
            try:
                (self._dictionary,) = _unpack_streams(payload, 0)
            except (ValueError, struct.error, zlib.error, lzma.LZMAError) as e:
                raise self._corrupt(f"the id dictionary does not decode ({e})") from e
        return self._dictionary


@dataclass
class _JournalScan:
    shard_index: int
    entries: list[_Entry]
    valid_end: int  # byte offset after the last good record
    size: int
    problem: str | None  # why scanning stopped before the end of the file


def _scan_journal(fd: int, path: Path) -> _JournalScan:
    size = os.fstat(fd).st_size
    head = os.pread(fd, _JOURNAL_HEADER.size, 0)
    if len(head) < _JOURNAL_HEADER.size:
        raise CacheCorruptError(f"{path}: truncated journal header; {_REBUILD}")
    magic, version, shard_index = _JOURNAL_HEADER.unpack(head)
    if magic != JOURNAL_MAGIC:
        raise CacheCorruptError(f"{path}: not a logit-cache journal (magic {magic!r}); {_REBUILD}")
    if version not in READ_VERSIONS:
        raise CacheError(
            f"{path}: journal format version {version}, this code reads versions {READ_VERSIONS}: use the "
            "matching quasar-sn24 version, or delete the journal to drop its unsharded samples"
        )
    entries: list[_Entry] = []
    pos, problem = _JOURNAL_HEADER.size, None
    data = os.pread(fd, size - pos, pos) if size > pos else b""
    base, size = pos, pos + len(data)  # read what is there now; a writer may be appending
    while pos < size:
        rel = pos - base
        if size - pos < _RECORD_HEADER.size:
            problem = "a record header is cut short"
            break
        magic, length, n, key, crc = _RECORD_HEADER.unpack_from(data, rel)
        if magic != RECORD_MAGIC:
            problem = "bad record magic"
            break
        end = pos + _RECORD_HEADER.size + length
        if end > size:
            problem = f"a record claims {length} bytes but the file ends first"
            break
        payload = data[rel + _RECORD_HEADER.size : rel + _RECORD_HEADER.size + length]
        if _record_crc(length, n, key, payload) != crc:
            problem = "a record fails its checksum"
            break
        entries.append(_Entry(key.hex(), n, pos + _RECORD_HEADER.size, length, crc))
        pos = end
    return _JournalScan(shard_index, entries, pos, size, problem)


def _record_crc(length: int, n: int, key: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<II", length, n) + key))


def _journal_header(shard_index: int) -> bytes:
    return _JOURNAL_HEADER.pack(JOURNAL_MAGIC, FORMAT_VERSION, shard_index)


def _decode_payload(payload: bytes, dictionary: np.ndarray | None, key: str, where: str) -> CachedSample:
    try:
        rows = _decode_rows(payload, dictionary)
    except (ValueError, struct.error, zlib.error, lzma.LZMAError, IndexError) as e:
        raise CacheCorruptError(f"{where} does not decode ({e}); the file is damaged: {_REBUILD}") from e
    if sample_key(rows.tokens) != key:
        raise CacheCorruptError(
            f"{where}: its tokens do not hash to its key; the file is damaged: {_REBUILD}"
        )
    return rows.to_sample(key)


# --------------------------------------------------------------------------------------------------
# writer


def _entropy_bytes(hist: np.ndarray) -> float:
    total = hist.sum()
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum() * total / 8)


def _plane_entropy(values: np.ndarray, weights: np.ndarray) -> float:
    """Order-0 entropy estimate (bytes) of the byte planes of `values` occurring `weights` times each."""
    cost = 0.0
    for p in range((int(values.max()).bit_length() + 7) // 8 if values.size else 0):
        cost += _entropy_bytes(np.bincount((values >> (8 * p)) & 0xFF, weights=weights, minlength=256))
    return cost


def _bucket_entropy(values: np.ndarray, weights: np.ndarray) -> float:
    """Estimated bytes of bucket-coding `values` occurring `weights` times each (symbols at their order-0
    entropy, extra bits verbatim)."""
    symbols, widths, _ = _to_buckets(values, _MANTISSA_BITS)
    hist = np.bincount(symbols, weights=weights, minlength=256)
    return _entropy_bytes(hist) + float((widths * weights).sum()) / 8


def _choose_dictionary(counts: np.ndarray) -> np.ndarray | None:
    """Frequency-ranked dictionary of id + 1 values, or None when raw ids would be smaller (bucket-coded
    codes against bucket-coded ids, plus the dictionary's own size)."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return None
    weights = counts[present].astype(np.float64)
    order = np.argsort(-weights, kind="stable")  # ties: smaller id first, so the result is deterministic
    dictionary = present[order].astype(np.uint32)
    raw_cost = _bucket_entropy(present, weights)
    dict_cost = _bucket_entropy(np.arange(present.size), weights[order])
    dict_cost += len(_pack_streams([dictionary], _CODECS["zlib"], 6))  # the dictionary itself
    return dictionary if dict_cost < raw_cost else None


def _choose_dictionary_v1(counts: np.ndarray) -> np.ndarray | None:
    """Version 1's choice (byte-plane cost model), for `_writing_version_1`."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return None
    weights = counts[present].astype(np.float64)
    order = np.argsort(-weights, kind="stable")  # ties: smaller id first, so the result is deterministic
    raw_cost = _plane_entropy(present, weights)
    dict_cost = _plane_entropy(np.arange(present.size), weights[order])
    dict_cost += present.size * max(1, (int(present[-1]).bit_length() + 7) // 8)  # the dictionary itself
    return present[order].astype(np.uint32) if dict_cost < raw_cost else None


@contextlib.contextmanager
def _writing_version_1() -> Iterator[None]:
    """Within this block the module writes the version-1 format (byte planes, lossless only), as the code
    before version 2 did: for compatibility tests and the benchmark's baseline. Not thread-safe."""
    saved = _encode_rows, _choose_dictionary, FORMAT_VERSION
    globals().update(_encode_rows=_encode_rows_v1, _choose_dictionary=_choose_dictionary_v1, FORMAT_VERSION=1)
    try:
        yield
    finally:
        globals().update(zip(("_encode_rows", "_choose_dictionary", "FORMAT_VERSION"), saved, strict=True))


class _JournalSync:
    """The journal's descriptor and fsync bookkeeping, shared by a writer and its group-commit thread.

    `written` counts records appended, `synced` those an fsync has covered (records rolled into a shard
    or rewritten into a fresh journal count as covered: both are written with fsync). With `start()`, a
    daemon thread fsyncs whenever `written` is ahead: one fsync covers every record written before it
    began, however many. The thread holds no reference to the writer, so a dropped writer is still
    collected (its `__del__` stops the thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards `fd` against a close or swap during the thread's dup
        self.fd = -1
        self.written = self.synced = self.fsyncs = 0
        self.error: OSError | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def set_fd(self, fd: int) -> None:
        """Make `fd` the journal (closing the previous one) so that the thread never syncs a stale number."""
        with self.lock:
            old, self.fd = self.fd, fd
            if old >= 0 and old != fd:
                os.close(old)

    def note_written(self, fsynced: bool = False) -> None:
        """One more record is in the journal; `fsynced`: the caller has just fsynced it (and all before)."""
        with self._cond:
            self.written += 1
            if fsynced:
                self.fsyncs += 1
                self.synced = self.written
            if self._thread is not None:
                self._cond.notify_all()

    def covered(self) -> None:
        """Everything written so far is durable by other means (a fresh fsynced journal or shard)."""
        with self._cond:
            self.synced = self.written
            self._cond.notify_all()

    def fsync_now(self) -> None:
        """fsync in the caller's thread (the mode without a group-commit thread)."""
        target = self.written
        os.fsync(self.fd)
        with self._cond:
            self.fsyncs += 1
            self.synced = max(self.synced, target)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cache-group-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self.synced >= self.written and not self._closing:
                    self._cond.wait()
                if self.synced >= self.written:  # closing, nothing left to cover
                    return
                target = self.written
            try:
                with self.lock:
                    fd = os.dup(self.fd) if self.fd >= 0 else -1
                if fd >= 0:
                    try:
                        os.fsync(fd)  # covers every record written to this file before `target` was read
                    finally:
                        os.close(fd)
            except OSError as e:  # the kernel may have dropped the dirty pages: durability is unknown
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self.fsyncs += 1
                self.synced = max(self.synced, target)
                self._cond.notify_all()

    def wait(self) -> None:
        """Block until every record written so far is covered (or the thread failed)."""
        with self._cond:
            target = self.written
            while self.synced < target and self.error is None and self._thread is not None:
                if not self._thread.is_alive():
                    break
                self._cond.wait()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise CacheError(
                f"fsync of the cache journal failed ({self.error}); samples written since the last good "
                "fsync may not be on disk: stop, check the disk, and re-run (the journal is verified on resume)"
            ) from self.error

    def stop(self) -> None:
        """Cover what is written (a last fsync) and end the thread."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if thread is not threading.current_thread():
            thread.join()
        self._thread = None


class CacheWriter:
    """Appends samples to one cache directory; one writer per directory at a time (flock on writer.lock).

    shard_samples, shard_bytes: the journal becomes a shard once it holds this many samples or bytes
        (a shard is built in memory, so shard_bytes bounds the writer's memory too).
    codec, level: compression of shards ("zlib" 0-9, default 6; "lzma" 0-9). The journal uses zlib 1.
    sync_every: fsync the journal every this many adds (1: each add; 0: never). A killed process loses
        nothing either way (written records are in the page cache); fsync covers power loss and OS crashes.
    group_commit: instead of `sync_every`, fsync in a background thread: one fsync covers every record
        written since the last, so `add` never waits for the disk (see the module docstring for what
        survives what). `sync()` waits until every added sample is durable; `close` does too.
    """

    def __init__(
        self,
        cache: LogitCache,
        *,
        shard_samples: int = 4096,
        shard_bytes: int = 64 << 20,
        codec: str = "zlib",
        level: int | None = None,
        sync_every: int = 1,
        group_commit: bool = False,
    ) -> None:
        self._sync = _JournalSync()
        if codec not in _CODECS:
            raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {codec!r}")
        level = 6 if level is None else level
        if not 0 <= level <= 9:
            raise ValueError(f"level must be in 0..9, got {level}")
        if shard_samples < 1 or shard_bytes < 1:
            raise ValueError("shard_samples and shard_bytes must be positive")
        self.cache = cache
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        if sync_every < 0:
            raise ValueError("sync_every must be >= 0 (0: never fsync the journal)")
        self._codec, self._level, self._sync_every = _CODECS[codec], level, sync_every
        self._unsynced = 0
        self._dir = cache.path
        self._lock_fd = self._acquire_lock()
        self._journal_fd = -1
        self._group_commit = bool(group_commit)
        try:
            self._recover()
        except BaseException:
            self._release()
            raise
        if self._group_commit:
            self._sync.start()

    # -- lifecycle

    def _acquire_lock(self) -> int:
        fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheLockedError(
                    f"{self._dir} is being written by another writer (pid {holder}, lock {LOCK_NAME}); wait for "
                    "it to finish or stop it: one teacher cache has one writer at a time"
                ) from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _set_journal_fd(self, fd: int) -> None:
        self._sync.set_fd(fd)  # closes the previous descriptor under the lock the commit thread takes
        self._journal_fd = fd

    def _release(self) -> None:
        self._sync.stop()  # the group-commit thread's last fsync covers every record written
        if self._journal_fd >= 0:
            self._set_journal_fd(-1)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def _recover(self) -> None:
        for entry in os.scandir(self._dir):  # temp files of a writer that died; we hold the lock
            if entry.name.startswith((_TMP_PREFIX + "shard-", _TMP_PREFIX + JOURNAL_NAME)):
                os.unlink(entry.path)
        self._keys: set[str] = set()
        self._next_index = 0
        for index, path in _list_shards(self._dir):
            shard = _Shard(path, self.cache.fingerprint_hash)
            self._keys.update(e.key for e in shard.entries)
            self._next_index = index + 1
        path = self._dir / JOURNAL_NAME
        self._entries: list[_Entry] = []
        if not path.exists():
            self._new_journal([])
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            scan = _scan_journal(fd, path)
            kept: list[tuple[_Entry, bytes]] = []
            seen = set(self._keys)
            for e in scan.entries:
                if e.key not in seen:
                    seen.add(e.key)
                    kept.append((e, os.pread(fd, e.length, e.offset)))
        finally:
            os.close(fd)
        if scan.problem is not None:
            log.warning(
                "%s: dropped %d bytes at offset %d (%s): a writer stopped mid-record; recovered the %d samples "
                "before it",
                path, scan.size - scan.valid_end, scan.valid_end, scan.problem, len(scan.entries),
            )  # fmt: skip
        if scan.shard_index < self._next_index and scan.entries:
            log.info("%s: its samples are already in shard %d; discarding it", path, scan.shard_index)
        if scan.problem is None and scan.shard_index == self._next_index and len(kept) == len(scan.entries):
            self._entries = [e for e, _ in kept]
            self._set_journal_fd(os.open(path, os.O_RDWR | os.O_APPEND))
            self._journal_size = scan.valid_end
        else:  # rewrite: drop the torn tail and samples already in shards, fix the index
            self._new_journal(kept)
        self._keys.update(e.key for e in self._entries)
        if self._entries:
            log.info("%s: resumed with %d journaled samples", path, len(self._entries))

    def _new_journal(self, records: list[tuple[_Entry, bytes]]) -> None:
        """Replace the journal (atomically) with one for the next shard holding `records`."""
        chunks, entries, pos = [_journal_header(self._next_index)], [], _JOURNAL_HEADER.size
        for e, payload in records:
            chunks.append(_RECORD_HEADER.pack(RECORD_MAGIC, e.length, e.n, bytes.fromhex(e.key), e.crc))
            entries.append(_Entry(e.key, e.n, pos + _RECORD_HEADER.size, e.length, e.crc))
            chunks.append(payload)
            pos += _RECORD_HEADER.size + e.length
        if self._journal_fd >= 0:
            self._set_journal_fd(-1)
        path = atomic_write(self._dir / JOURNAL_NAME, chunks, tmp_prefix=_TMP_PREFIX)
        self._set_journal_fd(os.open(path, os.O_RDWR | os.O_APPEND))
        self._journal_size = pos
        self._entries = entries
        self._unsynced = 0
        self._sync.covered()  # atomic_write fsynced the new journal; older records are in shards

    def close(self, flush: bool = True) -> None:
        """Release the directory; with flush (the default), journaled samples first become a shard."""
        if self._lock_fd < 0:
            return
        try:
            if flush:
                self.flush()
            elif self._unsynced:
                self._sync.fsync_now()
        finally:
            self._release()
        self._sync.check()  # a failed group fsync is an error even when the samples made it to a shard

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()  # a writer dropped without close(): free the lock, keep the journal

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(flush=exc_type is None)  # after an error the journal keeps the samples anyway

    # -- writing

    def contains(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def journal_samples(self) -> int:
        return len(self._entries)

    def add(self, tokens: Sequence[int] | np.ndarray, topk: TopK) -> bool:
        """Store one sample durably (journal record, fsynced per `sync_every` or by the group commit);
        False, and nothing written, if its key is already cached."""
        if self._lock_fd < 0:
            raise CacheError("this CacheWriter is closed; open a new one with cache.writer()")
        self._sync.check()  # a failed group fsync stops the writer: what it covered is unknown
        tokens = _as_tokens(tokens)
        key = sample_key(tokens)
        if key in self._keys:
            return False
        rows = _rows_from_topk(tokens, topk, self.cache.k, self.cache.precision)
        payload = _encode_rows(rows, None, _CODECS["zlib"], 1)
        crc = _record_crc(len(payload), tokens.size, bytes.fromhex(key), payload)
        record = (
            _RECORD_HEADER.pack(RECORD_MAGIC, len(payload), tokens.size, bytes.fromhex(key), crc) + payload
        )
        start = self._journal_size
        fsynced = False
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._journal_fd, view) :]
            if not self._group_commit:  # with group commit, the thread fsyncs (note_written wakes it)
                self._unsynced += 1
                if self._sync_every and self._unsynced >= self._sync_every:
                    os.fsync(self._journal_fd)
                    self._unsynced = 0
                    fsynced = True
        except BaseException:
            # cut the partial record off, so later appends do not land behind garbage
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, start)
            raise
        self._journal_size = start + len(record)
        self._entries.append(_Entry(key, tokens.size, start + _RECORD_HEADER.size, len(payload), crc))
        self._keys.add(key)
        self._sync.note_written(fsynced)
        if len(self._entries) >= self.shard_samples or self._journal_size >= self.shard_bytes:
            self.flush()
        return True

    def sync(self) -> None:
        """Make every sample added so far durable (fsynced) before returning."""
        if self._lock_fd < 0:
            raise CacheError("this CacheWriter is closed; open a new one with cache.writer()")
        if self._group_commit:
            self._sync.wait()
        elif self._unsynced:
            self._sync.fsync_now()
            self._unsynced = 0

    @property
    def durable_samples(self) -> int:
        """Samples added by this writer that an fsync has covered (all of them once `sync()` returns)."""
        return self._sync.synced

    @property
    def fsyncs(self) -> int:
        """Journal fsyncs this writer made for its adds (with group commit, one covers many adds)."""
        return self._sync.fsyncs

    def flush(self) -> Path | None:
        """Turn the journal into an atomic shard now (even a small one); returns its path, None if empty."""
        if not self._entries:
            return None
        fd = self._journal_fd

        def rows(e: _Entry) -> _Rows:
            payload = os.pread(fd, e.length, e.offset)
            if _record_crc(len(payload), e.n, bytes.fromhex(e.key), payload) != e.crc:
                raise CacheCorruptError(
                    f"{self._dir / JOURNAL_NAME}: a journaled sample changed on disk under the writer; "
                    "was the journal edited? Stop, delete the journal, and re-run the teacher cache job"
                )
            return _decode_rows(payload, None)

        # pass 1: id frequencies for the shard dictionary; pass 2: encode
        counts = np.zeros(0, dtype=np.int64)
        for e in self._entries:
            c = np.bincount(rows(e).ids.reshape(-1).astype(np.int64) + 1)
            if c.size > counts.size:
                counts = np.pad(counts, (0, c.size - counts.size))
            counts[: c.size] += c
        dictionary = _choose_dictionary(counts)
        lut = None
        if dictionary is not None:
            lut = np.zeros(counts.size, dtype=np.uint32)
            lut[dictionary] = np.arange(dictionary.size, dtype=np.uint32)
        blobs: list[bytes] = []
        offset = 0
        dict_meta = None
        if dictionary is not None:
            blob = _pack_streams([dictionary], self._codec, self._level)
            dict_meta = {
                "offset": 0,
                "length": len(blob),
                "crc": zlib.crc32(blob),
                "size": int(dictionary.size),
            }
            blobs.append(blob)
            offset = len(blob)
        samples = []
        for e in self._entries:
            blob = _encode_rows(rows(e), lut, self._codec, self._level)
            samples.append(
                {"key": e.key, "n": e.n, "offset": offset, "length": len(blob), "crc": zlib.crc32(blob)}
            )
            blobs.append(blob)
            offset += len(blob)
        header = json.dumps(
            {
                "shard_index": self._next_index,
                "fingerprint_hash": self.cache.fingerprint_hash,
                "k": self.cache.k,
                "dictionary": dict_meta,
                "samples": samples,
            },
            separators=(",", ":"),
        ).encode()
        prefix = _SHARD_PREFIX.pack(SHARD_MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header))
        path = atomic_write(
            self._dir / _shard_name(self._next_index), [prefix, header, *blobs], tmp_prefix=_TMP_PREFIX
        )
        # a crash here leaves a journal whose shard exists: recovery sees its index and discards it
        self._next_index += 1
        self._new_journal([])
        return path


# --------------------------------------------------------------------------------------------------
# reader


class CacheReader:
    """Reads a cache in a fixed global order: shards by index, then (with include_journal) the journal.

    The set of samples is a snapshot taken at open; a writer may keep adding meanwhile (open a new reader
    to see its samples). Indices are stable: rolling the journal into a shard keeps the order.
    """

    def __init__(self, cache: LogitCache, *, include_journal: bool = True) -> None:
        self.cache = cache
        self._journal_fd = -1
        self._journal_path = cache.path / JOURNAL_NAME
        for _ in range(8):  # retry if a writer rolled a shard between listing shards and opening the journal
            if self._snapshot(include_journal):
                break
        self._starts = [0]
        for source in self._sources:
            self._starts.append(self._starts[-1] + len(source[1]))

    def _snapshot(self, include_journal: bool) -> bool:
        self.close()
        shards = [_Shard(p, self.cache.fingerprint_hash) for _, p in _list_shards(self.cache.path)]
        for s in shards:
            if s.k != self.cache.k:
                raise s._corrupt(f"stores k={s.k}, the cache k={self.cache.k}")
        next_index = shards[-1].index + 1 if shards else 0
        self._sources: list[tuple[_Shard | None, list[_Entry]]] = [(s, s.entries) for s in shards]
        if not include_journal:
            return True
        try:
            fd = os.open(self._journal_path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        scan = _scan_journal(fd, self._journal_path)  # a torn tail may be a record being written: skip it
        if scan.shard_index > next_index:
            os.close(fd)
            return False
        self._journal_fd = fd
        if scan.shard_index == next_index:
            seen = {e.key for s in shards for e in s.entries}
            entries = [e for e in scan.entries if e.key not in seen]
            if entries:
                self._sources.append((None, entries))
        return True

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __len__(self) -> int:
        return self._starts[-1]

    def keys(self) -> list[str]:
        """Keys in global order."""
        return [e.key for _, entries in self._sources for e in entries]

    def _locate(self, index: int) -> tuple[_Shard | None, _Entry, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a cache of {len(self)} samples")
        s = bisect.bisect_right(self._starts, index) - 1
        shard, entries = self._sources[s]
        return shard, entries[index - self._starts[s]], index

    def __getitem__(self, index: int) -> CachedSample:
        shard, e, index = self._locate(index)
        if shard is not None:
            return _decode_payload(
                shard.read(e, f"sample {index}"), shard.dictionary(), e.key, f"{shard.path}: sample {index}"
            )
        payload = os.pread(self._journal_fd, e.length, e.offset)
        where = f"{self._journal_path}: sample {index}"
        if _record_crc(len(payload), e.n, bytes.fromhex(e.key), payload) != e.crc:
            raise CacheCorruptError(f"{where} fails its checksum; {_REBUILD}")
        return _decode_payload(payload, None, e.key, where)

    def iter_samples(self, start: int = 0) -> Iterator[tuple[int, CachedSample]]:
        """(index, sample) from `start` to the end, in global order (resume a run from a saved index)."""
        if not 0 <= start <= len(self):
            raise IndexError(f"start {start} out of range for a cache of {len(self)} samples")
        for index in range(start, len(self)):
            yield index, self[index]

    def iter_batches(self, batch_size: int, start: int = 0) -> Iterator[CacheBatch]:
        """Consecutive batches of `batch_size` samples (the last may be smaller) from `start`."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        batch: list[CachedSample] = []
        first = start
        for index, sample in self.iter_samples(start):
            if not batch:
                first = index
            batch.append(sample)
            if len(batch) == batch_size:
                yield CacheBatch(first, batch)
                batch = []
        if batch:
            yield CacheBatch(first, batch)

    def validate(self) -> None:
        """Decode every sample, checking checksums, structure and keys."""
        for index in range(len(self)):
            self[index]

    def stats(self) -> CacheStats:
        shards = [s for s, _ in self._sources if s is not None]
        journal = [e for s, entries in self._sources if s is None for e in entries]
        journal_bytes = os.fstat(self._journal_fd).st_size if self._journal_fd >= 0 else 0
        return CacheStats(
            shards=len(shards),
            shard_samples=sum(len(s.entries) for s in shards),
            shard_tokens=sum(e.n for s in shards for e in s.entries),
            shard_bytes=sum(s.size for s in shards),
            journal_samples=len(journal),
            journal_tokens=sum(e.n for e in journal),
            journal_bytes=journal_bytes,
        )
