"""distill.cache: exact round trips, crash safety, validation, resumable reading, bytes per token; format
version 1 still read; the compact (lossy) precision within its documented bounds."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import distill.cache as cache_module
from distill.cache import (
    JOURNAL_NAME,
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    FingerprintMismatchError,
    LogitCache,
    Precision,
    cache_dir_name,
    sample_key,
    teacher_fingerprint,
)
from distill.types import MISSING_ID, KDTargets, TopK

REPO_ROOT = Path(__file__).resolve().parents[2]
V1_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "logit-cache-v1"
QWEN_VOCAB = 248_320  # the student vocabulary: ids need 18 bits


def make_sample(seed: int, n: int, k: int, vocab: int = QWEN_VOCAB) -> tuple[np.ndarray, TopK]:
    """Random tokens and a TopK honouring the contract: row 0 empty, distinct ids per row, descending
    log-probs, some rows with -inf/MISSING slots (vocab < k), tails including -inf and 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n).astype(np.int32)
    ids = np.full((n, k), MISSING_ID, dtype=np.int32)
    lp = np.full((n, k), -np.inf, dtype=np.float32)
    tail = rng.uniform(-12.0, -1e-4, n).astype(np.float32)
    tail[0] = 0.0
    for t in range(1, n):
        width = k if rng.random() < 0.8 else int(rng.integers(0, k + 1))  # some rows end in empty slots
        ids[t, :width] = rng.choice(vocab, width, replace=False)
        lp[t, :width] = -np.sort(rng.exponential(3.0, width))
        if rng.random() < 0.1:
            tail[t] = -np.inf  # the top-k held all the mass
    if n > 2:
        lp[2, 0] = 0.0  # a certain prediction
        tail[2] = -np.inf
    return tokens, TopK(ids, lp, tail)


def fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def assert_exact(sample, tokens: np.ndarray, topk: TopK) -> None:
    """Lossless at storage precision: ids and tokens exact, log-probs and tails their float16 values."""
    assert sample.key == sample_key(tokens)
    assert sample.tokens.dtype == np.int32 and np.array_equal(sample.tokens, tokens)
    assert sample.topk.token_ids.dtype == np.int32 and np.array_equal(sample.topk.token_ids, topk.token_ids)
    assert sample.topk.logprobs.dtype == np.float32
    assert np.array_equal(sample.topk.logprobs, fp16(topk.logprobs))  # -inf == -inf, exact bits otherwise
    assert np.array_equal(np.signbit(sample.topk.logprobs), np.signbit(fp16(topk.logprobs)))
    assert np.array_equal(sample.topk.tail_logprob, fp16(topk.tail_logprob))


def new_cache(tmp_path: Path, k: int) -> LogitCache:
    return LogitCache.for_teacher(tmp_path, "test/teacher@rev", k, {"dtype": "float32"})


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("k", [1, 128])
def test_round_trip_is_exact_from_journal_and_from_shard(tmp_path, k):
    cache = new_cache(tmp_path, k)
    samples = [make_sample(s, n, k) for s, n in enumerate([1, 2, 7, 40, 1, 3])]
    samples = list({sample_key(t): (t, tk) for t, tk in samples}.values())  # n=1 seeds may collide
    writer = cache.writer()
    for tokens, topk in samples:
        assert writer.add(tokens, topk)
    with cache.reader() as r:  # before a shard exists: the journal's samples
        assert len(r) == len(samples) and r.stats().shards == 0
        for i, (tokens, topk) in enumerate(samples):
            assert_exact(r[i], tokens, topk)
    writer.close()  # rolls the journal into a shard
    with cache.reader() as r:
        assert r.stats().shards == 1 and r.stats().journal_samples == 0
        for (_, sample), (tokens, topk) in zip(r.iter_samples(), samples, strict=True):
            assert_exact(sample, tokens, topk)
        assert r.keys() == [sample_key(t) for t, _ in samples]
    cache.validate()


def test_lzma_codec_and_dense_small_vocab_round_trip(tmp_path):
    """A small vocabulary (every row has the same ids) takes the dictionary path; lzma is the other codec."""
    cache = new_cache(tmp_path, 8)
    samples = [make_sample(s, 30, 8, vocab=12) for s in range(3)]
    with cache.writer(codec="lzma", level=1) as w:
        for tokens, topk in samples:
            w.add(tokens, topk)
    with cache.reader() as r:
        for i, (tokens, topk) in enumerate(samples):
            assert_exact(r[i], tokens, topk)


def test_odd_logprob_values_round_trip(tmp_path):
    """Values the delta coding must not assume away: positive, -0.0, subnormal, huge, out of order."""
    k = 6
    ids = np.array([[-1] * k, [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]], dtype=np.int32)
    lp = np.array(
        [[-np.inf] * k, [1e-3, 0.0, -0.0, -1e-7, -7e4, -np.inf], [-5.0, -1.0, -9.0, -0.5, -np.inf, -3.0]],
        dtype=np.float32,
    )
    tail = np.array([0.0, -np.inf, -1e-8], dtype=np.float32)
    tokens = np.array([0, 1, 2**31 - 1], dtype=np.int32)
    cache = new_cache(tmp_path, k)
    with cache.writer() as w:
        w.add(tokens, TopK(ids, lp, tail))
    with cache.reader() as r:
        assert_exact(r[0], tokens, TopK(ids, lp, tail))
        assert r[0].topk.logprobs[1, 4] == -np.inf  # below float16's range: -inf, as documented


# ---------------------------------------------------------------------------------------------- keys and fingerprints


def test_sample_key_and_contains(tmp_path):
    tokens = [3, 1, 248_319]
    assert sample_key(tokens) == hashlib.sha256(np.array(tokens, dtype="<i4").tobytes()).hexdigest()
    assert sample_key(np.array(tokens, dtype=np.int64)) == sample_key(tokens)
    cache = new_cache(tmp_path, 4)
    a, b = make_sample(1, 5, 4), make_sample(2, 6, 4)
    with cache.writer(shard_samples=1) as w:
        assert w.add(*a) and not w.contains(sample_key(b[0]))
        assert not w.add(*a)  # stored once
        assert w.add(*b) and w.contains(sample_key(b[0]))
    assert cache.keys() == {sample_key(a[0]), sample_key(b[0])}
    assert sample_key(a[0]) in cache
    with cache.writer() as w:  # a restarted run sees what is done
        assert w.contains(sample_key(a[0])) and len(w) == 2


def test_fingerprint_picks_the_directory_and_mismatch_is_an_error(tmp_path):
    cache = LogitCache.for_teacher(tmp_path, "Qwen/Qwen3-8B@abc123", 128, {"dtype": "bfloat16"})
    assert cache.path.parent == tmp_path and cache.path.name.startswith("Qwen-Qwen3-8B-abc123-")
    assert cache.path.name == cache_dir_name(
        teacher_fingerprint("Qwen/Qwen3-8B@abc123", 128, {"dtype": "bfloat16"})
    )
    other = LogitCache.for_teacher(tmp_path, "Qwen/Qwen3-8B@abc123", 128, {"dtype": "float16"})
    assert other.path != cache.path
    assert (
        LogitCache.for_teacher(tmp_path, "Qwen/Qwen3-8B@abc123", 128, {"dtype": "bfloat16"}).path
        == cache.path
    )
    reopened = LogitCache(cache.path)
    assert reopened.k == 128 and reopened.fingerprint == cache.fingerprint
    with pytest.raises(FingerprintMismatchError, match="bfloat16"):
        LogitCache(cache.path, teacher_fingerprint("Qwen/Qwen3-8B@abc123", 64, {"dtype": "bfloat16"}))
    with pytest.raises(CacheError, match="not a logit cache"):
        LogitCache(tmp_path / "nowhere")


def test_bad_inputs_are_clear_errors(tmp_path):
    cache = new_cache(tmp_path, 4)
    tokens, topk = make_sample(0, 5, 4)
    with cache.writer() as w:
        with pytest.raises(ValueError, match="k=4"):
            w.add(*make_sample(0, 5, 8))
        with pytest.raises(ValueError, match="rows"):
            w.add(tokens[:4], topk)
        filled = TopK(topk.token_ids.copy(), topk.logprobs.copy(), topk.tail_logprob.copy())
        filled.token_ids[0] = 1
        with pytest.raises(ValueError, match="row 0"):
            w.add(tokens, filled)
        nan = TopK(
            topk.token_ids,
            np.where(topk.logprobs == topk.logprobs.max(), np.nan, topk.logprobs),
            topk.tail_logprob,
        )
        with pytest.raises(ValueError, match="NaN"):
            w.add(tokens, nan)
        assert len(w) == 0


def test_second_writer_is_refused_and_reader_sees_a_live_writer(tmp_path):
    cache = new_cache(tmp_path, 4)
    first = cache.writer()
    first.add(*make_sample(0, 5, 4))
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
        cache.writer()
    assert len(cache.reader()) == 1  # journaled samples are visible while the writer runs
    first.close()
    with cache.writer() as again:
        assert len(again) == 1


# ---------------------------------------------------------------------------------------------- order and resume


def test_shards_roll_keep_order_and_reader_resumes_from_an_index(tmp_path):
    cache = new_cache(tmp_path, 16)
    samples = [make_sample(s, 3 + s % 7, 16) for s in range(11)]
    keys = [sample_key(t) for t, _ in samples]
    with cache.writer(shard_samples=4) as w:
        for i, (tokens, topk) in enumerate(samples):
            w.add(tokens, topk)
            if i == 5:
                with cache.reader() as r:  # 4 in shard 0, 2 in the journal: indices already final
                    assert r.keys() == keys[:6] and r.stats().journal_samples == 2
    assert len(cache.shard_paths()) == 3  # 4 + 4 + the final 3 on close
    with cache.reader() as r:
        assert len(r) == 11 and r.keys() == keys
        full = [(i, s.key) for i, s in r.iter_samples()]
        for start in (0, 3, 4, 10, 11):
            assert [(i, s.key) for i, s in r.iter_samples(start)] == full[start:]
        assert r[-1].key == keys[-1] and r[7].key == keys[7]
        with pytest.raises(IndexError):
            r[11]
        batches = list(r.iter_batches(4, start=2))
        assert [b.start for b in batches] == [2, 6, 10] and batches[-1].next_index == 11
        targets = batches[0].kd_targets()
        assert len(targets) == sum(len(samples[i][0]) for i in range(2, 6))
        assert targets.token_ids.shape[1] == 16
    assert cache.stats().samples == 11


def test_shard_bytes_threshold_rolls(tmp_path):
    cache = new_cache(tmp_path, 32)
    with cache.writer(shard_bytes=1) as w:  # every add makes a shard
        w.add(*make_sample(0, 20, 32))
        w.add(*make_sample(1, 20, 32))
        assert w.journal_samples == 0
    assert len(cache.shard_paths()) == 2


# ---------------------------------------------------------------------------------------------- corruption


def _shard_with_samples(tmp_path: Path) -> tuple[LogitCache, Path]:
    cache = new_cache(tmp_path, 8)
    with cache.writer() as w:
        for s in range(3):
            w.add(*make_sample(s, 12, 8))
    (shard,) = cache.shard_paths()
    return cache, shard


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_sample_is_reported_with_the_file(tmp_path):
    cache, shard = _shard_with_samples(tmp_path)
    _flip(shard, shard.stat().st_size - 5)  # inside the last sample's blob
    with cache.reader() as r:
        r[0]  # the others still read
        with pytest.raises(CacheCorruptError, match=rf"{shard.name}.*sample 2.*checksum.*re-run"):
            r[2]
    with pytest.raises(CacheCorruptError, match=shard.name):
        cache.validate()


@pytest.mark.parametrize(
    ("offset", "match"), [(0, "magic"), (8, "version"), (30, "header checksum"), (12, "header checksum")]
)
def test_damaged_shard_header_is_reported(tmp_path, offset, match):
    cache, shard = _shard_with_samples(tmp_path)
    _flip(shard, offset)
    with pytest.raises(CacheError, match=rf"{shard.name}.*{match}"):
        cache.reader()
    with pytest.raises(CacheError, match=shard.name):  # the writer refuses too: it would lose keys
        cache.writer()


# ---------------------------------------------------------------------------------------------- crashes


def test_torn_journal_tail_is_dropped_with_a_warning(tmp_path, caplog):
    cache = new_cache(tmp_path, 8)
    samples = [make_sample(s, 10, 8) for s in range(3)]
    w = cache.writer(sync_every=2)
    for tokens, topk in samples:
        w.add(tokens, topk)
    w.close(flush=False)  # as if killed: samples only in the journal
    journal = cache.path / JOURNAL_NAME
    os.truncate(journal, journal.stat().st_size - 7)  # the last record cut mid-write
    with cache.reader() as r:  # a reader skips the torn record silently (it may be in progress)
        assert len(r) == 2
    with caplog.at_level(logging.WARNING, logger="distill.cache"), cache.writer() as w:
        assert "torn" in caplog.text or "mid-record" in caplog.text
        assert w.journal_samples == 2 and not w.contains(sample_key(samples[2][0]))
        assert w.add(*samples[2])
    with cache.reader() as r:
        for i, (tokens, topk) in enumerate(samples):
            assert_exact(r[i], tokens, topk)


def test_crash_between_shard_and_journal_reset_does_not_duplicate(tmp_path):
    cache = new_cache(tmp_path, 8)
    samples = [make_sample(s, 10, 8) for s in range(4)]
    w = cache.writer()
    for tokens, topk in samples[:3]:
        w.add(tokens, topk)
    stale = (cache.path / JOURNAL_NAME).read_bytes()
    w.flush()
    w.close(flush=False)
    (cache.path / JOURNAL_NAME).write_bytes(stale)  # the journal the crash left behind
    with cache.reader() as r:
        assert len(r) == 3
    with cache.writer() as w:
        assert w.journal_samples == 0 and len(w) == 3
        w.add(*samples[3])
    with cache.reader() as r:
        assert r.keys() == [sample_key(t) for t, _ in samples]


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from distill.cache import LogitCache
    from tests.distill.test_cache import make_sample

    cache = LogitCache({path!r})
    writer = cache.writer(shard_samples=5)
    for i in range(10_000):
        writer.add(*make_sample(i, 20 + i % 30, 32))
        print(i, flush=True)
    """
)


def test_sigkill_mid_shard_loses_nothing_that_was_added(tmp_path):
    cache = new_cache(tmp_path, 32)
    script = CHILD.format(root=str(REPO_ROOT), path=str(cache.path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = -1
    deadline = time.monotonic() + 60
    while reported < 12 and time.monotonic() < deadline:  # 2 shards and part of a journal
        line = proc.stdout.readline()
        if not line:
            break
        reported = int(line)
    try:
        assert reported >= 12, "the child writer did not get going"
        with pytest.raises(CacheLockedError, match=f"pid {proc.pid}"):  # another process is writing
            cache.writer()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    with cache.reader() as r:
        stored = r.keys()
    total = len(stored) + 8  # the child may have added more than it reported before the kill
    samples = [make_sample(i, 20 + i % 30, 32) for i in range(total)]
    keys = [sample_key(t) for t, _ in samples]
    with cache.reader() as r:  # everything reported as added is there and exact; nothing else
        assert stored == keys[: len(stored)] and len(stored) >= reported + 1
        for i in range(len(stored)):
            assert_exact(r[i], *samples[i])
    with cache.writer(shard_samples=5) as w:  # the lock died with the child
        added = [w.add(*s) for s in samples[:total]]
        assert added == [i >= len(stored) for i in range(total)]
    with cache.reader() as r:
        assert r.keys() == keys[:total] and r.stats().journal_samples == 0
        for i, sample in r.iter_samples():
            assert_exact(sample, *samples[i])


# ---------------------------------------------------------------------------------------------- size


def _bytes_per_token(tmp_path: Path, name: str, samples: list[tuple[np.ndarray, TopK]]) -> float:
    cache = LogitCache.for_teacher(tmp_path, name, samples[0][1].k)
    with cache.writer() as w:
        for tokens, topk in samples:
            w.add(tokens, topk)
    with cache.reader() as r:
        for i, sample in r.iter_samples():
            assert_exact(sample, *samples[i])
        return r.stats().bytes_per_token


def test_bytes_per_token_uniform_ids_worst_case(tmp_path):
    """Uniform ids in 248,320 have no structure to exploit: report, and check they cost no more than
    their 18 bits plus the log-probs."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        n = 512
        ids = np.full((n, 128), MISSING_ID, dtype=np.int32)
        ids[1:] = rng.integers(0, QWEN_VOCAB, (n - 1, 128))  # repeats within a row cost the cache nothing
        lp = np.full((n, 128), -np.inf, dtype=np.float32)
        lp[1:] = -np.sort(rng.exponential(3.0, (n - 1, 128)), axis=1)
        tail = np.r_[0.0, rng.uniform(-8, -0.01, n - 1)].astype(np.float32)
        samples.append((rng.integers(0, QWEN_VOCAB, n).astype(np.int32), TopK(ids, lp, tail)))
    bpt = _bytes_per_token(tmp_path, "uniform", samples)
    print(f"\nlogit cache, k=128, uniform ids over {QWEN_VOCAB}: {bpt:.1f} bytes/token")
    assert bpt < 128 * 18 / 8 + 128 * 16 / 8  # never worse than bit-packed ids + raw float16


@pytest.fixture(scope="module")
def tiny_teacher_samples() -> list[tuple[np.ndarray, TopK]]:
    """Exact top-128 of a tiny Qwen3 trained on real text, ids spread into the 248,320 vocabulary."""
    import torch

    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    docs = local_corpus()
    train, held_out = docs[:-60], docs[-60:]
    tok = train_tokenizer(train, 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only thrash on a shared machine (10x slower)
    try:
        model = build_qwen3_teacher(tok, train_texts=train, train_steps=200, batch_size=4, seq_len=64)
    finally:
        torch.set_num_threads(threads)
    ids: list[int] = []
    for text in held_out:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    seqs = torch.tensor(ids[: 4 * 512]).view(4, 512)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=seqs).logits.float(), dim=-1)
    top_lp, top_ids = logprobs.topk(128, dim=-1)
    spread = np.random.default_rng(0).choice(QWEN_VOCAB, len(tok), replace=False).astype(np.int32)
    samples = []
    for b in range(seqs.shape[0]):
        topk = TopK.empty_rows(512, 128)
        topk.token_ids[1:] = spread[top_ids[b, :-1].numpy()]  # row t predicts x_t from position t - 1
        topk.logprobs[1:] = top_lp[b, :-1].numpy()
        topk.tail_logprob[1:] = TopK.tail_from_logprobs(top_lp[b, :-1].numpy())
        samples.append((spread[seqs[b].numpy()], topk))
    return samples


def test_bytes_per_token_realistic_meets_the_target(tmp_path, tiny_teacher_samples):
    bpt = _bytes_per_token(tmp_path, "tiny-qwen3", tiny_teacher_samples)
    print(f"\nlogit cache, k=128, tiny teacher spread into {QWEN_VOCAB}: {bpt:.1f} bytes/token")
    assert bpt <= 400


def test_version_2_is_smaller_than_version_1_on_the_same_outputs(tmp_path, tiny_teacher_samples):
    """Same samples, the version-1 writer against the default one: identical reads, fewer bytes."""
    with cache_module._writing_version_1():
        v1 = _bytes_per_token(tmp_path / "v1", "tiny-qwen3", tiny_teacher_samples)
    v2 = _bytes_per_token(tmp_path / "v2", "tiny-qwen3", tiny_teacher_samples)
    print(f"\nlogit cache, k=128, tiny teacher: version 1 {v1:.1f}, version 2 {v2:.1f} bytes/token")
    assert v2 < v1


def zipf_samples(count: int, n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, TopK]]:
    """Ids drawn (distinct per row) from a Zipf(1.08) law over the whole 248,320-id vocabulary in a fixed
    random frequency order: order-0 entropy about 13 bits, as real teachers' top-128 ids."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(QWEN_VOCAB).astype(np.int32)
    cdf = np.cumsum((np.arange(QWEN_VOCAB) + 10.0) ** -1.08)
    cdf /= cdf[-1]
    out = []
    for _ in range(count):
        ids = np.full((n, k), MISSING_ID, dtype=np.int32)
        for t in range(1, n):
            draws = order[np.searchsorted(cdf, rng.random(3 * k)).clip(max=QWEN_VOCAB - 1)]
            _, first = np.unique(draws, return_index=True)
            ids[t] = draws[np.sort(first)][:k]
        lp = np.full((n, k), -np.inf, dtype=np.float32)
        lp[1:] = -np.sort(rng.exponential(3.0, (n - 1, k)), axis=1) - 0.05
        tail = np.r_[0.0, TopK.tail_from_logprobs(lp[1:])].astype(np.float32)
        out.append((rng.integers(0, QWEN_VOCAB, n).astype(np.int32), TopK(ids, lp, tail)))
    return out


def test_zipf_ids_cost_near_their_entropy(tmp_path):
    """The id streams of version 2 cost about the ids' order-0 entropy (a per-shard frequency-ranked
    dictionary, bucket-coded), well under version 1's byte planes."""
    samples = zipf_samples(6, 256, 128)
    ids = np.concatenate([t.token_ids[1:].reshape(-1) for _, t in samples])
    counts = np.bincount(ids)
    p = counts[counts > 0] / ids.size
    entropy = float(-(p * np.log2(p)).sum())
    with cache_module._writing_version_1():
        v1 = _bytes_per_token(tmp_path / "v1", "zipf", samples)
    v2 = _bytes_per_token(tmp_path / "v2", "zipf", samples)
    cache = LogitCache(next((tmp_path / "v2").glob("zipf-*")))
    with cache.reader() as r:
        shard, entries = r._sources[0]
        blobs = []
        for e in entries:
            payload = shard.read(e, "sample")
            blobs.append(cache_module._split_sections(payload, cache_module._SAMPLE_HEADER.size)[2])
    bits = 8 * sum(len(b) for b in blobs) / ids.size
    print(f"\nzipf ids: entropy {entropy:.2f} bits, stored {bits:.2f}; v1 {v1:.1f}, v2 {v2:.1f} bytes/token")
    assert bits < entropy + 0.3
    assert v2 < v1 - 15


# ---------------------------------------------------------------------------------------------- format version 1


def v1_fixture_samples() -> list[tuple[np.ndarray, TopK]]:
    """The samples of tests/fixtures/logit-cache-v1 (its README): do not change, the files hold them."""
    out = [make_sample(100 + s, 9 + 4 * s, 16) for s in range(2)]  # uniform ids: raw
    for s in range(2, 4):  # 20 distinct large ids: a shard dictionary pays
        tokens, topk = make_sample(100 + s, 9 + 4 * s, 16, vocab=20)
        spread = np.random.default_rng(s).choice(248_320, 20, replace=False).astype(np.int32)
        present = topk.token_ids >= 0
        topk.token_ids[present] = spread[topk.token_ids[present]]
        out.append((tokens, topk))
    out += [make_sample(100 + s, 9 + 4 * s, 16, vocab=40) for s in range(4, 6)]  # journal
    return out


def _file_version(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[8:12], "little")


def test_a_version_1_cache_reads_exactly_and_takes_new_samples(tmp_path):
    """A cache written by the code before format version 2 (tests/fixtures/logit-cache-v1): its shards
    (raw ids and a shard dictionary) and journal read exactly; a new writer resumes it, and its new shard
    is version 2 beside the old ones."""
    shutil.copytree(V1_FIXTURE, tmp_path / "root")
    (directory,) = (tmp_path / "root").glob("fixture-teacher-v1-*")
    # lossless fingerprints are what they were: for_teacher finds the old directory
    assert directory.name == cache_dir_name(
        teacher_fingerprint("fixture/teacher@v1", 16, {"dtype": "float32"})
    )
    cache = LogitCache.for_teacher(tmp_path / "root", "fixture/teacher@v1", 16, {"dtype": "float32"})
    assert cache.path == directory and cache.precision == Precision()
    shards = cache.shard_paths()
    assert [_file_version(p) for p in shards] == [1, 1]
    assert _file_version(directory / JOURNAL_NAME) == 1
    assert cache_module._Shard(shards[1], cache.fingerprint_hash).dict_entry is not None
    samples = v1_fixture_samples()
    with cache.reader() as r:
        assert len(r) == 6 and r.stats().journal_samples == 2
        for i, (tokens, topk) in enumerate(samples):
            assert_exact(r[i], tokens, topk)
    cache.validate()
    extra = make_sample(7, 30, 16)
    with cache.writer() as w:  # resumes the version-1 journal, then rolls it into a version-2 shard
        assert w.journal_samples == 2 and len(w) == 6
        assert w.add(*extra) and not w.add(*samples[0])
    assert [_file_version(p) for p in cache.shard_paths()] == [1, 1, 2]
    with cache.reader() as r:
        assert r.keys() == [sample_key(t) for t, _ in [*samples, extra]]
        for i, (tokens, topk) in enumerate([*samples, extra]):
            assert_exact(r[i], tokens, topk)


def test_the_version_1_writer_is_the_old_code_byte_for_byte(tmp_path):
    """`_writing_version_1` (the benchmark's baseline) rebuilds tests/fixtures/logit-cache-v1, which the old
    code wrote, to the byte."""
    samples = v1_fixture_samples()
    with cache_module._writing_version_1():
        cache = LogitCache.for_teacher(tmp_path, "fixture/teacher@v1", 16, {"dtype": "float32"})
        w = cache.writer()
        for batch in (samples[:2], samples[2:4]):
            for s in batch:
                w.add(*s)
            w.flush()
        for s in samples[4:]:
            w.add(*s)
        w.close(flush=False)
    (original,) = V1_FIXTURE.glob("fixture-teacher-v1-*")
    names = sorted(p.name for p in original.iterdir())
    assert names == ["journal.qlj", "manifest.json", "shard-000000.qlc", "shard-000001.qlc"]
    for name in names:
        assert (cache.path / name).read_bytes() == (original / name).read_bytes(), name


@pytest.mark.parametrize("k", [1, 5, 128])
def test_version_1_and_2_shards_mix_in_one_directory(tmp_path, k):
    """Shards written by the version-1 code path and by the default one, in one cache: everything exact,
    one global order."""
    cache = new_cache(tmp_path, k)
    samples = [make_sample(s, 3 + 11 * s, k) for s in range(6)]
    with cache_module._writing_version_1(), cache.writer(shard_samples=2) as w:
        for tokens, topk in samples[:3]:
            w.add(tokens, topk)
    with cache.writer(shard_samples=2) as w:
        for tokens, topk in samples[3:]:
            w.add(tokens, topk)
    assert [_file_version(p) for p in cache.shard_paths()] == [1, 1, 2, 2]
    with cache.reader() as r:
        for i, (tokens, topk) in enumerate(samples):
            assert_exact(r[i], tokens, topk)


def test_an_unknown_version_is_refused_with_the_versions_read(tmp_path):
    cache, shard = _shard_with_samples(tmp_path)
    data = bytearray(shard.read_bytes())
    data[8:12] = (3).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"version 3.*versions \(1, 2\)"):
        cache.reader()


# ---------------------------------------------------------------------------------------------- the coding


@pytest.mark.parametrize("seed", range(4))
def test_bucket_coding_round_trips_any_uint32(seed):
    rng = np.random.default_rng(seed)
    edge = np.array(
        [0, 1, 15, 16, 17, 31, 32, 255, 256, 2**16 - 1, 2**24 + 1, 2**31, 2**32 - 1], dtype=np.uint64
    )
    values = np.concatenate(
        [edge, rng.integers(0, 2**32, 500, dtype=np.uint64), rng.geometric(0.01, 3000).astype(np.uint64)]
    )
    values = rng.permutation(values)
    for bounds in ([0, values.size], [0, 0, 7, 7, 1000, values.size]):
        for codec, level in ((1, 6), (1, 1), (1, 0), (2, 1)):
            blob = cache_module._pack_buckets(values, bounds, codec, level)
            back = cache_module._unpack_buckets(blob)
            assert back.dtype == np.uint32 and np.array_equal(back, values)
    assert (
        cache_module._unpack_buckets(cache_module._pack_buckets(np.zeros(0, np.uint32), [0, 0], 1, 6)).size
        == 0
    )
    with pytest.raises(ValueError, match="2\\^32"):
        cache_module._pack_buckets(np.array([2**32]), [0, 1], 1, 6)


def test_lossless_version_2_decodes_to_the_version_1_rows():
    for seed, (n, k) in enumerate([(1, 1), (2, 3), (40, 128), (300, 16)]):
        tokens, topk = make_sample(seed, n, k)
        rows = cache_module._rows_from_topk(tokens, topk, k, Precision())
        for lut in (None, np.arange(1 << 19, dtype=np.uint32)[::-1].copy()):
            dictionary = None if lut is None else np.argsort(lut).astype(np.uint32)
            new = cache_module._decode_rows(cache_module._encode_rows(rows, lut, 1, 6), dictionary)
            old = cache_module._decode_rows(cache_module._encode_rows_v1(rows, lut, 1, 6), dictionary)
            for field in ("tokens", "ids", "lp16", "tail16"):
                assert np.array_equal(getattr(new, field), getattr(old, field)), field
                assert np.array_equal(getattr(new, field), getattr(rows, field)), field


@pytest.mark.parametrize("precision", ["lossless", "compact"])
def test_damaged_payloads_fail_as_corruption_never_otherwise(precision):
    """Whatever a damaged payload holds (the checksum is bypassed here), decoding raises CacheCorruptError
    or returns rows of the right shapes: no other exception escapes."""
    tokens, topk = make_sample(3, 60, 32)
    rows = cache_module._rows_from_topk(tokens, topk, 32, Precision.of(precision))
    payload = cache_module._encode_rows(rows, None, 1, 6)
    key = sample_key(tokens)
    rng = np.random.default_rng(0)
    for trial in range(400):
        data = bytearray(payload)
        if trial % 4 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for at in rng.integers(0, len(data), 1 + trial % 3):
                data[at] ^= 1 << int(rng.integers(0, 8))
        try:
            sample = cache_module._decode_payload(bytes(data), None, key, "test")
        except CacheCorruptError:
            continue
        assert sample.topk.token_ids.shape == topk.token_ids.shape


# ---------------------------------------------------------------------------------------------- compact


COMPACT = Precision.of("compact")


def check_compact(sample, tokens: np.ndarray, topk: TopK, p: Precision) -> None:
    """The documented bounds of `Precision` ("compact"), row by row."""
    assert np.array_equal(sample.tokens, tokens)
    got_ids, got_lp, got_tail = sample.topk.token_ids, sample.topk.logprobs, sample.topk.tail_logprob
    assert (got_ids[0] == MISSING_ID).all() and np.isneginf(got_lp[0]).all() and got_tail[0] == 0
    k = topk.k
    for t in range(1, tokens.size):
        lp = np.minimum(topk.logprobs[t].astype(np.float64), 0.0)
        order = np.argsort(-lp, kind="stable")
        lp, ids = lp[order], topk.token_ids[t][order]
        kept = int((got_lp[t] > -np.inf).sum())
        assert (got_lp[t, kept:] == -np.inf).all() and (got_ids[t, kept:] == MISSING_ID).all()
        assert np.array_equal(got_ids[t, :kept], ids[:kept])  # a prefix of the ranks, in order
        with np.errstate(over="ignore"):
            first16 = np.float16(lp[0])
        assert kept >= 1 or not np.isfinite(first16)  # rank 0 always stays
        dropped = float(np.exp(lp[kept:]).sum())
        assert kept >= min(p.min_keep, int((lp >= -1024 * p.logprob_step).sum()))
        assert dropped <= p.drop_mass + k * math.exp(-1024 * p.logprob_step) + 1e-12
        if kept:
            err = np.abs(got_lp[t, 1:kept].astype(np.float64) - lp[1:kept])
            assert (err <= p.logprob_step / 2 + 1e-12).all(), err.max()
            # rank 0: its float16 value, raised to rank 1's when that is higher (still within the bound)
            assert got_lp[t, 0] == max(np.float32(first16), got_lp[t, 1] if kept > 1 else -np.inf)
            assert abs(float(got_lp[t, 0]) - lp[0]) <= max(p.logprob_step / 2, abs(float(first16) - lp[0]))
            assert (np.diff(got_lp[t, :kept]) <= 0).all()  # sorted
        with np.errstate(divide="ignore"):
            want = min(math.log(math.exp(float(topk.tail_logprob[t])) + dropped) if dropped or np.isfinite(
                topk.tail_logprob[t]) else -math.inf, 0.0)  # fmt: skip
        if math.isinf(want):
            assert got_tail[t] == -np.inf
        else:  # float16 rounding of the new tail
            assert abs(float(got_tail[t]) - want) <= 2**-10 * abs(want) + 2**-24, (got_tail[t], want)


@pytest.mark.parametrize("k", [1, 8, 128])
def test_compact_round_trip_is_within_its_bounds_and_the_same_before_and_after_the_roll(tmp_path, k):
    cache = LogitCache.for_teacher(tmp_path, "test/teacher@rev", k, precision="compact")
    samples = [make_sample(s, n, k) for s, n in enumerate([2, 7, 40, 200])]
    samples += zipf_samples(2, 64, k, seed=5)
    writer = cache.writer()
    for tokens, topk in samples:
        assert writer.add(tokens, topk)
    with cache.reader() as r:  # from the journal
        journal = [r[i] for i in range(len(r))]
    writer.close()
    with cache.reader() as r:  # from the shard: the very same values
        assert r.stats().shards == 1
        for i, (tokens, topk) in enumerate(samples):
            s = r[i]
            check_compact(s, tokens, topk, COMPACT)
            for field in ("token_ids", "logprobs", "tail_logprob"):
                assert np.array_equal(getattr(s.topk, field), getattr(journal[i].topk, field))
    cache.validate()


def test_the_compact_grid_is_idempotent(tmp_path):
    """Rounding to the grid twice changes nothing (dropping by mass, applied again, would drop more: the
    writer never re-applies it, a roll re-encodes the stored values)."""
    p = Precision("compact", 0.0, 1 / 16, 1)
    samples = [make_sample(s, 50, 32) for s in range(3)]
    first = LogitCache.for_teacher(tmp_path, "t", 32, precision=p)
    second = LogitCache.for_teacher(tmp_path / "again", "t", 32, precision=p)
    with first.writer() as w:
        for tokens, topk in samples:
            w.add(tokens, topk)
    with first.reader() as r, second.writer() as w:
        once = [r[i] for i in range(len(samples))]
        for s in once:
            w.add(s.tokens, s.topk)
    with second.reader() as r:
        for i, s in enumerate(once):
            for field in ("token_ids", "logprobs", "tail_logprob"):
                assert np.array_equal(getattr(r[i].topk, field), getattr(s.topk, field))


def test_compact_odd_rows(tmp_path):
    """Rows the quantiser must not assume away: unsorted, positive, ties, -0.0, below -64, all empty,
    a certain prediction, a -inf tail, values below float16's range."""
    k = 6
    ids = np.array(
        [[-1] * k, [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6],
         [-1] * k, [3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4]],
        dtype=np.int32,
    )  # fmt: skip
    lp = np.array(
        [
            [-np.inf] * k,
            [1e-3, 0.0, -0.0, -1e-7, -7e4, -np.inf],  # positive, zeros, below float16
            [-5.0, -1.0, -9.0, -0.5, -np.inf, -3.0],  # unsorted
            [-2.0, -2.0, -2.0, -2.03, -2.03, -2.1],  # ties
            [-70.0, -80.0, -90.0, -100.0, -110.0, -120.0],  # far below the grid's range
            [-np.inf] * k,  # nothing
            [0.0, -30.0, -31.0, -32.0, -33.0, -34.0],  # certain
            [-0.7, -0.71, -0.72, -0.73, -4.0, -12.0],
        ],
        dtype=np.float32,
    )
    tail = np.array([0.0, -np.inf, -1e-8, -3.0, 0.0, -0.1, -np.inf, -2.0], dtype=np.float32)
    tokens = np.arange(8, dtype=np.int32) * 1000
    for p in (COMPACT, Precision("compact", 0.0, 1 / 16, 1), Precision("compact", 0.3, 1.0, 1)):
        cache = LogitCache.for_teacher(tmp_path / str(p.drop_mass) / str(p.logprob_step), "t", k, precision=p)
        with cache.writer() as w:
            w.add(tokens, TopK(ids, lp, tail))
        with cache.reader() as r:
            check_compact(r[0], tokens, TopK(ids, lp, tail), p)
            got = r[0].topk
            assert (got.token_ids[5] == MISSING_ID).all() and got.tail_logprob[5] == np.float32(
                np.float16(-0.1)
            )
            assert (
                got.token_ids[4, 0] == 1 and (got.token_ids[4, 1:] == MISSING_ID).all()
            )  # below -64: dropped
            assert got.tail_logprob[4] == 0  # all mass was outside (tail 0), and stays so
            targets = KDTargets.from_topk(tokens, got)
            assert targets.mask.tolist() == [True] * 7 + [False]  # every row keeps a prediction


def test_precision_is_in_the_fingerprint_so_caches_never_mix(tmp_path):
    lossless = LogitCache.for_teacher(tmp_path, "t@r", 8, {"dtype": "bf16"})
    compact = LogitCache.for_teacher(tmp_path, "t@r", 8, {"dtype": "bf16"}, precision="compact")
    assert lossless.path != compact.path
    assert "precision" not in lossless.fingerprint  # lossless fingerprints (and directories) as before
    assert compact.fingerprint["precision"] == {
        "mode": "compact",
        "drop_mass": cache_module.COMPACT_DROP_MASS,
        "logprob_step": cache_module.COMPACT_LOGPROB_STEP,
        "min_keep": cache_module.COMPACT_MIN_KEEP,
    }
    assert LogitCache(compact.path).precision == COMPACT  # a reopened directory knows its precision
    other = Precision("compact", 0.05, 1 / 8, 32)
    assert LogitCache.for_teacher(tmp_path, "t@r", 8, {"dtype": "bf16"}, precision=other).path != compact.path
    with pytest.raises(FingerprintMismatchError):
        LogitCache(compact.path, teacher_fingerprint("t@r", 8, {"dtype": "bf16"}))
    with pytest.raises(FingerprintMismatchError):
        LogitCache(lossless.path, teacher_fingerprint("t@r", 8, {"dtype": "bf16"}, "compact"))
    manifest = compact.path / "manifest.json"
    text = manifest.read_text().replace('"compact"', '"cubist"')
    manifest.write_text(text)
    with pytest.raises(CacheError, match="precision"):
        LogitCache(compact.path)
    with pytest.raises(ValueError, match="lossless"):
        teacher_fingerprint("t", 8, None, "lossy")
    with pytest.raises(ValueError, match="logprob_step"):
        teacher_fingerprint("t", 8, None, {"mode": "compact"})
    with pytest.raises(ValueError, match="power of two"):
        Precision("compact", 0.01, 0.1, 8)
    with pytest.raises(ValueError, match="drop_mass"):
        Precision("compact", 1.0, 0.5, 8)
    with pytest.raises(ValueError, match="min_keep"):
        Precision("compact", 0.01, 0.5, 0)


def test_compact_is_smaller(tmp_path):
    samples = zipf_samples(3, 128, 128, seed=1)
    lossless = _bytes_per_token(tmp_path / "a", "zipf", samples)
    cache = LogitCache.for_teacher(tmp_path / "b", "zipf", 128, precision="compact")
    with cache.writer() as w:
        for tokens, topk in samples:
            w.add(tokens, topk)
    with cache.reader() as r:
        for i, (tokens, topk) in enumerate(samples):
            check_compact(r[i], tokens, topk, COMPACT)
        compact = r.stats().bytes_per_token
    print(f"\nzipf ids, k=128: lossless {lossless:.1f}, compact {compact:.1f} bytes/token")
    assert compact < lossless


def test_cache_command_writes_a_compact_cache(tmp_path, workspace):
    from distill.cli import main

    out = tmp_path / "cache"
    code = main(
        [
            "cache", "--cache_dir", str(out), "--teacher.kind", "hf", "--teacher.model", str(workspace / "teacher"),
            "--teacher.device", "cpu", "--data.tokenizer", str(workspace / "tokenizer"),
            "--data.sources", str(workspace / "text"), "--data.sample_len", "32", "--k", "16",
            "--max_samples", "12", "--cache_precision", "compact", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    (manifest,) = out.glob("*/manifest.json")
    cache = LogitCache(manifest.parent)
    assert cache.precision == COMPACT and len(cache.keys()) == 12
    with cache.reader() as r:
        for _, s in r.iter_samples():
            lp = s.topk.logprobs[1:]
            kept = (lp > -np.inf).sum(1)
            assert (kept >= 1).all() and (kept <= 16).all()
            assert (np.diff(np.where(lp > -np.inf, lp, -1e9)[:, 1:], axis=1) <= 0).all()
    with pytest.raises(SystemExit) as exit_info:  # argparse: "invalid choice", the choices listed
        main(["cache", "--cache_dir", str(out), "--cache_precision", "lossy"])
    assert exit_info.value.code == 2
