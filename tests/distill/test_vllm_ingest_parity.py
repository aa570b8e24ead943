"""The fast vLLM reply parser (`distill.teachers.vllm_parse`) against the original per-candidate parser
(`distill.teachers._reference`, the oracle): the same arrays, bit for bit, on replies recorded from a
real vLLM 0.32 server and on realistic generated ones (k=128 and k=20 over the 248,320-id Qwen3.5
vocabulary), and the same errors on malformed replies, whichever of its two readers takes them."""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from bench.teacher_ingest import VOCAB, Vocab, realistic_prompts, realistic_reply
from distill.teachers import TeacherError
from distill.teachers import vllm_parse as vp
from distill.teachers._reference import (
    reference_parse_completion_response,
    reference_parse_engine_prompt_logprobs,
    select_topk,
)
from distill.teachers.vllm_engine import parse_engine_prompt_logprobs
from distill.teachers.vllm_server import parse_completion_response
from distill.types import MISSING_ID, TopK
from tests.distill.test_vllm_server_parsing import BAD, REAL_PROMPTS, FlatLike, flat_logprobs

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32-replies"


class _Choices(msgspec.Struct):
    choices: list[_PLP]


class _PLP(msgspec.Struct):
    prompt_logprobs: msgspec.Raw


def assert_same(new: list[TopK], old: list[TopK]) -> None:
    assert len(new) == len(old)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)
        assert a.token_ids.dtype == b.token_ids.dtype and a.logprobs.dtype == b.logprobs.dtype
        assert a.tail_logprob.dtype == b.tail_logprob.dtype


def fast_path_taken(raw: bytes, prompts: list[list[int]], k: int) -> bool:
    """Whether every choice of `raw` is read by the numpy scan (not the general reader)."""
    choices = msgspec.json.decode(raw, type=_Choices).choices
    return all(
        vp.scan_prompt_logprobs(bytes(c.prompt_logprobs), p, k) is not None for c, p in zip(choices, prompts)
    )


def outcome(fn, *args):
    """('ok', result) or ('error', message) of fn(*args)."""
    try:
        return "ok", fn(*args)
    except TeacherError as exc:
        return "error", str(exc)


# -- recorded replies of a real vLLM server ---------------------------------------------------------


@pytest.mark.parametrize("name", ["completions-k20.json.gz", "completions-k20-skip-tokenizer-init.json.gz"])
@pytest.mark.parametrize("k", [20, 5, 1, 32])
def test_recorded_real_replies(name, k):
    raw = gzip.decompress((RECORDED / name).read_bytes())
    prompts = json.loads((RECORDED / "request.json").read_text())["prompts"]
    assert b"\\" in raw or b'"decoded_token":null' in raw  # escaped quotes in tokens, or no tokens at all
    assert fast_path_taken(raw, prompts, k)
    want = reference_parse_completion_response(json.loads(raw), prompts, k)
    assert_same(parse_completion_response(raw, prompts, k), want)
    assert_same(parse_completion_response(raw.decode(), prompts, k), want)  # str too
    assert_same(parse_completion_response(json.loads(raw), prompts, k), want)  # and decoded JSON


# -- realistic generated replies -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab("synthetic", seed=3)


@pytest.mark.parametrize("k", [128, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_realistic_replies(vocab, k, seed):
    rng = np.random.default_rng(seed)
    prompts = [*realistic_prompts(rng, vocab, 3, 48), realistic_prompts(rng, vocab, 1, 2)[0]]
    raw = realistic_reply(rng, vocab, prompts, k)
    ids = np.concatenate(
        [t.token_ids.ravel() for t in reference_parse_completion_response(json.loads(raw), prompts, k)]
    )
    assert ids.max() > 200_000 and ids.max() < VOCAB  # ids of six digits, as Qwen3.5's are
    assert fast_path_taken(raw, prompts, k)
    for kk in (k, k // 2, 1):  # the client may ask for less than the reply holds
        want = reference_parse_completion_response(json.loads(raw), prompts, kk)
        assert_same(parse_completion_response(raw, prompts, kk), want)


def _rewrite(raw: bytes, *, key_prefix: bool = False, decoded: str | None = "keep") -> bytes:
    """The same reply with keys written as "token_id:N", or decoded_token as "token_id:N" / null,
    re-serialised the way vLLM's server does (compact, non-ASCII as UTF-8)."""
    body = json.loads(raw)
    for choice in body["choices"]:
        plp = choice["prompt_logprobs"]
        for t, entry in enumerate(plp):
            if entry is None:
                continue
            new = {}
            for key, val in entry.items():
                if decoded == "token_id":
                    val["decoded_token"] = f"token_id:{key}"
                elif decoded is None:
                    val["decoded_token"] = None
                new[f"token_id:{key}" if key_prefix else key] = val
            plp[t] = new
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("k", [128, 20])
def test_token_id_forms(vocab, k):
    """`"decoded_token": "token_id:N"` (what return_tokens_as_token_ids writes where vLLM applies it)
    and null are read like any text; keys in the "token_id:N" form mean the ids N."""
    rng = np.random.default_rng(7)
    prompts = realistic_prompts(rng, vocab, 2, 40)
    raw = realistic_reply(rng, vocab, prompts, k)
    want = reference_parse_completion_response(json.loads(raw), prompts, k)
    for variant in (_rewrite(raw, decoded="token_id"), _rewrite(raw, decoded=None)):
        assert fast_path_taken(variant, prompts, k)
        assert_same(parse_completion_response(variant, prompts, k), want)
        assert_same(reference_parse_completion_response(json.loads(variant), prompts, k), want)
    prefixed = _rewrite(raw, key_prefix=True, decoded="token_id")
    assert fast_path_taken(prefixed, prompts, k)
    assert_same(parse_completion_response(prefixed, prompts, k), want)
    assert_same(parse_completion_response(json.loads(prefixed), prompts, k), want)


def test_other_json_layouts_read_the_same(vocab):
    """Whitespace, another field order, extra fields: not vLLM's layout, so the general reader takes
    them, with the same result."""
    rng = np.random.default_rng(11)
    prompts = realistic_prompts(rng, vocab, 2, 30)
    raw = realistic_reply(rng, vocab, prompts, 20)
    want = reference_parse_completion_response(json.loads(raw), prompts, 20)
    body = json.loads(raw)
    spaced = json.dumps(body).encode()
    for choice in body["choices"]:
        choice["prompt_logprobs"] = [
            None
            if e is None
            else {key: {"rank": v["rank"], "logprob": v["logprob"], "x": [1]} for key, v in e.items()}
            for e in choice["prompt_logprobs"]
        ]
    reordered = json.dumps(body, separators=(",", ":")).encode()
    for variant in (spaced, reordered):
        assert not fast_path_taken(variant, prompts, 20)
        assert_same(parse_completion_response(variant, prompts, 20), want)


# -- malformed replies: the same errors --------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD))
def test_bad_shapes_raise_the_same_from_bytes(case):
    resp, message = BAD[case]
    raw = json.dumps(resp, separators=(",", ":")).encode()  # NaN is written as NaN: not strict JSON
    with pytest.raises(TeacherError, match=message):
        parse_completion_response(raw, REAL_PROMPTS, 3)
    ref = outcome(reference_parse_completion_response, copy.deepcopy(resp), REAL_PROMPTS, 3)
    new = outcome(parse_completion_response, raw, REAL_PROMPTS, 3)
    assert ref[0] == new[0] == "error" and ref[1] == new[1]


def test_invalid_json_is_a_clear_error():
    with pytest.raises(TeacherError, match="not valid JSON"):
        parse_completion_response(b'{"choices": [', [[1, 2]], 2)


def _compact_reply(rng, vocab, k):
    prompts = realistic_prompts(rng, vocab, 2, 12)
    return prompts, realistic_reply(rng, vocab, prompts, k)


SAME, ID_RANGE, PREFIX = "same", "id range", "token_id prefix"
MUTATIONS = [
    (b'"rank":1,', b'"rank":0,', SAME),
    (b'"rank":2,', b'"rank":2.0,', SAME),
    (b'"rank":3,', b'"rank":-3,', SAME),
    (b'"rank":4,', b'"rank":"4",', SAME),
    (b'"rank":5,', b'"rank":true,', SAME),
    (b'"rank":2,', b'"rank":1,', SAME),  # a rank twice: the order by logprob decides
    (b'"logprob":-', b'"logprob":', SAME),  # a positive logprob
    (b'"logprob":-', b'"logprob":-1e999,"x":-', SAME),  # out of float range
    (b'"logprob":-', b'"logprob":null,"y":-', SAME),
    (b'"logprob":-', b'"logprob": -', SAME),
    (b',"decoded_token":', b',"rank":7,"decoded_token":', SAME),  # a key twice: the later wins
    (b',"decoded_token":', b',"decoded_tokens":', SAME),
    (b'"decoded_token":"', b'"decoded_token":7,"z":"', SAME),
    (b"{", b"{ ", SAME),
    (b"},{", b"},null,{", SAME),
    (b"},{", b"},{},{", SAME),
    (b":{", b":{}", SAME),
    (b'{"', b'{"0', SAME),  # a leading zero in a key
    (b'{"', b'{"token_ix:', SAME),
    (b'"prompt_logprobs":[null,', b'"prompt_logprobs":[{},', SAME),
    (b'"index":1', b'"index":0', SAME),
    (b'"index":1', b'"index":1.0', SAME),
    (b'"prompt_token_ids":null', b'"prompt_token_ids":[1]', SAME),
    (b"}}]", b"}}],", SAME),
    (b'},"', b'},"-', ID_RANGE),  # a negative key: the oracle took it as an id
    (b'},"', b'},"99999999999', ID_RANGE),  # beyond int32: the oracle crashed (OverflowError)
    (b'},"', b'},"token_id:', PREFIX),  # the oracle knew no such keys
]


@pytest.mark.parametrize("seed", range(4))
def test_mutated_replies_match_the_reference(vocab, seed):
    """Every mutation, at several places in a reply: the fast parser does what the oracle does (same
    arrays, or an error with the same message). Deliberate differences: ids outside 0..2**31-1 are
    refused (the oracle took negative ones and crashed on large ones), and "token_id:N" keys read as N."""
    rng = np.random.default_rng(100 + seed)
    k = 20 if seed % 2 else 128
    prompts, raw = _compact_reply(rng, vocab, k)
    original = reference_parse_completion_response(json.loads(raw), prompts, k)
    checked = refused = 0
    for old, new, kind in MUTATIONS:
        starts = [i for i in range(len(raw)) if raw.startswith(old, i)]
        for start in rng.choice(starts, min(3, len(starts)), replace=False).tolist() if starts else []:
            mutated = raw[:start] + new + raw[start + len(old) :]
            got = outcome(parse_completion_response, mutated, prompts, k)
            try:
                body = json.loads(mutated)
            except ValueError:
                assert got[0] == "error" and "not valid JSON" in got[1]
                continue
            if kind != SAME:  # (at `},"` outside prompt_logprobs the mutation touches nothing we read)
                if kind == ID_RANGE and got[0] == "error":
                    assert "not a token id" in got[1], got
                    refused += 1
                else:
                    assert got[0] == "ok", got
                    assert_same(got[1], original)
                continue
            ref = outcome(reference_parse_completion_response, body, prompts, k)
            assert got[0] == ref[0], (old, new, got, ref)
            if got[0] == "ok":
                assert_same(got[1], ref[1])
            else:
                assert got[1] == ref[1]
            checked += 1
    assert checked > 20 and refused > 0


# -- the selection: ties, repeated ids and ranks, gaps --------------------------------------------


def test_select_flat_equals_select_topk_on_awkward_positions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(2, 6)), int(rng.integers(1, 6))
        pos, tid, lp, rank, rows = [], [], [], [], [None]
        for t in range(1, n):
            m = int(rng.integers(1, 9))
            entries = [
                (
                    int(rng.integers(0, 6)),  # few ids: repeats
                    float(rng.choice([-0.5, -1.0, -1.0, -9999.0, -12000.0, rng.uniform(-5, 0)])),
                    int(rng.integers(1, k + 3)),  # repeated ranks, gaps, ranks above k
                )
                for _ in range(m)
            ]
            for e in entries:
                pos.append(t)
                tid.append(e[0])
                lp.append(e[1])
                rank.append(e[2])
            rows.append(select_topk(entries, k))
        ids, lps, tail = vp.select_flat(np.array(pos), np.array(tid), np.array(lp), np.array(rank), n, k)
        for t in range(1, n):
            want_ids, want_lps = rows[t]
            assert ids[t, : len(want_ids)].tolist() == want_ids
            assert (ids[t, len(want_ids) :] == MISSING_ID).all()
            np.testing.assert_array_equal(lps[t, : len(want_lps)], np.array(want_lps, dtype=np.float32))
        np.testing.assert_array_equal(tail[1:], TopK.tail_from_logprobs(lps[1:]))


def test_constants_and_tail_match_distill_types():
    assert vp.MISSING_ID == MISSING_ID
    lps = np.log(np.random.default_rng(0).dirichlet(np.ones(40), 50)[:, :12]).astype(np.float32)
    lps[3] = -np.inf
    lps[4, :] = np.log(np.float32(1 / 12))
    np.testing.assert_array_equal(vp.tail_from_logprobs(lps), TopK.tail_from_logprobs(lps))


# -- the in-process engine's flat lists --------------------------------------------------------------


def _engine_positions(rng, n, k, vocab_size):
    """vLLM's layout: per position the actual token first (tie-pessimistic rank), then ranks 1..k."""
    positions = [[]]
    prompt = rng.integers(0, vocab_size, n).tolist()
    for t in range(1, n):
        top = rng.choice(vocab_size, k, replace=False).tolist()
        lps = np.sort(rng.uniform(-12, 0, k).astype(np.float32))[::-1].tolist()
        if rng.random() < 0.2:  # ties
            lps[1] = lps[0]
        if rng.random() < 0.5:
            j = int(rng.integers(0, k))
            top[j] = prompt[t] if prompt[t] not in top else top[j]
        if prompt[t] in top:
            j = top.index(prompt[t])
            first = (prompt[t], lps[j], j + 1 + int(rng.random() < 0.2))  # ties: a worse rank
        else:
            first = (prompt[t], float(np.float32(lps[-1] - 1)), k + int(rng.integers(1, 999)))
        if rng.random() < 0.05:
            first = (first[0], -math.inf, first[2])
        positions.append([first] + [(a, b, j + 1) for j, (a, b) in enumerate(zip(top, lps))])
    return prompt, positions


@pytest.mark.parametrize("k", [128, 20, 3])
def test_engine_flat_lists_match_the_reference(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        prompt, positions = _engine_positions(rng, 30, k, VOCAB)
        flat = flat_logprobs(positions)
        for kk in (k, max(1, k // 2)):
            a = parse_engine_prompt_logprobs(flat, prompt, kk)
            b = reference_parse_engine_prompt_logprobs(flat, prompt, kk)
            assert_same([a], [b])
        as_dicts = [None] + [
            {tid: SimpleNamespace(logprob=lp, rank=rank) for tid, lp, rank in entries}
            for entries in positions[1:]
        ]
        assert_same(
            [parse_engine_prompt_logprobs(as_dicts, prompt, k)],
            [reference_parse_engine_prompt_logprobs(as_dicts, prompt, k)],
        )


def test_engine_errors_match_the_reference():
    prompt = [5, 7, 9]
    base = [[], [(7, -0.5, 1), (1, -1.5, 2)], [(9, -0.7, 1), (3, -0.9, 2)]]
    cases = {
        "nan": [[], [(7, float("nan"), 1)], base[2]],
        "positive": [[], [(7, 0.5, 1)], base[2]],
        "plus inf": [[], base[1], [(9, math.inf, 1)]],
        "missing rank": [[], [(7, -0.5, None)], base[2]],
        "empty": [[], [], base[2]],
        "misaligned": [[], [(8, -0.5, 1)], base[2]],
        "first not empty": [[(1, -1.0, 1)], base[1], base[2]],
        "misaligned before a bad logprob": [[], [(8, -0.5, 1)], [(9, 2.0, 1)]],
        "bad logprob before misaligned": [[], [(7, 2.0, 1)], [(8, -0.5, 1)]],
        "rank 0 is never selected": [[], [(7, -0.5, 0), (1, -1.5, 1)], base[2]],
    }
    for name, positions in cases.items():
        flat = flat_logprobs(positions)
        ref = outcome(reference_parse_engine_prompt_logprobs, flat, prompt, 2)
        got = outcome(parse_engine_prompt_logprobs, flat, prompt, 2)
        assert got[0] == ref[0], name
        if got[0] == "error":
            assert got[1] == ref[1], name
        else:
            assert_same([got[1]], [ref[1]])


def test_engine_flat_lists_out_of_order_slices():
    """FlatLogprobs whose positions are not laid end to end (a slice of a longer one) still read right."""
    positions = [[], [(7, -0.5, 1), (1, -1.5, 2)], [(9, -0.7, 1), (3, -0.9, 2)]]
    flat = flat_logprobs(positions)
    shuffled = FlatLike(
        start_indices=[4, 2, 0],
        end_indices=[4, 4, 2],
        token_ids=flat.token_ids[2:] + flat.token_ids[:2],
        logprobs=flat.logprobs[2:] + flat.logprobs[:2],
        ranks=flat.ranks[2:] + flat.ranks[:2],
    )
    # position 1 is entries 2..4 of the new lists, position 2 entries 0..2
    assert_same(
        [parse_engine_prompt_logprobs(shuffled, [5, 7, 9], 2)],
        [reference_parse_engine_prompt_logprobs(shuffled, [5, 7, 9], 2)],
    )
