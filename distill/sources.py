"""Where training samples and their teacher targets come from, and how they become batches.

A `SampleStream` is an endless, deterministic sequence of token samples (epochs wrap around)
with a way to get teacher targets for any of them: from the logit cache (`CacheStream`) or from a
live teacher (`TextStream`, optionally writing what it fetches into the cache). `step_batches`
turns a stream into per-rank micro-batches, one optimizer step at a time, and reports the stream
position after each step: that index is the whole data state a resumed run needs.

`Prefetcher` runs such an iterator ahead of the training step in a background thread (cache
decoding, live-teacher requests and alignment, `KDTargets` building) with a bounded queue. One
producer and a FIFO queue keep the order exactly the iterator's, so training with prefetch is
bit-identical to training without it, and resume stays exact (the position travels with each step).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Generic, TypeVar

import numpy as np

from distill.data import Batch, collate, make_window, pack_windows
from distill.types import KDTargets, Teacher, TopK


class SampleStream:
    """Samples by global index (index i is sample i mod N of epoch i // N when the source is finite)."""

    size: int | None = None  # samples per epoch, when known

    def iter_tokens(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def targets(self, items: list[tuple[int, np.ndarray]]) -> list[KDTargets]:
        raise NotImplementedError


class ListStream(SampleStream):
    """A finite list of samples with a function that fetches targets for a group of them."""

    def __init__(self, samples: list[np.ndarray], fetch: Callable[[list[np.ndarray]], list[TopK]]):
        if not samples:
            raise ValueError("no training samples: the data sources produced no text with at least 2 tokens")
        self.samples, self.fetch = samples, fetch
        self.size = len(samples)

    def iter_tokens(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        index = start
        while True:
            yield index, self.samples[index % len(self.samples)]
            index += 1

    def targets(self, items: list[tuple[int, np.ndarray]]) -> list[KDTargets]:
        tokens = [t for _, t in items]
        return [KDTargets.from_topk(t, topk) for t, topk in zip(tokens, self.fetch(tokens), strict=True)]


class TextStream(SampleStream):
    """Samples read lazily from text (files or a streamed dataset), never all held in memory.

    `make_samples()` starts a fresh pass over the samples; global index i is sample skip + i of a
    pass (wrapping to a new pass, i.e. a new epoch, when the text runs out). Resuming at a position
    re-tokenises the skipped samples but never asks the teacher for them again."""

    def __init__(self, make_samples: Callable[[], Iterator[np.ndarray]], fetch, skip: int = 0):
        self.make_samples, self.fetch, self.skip = make_samples, fetch, skip

    def iter_tokens(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        index, first_pass = 0, True
        while True:
            produced = 0
            for tokens in islice(self.make_samples(), self.skip, None):
                produced += 1
                if index >= start:
                    yield index, tokens
                index += 1
            if produced == 0:
                raise ValueError(
                    "no training samples: the data sources produced no text with at least 2 tokens"
                    + ("" if first_pass else " after the held-out ones")
                )
            first_pass = False

    def targets(self, items: list[tuple[int, np.ndarray]]) -> list[KDTargets]:
        tokens = [t for _, t in items]
        return [KDTargets.from_topk(t, topk) for t, topk in zip(tokens, self.fetch(tokens), strict=True)]


def teacher_fetcher(teacher: Teacher, k: int, batch: int = 16, on_result=None):
    """fetch(samples) -> TopK list, calling the teacher `batch` samples at a time; `on_result(tokens,
    topk)` sees every result (e.g. to write it into the cache)."""

    def fetch(samples: list[np.ndarray]) -> list[TopK]:
        out: list[TopK] = []
        for i in range(0, len(samples), batch):
            group = samples[i : i + batch]
            results = teacher.topk([s.tolist() for s in group], k)
            if len(results) != len(group):
                raise RuntimeError(f"teacher returned {len(results)} results for {len(group)} samples")
            for tokens, topk in zip(group, results, strict=True):
                if topk.length != len(tokens):
                    raise RuntimeError(
                        f"teacher returned {topk.length} rows for a {len(tokens)}-token sample"
                    )
                if on_result is not None:
                    on_result(tokens, topk)
            out.extend(results)
        return out

    return fetch


@dataclass
class StepData:
    batches: list[Batch]  # this rank's micro-batches for one optimizer step
    position: int  # stream index after the step (the same on every rank)


def step_batches(
    stream: SampleStream,
    *,
    seq_len: int,
    batch_size: int,
    grad_accum: int,
    start: int,
    rank: int = 0,
    world: int = 1,
    pad_id: int = 0,
) -> Iterator[StepData]:
    """Every rank packs the whole stream the same way (lengths only) and fetches targets only for
    its own batches: batch j of a step belongs to rank j % world."""
    per_step = grad_accum * world
    window_iter = pack_windows(stream.iter_tokens(start), seq_len)
    while True:
        groups = [list(islice(window_iter, batch_size)) for _ in range(per_step)]
        batches = [build_batch(stream, windows, seq_len, pad_id) for windows in groups[rank::world]]
        yield StepData(batches, groups[-1][-1][-1][0] + 1)


T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """`next(p)` returns the items of `source` in order, produced up to `depth` ahead in a daemon
    thread; `p.waited` is how long the last `next` blocked. An exception in the producer is raised
    in the consumer at the item where it happened. Use as a context manager (or call `close`): the
    producer stops and is joined, so nothing it uses (a teacher, a cache writer) is touched after.
    With depth 0 it is a plain iterator in the caller's thread."""

    def __init__(self, source: Iterator[T], depth: int, name: str = "prefetch"):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source, self.depth, self.waited = source, depth, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self.source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer, raised where the item was due
            self._put((None, e))
            return
        self._put((_DONE, None))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        if self._thread is None:
            item = next(self.source)
            self.waited = time.perf_counter() - start
            return item
        item, error = self._queue.get()
        self.waited = time.perf_counter() - start
        if error is not None:
            raise error
        if item is _DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_batch(
    stream: SampleStream, windows: list[list[tuple[int, np.ndarray]]], seq_len: int, pad_id: int
) -> Batch:
    """Fetch the targets of packed windows' samples and lay the windows end to end in one row."""
    built = []
    for items in windows:
        targets = stream.targets(items)
        built.append(
            make_window([(t, tg) for (_, t), tg in zip(items, targets, strict=True)], seq_len, pad_id)
        )
    return collate(built)


def take_samples(stream: SampleStream, count: int) -> list[tuple[int, np.ndarray]]:
    """The first `count` samples of one epoch (fewer when the stream holds fewer: never repeated)."""
    if stream.size is not None:
        count = min(count, stream.size)
    return list(islice(stream.iter_tokens(0), count))


class CacheStream(SampleStream):
    """Samples [begin, end) of a logit cache in its global order, epoch after epoch (global index i is
    cache sample begin + i mod (end - begin)). Held-out samples are a separate range, never trained on."""

    def __init__(self, reader, begin: int = 0, end: int | None = None):
        total = len(reader)
        end = total if end is None else min(end, total)
        if end - begin <= 0:
            raise ValueError(
                f"the logit cache at {reader.cache.path} has {total} samples, none in [{begin}, {end}): "
                "fill it with python -m distill cache (or lower --data.eval_samples)"
            )
        self.reader, self.begin, self.size = reader, begin, end - begin
        self._pending: dict[int, KDTargets] = {}

    def iter_tokens(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        epoch, offset = divmod(start, self.size)
        while True:
            for index, sample in self.reader.iter_samples(self.begin + offset):
                local = index - self.begin
                if local >= self.size:
                    break
                global_index = epoch * self.size + local
                self._pending[global_index] = sample.kd_targets()
                yield global_index, sample.tokens
            epoch, offset = epoch + 1, 0

    def targets(self, items: list[tuple[int, np.ndarray]]) -> list[KDTargets]:
        out = [self._pending.pop(index) for index, _ in items]
        # Samples read ahead for packing but owned by another rank are never asked for: drop them.
        oldest = items[0][0]
        for stale in [i for i in self._pending if i < oldest]:
            del self._pending[stale]
        return out


__all__ = [
    "CacheStream",
    "ListStream",
    "SampleStream",
    "StepData",
    "TextStream",
    "build_batch",
    "step_batches",
    "teacher_fetcher",
]
