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
empty by convention (see `distill.types`) and rebuilt on read. Storage is lossless at storage precision:
token ids and tokens exact, log-probabilities and the tail log-mass exactly their float16 values (so
-inf is kept, and values below -65504 become -inf).

Encoding of one sample (the same in shards and in the journal): five streams of unsigned integers, each
split into byte planes (a top plane of at most 4 bits is bit-packed) and each plane compressed on its
own (zlib, or lzma when asked for):

- tokens [n];
- tail: the float16 bit patterns of the tail log-mass [n-1];
- logprob ranks: log-probs arrive in descending order, and the float16 bit pattern of a negative value
  grows as the value falls, so each row is stored as its first pattern plus the differences between
  neighbours (mod 2^16, so any input round-trips), rank-major: small numbers that compress well;
- ids: in a shard, codes into a per-shard dictionary ranked by frequency (frequent ids get small
  codes, so high byte planes are mostly zero) or, when that would not pay (near-uniform ids), id + 1
  directly; the journal always uses id + 1 so that appending never depends on later samples.

Files (all integers little-endian):

- shard: b"QLCSHARD", u32 version, u32 header length, u32 crc32 of the header, the JSON header
  (shard index, fingerprint hash, k, the byte range and crc32 of the id dictionary or null, and per
  sample its key, n, byte range and crc32; offsets count from the end of the header), then the blobs.
- journal: b"QLCJOURN", u32 version, u32 index of the shard it will become; then records:
  b"QREC", u32 payload length, u32 n, 32-byte key, u32 crc32 (of length, n, key and payload), payload.

Crash safety: `CacheWriter.add` writes one record to the journal before it returns, so a SIGKILL loses
at most the sample being written; it also fsyncs it (every `sync_every` adds), which covers power loss.
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
import json
import logging
import lzma
import math
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.types import MISSING_ID, KDTargets, TopK
from quasar.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
_SAMPLE_HEADER = struct.Struct("<IIB")  # n, k, id mode
_CONTAINER_HEADER = struct.Struct("<BBB")  # codec, level, number of streams
_STREAM_INFO = struct.Struct("<IB")  # number of values, bits per value

_CODECS = {"zlib": 1, "lzma": 2}
_ID_RAW, _ID_DICT = 0, 1
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


def teacher_fingerprint(teacher: str, k: int, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint a cache directory is keyed on: teacher name, k, and settings that change the numbers
    (revision, dtype, backend, max length, ...). Must be JSON-serialisable."""
    if not isinstance(teacher, str) or not teacher:
        raise ValueError("teacher must be a non-empty string naming the model, revision and backend")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return {"teacher": teacher, "k": k, "settings": dict(settings or {})}


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

    @classmethod
    def for_teacher(
        cls, root: str | Path, teacher: str, k: int, settings: Mapping[str, Any] | None = None
    ) -> LogitCache:
        fingerprint = teacher_fingerprint(teacher, k, settings)
        return cls(Path(root) / cache_dir_name(fingerprint), fingerprint)

    def writer(
        self,
        *,
        shard_samples: int = 4096,
        shard_bytes: int = 64 << 20,
        codec: str = "zlib",
        level: int | None = None,
        sync_every: int = 1,
    ) -> CacheWriter:
        """The single writer of this directory; see `CacheWriter` for the options."""
        return CacheWriter(
            self,
            shard_samples=shard_samples,
            shard_bytes=shard_bytes,
            codec=codec,
            level=level,
            sync_every=sync_every,
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
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version}, this code handles version {FORMAT_VERSION}: use the "
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
    """float16 bit patterns -> uint16 keys that grow as the value falls (the pattern itself if negative)."""
    return np.where(bits & 0x8000, bits, ~bits & 0x7FFF).astype(np.uint16)


@dataclass
class _Rows:
    """A sample at storage precision: tokens int32 [n]; ids int32, lp16 (float16 bits) uint16 [n-1, k];
    tail16 uint16 [n-1]."""

    tokens: np.ndarray
    ids: np.ndarray
    lp16: np.ndarray
    tail16: np.ndarray

    def to_sample(self, key: str) -> CachedSample:
        k = self.ids.shape[1]
        head = TopK.empty_rows(1, k)
        topk = TopK(
            np.concatenate([head.token_ids, self.ids]),
            np.concatenate([head.logprobs, self.lp16.view(np.float16).astype(np.float32)]),
            np.concatenate([head.tail_logprob, self.tail16.view(np.float16).astype(np.float32)]),
        )
        return CachedSample(key, self.tokens, topk)


def _encode_rows(rows: _Rows, lut: np.ndarray | None, codec: int, level: int) -> bytes:
    """One sample -> payload. `lut` maps id + 1 to its shard dictionary code; None stores id + 1."""
    k = rows.ids.shape[1]
    u = _order_key(rows.lp16)
    first = u[:, 0]
    # rank-major: the differences at one rank have similar sizes across positions
    delta = (np.diff(u.astype(np.int32), axis=1).T & 0xFFFF).astype(np.uint32)
    values = rows.ids.T.astype(np.int64) + 1
    codes = lut[values] if lut is not None else values
    head = _SAMPLE_HEADER.pack(rows.tokens.size, k, _ID_RAW if lut is None else _ID_DICT)
    body = _pack_streams([rows.tokens.view(np.uint32), rows.tail16, first, delta, codes], codec, level)
    return head + body


def _decode_rows(payload: bytes, dictionary: np.ndarray | None) -> _Rows:
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


def _rows_from_topk(tokens: np.ndarray, topk: TopK, k: int) -> _Rows:
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
    with np.errstate(over="ignore"):  # below -65504 is -inf in float16, as documented
        lp16 = lp.astype(np.float16).view(np.uint16)
        tail16 = tail.astype(np.float16).view(np.uint16)
    return _Rows(tokens, np.ascontiguousarray(ids, dtype=np.int32), lp16, tail16)


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
            if version != FORMAT_VERSION:
                raise CacheError(
                    f"{path}: shard format version {version}, this code reads version {FORMAT_VERSION}: use the "
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
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: journal format version {version}, this code reads version {FORMAT_VERSION}: use the "
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


def _choose_dictionary(counts: np.ndarray) -> np.ndarray | None:
    """Frequency-ranked dictionary of id + 1 values, or None when raw ids would be smaller."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return None
    weights = counts[present].astype(np.float64)
    order = np.argsort(-weights, kind="stable")  # ties: smaller id first, so the result is deterministic
    raw_cost = _plane_entropy(present, weights)
    dict_cost = _plane_entropy(np.arange(present.size), weights[order])
    dict_cost += present.size * max(1, (int(present[-1]).bit_length() + 7) // 8)  # the dictionary itself
    return present[order].astype(np.uint32) if dict_cost < raw_cost else None


class CacheWriter:
    """Appends samples to one cache directory; one writer per directory at a time (flock on writer.lock).

    shard_samples, shard_bytes: the journal becomes a shard once it holds this many samples or bytes
        (a shard is built in memory, so shard_bytes bounds the writer's memory too).
    codec, level: compression of shards ("zlib" 0-9, default 6; "lzma" 0-9). The journal uses zlib 1.
    sync_every: fsync the journal every this many adds (1: each add; 0: never). A killed process loses
        nothing either way (written records are in the page cache); fsync covers power loss and OS crashes.
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
    ) -> None:
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
        try:
            self._recover()
        except BaseException:
            self._release()
            raise

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

    def _release(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
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
            self._journal_fd = os.open(path, os.O_RDWR | os.O_APPEND)
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
            os.close(self._journal_fd)
            self._journal_fd = -1
        path = atomic_write(self._dir / JOURNAL_NAME, chunks, tmp_prefix=_TMP_PREFIX)
        self._journal_fd = os.open(path, os.O_RDWR | os.O_APPEND)
        self._journal_size = pos
        self._entries = entries

    def close(self, flush: bool = True) -> None:
        """Release the directory; with flush (the default), journaled samples first become a shard."""
        if self._lock_fd < 0:
            return
        try:
            if flush:
                self.flush()
            elif self._unsynced:
                os.fsync(self._journal_fd)
        finally:
            self._release()

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
        """Store one sample durably (journal record, fsynced per `sync_every`); False, and nothing written,
        if its key is already cached."""
        if self._lock_fd < 0:
            raise CacheError("this CacheWriter is closed; open a new one with cache.writer()")
        tokens = _as_tokens(tokens)
        key = sample_key(tokens)
        if key in self._keys:
            return False
        rows = _rows_from_topk(tokens, topk, self.cache.k)
        payload = _encode_rows(rows, None, _CODECS["zlib"], 1)
        crc = _record_crc(len(payload), tokens.size, bytes.fromhex(key), payload)
        record = (
            _RECORD_HEADER.pack(RECORD_MAGIC, len(payload), tokens.size, bytes.fromhex(key), crc) + payload
        )
        start = self._journal_size
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._journal_fd, view) :]
            self._unsynced += 1
            if self._sync_every and self._unsynced >= self._sync_every:
                os.fsync(self._journal_fd)
                self._unsynced = 0
        except BaseException:
            # cut the partial record off, so later appends do not land behind garbage
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, start)
            raise
        self._journal_size = start + len(record)
        self._entries.append(_Entry(key, tokens.size, start + _RECORD_HEADER.size, len(payload), crc))
        self._keys.add(key)
        if len(self._entries) >= self.shard_samples or self._journal_size >= self.shard_bytes:
            self.flush()
        return True

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
