"""The engine of `python -m distill cache`: teacher requests run ahead of the cache writer.

`fill_cache(writer, teacher, samples, ...)` scores samples into a `CacheWriter` as a bounded pipeline:

- the caller's thread reads the samples (tokenising text, when the iterator does), drops repeats, cuts
  them into batches of `batch` consecutive samples and submits every batch with a sample the cache
  lacks; at most `depth` batches are between submission and written;
- the teacher computes them: with an async teacher (`atopk`, e.g. the vLLM server client) up to
  `depth` calls run at once on a private event loop; otherwise (a model in this process) one worker
  thread calls `topk` batch after batch, so the next batch is computed while this one is written;
- the writer thread takes the batches in submission order and adds their missing samples to the
  cache (encode, journal append). With `group_commit` the journal fsync runs in the writer's own
  background thread, one fsync covering every record since the last: no request waits for the disk.

Determinism: a batch is the same run of samples whatever the cache holds, the depth or the timing
(consecutive distinct samples of the data, `batch` at a time), and results are written in data order.
So the teacher sees exactly the calls an uninterrupted run makes, and the cache ends with the same
samples and the same numbers. A batch is skipped when all its samples are cached and sent whole when
some are: after a crash that is at most the batches that were in flight, and only their missing
samples are written (the rest would be the same numbers again).

Crash contract (with the writer's journal, see `distill.cache`): records are appended in data order,
so after a SIGKILL the cache holds a prefix of the run, every sample whose `add` returned (a torn last
record is dropped on reopen); after power loss, every sample an fsync covered (`durable_samples`).
A re-run recomputes the batches from the first missing sample on. A failed teacher call stops the
run at that batch: everything before it is written, nothing after, and the error is raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.cache import CacheWriter, sample_key
from distill.teachers.base import TeacherError
from distill.types import Teacher, TopK

log = logging.getLogger(__name__)


@dataclass
class FillStats:
    added_samples: int = 0  # written to the cache by this run
    skipped_samples: int = 0  # already cached, or a repeat of an earlier sample of the data
    added_tokens: int = 0
    batches: int = 0  # teacher calls made


@dataclass
class _Batch:
    index: int  # position among all batches of the data (cached ones included)
    first: int  # index in the data of its first sample
    tokens: list[np.ndarray]
    keys: list[str]
    missing: list[bool]


def _batches(
    samples: Iterable[np.ndarray], batch: int, max_samples: int | None, stats: FillStats
) -> Iterator[tuple[int, int, list[np.ndarray], list[str]]]:
    """(batch index, data index of its first sample, tokens, keys) of consecutive distinct samples."""
    seen: set[str] = set()
    tokens: list[np.ndarray] = []
    keys: list[str] = []
    first = index = 0
    for count, sample in enumerate(samples):
        if max_samples is not None and count >= max_samples:
            break
        key = sample_key(sample)
        if key in seen:  # the same tokens again: one cache entry, asked of the teacher once
            stats.skipped_samples += 1
            continue
        seen.add(key)
        if not tokens:
            first = count
        tokens.append(sample)
        keys.append(key)
        if len(tokens) == batch:
            yield index, first, tokens, keys
            index += 1
            tokens, keys = [], []
    if tokens:
        yield index, first, tokens, keys


def _write(writer: CacheWriter, b: _Batch, results: list[TopK], stats: FillStats, progress: Any) -> None:
    if len(results) != len(b.tokens):
        raise TeacherError(f"the teacher returned {len(results)} results for {len(b.tokens)} sequences")
    tokens = 0
    for sample, missing, topk in zip(b.tokens, b.missing, results):
        if missing and writer.add(sample, topk):
            stats.added_samples += 1
            tokens += len(sample)
    stats.added_tokens += tokens
    if progress is not None:
        progress.update(tokens)
        progress.set_postfix(samples=stats.added_samples, skipped=stats.skipped_samples)


class _Requests:
    """Teacher calls as futures: `atopk` on a private event loop (concurrent), else `topk` in one thread."""

    def __init__(self, teacher: Teacher, k: int) -> None:
        self.teacher, self.k = teacher, k
        atopk = getattr(teacher, "atopk", None)
        self._async = atopk is not None and inspect.iscoroutinefunction(atopk)
        if self._async:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="cache-teacher", daemon=True)
            self._thread.start()
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-teacher")

    def submit(self, tokens: list[np.ndarray]) -> concurrent.futures.Future:
        seqs = [t.tolist() for t in tokens]
        if self._async:
            return asyncio.run_coroutine_threadsafe(self.teacher.atopk(seqs, self.k), self._loop)  # type: ignore[attr-defined]
        return self._pool.submit(self.teacher.topk, seqs, self.k)

    def close(self) -> None:
        """Cancel what has not started, wait for what runs (nothing touches the teacher afterwards)."""
        if not self._async:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        aclose = getattr(self.teacher, "aclose", None)

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if aclose is not None and inspect.iscoroutinefunction(aclose):
                await aclose()  # the teacher's HTTP session on this loop

        try:
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def fill_cache(
    writer: CacheWriter,
    teacher: Teacher,
    samples: Iterable[np.ndarray],
    *,
    k: int,
    batch: int = 16,
    depth: int = 3,
    max_samples: int | None = None,
    progress: Any = None,
) -> FillStats:
    """Score the samples the cache lacks with the teacher into `writer` (see the module docstring).

    batch: samples per teacher call; depth: batches in flight (1: call, then write, one at a time, in
    this thread); max_samples: read at most this many samples of the data; progress: a tqdm bar (tokens).
    Raises what the teacher or the writer raised, after writing every batch before the failed one."""
    if batch < 1 or depth < 1:
        raise ValueError(f"batch and depth must be positive, got batch={batch}, depth={depth}")
    stats = FillStats()

    def plan() -> Iterator[_Batch]:
        for index, first, tokens, keys in _batches(samples, batch, max_samples, stats):
            # Only keys of earlier batches enter the writer meanwhile, so this answer cannot go stale.
            missing = [not writer.contains(key) for key in keys]
            stats.skipped_samples += missing.count(False)
            if any(missing):
                yield _Batch(index, first, tokens, keys, missing)

    failed: list[_Batch] = []  # the batch an error belongs to
    try:
        if depth == 1:
            for b in plan():
                failed[:] = [b]
                stats.batches += 1
                _write(writer, b, teacher.topk([t.tolist() for t in b.tokens], k), stats, progress)
                failed.clear()
        else:
            _pipelined(writer, teacher, plan(), k, depth, stats, progress, failed)
    except Exception as e:
        if failed:
            b = failed[0]
            where = f"teacher batch {b.index} (samples {b.first}.. of the data, {len(b.tokens)} sequences)"
            log.error(
                "distill cache stopped at %s: %s: %s. The %d samples written before it are in the cache; "
                "run the same command again to resume from there",
                where, type(e).__name__, e, stats.added_samples,
            )  # fmt: skip
            if hasattr(e, "add_note"):  # Python 3.11+: shown with the traceback
                e.add_note(f"distill cache: failed at {where}; earlier batches are cached, re-run to resume")
        raise
    return stats


def _pipelined(
    writer: CacheWriter,
    teacher: Teacher,
    batches: Iterator[_Batch],
    k: int,
    depth: int,
    stats: FillStats,
    progress: Any,
    failed: list[_Batch],
) -> None:
    slots = threading.Semaphore(depth)  # batches submitted and not yet written
    work: queue.SimpleQueue = queue.SimpleQueue()  # (batch, future) in submission order; None ends
    errors: list[BaseException] = []
    abort = threading.Event()

    def write_loop() -> None:
        while (item := work.get()) is not None:
            b, future = item
            try:
                if errors or abort.is_set():  # stop at the first failure: nothing after it is written
                    future.cancel()
                    continue
                _write(writer, b, future.result(), stats, progress)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
                failed.append(b)
            finally:
                slots.release()

    requests = _Requests(teacher, k)
    thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
    thread.start()
    try:
        for b in batches:
            slots.acquire()  # the writer releases one per batch, also after a failure
            if errors:
                slots.release()
                break
            stats.batches += 1
            work.put((b, requests.submit(b.tokens)))
    except BaseException:
        abort.set()  # e.g. Ctrl-C: keep what is written, drop what is in flight
        raise
    finally:
        work.put(None)
        thread.join()
        requests.close()
    if errors:
        raise errors[0]
