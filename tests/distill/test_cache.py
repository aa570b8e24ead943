"""distill.cache: exact round trips, crash safety, validation, resumable reading, bytes per token."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from distill.cache import (
    JOURNAL_NAME,
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    FingerprintMismatchError,
    LogitCache,
    cache_dir_name,
    sample_key,
    teacher_fingerprint,
)
from distill.types import MISSING_ID, TopK

REPO_ROOT = Path(__file__).resolve().parents[2]
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
