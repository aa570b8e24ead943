"""vLLM prompt logprobs -> top-k arrays, fast: one parser for the server's JSON and the engine's lists.

Imports only numpy and msgspec (never torch), so that parse worker processes start in a fraction of a
second. Results are plain arrays `(token_ids int32 [n, k], logprobs float32 [n, k], tail float32 [n])`;
the teachers wrap them in `distill.types.TopK`.

Semantics (the same as the original per-entry parser, kept in `distill.teachers._reference` as the test
oracle): position t lists vLLM's candidates (token_id, logprob, rank); the actual prompt token comes
with its true rank, so a position carries k or k + 1 candidates (fewer when the vocabulary is smaller).
A later candidate for the same id replaces an earlier one; candidates ranked above k are dropped; the
rest are ordered by (rank, -logprob, id) and the first k kept; logprobs at or below vLLM's -9999 clamp
are -inf; the tail is log(1 - sum p) of the kept slots.

The server's reply is read in two steps. msgspec checks that the whole body is valid JSON and hands
over each choice's `prompt_logprobs` as raw bytes. Those bytes are then read with numpy, without a
Python object per candidate: the real (unescaped) quotes give every string, each candidate's fixed
pieces (`":{"logprob":`, `,"rank":`, `,"decoded_token":`) are compared eight bytes at a time, ids and
ranks are decoded eight digits at a time (SWAR), and the log-probs by msgspec from one packed buffer
(correctly rounded, like `float()`). The scan accepts only the exact layout vLLM writes (compact JSON,
fields in vLLM's order, `decoded_token` a string or null, keys `"123"` or `"token_id:123"`) and checks
that its pieces cover every byte; anything else, and every reply with an error in it, goes through
the general reader (Python objects, per-candidate checks), which gives the error message.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from distill.teachers.errors import TeacherError

MISSING_ID = -1  # == distill.types.MISSING_ID (not imported: that module imports torch)
# vLLM's OpenAI server cannot put -inf in JSON and writes this instead (probability 0).
VLLM_NEG_INF = -9999.0
MAX_LOGPROB = 1e-3  # above this a "log-probability" is not one (float noise gives tiny positive values)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


# -- the selection shared by every path ------------------------------------------------------------


def tail_from_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(logprobs)) per row: the same arithmetic as `distill.types.TopK.tail_from_logprobs`."""
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)


def empty_arrays(n: int, k: int) -> Arrays:
    return (
        np.full((n, k), MISSING_ID, dtype=np.int32),
        np.full((n, k), -np.inf, dtype=np.float32),
        np.zeros(n, dtype=np.float32),
    )


def select_flat(pos: np.ndarray, tid: np.ndarray, lp: np.ndarray, rank: np.ndarray, n: int, k: int) -> Arrays:
    """Top-k arrays for n positions from validated candidates, in vLLM's order.

    pos int64 [m]: position of each candidate (1 .. n-1, non-decreasing, every position present);
    tid int64 (0 <= id < 2**31), lp float64 (no NaN, no +inf, <= MAX_LOGPROB), rank int64 (>= 1).
    Vectorised for the layouts vLLM produces (ranks 1..m distinct per position, the actual token
    possibly listed twice); any other position is reduced exactly, one by one.
    """
    ids, lps, tail = empty_arrays(n, k)
    m = tid.size
    lp = np.where(lp <= VLLM_NEG_INF, -np.inf, lp)
    if m:
        new = np.empty(m, dtype=bool)
        new[0] = True
        np.not_equal(pos[1:], pos[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        first = np.repeat(starts, np.diff(np.append(starts, m)))  # first candidate of each one's position
        # The actual token listed first and again inside the top-k: the later listing wins.
        twice = np.bincount(pos[tid == tid[first]], minlength=n)[pos[starts]] > 1
        alive = np.ones(m, dtype=bool)
        alive[starts[twice]] = False
        kept = alive & (rank <= k)
        kidx = np.flatnonzero(kept)
        flat = pos[kidx] * k + (rank[kidx] - 1)
        count = np.bincount(flat, minlength=n * k).reshape(n, k)
        # a rank listed twice, or a gap in the ranks: not the simple layout
        dirty = (count > 1).any(1) | ((count[:, 1:] > 0) & (count[:, :-1] == 0)).any(1)
        ids.reshape(-1)[flat] = tid[kidx]
        lps.reshape(-1)[flat] = lp[kidx]
        srt = np.sort(ids, axis=1)
        dirty |= ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != MISSING_ID)).any(1)  # an id twice
        late = np.flatnonzero(alive & ~kept)
        late = late[late != first[late]]  # dropped (rank > k) after another listing of its id
        if late.size:
            hit = (ids[pos[late]] == tid[late, None]).any(1)
            dirty[pos[late[hit]]] = True
        for t in np.flatnonzero(dirty).tolist():
            lo, hi = np.searchsorted(pos, [t, t + 1])
            _select_one(tid[lo:hi].tolist(), lp[lo:hi].tolist(), rank[lo:hi].tolist(), k, ids[t], lps[t])
    has = np.zeros(n, dtype=bool)
    has[1:] = True
    if has.any():
        tail[has] = tail_from_logprobs(lps[has])
    return ids, lps, tail


def _select_one(tids: list[int], lps: list[float], ranks: list[int], k: int, out_ids, out_lps) -> None:
    """One position the general way: later listings replace earlier ones; (rank, -logprob, id) order."""
    best: dict[int, tuple[float, int]] = {}
    for tid, lp, rank in zip(tids, lps, ranks):
        best[tid] = (lp, rank)
    chosen = sorted((rank, -lp, tid) for tid, (lp, rank) in best.items() if 1 <= rank <= k)[:k]
    out_ids[:] = MISSING_ID
    out_lps[:] = -np.inf
    out_ids[: len(chosen)] = [tid for _, _, tid in chosen]
    out_lps[: len(chosen)] = [-neg for _, neg, _ in chosen]


# -- the server's reply: general reader (Python objects) -------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _token_key(key: Any, where: str, t: int) -> int:
    text = key[9:] if isinstance(key, str) and key.startswith("token_id:") else key
    try:
        tid = int(text)
    except (TypeError, ValueError):
        raise TeacherError(f"{where}: entry {t} has a non-integer token key {key!r}") from None
    if not 0 <= tid < 2**31:
        raise TeacherError(f"{where}: entry {t} has the token key {key!r}, not a token id (0 <= id < 2**31)")
    return tid


def parse_prompt_logprobs_objects(
    entries: Any, prompt: Sequence[int], k: int, where: str = "prompt"
) -> Arrays:
    """One choice's decoded `prompt_logprobs` (a list of dicts) -> arrays (validated; TeacherError otherwise)."""
    if not isinstance(entries, list):
        raise TeacherError(f"{where}: prompt_logprobs is {type(entries).__name__}, expected a list")
    if len(entries) != len(prompt):
        raise TeacherError(
            f"{where}: {len(entries)} prompt_logprobs entries for a prompt of {len(prompt)} tokens "
            "(the server must return one entry per prompt token)"
        )
    pos: list[int] = []
    tids: list[int] = []
    lps: list[float] = []
    ranks: list[int] = []
    for t, entry in enumerate(entries):
        if t == 0:
            if entry is not None:
                raise TeacherError(f"{where}: entry 0 should be null (nothing precedes the first token)")
            continue
        if not isinstance(entry, dict) or not entry:
            raise TeacherError(f"{where}: entry {t} is {entry!r:.80}, expected a non-empty object")
        start = len(tids)
        for key, val in entry.items():
            tid = _token_key(key, where, t)
            if not isinstance(val, dict) or not _is_number(val.get("logprob")):
                raise TeacherError(f"{where}: entry {t}, token {tid}: no numeric logprob in {val!r:.80}")
            lp, rank = float(val["logprob"]), val.get("rank")
            if not math.isfinite(lp):  # -inf arrives as -9999; anything non-finite is corrupt
                raise TeacherError(f"{where}: entry {t}, token {tid}: non-finite logprob {lp}")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise TeacherError(f"{where}: entry {t}, token {tid}: invalid rank {rank!r}")
            tids.append(tid)
            lps.append(lp)
            ranks.append(rank)
        if prompt[t] not in tids[start:]:
            # vLLM always lists the actual token: without it, this entry belongs to another prompt.
            raise TeacherError(
                f"{where}: entry {t} does not list the prompt token {prompt[t]}; response misaligned with the request"
            )
        for j in range(start, len(tids)):
            if lps[j] > MAX_LOGPROB:
                raise TeacherError(f"invalid logprob {lps[j]!r} for token {tids[j]}")
        pos += [t] * (len(tids) - start)
    return select_flat(
        np.asarray(pos, dtype=np.int64),
        np.asarray(tids, dtype=np.int64),
        np.asarray(lps, dtype=np.float64),
        np.asarray(ranks, dtype=np.int64),
        len(prompt),
        k,
    )


class _Choices:
    """The checks on a reply's choices that come before their log-probs (index, echoed prompt)."""

    def __init__(self, count: int, prompts: Sequence[Sequence[int]]) -> None:
        if count != len(prompts):
            raise TeacherError(f"response has {count} choices for {len(prompts)} prompts")
        self.prompts = prompts
        self.out: list[Arrays | None] = [None] * len(prompts)

    def index(self, pos: int, idx: Any, echoed: Any) -> int:
        n = len(self.prompts)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n:
            raise TeacherError(f"choice {pos} has an invalid index {idx!r} (expected 0..{n - 1})")
        if self.out[idx] is not None:
            raise TeacherError(f"two choices carry index {idx}")
        if echoed is not None and list(echoed) != list(self.prompts[idx]):
            raise TeacherError(f"choice {idx}: prompt_token_ids differ from the prompt sent")
        return idx


def parse_reply_objects(body: Any, prompts: Sequence[Sequence[int]], k: int) -> list[Arrays]:
    """A decoded /v1/completions body -> arrays per prompt (the general reader)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise TeacherError(f"response has no 'choices' list: {str(body)[:200]}")
    choices = _Choices(len(body["choices"]), prompts)
    for pos, choice in enumerate(body["choices"]):
        is_dict = isinstance(choice, dict)
        idx = choices.index(
            pos, choice.get("index", pos) if is_dict else None, choice.get("prompt_token_ids")
        )
        choices.out[idx] = parse_prompt_logprobs_objects(
            choice.get("prompt_logprobs"), prompts[idx], k, f"choice {idx}"
        )
    return choices.out  # type: ignore[return-value]


# -- the server's reply: the fast scan of vLLM's own layout ----------------------------------------


class _Choice(msgspec.Struct):
    index: int | msgspec.UnsetType | None = msgspec.UNSET
    prompt_logprobs: msgspec.Raw = msgspec.Raw()
    prompt_token_ids: list[int] | None = None


class _Reply(msgspec.Struct):
    choices: list[_Choice]


_REPLY = msgspec.json.Decoder(_Reply)
_FLOATS = msgspec.json.Decoder(list[float])


def _u64(text: bytes) -> np.uint64:
    return np.frombuffer(text, dtype="<u8")[0]


_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_ZEROS = _u64(b"00000000")
_DIGIT_LO = np.uint64(0x3030303030303030)
_DIGIT_HI = np.uint64(0x4646464646464646)
_HIGH_BITS = np.uint64(0x8080808080808080)
_M8 = np.uint64(0x00FF00FF00FF00FF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0x00000000FFFFFFFF)
_LP_A = _u64(b'":{"logp')  # `":{"logprob":` from the key's closing quote: 13 bytes in two words
_LP_B = _u64(b'ogprob":')
_RANK = _u64(b',"rank":')
_DT_A = _u64(b',"decode')  # `,"decoded_token":`: two words and a colon
_DT_B = _u64(b'd_token"')
_NULL = _u64(b'n":null}')  # from the last letter of "decoded_token"
_TOKEN_ID = _u64(b"token_id")
_HEAD = b"[null,{"
_SHIFTS = np.arange(8, dtype=np.uint64) * np.uint64(8)


def _words(arr: np.ndarray) -> np.ndarray:
    """The 8 bytes starting at every offset of `arr`, as little-endian uint64 (a strided view, no copy)."""
    return np.ndarray(shape=(arr.size - 7,), dtype="<u8", buffer=arr, strides=(1,))


def _digits(words: np.ndarray, end: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, bool]:
    """Decimal values of the digit runs arr[end - length:end] (1 <= length <= 8), and whether all are digits."""
    w = words[end - 8]
    keep = _ALL << _SHIFTS[8 - length]  # the run is the high `length` bytes; pad with '0' below it
    w = (w & keep) | (_ZEROS & ~keep)
    ok = not (((w + _DIGIT_HI) | (w - _DIGIT_LO)) & _HIGH_BITS).any()
    x = w - _DIGIT_LO
    x = (x * np.uint64(10) + (x >> np.uint64(8))) & _M8
    x = (x * np.uint64(100) + (x >> np.uint64(16))) & _M16
    x = (x * np.uint64(10000) + (x >> np.uint64(32))) & _M32
    return x.astype(np.int64), ok


def _span_tables(sep: int) -> tuple[np.ndarray, np.ndarray]:
    """KEEP[j][L]: the bytes of word j (bytes 8j .. 8j+7) inside a span of length L (0 <= L <= 23);
    FILL[j][L]: what goes in the others: `sep` right after the span, spaces after that."""
    keep, fill = np.zeros((3, 24), dtype=np.uint64), np.zeros((3, 24), dtype=np.uint64)
    for length in range(24):
        row = bytes(length) + bytes([sep]) + b" " * (23 - length)
        for j in range(3):
            chunk = row[8 * j : 8 * j + 8]
            keep[j, length] = int.from_bytes(
                bytes(0xFF if 8 * j + i < length else 0 for i in range(8)), "little"
            )
            fill[j, length] = int.from_bytes(
                bytes(0 if 8 * j + i < length else chunk[i] for i in range(8)), "little"
            )
    return keep, fill


_KEEP, _FILL_COMMA = _span_tables(ord(","))
_, _FILL_CLOSE = _span_tables(ord("]"))
_OPEN = _u64(b"[       ")


def _floats(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> list[float]:
    """The numbers arr[start:start + length] (1 <= length <= 23), read by msgspec from one JSON array
    in which each span, with its comma, is padded with spaces to 24 bytes (correctly rounded, like float())."""
    out = np.empty(3 * start.size + 1, dtype=np.uint64)
    out[0] = _OPEN
    rows = out[1:].reshape(-1, 3)
    for j in range(3):
        rows[:, j] = (words[start + 8 * j] & _KEEP[j][length]) | _FILL_COMMA[j][length]
        last = length[-1]
        rows[-1, j] = (words[start[-1] + 8 * j] & _KEEP[j][last]) | _FILL_CLOSE[j][last]
    return _FLOATS.decode(memoryview(out).cast("B"))


def scan_prompt_logprobs(raw: Any, prompt: Sequence[int], k: int) -> Arrays | None:
    """Arrays from one choice's raw `prompt_logprobs` JSON if it is in vLLM's exact layout and valid;
    None otherwise (the caller then uses the general reader, which names the problem).

    `raw` (bytes-like) must be valid JSON (msgspec checked the whole body): that is what makes quotes,
    escapes and the packed numbers unambiguous.
    """
    n = len(prompt)
    view = memoryview(raw)
    if n < 2:
        return empty_arrays(n, k) if view == b"[null]" and n == 1 else None
    if len(view) < 16 or view[:8] != b'[null,{"' or view[-3:] != b"}}]":
        return None
    arr = np.frombuffer(view, dtype=np.uint8)
    size = arr.size
    words = _words(arr)
    is_quote = arr == 34
    slashes = np.flatnonzero(arr == 92)
    if slashes.size:  # escaped quotes are not quotes: those after an odd run of backslashes
        new = np.empty(slashes.size, dtype=bool)
        new[0] = True
        np.not_equal(slashes[1:], slashes[:-1] + 1, out=new[1:])
        run_start = np.flatnonzero(new)
        in_run = np.arange(slashes.size) - np.repeat(run_start, np.diff(np.append(run_start, slashes.size)))
        is_quote[slashes[(in_run & 1) == 0] + 1] = False  # (valid JSON never ends in a backslash)
    quotes = np.flatnonzero(is_quote)
    if quotes.size & 1:
        return None
    opens, closes = quotes[0::2], quotes[1::2]
    # Candidate keys are the strings followed by `:{`; after each come "logprob", "rank",
    # "decoded_token" and, unless decoded_token is null, its value: 4 or 5 strings per candidate.
    key = np.flatnonzero((arr[closes + 1] == 58) & (arr[closes + 2] == 123))
    m = key.size
    if not m:
        return None
    strings = np.diff(key, append=opens.size)
    text = strings == 5
    if not (text | (strings == 4)).all():
        return None
    ko, kc = opens[key], closes[key]
    ro, do = opens[key + 2], opens[key + 3]
    v = do + 16  # the decoded_token value
    if not (
        (words[kc] == _LP_A).all()
        and (words[kc + 5] == _LP_B).all()
        and (words[ro - 1] == _RANK).all()
        and (words[do - 1] == _DT_A).all()
        and (words[do + 7] == _DT_B).all()
        and (arr[do + 15] == 58).all()
    ):
        return None
    end = np.empty(m, dtype=np.int64)  # one past each candidate's closing brace
    value = key[text] + 4
    if not ((opens[value] == v[text]).all() and (arr[closes[value] + 1] == 125).all()):
        return None
    end[text] = closes[value] + 2
    if not (words[v[~text] - 3] == _NULL).all():
        return None
    end[~text] = v[~text] + 5
    # Candidates follow each other with `,` inside a position and `},{` between positions.
    boundary = arr[end] == 125
    e, nxt, b = end[:-1], ko[1:], boundary[:-1]
    if not (
        np.where(
            b, (arr[e + 1] == 44) & (arr[e + 2] == 123) & (nxt == e + 3), (arr[e] == 44) & (nxt == e + 1)
        ).all()
        and ko[0] == len(_HEAD)
        and boundary[-1]
        and end[-1] + 2 == size
        and arr[end[-1] + 1] == 93
    ):
        return None
    pos = np.empty(m, dtype=np.int64)
    pos[0] = 1
    np.cumsum(b, out=pos[1:])
    pos[1:] += 1
    if pos[-1] != n - 1:
        return None
    # ids: "123" or "token_id:123"; ranks; at most 8 digits each
    digits = ko + 1
    prefixed = arr[digits] == 116
    if prefixed.any():
        if not ((words[digits[prefixed]] == _TOKEN_ID).all() and (arr[digits[prefixed] + 8] == 58).all()):
            return None
        digits = digits + 9 * prefixed
    id_len = kc - digits
    rank_len = do - 1 - (ro + 7)
    if not ((id_len >= 1) & (id_len <= 8) & (rank_len >= 1) & (rank_len <= 8)).all():
        return None
    tid, ok_id = _digits(words, kc, id_len)
    rank, ok_rank = _digits(words, do - 1, rank_len)
    lp_start = kc + 13
    lp_len = ro - 1 - lp_start
    if not (ok_id and ok_rank and ((lp_len >= 1) & (lp_len <= 23)).all() and (rank >= 1).all()):
        return None
    try:
        lp = np.fromiter(_floats(words, lp_start, lp_len), dtype=np.float64, count=m)
    except (msgspec.DecodeError, msgspec.ValidationError):  # not a number, or out of float range
        return None
    if lp.size != m or not (lp <= MAX_LOGPROB).all():
        return None
    listed = np.bincount(pos[tid == np.asarray(prompt, dtype=np.int64)[pos]], minlength=n)
    if not (listed[1:] > 0).all():
        return None
    return select_flat(pos, tid, lp, rank, n, k)


def parse_reply(body: Any, prompts: Sequence[Sequence[int]], k: int) -> list[Arrays]:
    """A /v1/completions reply for `prompts` -> one `(ids, logprobs, tail)` per prompt.

    `body` is the raw reply (bytes or str; the fast path) or its decoded JSON (the general reader).
    Raises TeacherError, with the same message either way, for anything that is not a valid reply.
    """
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return parse_reply_objects(body, prompts, k)
    raw = body if isinstance(body, bytes) else memoryview(body)  # no copy
    try:
        reply = _REPLY.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:  # what a strict reader refuses (NaN, a lone surrogate, a wrong type) the general one names
            decoded = json.loads(bytes(raw))
        except ValueError as exc:
            raise TeacherError(f"the response is not valid JSON ({exc}): {bytes(raw[:200])!r}") from None
        return parse_reply_objects(decoded, prompts, k)
    choices = _Choices(len(reply.choices), prompts)
    for pos, choice in enumerate(reply.choices):
        idx = pos if choice.index is msgspec.UNSET else choice.index
        idx = choices.index(pos, idx, choice.prompt_token_ids)
        plp = choice.prompt_logprobs
        got = scan_prompt_logprobs(plp, prompts[idx], k) if len(plp) else None
        if got is None:
            entries = json.loads(bytes(plp)) if len(plp) else None
            got = parse_prompt_logprobs_objects(entries, prompts[idx], k, f"choice {idx}")
        choices.out[idx] = got
    return choices.out  # type: ignore[return-value]


# -- in a parse worker process ---------------------------------------------------------------------


def parse_shared_reply(name: str, size: int, prompts: Sequence[Sequence[int]], k: int) -> list[Arrays]:
    """`parse_reply` of the reply the client left in shared memory block `name` (its first `size`
    bytes): the worker reads it in place, so a reply crosses processes with one copy, not four."""
    block = _attached(name)
    result, error = _parse_view(block.buf, size, prompts, k)
    if error is not None:
        raise TeacherError(error)
    return result


_ATTACHED: dict[str, Any] = {}  # name -> SharedMemory, oldest first: the client reuses its blocks
_MAX_ATTACHED = 8


def _attached(name: str):
    """The client's block `name`, mapped once per worker (mapping it anew costs a page fault per page)."""
    from multiprocessing import shared_memory

    block = _ATTACHED.pop(name, None)
    if block is None:
        block = shared_memory.SharedMemory(name=name)
        while len(_ATTACHED) >= _MAX_ATTACHED:  # blocks the client has replaced, most likely
            old = _ATTACHED.pop(next(iter(_ATTACHED)))
            # a view still alive (only after an unexpected error) is freed with the process
            with contextlib.suppress(BufferError):
                old.close()
    _ATTACHED[name] = block  # most recent last
    return block


def _parse_view(buf: memoryview, size: int, prompts: Sequence[Sequence[int]], k: int):
    """(arrays, None) or (None, message): no exception, whose traceback would keep views of `buf` alive."""
    view = buf[:size]
    try:
        return parse_reply(view, prompts, k), None
    except TeacherError as exc:
        return None, str(exc)
    finally:
        view.release()
