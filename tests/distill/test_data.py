"""Text sources, packing into windows, and the per-rank split of the sample stream."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from distill.data import DataError, iter_texts, split_tokens
from distill.sources import ListStream, step_batches
from distill.types import TopK


def fake_fetch(samples):
    """Deterministic teacher rows that encode the token itself, so tests can check alignment."""
    out = []
    for s in samples:
        n = len(s)
        ids = np.stack([s, (s + 1) % 1000]).T.astype(np.int32)
        lp = np.log(np.full((n, 2), 0.25, dtype=np.float32))
        topk = TopK(ids, lp, TopK.tail_from_logprobs(lp))
        topk.token_ids[0], topk.logprobs[0], topk.tail_logprob[0] = -1, -np.inf, 0.0
        out.append(topk)
    return out


def make_stream(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return ListStream([rng.integers(0, 1000, n).astype(np.int32) for n in lengths], fake_fetch)


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"})
    )
    assert list(iter_texts([str(tmp_path)])) == ["first document", "second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no string field 'text'.*--data.text_field"):
        list(iter_texts([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        list(iter_texts([str(tmp_path / "broken.jsonl")]))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_texts([str(tmp_path / "missing")]))


def test_split_tokens_keeps_every_token_in_samples_of_at_least_two():
    pieces = list(split_tokens(list(range(10)), 4))
    assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.tolist() for p in split_tokens(list(range(9)), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_windows_pack_whole_samples_with_boundaries_and_aligned_targets():
    stream = make_stream([30, 50, 40, 64, 10, 20, 5])
    step = next(step_batches(stream, seq_len=64, batch_size=2, grad_accum=1, start=0))
    (batch,) = step.batches
    assert batch.input_ids.shape == (1, 128)
    cu = batch.cu_seqlens.tolist()
    assert cu == [0, 30, 64, 64 + 50, 128]  # [30 | pad 34] [50 | pad 14]
    ids, t = batch.input_ids[0], batch.targets
    for a, b, real in ((0, 30, True), (30, 64, False), (64, 114, True), (114, 128, False)):
        assert bool(t.mask[a : b - 1].all()) == real
        assert not bool(t.mask[b - 1])  # the last position of every document has no target
        if real:  # position j is trained on the teacher row of token j + 1
            assert torch.equal(t.token_ids[a : b - 1, 0], ids[a + 1 : b])
            assert torch.equal(t.labels[a : b - 1], ids[a + 1 : b])
    assert step.position == 2


def test_ranks_split_the_batches_of_one_process_and_resume_is_exact():
    lengths = list(np.random.default_rng(1).integers(2, 60, 200))
    single = list(
        zip(range(5), step_batches(make_stream(lengths), seq_len=64, batch_size=2, grad_accum=2, start=0))
    )
    for rank in (0, 1):
        ranked = step_batches(
            make_stream(lengths), seq_len=64, batch_size=2, grad_accum=1, start=0, rank=rank, world=2
        )
        for (_, one), mine in zip(single, ranked):
            assert mine.position == one.position
            assert torch.equal(mine.batches[0].input_ids, one.batches[rank].input_ids)
    # Restarting at a step's position reproduces the following steps.
    resumed = step_batches(
        make_stream(lengths), seq_len=64, batch_size=2, grad_accum=2, start=single[2][1].position
    )
    for (_, expected), got in zip(single[3:], resumed):
        assert got.position == expected.position
        for a, b in zip(expected.batches, got.batches):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_sample_longer_than_the_window_is_rejected():
    with pytest.raises(ValueError, match="more than seq_len=64; lower sample_len"):
        next(step_batches(make_stream([65]), seq_len=64, batch_size=1, grad_accum=1, start=0))


def test_empty_text_gives_a_clear_error():
    with pytest.raises(ValueError, match="no training samples"):
        ListStream([], fake_fetch)


def test_text_stream_is_lazy_wraps_epochs_and_skips_held_out():
    from distill.sources import TextStream

    passes = []

    def make():
        passes.append(1)
        return (np.array([i, i + 1], dtype=np.int32) for i in range(5))

    stream = TextStream(make, fake_fetch, skip=2)
    got = [(i, int(t[0])) for i, t in islice(stream.iter_tokens(1), 6)]
    assert got == [(1, 3), (2, 4), (3, 2), (4, 3), (5, 4), (6, 2)]  # samples 2..4 only, epoch after epoch
    assert len(passes) == 3
    with pytest.raises(ValueError, match="no training samples"):
        next(TextStream(make, fake_fetch, skip=5).iter_tokens(0))


def test_hf_dataset_source_without_datasets_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"pip install datasets"):
        list(iter_texts(["hf:HuggingFaceFW/fineweb-edu:sample-10BT@train"]))


def test_held_out_samples_are_never_repeated_when_fewer_than_asked():
    from distill.sources import take_samples

    stream = make_stream([10, 20, 30])
    assert [i for i, _ in take_samples(stream, 32)] == [0, 1, 2]
