"""VllmServerTeacher without a real server: the response parser on hand-written JSON shaped like vLLM's,
and the client's failure handling against a small aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web

from distill.teachers import TeacherConfig, TeacherError, VllmServerTeacher, build_teacher
from distill.teachers.vllm_engine import parse_engine_prompt_logprobs
from distill.teachers.vllm_server import parse_completion_response
from distill.types import MISSING_ID, Teacher

# -- the parser on hand-written responses ----------------------------------------------------------

# Shaped after a real vLLM 0.32 answer for prompts [[5, 100, 200, 300], [7, 8]] at prompt_logprobs=3:
# entry 0 null, string keys, the actual token first with its true rank (here outside the top-3).
REAL_SHAPE = {
    "id": "cmpl-1",
    "object": "text_completion",
    "model": "teacher",
    "choices": [
        {
            "index": 0,
            "text": "i",
            "logprobs": None,
            "finish_reason": "length",
            "prompt_logprobs": [
                None,
                {
                    "100": {"logprob": -8.377851486206055, "rank": 500, "decoded_token": ""},
                    "14": {"logprob": -3.953543186187744, "rank": 1, "decoded_token": "."},
                    "9": {"logprob": -4.148728847503662, "rank": 2, "decoded_token": ")"},
                    "221": {"logprob": -4.1946024894714355, "rank": 3, "decoded_token": " "},
                },
                {
                    "200": {"logprob": -4.13, "rank": 1, "decoded_token": "\u000b"},  # actual token is rank 1
                    "68": {"logprob": -4.174127578735352, "rank": 2, "decoded_token": "d"},
                    "47": {"logprob": -4.347963809967041, "rank": 3, "decoded_token": "O"},
                },
                {
                    "300": {
                        "logprob": -3.8094851970672607,
                        "rank": 2,
                        "decoded_token": "ur",
                    },  # inside, listed first
                    "14": {"logprob": -3.6547911167144775, "rank": 1, "decoded_token": "."},
                    "73": {"logprob": -3.948760509490967, "rank": 3, "decoded_token": "i"},
                },
            ],
            "prompt_token_ids": None,
        },
        {
            "index": 1,
            "text": "s",
            "prompt_logprobs": [
                None,
                {
                    "8": {"logprob": -4.884393692016602, "rank": 21, "decoded_token": "("},
                    "83": {"logprob": -2.7036993503570557, "rank": 1, "decoded_token": "s"},
                    "14": {"logprob": -3.114342451095581, "rank": 2, "decoded_token": "."},
                    "221": {"logprob": -3.1741297245025635, "rank": 3, "decoded_token": " "},
                },
            ],
        },
    ],
    "usage": {"prompt_tokens": 6, "total_tokens": 8, "completion_tokens": 2},
}
REAL_PROMPTS = [[5, 100, 200, 300], [7, 8]]


def body(obj) -> dict:
    return json.loads(json.dumps(obj))  # a fresh deep copy each time


def test_parses_real_vllm_shape():
    a, b = parse_completion_response(body(REAL_SHAPE), REAL_PROMPTS, 3)
    assert a.length == 4 and a.k == 3 and b.length == 2
    assert (
        (a.token_ids[0] == MISSING_ID).all() and np.isneginf(a.logprobs[0]).all() and a.tail_logprob[0] == 0
    )
    # k+1 entries: the actual token at rank 500 is not a top-3 candidate
    assert a.token_ids[1].tolist() == [14, 9, 221]
    np.testing.assert_allclose(a.logprobs[1], [-3.953543186187744, -4.148728847503662, -4.1946024894714355])
    # k entries with the actual token among them: ordered by rank, wherever it was listed
    assert a.token_ids[2].tolist() == [200, 68, 47]
    assert a.token_ids[3].tolist() == [14, 300, 73]
    assert b.token_ids[1].tolist() == [83, 14, 221]
    assert a.token_ids.dtype == np.int32 and a.logprobs.dtype == np.float32
    mass = np.exp(np.array([-3.953543186187744, -4.148728847503662, -4.1946024894714355])).sum()
    assert a.tail_logprob[1] == pytest.approx(math.log1p(-mass), abs=1e-6)


def test_minus_9999_is_zero_probability():
    resp = {"choices": [{"index": 0, "prompt_logprobs": [None, {
        "3": {"logprob": -0.0, "rank": 1},
        "1": {"logprob": -9999.0, "rank": 2},
        "2": {"logprob": -9999.0, "rank": 3},
    }]}]}  # fmt: skip
    (tk,) = parse_completion_response(resp, [[0, 2]], 3)
    assert tk.token_ids[1].tolist() == [3, 1, 2]
    assert tk.logprobs[1, 0] == 0 and np.isneginf(tk.logprobs[1, 1:]).all()
    assert np.isneginf(tk.tail_logprob[1])  # all the mass is in the top-k


def test_fewer_candidates_than_k_are_padded():
    resp = {"choices": [{"index": 0, "prompt_logprobs": [None, {
        "1": {"logprob": -0.1, "rank": 1}, "0": {"logprob": -2.4, "rank": 2},
    }]}]}  # fmt: skip
    (tk,) = parse_completion_response(resp, [[1, 0]], 5)
    assert tk.token_ids[1].tolist() == [1, 0, MISSING_ID, MISSING_ID, MISSING_ID]
    assert np.isneginf(tk.logprobs[1, 2:]).all()


def test_choices_are_matched_by_index_not_order():
    resp = body(REAL_SHAPE)
    resp["choices"].reverse()
    a, b = parse_completion_response(resp, REAL_PROMPTS, 3)
    assert a.length == 4 and b.length == 2 and b.token_ids[1, 0] == 83


def test_single_token_prompt_has_only_row_zero():
    (tk,) = parse_completion_response({"choices": [{"index": 0, "prompt_logprobs": [None]}]}, [[5]], 2)
    assert tk.length == 1 and (tk.token_ids == MISSING_ID).all()


def _mutate(path, value):
    resp = body(REAL_SHAPE)
    node = resp
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return resp


BAD = {
    "no choices": ({"error": "x"}, "no 'choices'"),
    "one choice missing": ({"choices": REAL_SHAPE["choices"][:1]}, "1 choices for 2 prompts"),
    "duplicate index": (_mutate(("choices", 1, "index"), 0), "two choices"),
    "index out of range": (_mutate(("choices", 1, "index"), 2), "invalid index"),
    "entry count": (_mutate(("choices", 0, "prompt_logprobs", 3), KeyError), "3 prompt_logprobs entries"),
    "first entry not null": (_mutate(("choices", 1, "prompt_logprobs", 0), {"7": {"logprob": -1.0, "rank": 1}}), "entry 0"),
    "no prompt_logprobs": (_mutate(("choices", 0, "prompt_logprobs"), None), "expected a list"),
    "empty entry": (_mutate(("choices", 1, "prompt_logprobs", 1), {}), "non-empty"),
    "non-integer key": (_mutate(("choices", 1, "prompt_logprobs", 1, "x"), {"logprob": -1.0, "rank": 2}), "non-integer"),
    "nan logprob": (_mutate(("choices", 1, "prompt_logprobs", 1, "83", "logprob"), float("nan")), "non-finite"),
    "string logprob": (_mutate(("choices", 1, "prompt_logprobs", 1, "83", "logprob"), "-1"), "numeric logprob"),
    "positive logprob": (_mutate(("choices", 1, "prompt_logprobs", 1, "83", "logprob"), 3.0), "invalid logprob"),
    "missing rank": (_mutate(("choices", 1, "prompt_logprobs", 1, "83", "rank"), KeyError), "invalid rank"),
    "actual token absent": (_mutate(("choices", 1, "prompt_logprobs", 1, "8"), KeyError), "misaligned"),
    "echoed ids differ": (_mutate(("choices", 1, "prompt_token_ids"), [7, 9]), "differ from the prompt"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_shapes_raise_teacher_error(case):
    resp, message = BAD[case]
    with pytest.raises(TeacherError, match=message):
        parse_completion_response(body(resp), REAL_PROMPTS, 3)


# -- the in-process engine's two container forms (duck-typed like vllm.logprobs) ---------------------


@dataclass
class FlatLike:
    """vllm.logprobs.FlatLogprobs' fields: flat lists, position i spanning start_indices[i]:end_indices[i]."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_indices)


def flat_logprobs(positions) -> FlatLike:
    """Built the way vLLM appends: per position, the actual token first (true rank), then the top-k in
    rank order, duplicates included."""
    flat = FlatLike()
    for entries in positions:
        flat.start_indices.append(len(flat.token_ids))
        for tid, lp, rank in entries:
            flat.token_ids.append(tid)
            flat.logprobs.append(lp)
            flat.ranks.append(rank)
        flat.end_indices.append(len(flat.token_ids))
    return flat


ENGINE_POSITIONS = [
    [],
    [(7, -6.0, 40), (1, -0.5, 1), (2, -1.5, 2)],  # actual token outside the top-2
    [(9, -0.7, 2), (9, -0.7, 1), (3, -0.7, 2)],  # actual token tied at the top: listed twice
]


def test_engine_flat_logprobs():
    tk = parse_engine_prompt_logprobs(flat_logprobs(ENGINE_POSITIONS), [5, 7, 9], 2)
    assert tk.token_ids.tolist() == [[MISSING_ID, MISSING_ID], [1, 2], [9, 3]]
    np.testing.assert_allclose(tk.logprobs[1:], [[-0.5, -1.5], [-0.7, -0.7]])


def test_engine_list_of_dicts_gives_the_same():
    as_dicts = [None] + [
        {tid: SimpleNamespace(logprob=lp, rank=rank, decoded_token=None) for tid, lp, rank in entries}
        for entries in ENGINE_POSITIONS[1:]
    ]
    a = parse_engine_prompt_logprobs(as_dicts, [5, 7, 9], 2)
    b = parse_engine_prompt_logprobs(flat_logprobs(ENGINE_POSITIONS), [5, 7, 9], 2)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    with pytest.raises(TeacherError, match="3 prompt-logprob positions for a prompt of 4"):
        parse_engine_prompt_logprobs(as_dicts, [5, 7, 9, 1], 2)
    with pytest.raises(TeacherError, match="misaligned"):
        parse_engine_prompt_logprobs(as_dicts, [5, 7, 8], 2)
    with pytest.raises(TeacherError, match="no prompt logprobs"):
        parse_engine_prompt_logprobs(None, [5, 7, 9], 2)


def test_vllm_engine_needs_vllm_installed():
    pytest.importorskip("distill.teachers.vllm_engine")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(TeacherError, match=r"pip install '\.\[vllm\]'.*vllm-server"):
            build_teacher(TeacherConfig(kind="vllm", model="some/model"))
    else:
        pytest.skip("vllm is installed here")


# -- the client against a fake server ----------------------------------------------------------------


def fake_choice(prompt: list[int], k: int, index: int, vocab: int = 50) -> dict:
    """A well-formed choice: position t's top-k are ids (t + j) % vocab with logprob -1 - j."""
    entries: list[dict | None] = [None]
    for t in range(1, len(prompt)):
        entry = {str(prompt[t]): {"logprob": -30.0, "rank": 40, "decoded_token": "?"}}
        for j in range(k):
            entry[str((t + j) % vocab)] = {"logprob": -1.0 - j, "rank": j + 1, "decoded_token": "?"}
        entries.append(entry)
    return {"index": index, "text": "", "prompt_logprobs": entries, "prompt_token_ids": None}


class FakeVllm:
    """A stand-in for a vLLM server; `mode` picks how /v1/completions behaves."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts_per_call: list[int] = []

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "teacher", "root": "/nonexistent/teacher", "max_model_len": 64}]})  # fmt: skip

    async def completions(self, request: web.Request) -> web.Response:
        self.calls += 1
        payload = await request.json()
        prompts = payload["prompt"]
        if self.mode == "probe":  # vocabulary probe: ids >= 700 are rejected like vLLM does
            bad = max(prompts)
            if bad >= 700:
                return web.json_response({"error": {"message": f"Token id {bad} is out of vocabulary", "code": 400}}, status=400)  # fmt: skip
            return web.json_response({"choices": [{"index": 0, "text": "x"}]})
        if self.mode == "500-then-ok" and self.calls == 1:
            return web.json_response({"error": {"message": "EngineCore died"}}, status=500)
        if self.mode == "always-500":
            return web.Response(text="Internal Server Error", status=500)
        if self.mode == "max-logprobs":
            msg = (f"Requested prompt logprobs of {payload['prompt_logprobs']}, which is greater than max allowed: 20 "
                   "(parameter=prompt_logprobs, value=21)")  # fmt: skip
            return web.json_response(
                {"error": {"message": msg, "type": "BadRequestError", "code": 400}}, status=400
            )
        if self.mode == "hang":
            await asyncio.sleep(30)
        assert payload["max_tokens"] == 1 and payload["temperature"] == 0 and payload["model"] == "teacher"
        self.prompts_per_call.append(len(prompts))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        k = payload["prompt_logprobs"]
        return web.json_response({"choices": [fake_choice(p, k, i) for i, p in enumerate(prompts)]})


@contextmanager
def serve(fake: FakeVllm):
    """Run `fake` on 127.0.0.1 in a thread with its own event loop; yields the base URL."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.completions)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)  # do not wait for "hang"
    port = _free_port()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:

        async def stop():
            await runner.cleanup()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:  # handlers still "hanging"
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url: str, **kw) -> VllmServerTeacher:
    kw.setdefault("retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5)
    return VllmServerTeacher(url, "teacher", **kw)


def test_batches_requests_bounds_concurrency_and_keeps_order():
    fake = FakeVllm()
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [], [12, 13, 14], [15, 16], [17, 18, 19, 20]]
    with serve(fake) as url, client(url, request_batch=2, max_concurrency=2, vocab_size=50) as teacher:
        assert isinstance(teacher, Teacher)
        out = teacher.topk(seqs, 4)
    assert fake.prompts_per_call == [2, 2, 2] and fake.max_in_flight <= 2  # 1- and 0-token prompts stay local
    for seq, tk in zip(seqs, out):
        assert tk.length == len(seq) and tk.k == 4
        for t in range(1, len(seq)):
            assert tk.token_ids[t].tolist() == [(t + j) % 50 for j in range(4)]
    assert teacher.name == "vllm-server:teacher" and teacher.max_model_len == 64


def test_retries_a_500_then_succeeds():
    fake = FakeVllm("500-then-ok")
    with serve(fake) as url, client(url) as teacher:
        (tk,) = teacher.topk([[1, 2, 3]], 2)
    assert fake.calls == 2 and tk.token_ids[2].tolist() == [2, 3]


def test_gives_up_after_retries_on_persistent_500():
    fake = FakeVllm("always-500")
    with (
        serve(fake) as url,
        client(url, retries=2) as teacher,
        pytest.raises(TeacherError, match=r"failed 3 times.*HTTP 500"),
    ):
        teacher.topk([[1, 2, 3]], 2)
    assert fake.calls == 3


def test_k_above_server_limit_is_a_clear_error_without_retry():
    fake = FakeVllm("max-logprobs")
    with (
        serve(fake) as url,
        client(url) as teacher,
        pytest.raises(TeacherError, match=r"k=21 is above .* limit of 20.*--max-logprobs 21"),
    ):
        teacher.topk([[1, 2, 3]], 21)
    assert fake.calls == 1


def test_hanging_server_times_out():
    fake = FakeVllm("hang")
    start = time.monotonic()
    with (
        serve(fake) as url,
        client(url, timeout_s=0.3, retries=1) as teacher,
        pytest.raises(TeacherError, match=r"no response within 0\.3 s"),
    ):
        teacher.topk([[1, 2, 3]], 2)
    assert time.monotonic() - start < 10 and fake.calls == 2


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    with (
        client(url) as teacher,
        pytest.raises(TeacherError, match=rf"cannot reach vLLM server at {url}.*--max-logprobs 7"),
    ):
        teacher.topk([[1, 2, 3]], 7)


def test_unknown_model_name_lists_served_names():
    with (
        serve(FakeVllm()) as url,
        VllmServerTeacher(url, "other", retries=0) as teacher,
        pytest.raises(TeacherError, match=r"does not serve 'other'.*\['teacher'\]"),
    ):
        teacher.topk([[1, 2]], 2)


def test_prompt_longer_than_max_model_len_is_refused_before_sending():
    fake = FakeVllm()
    with (
        serve(fake) as url,
        client(url) as teacher,
        pytest.raises(TeacherError, match=r"sequence 1 has 64 tokens.*--max-model-len 65"),
    ):
        teacher.topk([[1, 2], list(range(64))], 2)
    assert fake.calls == 0


def test_async_api_and_sync_api_inside_a_running_loop():
    fake = FakeVllm()
    with serve(fake) as url:
        teacher = build_teacher(TeacherConfig(kind="vllm-server", url=url + "/v1", model="teacher"))
        assert isinstance(teacher, VllmServerTeacher) and teacher.url == url

        async def main():
            (a,) = await teacher.atopk([[1, 2, 3]], 3)
            (b,) = teacher.topk([[1, 2, 3]], 3)  # from inside a running loop: served by the helper thread
            await teacher.aclose()
            return a, b

        a, b = asyncio.run(main())
        teacher.close()
    np.testing.assert_array_equal(a.token_ids, b.token_ids)


def test_vocab_size_is_probed_when_the_model_directory_is_not_local():
    with serve(FakeVllm("probe")) as url, client(url) as teacher:
        assert teacher.vocab_size == 700
    assert VllmServerTeacher("http://127.0.0.1:1", vocab_size=123).vocab_size == 123


def test_ids_outside_a_given_vocabulary_are_refused_before_anything_is_sent():
    # With --skip-tokenizer-init vLLM does not check ids and one out of range stops its engine; so the
    # client refuses it itself (port 1: nothing listens, so a request would fail differently).
    teacher = VllmServerTeacher("http://127.0.0.1:1", vocab_size=100, retries=0)
    try:
        for bad in ([[1, 2, 100]], [[5], [3, 250_000]]):
            with pytest.raises(
                TeacherError, match=r"outside the teacher's vocabulary of 100 ids.*nothing was sent"
            ):
                teacher.topk(bad, 3)
    finally:
        teacher.close()
