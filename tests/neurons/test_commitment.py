"""The q24 commitment: exact round trip, the 128-byte limit, the hotkey binding, strict parsing."""

from __future__ import annotations

import hashlib

import pytest

from neurons.commitment import Commitment, CommitmentError, binding_hash, parse

CONTENT = hashlib.sha256(b"weights").hexdigest()
REV = "0123456789abcdef0123456789abcdef01234567"


def test_round_trip_and_size() -> None:
    c = Commitment.for_checkpoint("hf", "alice/quasar-small", REV, CONTENT, "5Alice")
    text = c.encode()
    assert text == f"q24:2:hf:alice/quasar-small:{REV}:{c.binding}"
    assert parse(text) == c and parse(text.encode()) == c
    longest = Commitment("hf", "a" * 20 + "/" + "b" * 24, REV, c.binding)  # 45 characters: exactly 128 bytes
    assert len(longest.encode().encode()) == 128
    with pytest.raises(
        CommitmentError, match=r"129 bytes, over the chain's 128: use a repository name at most 45"
    ):
        Commitment("hf", "a" * 20 + "/" + "b" * 25, REV, c.binding)
    local = Commitment.for_checkpoint("local", "miner-1", REV, CONTENT, "5Alice")
    assert parse(local.encode()) == local


def test_binding_ties_content_to_the_hotkey() -> None:
    c = Commitment.for_checkpoint("hf", "alice/q", REV, CONTENT, "5Alice")
    assert c.binds(CONTENT, "5Alice")
    assert not c.binds(CONTENT, "5Mallory")  # the same upload re-committed by a copier does not bind
    assert not c.binds(hashlib.sha256(b"other").hexdigest(), "5Alice")
    assert binding_hash(CONTENT, "5Alice") != binding_hash(CONTENT, "5Alice2")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        binding_hash("abc", "5Alice")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "does not start with 'q24:'"),
        ('{"model": "a/b", "revision": "x"}', "does not start with 'q24:'"),
        ("q24:3:hf:a/b:" + REV + ":" + "0" * 32, "unsupported q24 protocol version '3'"),
        ("q24:1:hf:a/b:" + REV + ":" + "0" * 32, "version 1 is retired (upload, then commit"),
        ("q24:2:hf:a/b:" + REV, "expected 6"),
        ("q24:2:hf:a/b:" + REV + ":" + "0" * 32 + ":extra", "expected 6"),
        ("q24:2:s3:a/b:" + REV + ":" + "0" * 32, "unknown store 's3'"),
        ("q24:2:hf:no-owner:" + REV + ":" + "0" * 32, "not a valid hf repository"),
        ("q24:2:hf:a/../b:" + REV + ":" + "0" * 32, "not a valid hf repository"),
        ("q24:2:local:../etc:" + REV + ":" + "0" * 32, "not a valid local repository"),
        ("q24:2:hf:a/b:main:" + "0" * 32, "revision must be 40 lowercase hex"),
        ("q24:2:hf:a/b:" + REV.upper() + ":" + "0" * 32, "revision must be 40 lowercase hex"),
        ("q24:2:hf:a/b:" + REV + ":" + "0" * 31, "binding must be 32 lowercase hex"),
        (" q24:2:hf:a/b:" + REV + ":" + "0" * 32, "does not start with 'q24:'"),
        ("q24:2:hf:a/b:" + REV + ":" + "0" * 32 + "\n", "binding must be 32"),
        ("q24:2:hf:" + "a" * 200, "over 128"),
        (b"\xff\xfe", "not UTF-8"),
        (None, "must be text"),
    ],
)
def test_parse_rejects_anything_else_with_a_reason(text, reason) -> None:
    with pytest.raises(CommitmentError, match=reason.replace("(", r"\(")):
        parse(text)
