"""The batch prefetcher: the source's items in order, errors where they happened, a clean stop."""

from __future__ import annotations

import threading

import pytest

from distill.sources import Prefetcher


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_items_come_in_the_source_order_and_the_end_is_the_end(depth) -> None:
    with Prefetcher(iter(range(50)), depth) as p:
        assert list(p) == list(range(50))
        assert p.waited >= 0.0


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_in_the_source_is_raised_at_its_item(depth) -> None:
    def source():
        yield from range(3)
        raise ValueError("bad shard 7")

    with Prefetcher(source(), depth) as p:
        assert [next(p), next(p), next(p)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad shard 7"):
            next(p)


def test_close_stops_the_producer_and_touches_nothing_after() -> None:
    produced, release = [], threading.Event()

    def source():
        for i in range(1000):
            produced.append(i)
            yield i
            if i == 0:
                release.wait()  # the consumer has taken an item; the queue fills behind it

    p = Prefetcher(source(), depth=2)
    assert next(p) == 0
    release.set()
    p.close()
    count = len(produced)
    assert count <= 1 + 2 + 2  # what was taken, what fills the queue, one blocked put and its successor
    assert len(produced) == count  # joined: the producer is gone
    with pytest.raises(ValueError):
        Prefetcher(iter(()), depth=-1)


def test_prefetch_defaults_to_two_on_a_gpu_and_off_on_cpu():
    import torch

    from distill.config import DataConfig
    from distill.trainer import prefetch_depth

    assert DataConfig().prefetch is None
    assert prefetch_depth(None, torch.device("cpu")) == 0
    assert prefetch_depth(None, torch.device("cuda", 0)) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3 and prefetch_depth(0, torch.device("cuda")) == 0
