"""The vllm-server client's ingest settings against a fake vLLM on 127.0.0.1: what each request asks
for, `max_in_flight`, parsing in worker processes (same results, clean shutdown, errors carried back),
and that a parse worker imports neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from distill.teachers import TeacherConfig, TeacherError, VllmServerTeacher, build_teacher
from tests.distill.test_vllm_server_parsing import FakeVllm, client, serve


class RecordingVllm(FakeVllm):
    """FakeVllm that keeps every completions payload; mode "broken" answers a misaligned reply."""

    def __init__(self, mode: str = "ok", delay: float = 0.05):
        super().__init__(mode)
        self.payloads: list[dict] = []
        self.delay = delay

    async def completions(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.payloads.append(payload)
        if self.mode == "broken":
            prompts = payload["prompt"]
            body = {"choices": [{"index": i, "prompt_logprobs": [None] + [{"0": {"logprob": -1.0, "rank": 1}}] * (len(p) - 1)}
                                for i, p in enumerate(prompts)]}  # fmt: skip
            return web.json_response(body)
        return await super().completions(request)


SEQS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17], [18, 19, 20, 21], [22, 23]]


def test_request_asks_for_token_ids_and_nothing_else():
    fake = RecordingVllm()
    with serve(fake) as url, client(url, vocab_size=50) as teacher:
        teacher.topk(SEQS[:2], 3)
    (payload,) = fake.payloads
    assert payload == {
        "model": "teacher",
        "prompt": SEQS[:2],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 3,
        "return_tokens_as_token_ids": True,
    }


def test_max_in_flight_bounds_and_overlaps_requests():
    fake = RecordingVllm()
    with serve(fake) as url, client(url, request_batch=1, max_in_flight=3, vocab_size=50) as teacher:
        out = teacher.topk(SEQS, 4)
        assert teacher.max_in_flight == 3
    assert len(fake.payloads) == len(SEQS)
    assert 2 <= fake.max_in_flight <= 3  # several at once, never more than allowed
    assert [t.length for t in out] == [len(s) for s in SEQS]


def test_max_concurrency_is_the_old_name_of_max_in_flight():
    assert VllmServerTeacher("http://127.0.0.1:1", max_concurrency=5).max_in_flight == 5
    with pytest.raises(TeacherError, match="max_in_flight"):
        VllmServerTeacher("http://127.0.0.1:1", max_in_flight=0)
    with pytest.raises(TeacherError, match="parse_workers"):
        VllmServerTeacher("http://127.0.0.1:1", parse_workers=-1)


def test_teacher_config_carries_the_ingest_settings():
    cfg = TeacherConfig(kind="vllm-server", url="http://127.0.0.1:1", max_in_flight=6, parse_workers=2)
    teacher = build_teacher(cfg)
    assert isinstance(teacher, VllmServerTeacher)
    assert (teacher.max_in_flight, teacher.parse_workers) == (6, 2)
    assert TeacherConfig().max_in_flight == 4 and TeacherConfig().parse_workers == 0
    assert TeacherConfig(max_concurrency=3).max_in_flight == 3  # a config of before the rename
    teacher.close()


def test_parse_workers_give_the_same_results_and_shut_down():
    fake = RecordingVllm()
    with serve(fake) as url:
        with client(url, request_batch=2, vocab_size=50) as teacher:
            want = teacher.topk(SEQS, 5)
        teacher = client(url, request_batch=2, vocab_size=50, parse_workers=2)
        got = teacher.topk(SEQS, 5)
        got_again = teacher.topk(SEQS[:3], 5)  # the same workers again
        pool = teacher._pool
        assert pool is not None
        workers = list(pool._processes.values())
        assert workers and all(p.is_alive() for p in workers)
        blocks = [b.name for b in teacher._blocks._free]  # reused, one per reply in flight at most
        assert 1 <= len(blocks) <= teacher.max_in_flight
        teacher.close()
        assert teacher._pool is None
        assert not [b for b in blocks if Path("/dev/shm", b.lstrip("/")).exists()], "blocks left behind"
        for p in workers:
            p.join(10)
            assert not p.is_alive()
        teacher.close()  # twice is fine
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)
    np.testing.assert_array_equal(got_again[2].token_ids, want[2].token_ids)


def test_a_bad_reply_parsed_in_a_worker_raises_the_same_error():
    fake = RecordingVllm("broken")
    with serve(fake) as url:
        messages = []
        for workers in (0, 1):
            with client(url, vocab_size=50, parse_workers=workers) as teacher:
                with pytest.raises(TeacherError, match="misaligned") as info:
                    teacher.topk(SEQS[:2], 2)
                messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_parse_worker_imports_neither_torch_nor_transformers():
    code = (
        "import sys, distill.teachers.vllm_parse as p; "
        'assert p.parse_reply(b\'{"choices":[{"prompt_logprobs":[null]}]}\', [[1]], 2)[0][0].shape == (1, 2); '
        "heavy = {'torch', 'transformers', 'aiohttp'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reply_blocks_are_reused_and_a_small_one_is_replaced():
    from distill.teachers.vllm_server import _ReplyBlocks

    blocks = _ReplyBlocks()
    a = blocks.acquire(10)
    assert a.size == 1 << 20
    blocks.release(a)
    assert blocks.acquire(1 << 20) is a  # fits: the same block, no new mapping
    blocks.release(a)
    b = blocks.acquire((1 << 21) + 1)  # too big for it: it is retired, the new one is a power of two
    assert b.size == 1 << 22 and b.name != a.name
    assert not Path("/dev/shm", a.name.lstrip("/")).exists()
    blocks.release(b)
    blocks.close()
    assert not Path("/dev/shm", b.name.lstrip("/")).exists()
