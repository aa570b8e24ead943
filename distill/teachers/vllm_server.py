"""`VllmServerTeacher`: top-k prompt logprobs from a running vLLM OpenAI-compatible server.

Production teachers run vLLM in their own container; this client sends token ids (never text) to
POST /v1/completions with `prompt_logprobs=k`, several prompts per request, up to `max_in_flight`
requests at once (a request counts until its reply is parsed, which bounds the memory replies take),
and retries only where retrying can help (connection errors, timeouts, 5xx).

Response facts the parser relies on (vLLM 0.11 .. 0.33): `choices[i].prompt_logprobs` has one entry
per prompt token; entry 0 is null; the others map the token id *as a string* to
{logprob, rank, decoded_token}; -inf is written as -9999.0; the actual prompt token is listed with
its true rank, so an entry holds k or k + 1 candidates (fewer when the vocabulary is smaller than k).
The reply is compact JSON (about 80 bytes per candidate, ~9-11 KB per token at k = 128); it is read
straight into arrays by `distill.teachers.vllm_parse`, in the event-loop thread or, with
`parse_workers`, in worker processes that read it from shared memory (one copy per reply).

What the request asks for: token ids in, `prompt_logprobs=k`, one generated token, and
`return_tokens_as_token_ids` (where vLLM honours it, tokens come as "token_id:N" rather than
detokenised text; in vLLM 0.32 that covers the sampled `logprobs` only, not `prompt_logprobs`, and a
server that does not know the field ignores it). `decoded_token` strings cannot be switched off
per request: start the server with `--skip-tokenizer-init` (we send token ids, so it needs no
tokenizer) and it writes `"decoded_token": null` and skips detokenising k + 1 tokens per position.
Such a server no longer checks token ids, and an id outside the vocabulary stops its engine (vLLM
0.32, observed): give `vocab_size` (it is then not probed) and the client refuses such ids itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import re
import threading
import weakref
from collections.abc import Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from distill.teachers.base import TeacherError, check_k, check_sequences
from distill.teachers.vllm_parse import parse_prompt_logprobs_objects, parse_reply, parse_shared_reply
from distill.types import TopK

T = TypeVar("T")

START_HINT = (
    "python -m vllm.entrypoints.openai.api_server --model MODEL --served-model-name NAME "
    "--max-logprobs {k}   (or `vllm serve MODEL --max-logprobs {k}`; on CPU see distill.teachers.local_server)"
)


# -- response parsing (pure functions, unit-tested on hand-written JSON) -------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_prompt_logprobs(entries: Any, prompt: Sequence[int], k: int, where: str = "prompt") -> TopK:
    """One choice's decoded `prompt_logprobs` list -> `TopK` for `prompt` (validated; TeacherError otherwise)."""
    return TopK(*parse_prompt_logprobs_objects(entries, prompt, k, where))


def parse_completion_response(body: Any, prompts: Sequence[Sequence[int]], k: int) -> list[TopK]:
    """A /v1/completions reply for `prompts` (token-id lists) -> one `TopK` per prompt.

    `body` is the raw reply (bytes or str: the fast path the client uses) or its decoded JSON."""
    return [TopK(*arrays) for arrays in parse_reply(body, prompts, k)]


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or err)[:500]
    except (ValueError, AttributeError):
        return text.strip()[:500] or "(empty body)"


# -- the client --------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """aiohttp sessions and semaphores belong to one event loop; keep one set per loop."""

    session: aiohttp.ClientSession
    semaphore: asyncio.Semaphore


class _BackgroundLoop:
    """An event loop in a daemon thread, for sync calls from any thread (even one running a loop)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-client", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise TeacherError("the sync topk() was called from the teacher's own event loop; use atopk()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        with self._lock:
            loop, thread, self.loop, self._thread = self.loop, self._thread, None, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()


class _ReplyBlocks:
    """The shared-memory blocks that carry replies to the parse workers, kept and reused: a new block
    per reply costs a page fault per 4 KiB page in both processes, several times the copy itself.
    At most one block per reply being parsed (`max_in_flight`); a block too small for a reply is
    replaced by one of the next power of two."""

    def __init__(self) -> None:
        self._free: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()

    def acquire(self, size: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [b for b in self._free if b.size >= size]
            if fits:
                block = min(fits, key=lambda b: b.size)
                self._free.remove(block)
                return block
            if self._free:  # all too small: retire one, so that the count stays bounded
                _drop_block(self._free.pop())
        return shared_memory.SharedMemory(create=True, size=1 << max(20, (size - 1).bit_length()))

    def release(self, block: shared_memory.SharedMemory) -> None:
        with self._lock:
            self._free.append(block)

    def close(self) -> None:
        with self._lock:
            blocks, self._free = self._free, []
        for block in blocks:
            _drop_block(block)


def _drop_block(block: shared_memory.SharedMemory) -> None:
    block.close()
    with contextlib.suppress(FileNotFoundError):
        block.unlink()  # (a worker that still maps it keeps its pages until it lets go)


class VllmServerTeacher:
    """Client of a vLLM OpenAI-compatible server (`atopk` async, `topk` sync; see module docstring).

    `model` is the served model name (None: the server's only model). `request_batch` prompts (and at
    most `max_request_tokens` tokens) go in one request; `max_in_flight` requests are in flight (sent,
    or answered and not yet parsed; `max_concurrency` is its old name). `parse_workers` > 0 parses
    replies in that many worker processes (started on first use, stopped by `close`); 0 parses them
    in the client's event-loop thread. Each attempt has `timeout_s`; connection errors, timeouts and
    5xx are retried `retries` times with exponential backoff from `backoff_s`. `vocab_size` defaults
    to the served model's config (read from its directory when the server runs on this machine) or is
    probed from the server.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        *,
        max_in_flight: int = 4,
        parse_workers: int = 0,
        max_concurrency: int | None = None,
        request_batch: int = 8,
        max_request_tokens: int = 65536,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        vocab_size: int | None = None,
        revision: str | None = None,
        api_key: str | None = None,
        name: str | None = None,
    ) -> None:
        if max_concurrency is not None:  # the old name of max_in_flight
            max_in_flight = max_concurrency
        if max_in_flight < 1 or request_batch < 1 or max_request_tokens < 1:
            raise TeacherError("max_in_flight, request_batch and max_request_tokens must be positive")
        if parse_workers < 0:
            raise TeacherError("parse_workers must not be negative (0: parse in the client's own thread)")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise TeacherError("timeout_s must be positive; retries and backoff_s must not be negative")
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.model = model
        self.max_in_flight = max_in_flight
        self.parse_workers = parse_workers
        self.request_batch = request_batch
        self.max_request_tokens = max_request_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.revision = revision
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._name = name
        self._vocab_size = vocab_size
        self._root: str | None = None
        self.max_model_len: int | None = None
        self._ready = False
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._background = _BackgroundLoop()
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._blocks = _ReplyBlocks()

    # -- identity ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """`vllm-server:<served model name>[@revision]`: serve a model under its hub id (vLLM's default) or
        set `name`, since the logit cache keys on this. Needs the server only when `model` is None."""
        if self._name is None:
            if self.model is None:
                self._sync(self._aensure_ready())
            self._name = f"vllm-server:{self.model}" + (f"@{self.revision}" if self.revision else "")
        return self._name

    @property
    def vocab_size(self) -> int:
        """Given, else read from the served model's directory when it is on this machine, else probed
        from the server (on first access; `isinstance(t, Teacher)` reads it before Python 3.12)."""
        if self._vocab_size is None:
            self._vocab_size = self._sync(self._aresolve_vocab_size())
        return self._vocab_size

    # -- public API ----------------------------------------------------------------------------

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        """Sync `atopk`; runs on a private event-loop thread, so it works inside async code too."""
        return self._sync(self.atopk(sequences, k))

    async def atopk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        k = check_k(k)
        seqs = check_sequences(sequences)
        if self._vocab_size is not None:  # a server started with --skip-tokenizer-init does not check
            for i, s in enumerate(seqs):
                if s and max(s) >= self._vocab_size:
                    raise TeacherError(
                        f"sequence {i} holds token id {max(s)}, outside the teacher's vocabulary of "
                        f"{self._vocab_size} ids: are the prompts in the teacher's tokenizer? (nothing was sent; "
                        "a vLLM server started with --skip-tokenizer-init does not check ids itself)"
                    )
        await self._aensure_ready(k)
        limit = None if self.max_model_len is None else self.max_model_len - 1  # one slot for max_tokens=1
        for i, s in enumerate(seqs):
            if limit is not None and len(s) > limit:
                raise TeacherError(
                    f"sequence {i} has {len(s)} tokens; the server's max model length is {self.max_model_len} "
                    f"(prompts up to {limit} tokens, one slot is the generated token). Restart vLLM with "
                    f"--max-model-len {len(s) + 1} or more, or split the sequence"
                )
        out: list[TopK | None] = [TopK.empty_rows(len(s), k) if len(s) <= 1 else None for s in seqs]
        groups = self._groups([i for i, s in enumerate(seqs) if len(s) > 1], seqs)
        tasks = [asyncio.ensure_future(self._arequest_group(g, seqs, k)) for g in groups]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failure fails the call: stop the rest
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for group, topks in zip(groups, results):
            for i, tk in zip(group, topks):
                out[i] = tk
        return out  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Close the HTTP session of the running event loop (the one `atopk` used here)."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.session.close()

    def close(self) -> None:
        """Close every HTTP session and stop the private event-loop thread."""
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, state in list(self._states.items()):
            self._states.pop(loop, None)
            if loop.is_closed():
                continue
            if loop is self._background.loop:
                asyncio.run_coroutine_threadsafe(state.session.close(), loop).result(timeout=10)
            elif loop is current:
                loop.create_task(state.session.close())
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(state.session.close(), loop).result(timeout=10)
            else:
                loop.run_until_complete(state.session.close())
        self._background.stop()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._blocks.close()

    def __enter__(self) -> VllmServerTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> VllmServerTeacher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        self.close()

    def __repr__(self) -> str:
        return (
            f"VllmServerTeacher(url={self.url!r}, model={self.model!r}, max_in_flight={self.max_in_flight})"
        )

    # -- internals -----------------------------------------------------------------------------

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._background.run(coro)

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None or state.session.closed:
            session = aiohttp.ClientSession(headers=self._headers, connector=aiohttp.TCPConnector(limit=0))
            state = self._states[loop] = _LoopState(session, asyncio.Semaphore(self.max_in_flight))
        return state

    def _groups(self, order: list[int], seqs: list[list[int]]) -> list[list[int]]:
        groups: list[list[int]] = []
        cur: list[int] = []
        tokens = 0
        for i in order:
            n = len(seqs[i])
            if cur and (len(cur) >= self.request_batch or tokens + n > self.max_request_tokens):
                groups.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        if cur:
            groups.append(cur)
        return groups

    async def _arequest_group(self, group: list[int], seqs: list[list[int]], k: int) -> list[TopK]:
        prompts = [seqs[i] for i in group]
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": k,
            "return_tokens_as_token_ids": True,
        }
        async with self._state().semaphore:  # held until parsed: bounds the replies held in memory
            raw = await self._arequest("POST", "/v1/completions", payload, k=k, raw=True, held=True)
            if self.parse_workers == 0:
                arrays = parse_reply(raw, prompts, k)
            else:
                arrays = await self._aparse_in_worker(raw, prompts, k)
        return [TopK(*a) for a in arrays]

    async def _aparse_in_worker(self, raw: bytes, prompts: list[list[int]], k: int) -> list:
        """`parse_reply` in a worker process; the reply goes there through shared memory (one copy)."""
        block = self._blocks.acquire(len(raw))
        try:
            block.buf[: len(raw)] = raw
            return await asyncio.get_running_loop().run_in_executor(
                self._parse_pool(), parse_shared_reply, block.name, len(raw), prompts, k
            )
        except BrokenProcessPool as exc:
            with self._pool_lock:
                self._pool = None  # the next call starts fresh workers
            raise TeacherError(
                f"a reply-parsing worker process died ({exc}); set parse_workers=0 to parse in-process"
            ) from None
        finally:
            self._blocks.release(block)

    def _parse_pool(self) -> ProcessPoolExecutor:
        """The worker processes that parse replies, started on first use ("spawn": no fork of a process
        with threads; they import only numpy, msgspec and distill.teachers.vllm_parse)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.parse_workers, mp_context=multiprocessing.get_context("spawn")
                )
                weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
            return self._pool

    async def _arequest(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        k: int | None = None,
        raw: bool = False,
        held: bool = False,
    ) -> Any:
        """One HTTP call with retries on connection errors, timeouts and 5xx (never on 4xx): the decoded
        JSON body, or with `raw` its bytes. `held`: the caller holds a slot of the in-flight semaphore."""
        state = self._state()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        attempts = self.retries + 1
        failure = ""
        kind = ""
        for attempt in range(attempts):
            try:
                async with (
                    contextlib.nullcontext() if held else state.semaphore,
                    state.session.request(method, self.url + path, json=payload, timeout=timeout) as resp,
                ):
                    status, data = resp.status, await resp.read()
            except asyncio.TimeoutError:  # before ClientError: aiohttp's timeouts are both
                kind, failure = "timeout", f"no response within {self.timeout_s:g} s"
            except aiohttp.ClientConnectorError as exc:
                kind, failure = "connect", str(exc)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                kind, failure = "connection", f"{type(exc).__name__}: {exc}"
            else:
                if status < 400:
                    if raw:
                        return data
                    try:
                        return json.loads(data)
                    except ValueError:
                        raise TeacherError(
                            f"vLLM server at {self.url}{path} returned invalid JSON: {data[:200]!r}"
                        ) from None
                text = data.decode("utf-8", "replace")
                if status < 500:
                    raise self._client_error(status, _error_message(text), path, k)
                kind, failure = "server", f"HTTP {status}: {_error_message(text)}"
            if attempt + 1 < attempts:
                # exponential backoff with jitter, so retries of many requests do not arrive together
                await asyncio.sleep(self.backoff_s * 2**attempt * random.uniform(0.75, 1.25))
        if kind == "connect":
            raise TeacherError(
                f"cannot reach vLLM server at {self.url} ({failure}; {attempts} attempts). Start it with: "
                + START_HINT.format(k=k or 128)
            )
        if kind == "timeout":
            raise TeacherError(
                f"vLLM server at {self.url}{path}: {failure} ({attempts} attempts). Raise timeout_s, lower "
                "request_batch/max_request_tokens, or check the server's log"
            )
        raise TeacherError(
            f"vLLM server at {self.url}{path} failed {attempts} times, last: {failure}. Check the server's log"
        )

    def _client_error(self, status: int, message: str, path: str, k: int | None) -> TeacherError:
        limit = re.search(r"max allowed:\s*(\d+)", message)
        if limit:
            return TeacherError(
                f"k={k} is above the vLLM server's limit of {limit.group(1)} logprobs ({message}). Restart the "
                f"server with --max-logprobs {k} (or higher), or use k <= {limit.group(1)}"
            )
        if "context length" in message or "max_tokens must be at least" in message:
            return TeacherError(
                f"a prompt is too long for the vLLM server's max model length ({message}). Restart the server "
                "with a larger --max-model-len, or split the sequences"
            )
        if status == 404 and "model" in message.lower():
            return TeacherError(
                f"model {self.model!r} is not served at {self.url} ({message}); set the teacher model to the "
                "server's --served-model-name"
            )
        if status in (401, 403):
            return TeacherError(f"vLLM server at {self.url} refused the request (HTTP {status}): set api_key")
        return TeacherError(
            f"vLLM server at {self.url}{path} rejected the request (HTTP {status}): {message}"
        )

    async def _aensure_ready(self, k: int | None = None) -> None:
        """Confirm once that the server serves `model` (and learn its max model length)."""
        if self._ready:
            return
        body = await self._arequest("GET", "/v1/models", k=k)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise TeacherError(f"{self.url}/v1/models did not return a model list: {str(body)[:200]}")
        served = {m.get("id"): m for m in data if isinstance(m, dict)}
        if self.model is None:
            if len(served) != 1:
                raise TeacherError(
                    f"vLLM server at {self.url} serves {sorted(map(str, served))}; set the teacher model to one"
                )
            self.model = next(iter(served))
        if self.model not in served:
            raise TeacherError(
                f"vLLM server at {self.url} does not serve {self.model!r}; it serves {sorted(map(str, served))}. "
                "Set the teacher model to one of these (vLLM's --served-model-name)"
            )
        info = served[self.model]
        self._root = info.get("root") or self.model
        mml = info.get("max_model_len")
        self.max_model_len = int(mml) if _is_number(mml) else None
        self._ready = True

    async def _aresolve_vocab_size(self) -> int:
        await self._aensure_ready()
        config = Path(str(self._root)) / "config.json"
        if config.is_file():  # the server runs here from a local directory
            cfg = json.loads(config.read_text())
            size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if isinstance(size, int):
                return size
        return await self._aprobe_vocab_size()

    async def _aprobe_vocab_size(self) -> int:
        """Smallest id the server rejects as out of vocabulary (bisection over 1-token prompts)."""

        async def valid(token_id: int) -> bool:
            try:
                await self._arequest(
                    "POST", "/v1/completions", {"model": self.model, "prompt": [token_id], "max_tokens": 1}
                )
            except TeacherError as exc:
                if "out of vocabulary" in str(exc):
                    return False
                raise
            return True

        lo, hi = 0, 1024  # lo is valid; find an invalid hi
        while await valid(hi):
            lo, hi = hi, hi * 2
            if hi > 2**26:
                raise TeacherError(f"cannot determine the vocabulary size of {self.model!r}; set vocab_size")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await valid(mid):
                lo = mid
            else:
                hi = mid
        return hi
