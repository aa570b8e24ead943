"""`distill cache` as a pipeline (distill.cache_pipeline) and the writer's group commit: the content is
the same for any pipeline depth, a SIGKILLed run resumes to exactly an uninterrupted run's cache, and a
teacher error loses nothing already written."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill.cache import JOURNAL_NAME, CacheError, LogitCache, sample_key
from distill.cache_pipeline import fill_cache
from distill.teachers.base import TeacherError
from distill.types import TopK
from tests.distill.conftest import cache_args

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 5000
K = 8


def fake_topk(seq: list[int], k: int, salt: bytes) -> TopK:
    """Numbers that depend on the sequence and on `salt` (the whole call), like a batch-variant teacher."""
    seed = int.from_bytes(
        hashlib.sha256(salt + np.asarray(seq, dtype="<i4").tobytes()).digest()[:8], "little"
    )
    rng = np.random.default_rng(seed)
    n = len(seq)
    topk = TopK.empty_rows(n, k)
    topk.token_ids[1:] = rng.integers(0, VOCAB, (n - 1, k))
    lp = -np.cumsum(rng.exponential(1.0, (n - 1, k)), axis=1).astype(np.float32)
    topk.logprobs[1:] = lp
    topk.tail_logprob[1:] = TopK.tail_from_logprobs(lp)
    return topk


class FakeTeacher:
    """Deterministic given the call: each sequence's rows also depend on the other sequences of its call,
    so a run that batches differently from an uninterrupted one ends with different numbers."""

    name = "fake/batch-variant@1"
    vocab_size = VOCAB

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[tuple[int, ...], ...]] = []
        self.fail_at = fail_at

    def _answer(self, index: int, seqs: list[list[int]], k: int) -> list[TopK]:
        if index == self.fail_at:
            raise TeacherError(f"the fake teacher fails call {index} on purpose")
        salt = hashlib.sha256(repr(seqs).encode()).digest()
        return [fake_topk(s, k, salt) for s in seqs]

    def _record(self, seqs: list[list[int]]) -> int:
        self.calls.append(tuple(tuple(s) for s in seqs))
        return len(self.calls) - 1

    def topk(self, seqs: list[list[int]], k: int) -> list[TopK]:
        return self._answer(self._record(seqs), seqs, k)

    def close(self) -> None:
        pass


class AsyncFakeTeacher(FakeTeacher):
    """The same numbers through `atopk`; calls finish out of order (they yield a varying number of times)."""

    def __init__(self, fail_at: int | None = None, hold_failure: bool = False) -> None:
        super().__init__(fail_at)
        self.hold_failure = hold_failure  # the failing call waits until the call after it has finished
        self._next_done: asyncio.Event | None = None

    async def atopk(self, seqs: list[list[int]], k: int) -> list[TopK]:
        index = self._record(seqs)
        if self._next_done is None:
            self._next_done = asyncio.Event()
        for _ in range((index * 7) % 5):
            await asyncio.sleep(0)
        if self.hold_failure and index == self.fail_at:
            await self._next_done.wait()
        out = self._answer(index, seqs, k)
        if self.fail_at is not None and index == self.fail_at + 1:
            self._next_done.set()
        return out

    def topk(self, seqs, k):  # pragma: no cover - the pipeline uses atopk
        raise AssertionError("an async teacher is called through atopk")


def make_samples(count: int = 70, seed: int = 0) -> list[np.ndarray]:
    """Token samples of 2..40 tokens, with a few repeats (one cache entry each)."""
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, VOCAB, int(rng.integers(2, 41))).astype(np.int32) for _ in range(count)]
    for i in (9, 30, 31, 55):
        if i < count:
            samples[i] = samples[i - 7].copy()
    return samples


def content(cache: LogitCache) -> tuple[list[str], dict[str, tuple[np.ndarray, ...]]]:
    """(keys in the reader's order, key -> tokens and the stored arrays as exact bit patterns)."""
    out = {}
    with cache.reader() as r:
        keys = r.keys()
        for _, s in r.iter_samples():
            out[s.key] = (
                s.tokens,
                s.topk.token_ids,
                s.topk.logprobs.view(np.uint32),
                s.topk.tail_logprob.view(np.uint32),
            )
    return keys, out


def assert_same_content(a: LogitCache, b: LogitCache, *, order: bool = True) -> None:
    keys_a, ca = content(a)
    keys_b, cb = content(b)
    assert set(ca) == set(cb) and len(keys_a) == len(keys_b)
    if order:
        assert keys_a == keys_b
    for key in ca:
        for x, y in zip(ca[key], cb[key], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), key


def shard_bytes(cache: LogitCache) -> list[bytes]:
    return [p.read_bytes() for p in cache.shard_paths()]


def new_cache(root: Path, name: str = "c") -> LogitCache:
    return LogitCache.for_teacher(root / name, FakeTeacher.name, K)


def fill(cache: LogitCache, teacher, samples, *, depth: int, group: bool = True, seal: bool = True):
    """What `run_cache` does: one writer, `fill_cache`, close (sealing the journal into a shard if `seal`)."""
    w = cache.writer(shard_samples=9, group_commit=group)
    try:
        stats = fill_cache(w, teacher, samples, k=K, batch=4, depth=depth)
        w.sync()
        assert w.durable_samples == stats.added_samples
    finally:
        w.close(flush=seal)
    return stats


def unique_keys(samples) -> list[str]:
    return list(dict.fromkeys(sample_key(s) for s in samples))


# ---------------------------------------------------------------------------------------------- (a) depth


@pytest.mark.parametrize("teacher_cls", [FakeTeacher, AsyncFakeTeacher])
@pytest.mark.parametrize(("depth", "group"), [(2, True), (4, True), (3, False)])
def test_pipelined_run_equals_depth_1(tmp_path, teacher_cls, depth, group):
    samples = make_samples()
    ref_teacher = FakeTeacher()
    ref = new_cache(tmp_path, "ref")
    ref_stats = fill(ref, ref_teacher, samples, depth=1, group=False)
    teacher = teacher_cls()
    cache = new_cache(tmp_path, "pipe")
    stats = fill(cache, teacher, samples, depth=depth, group=group)
    assert teacher.calls == ref_teacher.calls  # the same batches, sent in data order
    assert stats == ref_stats
    assert stats.added_samples == len(unique_keys(samples)) == 66 and stats.skipped_samples == 4
    assert_same_content(ref, cache)  # same keys, same numbers, same (data) order
    assert content(cache)[0] == unique_keys(samples)
    assert shard_bytes(cache) == shard_bytes(ref)  # the very same shards
    cache.validate()


def test_cli_pipelined_equals_sequential_with_a_tiny_hf_teacher(workspace, tmp_path):
    from distill.cli import main

    def run(out: Path, *extra: str) -> LogitCache:
        code = main(
            cache_args(
                workspace, out, k=16, max_samples=90,
                extra=("--teacher_batch", "8", "--shard_samples", "25", *extra),
            )
        )  # fmt: skip
        assert code == 0
        (manifest,) = out.glob("*/manifest.json")
        return LogitCache(manifest.parent)

    sequential = run(tmp_path / "seq", "--pipeline_depth", "1", "--fsync", "each")
    pipelined = run(tmp_path / "pipe", "--pipeline_depth", "4", "--fsync", "group")
    assert_same_content(sequential, pipelined)
    assert len(sequential.shard_paths()) == 4  # 25 + 25 + 25 + the rest
    assert shard_bytes(sequential) == shard_bytes(pipelined)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_sends_the_interrupted_runs_batches_and_writes_only_missing_samples(tmp_path):
    samples = make_samples()
    ref = new_cache(tmp_path, "ref")
    ref_teacher = FakeTeacher()
    fill(ref, ref_teacher, samples, depth=3)
    cache = new_cache(tmp_path, "cut")
    fill(cache, FakeTeacher(), samples[:60], depth=3, seal=False)  # 56 distinct: 6 shards, 2 journaled
    # as if a SIGKILL tore the record being written: the journal ends mid-record
    journal = cache.path / JOURNAL_NAME
    os.truncate(journal, journal.stat().st_size - 5)
    kept = content(cache)[0]
    assert len(kept) == 55 and cache.stats().journal_samples == 1
    assert kept == unique_keys(samples)[: len(kept)]  # a prefix of the run, in data order
    teacher = FakeTeacher()
    stats = fill(cache, teacher, samples, depth=3)
    assert stats.added_samples == len(unique_keys(samples)) - len(kept)  # exactly the missing ones
    first = len(kept) // 4  # the batch of the first missing sample: 13, of which 3 samples are cached
    assert teacher.calls == ref_teacher.calls[first:]  # whole batches, as the uninterrupted run sent them
    assert_same_content(ref, cache)


def test_resume_skips_batches_that_are_fully_cached(tmp_path):
    samples = make_samples()
    cache = new_cache(tmp_path)
    fill(cache, FakeTeacher(), samples, depth=2)
    teacher = FakeTeacher()
    stats = fill(cache, teacher, samples, depth=2)
    assert teacher.calls == [] and stats.added_samples == 0 and stats.skipped_samples == len(samples)


# ---------------------------------------------------------------------------------------------- (c) errors


@pytest.mark.parametrize(
    ("make_teacher", "depth"),
    [
        (lambda: FakeTeacher(fail_at=4), 1),
        (lambda: FakeTeacher(fail_at=4), 3),
        (lambda: AsyncFakeTeacher(fail_at=4), 3),
        (lambda: AsyncFakeTeacher(fail_at=4, hold_failure=True), 3),  # call 5 is done before 4 fails
    ],
    ids=["sequential", "sync", "async", "async-later-batch-done-first"],
)
def test_teacher_error_mid_pipeline_keeps_what_came_before_and_surfaces(
    tmp_path, make_teacher, depth, caplog
):
    samples = make_samples()
    teacher = make_teacher()
    cache = new_cache(tmp_path)
    with pytest.raises(TeacherError, match="fails call 4 on purpose"), caplog.at_level("ERROR"):
        fill(cache, teacher, samples, depth=depth)
    assert "teacher batch 4" in caplog.text and "run the same command again to resume" in caplog.text
    assert len(teacher.calls) >= 5  # batches after the failed one were in flight
    keys, _ = content(cache)
    assert keys == unique_keys(samples)[:16]  # batches 0-3, in order; nothing after the failure
    cache.validate()
    ref = new_cache(tmp_path, "ref")
    fill(ref, FakeTeacher(), samples, depth=1)
    stats = fill(cache, FakeTeacher(), samples, depth=3)  # the re-run
    assert stats.added_samples == 66 - 16
    assert_same_content(ref, cache)


def test_writer_error_surfaces_and_keeps_earlier_batches(tmp_path):
    class NaNTeacher(FakeTeacher):
        def topk(self, seqs, k):
            out = super().topk(seqs, k)
            if len(self.calls) == 3:
                out[1].logprobs[1, 0] = np.nan
            return out

    cache = new_cache(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        fill(cache, NaNTeacher(), make_samples(), depth=2)
    assert content(cache)[0] == unique_keys(make_samples())[:9]  # batches 0, 1 and batch 2's first sample


# ---------------------------------------------------------------------------------------------- group commit


def test_group_commit_covers_every_add_and_survives_a_roll(tmp_path):
    cache = new_cache(tmp_path)
    samples = make_samples(30)
    teacher = FakeTeacher()
    with cache.writer(shard_samples=7, group_commit=True) as w:
        for s in samples:
            w.add(s, teacher.topk([s.tolist()], K)[0])
            if w.journal_samples == 3:
                w.sync()
                assert w.durable_samples == len(w)  # everything added so far
        w.sync()
        assert w.durable_samples == len(w) == 29 and 1 <= w.fsyncs <= 29
    assert len(cache.shard_paths()) == 5 and cache.stats().samples == 29  # 4 x 7 + 1 sealed on close
    w = cache.writer(group_commit=True)  # closing without a shard: the last fsync covers the journal
    w.add(*_one(99))
    w.close(flush=False)
    assert cache.stats().journal_samples == 1


def _one(seed: int) -> tuple[np.ndarray, TopK]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, 12).astype(np.int32)
    return tokens, fake_topk(tokens.tolist(), K, b"")


def test_failed_group_fsync_stops_the_writer(tmp_path, monkeypatch):
    cache = new_cache(tmp_path)
    w = cache.writer(group_commit=True)
    real_fsync = os.fsync

    def broken(fd):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    w.add(*_one(1))
    with pytest.raises(CacheError, match=r"fsync of the cache journal failed.*I/O error"):
        w.sync()
    with pytest.raises(CacheError, match="fsync"):
        w.add(*_one(2))
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(CacheError, match="fsync"):
        w.close(flush=False)
    assert cache.stats().journal_samples == 1  # written, just not known to be durable


# ---------------------------------------------------------------------------------------------- (b) SIGKILL


def _cache_command(workspace: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "distill", "cache",
        "--cache_dir", str(out),
        "--teacher.kind", "hf",
        "--teacher.model", str(workspace / "teacher"),
        "--teacher.device", "cpu",
        "--data.tokenizer", str(workspace / "tokenizer"),
        "--data.sources", str(workspace / "text"),
        "--data.sample_len", "64",
        "--k", "16",
        "--max_samples", "320",
        "--teacher_batch", "4",
        "--pipeline_depth", "3",
        "--shard_samples", "40",
        "--no-progress",
    ]  # fmt: skip


def _summary(stdout: str) -> dict[str, str]:
    line = next(line for line in stdout.splitlines() if line.startswith("cache="))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def _only_cache(root: Path) -> LogitCache | None:
    found = list(root.glob("*/manifest.json"))
    return LogitCache(found[0].parent) if found else None


def test_sigkilled_pipelined_cache_resumes_to_the_uninterrupted_content(workspace, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_log, cut_log = open(tmp_path / "ref.log", "w+"), open(tmp_path / "cut.log", "w+")  # noqa: SIM115
    reference = subprocess.Popen(
        _cache_command(workspace, ref_dir), cwd=REPO_ROOT, env=env, stdout=ref_log, stderr=subprocess.STDOUT
    )
    victim = subprocess.Popen(
        _cache_command(workspace, cut_dir), cwd=REPO_ROOT, env=env, stdout=cut_log, stderr=subprocess.STDOUT
    )
    try:
        # wait until the victim has sealed a shard and journaled more: then kill it mid-run
        seen, deadline = 0, time.monotonic() + 240
        while seen < 60 and time.monotonic() < deadline and victim.poll() is None:
            cache = _only_cache(cut_dir)
            if cache is not None and cache.shard_paths():
                with cache.reader() as r:
                    seen = len(r)
            if seen < 60:
                time.sleep(0.02)  # polling the files, not waiting for an event
        assert victim.poll() is None, f"the run ended before it was killed: {_tail(cut_log)}"
        assert seen >= 60
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert reference.wait(timeout=600) == 0, _tail(ref_log)
    ref = _only_cache(ref_dir)
    ref_keys = content(ref)[0]

    cut = _only_cache(cut_dir)
    kept = content(cut)[0]  # what survived: a prefix of the run, in data order
    assert 60 <= len(kept) < len(ref_keys) and kept == ref_keys[: len(kept)]
    print(f"\nSIGKILL after {len(kept)} of {len(ref_keys)} samples ({len(cut.shard_paths())} shards)")

    resumed = subprocess.run(
        _cache_command(workspace, cut_dir),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _summary(resumed.stdout)
    assert int(summary["added_samples"]) == len(ref_keys) - len(kept)  # exactly the missing samples
    assert_same_content(ref, cut)
    cut.validate()
    assert not any(p.name.startswith(".tmp-") for p in cut.path.iterdir())
