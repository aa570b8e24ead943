"""The submission protocol: what a miner writes on chain to point at its checkpoint.

    q24:2:<store>:<repo>:<revision>:<binding>

- `q24:2` names the protocol and its version; anything else is not ours and is ignored. Version 2
  is commit-then-publish: the miner commits the pinned revision before anyone can read its weights
  (staged privately), then publishes, and validators retry a revision that is not readable yet for
  a grace period. Version 1 uploaded first: a watcher could read the fresh upload, compute the
  binding for its own hotkey and commit a pointer to the victim's revision first. It is refused.
- `store`: `hf` (Hugging Face Hub) or `local` (a directory store, for the embedded default).
- `repo`: `owner/name` on the Hub (letters, digits, `-`, `_`, `.`), or a store key for `local`.
- `revision`: the pinned commit, 40 lowercase hex digits (a git sha for `hf`, a content id for `local`).
- `binding`: the first 16 bytes, hex, of sha256(content_hash || hotkey): ties the weights to the
  committing hotkey, so a copier who re-commits someone else's upload under its own hotkey commits a
  binding that the content does not reproduce (SN9's `secure_hash` idea). It also hides the content
  hash: before publication, nobody else can compute a valid binding for these weights.

Everything fits the chain's 128-byte commitment field. Parsing is strict: one exact shape, no
whitespace, no extra fields; a commitment that does not parse is ignored with the reason logged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from neurons.chain.base import MAX_COMMITMENT_BYTES

PREFIX = "q24"
VERSION = "2"
RETIRED_VERSIONS = {"1": "upload, then commit: its fresh uploads could be front-run"}
STORES = ("hf", "local")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,38}/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LOCAL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CommitmentError(ValueError):
    """A commitment that is not a valid q24 submission; the message says why."""


def binding_hash(content_hash: str, hotkey: str) -> str:
    """sha256(content_hash || hotkey), first 16 bytes as hex. `content_hash` is the checkpoint's
    64-hex sha256 (see `neurons.store.content_hash`)."""
    if not isinstance(content_hash, str) or not _HEX64.fullmatch(content_hash):
        raise ValueError(f"content hash must be 64 lowercase hex digits, got {content_hash!r}")
    if not hotkey:
        raise ValueError("hotkey is empty")
    return hashlib.sha256(bytes.fromhex(content_hash) + hotkey.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Commitment:
    store: Literal["hf", "local"]
    repo: str
    revision: str
    binding: str

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise CommitmentError(f"unknown store {self.store!r}; expected one of {', '.join(STORES)}")
        pattern = _REPO if self.store == "hf" else _LOCAL_KEY
        if not isinstance(self.repo, str) or not pattern.fullmatch(self.repo) or ".." in self.repo:
            shape = "owner/name" if self.store == "hf" else "a key of letters, digits, '-', '_', '.'"
            raise CommitmentError(f"repo {self.repo!r} is not a valid {self.store} repository ({shape})")
        if not isinstance(self.revision, str) or not _HEX40.fullmatch(self.revision):
            raise CommitmentError(
                f"revision must be 40 lowercase hex digits (a pinned commit), got {self.revision!r}"
            )
        if not isinstance(self.binding, str) or not _HEX32.fullmatch(self.binding):
            raise CommitmentError(f"binding must be 32 lowercase hex digits, got {self.binding!r}")
        size = len(self.encode().encode())
        if size > MAX_COMMITMENT_BYTES:
            raise CommitmentError(
                f"commitment is {size} bytes, over the chain's {MAX_COMMITMENT_BYTES}: "
                f"use a repository name at most {len(self.repo) - (size - MAX_COMMITMENT_BYTES)} characters long"
            )

    def encode(self) -> str:
        return ":".join((PREFIX, VERSION, self.store, self.repo, self.revision, self.binding))

    def binds(self, content_hash: str, hotkey: str) -> bool:
        """Whether this commitment's binding is what `hotkey` committing `content_hash` gives."""
        return binding_hash(content_hash, hotkey) == self.binding

    @classmethod
    def for_checkpoint(
        cls, store: str, repo: str, revision: str, content_hash: str, hotkey: str
    ) -> Commitment:
        return cls(store, repo, revision, binding_hash(content_hash, hotkey))  # type: ignore[arg-type]


def parse(data: object) -> Commitment:
    """The commitment in `data`, or CommitmentError saying why it is not one."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommitmentError("commitment is not UTF-8 text") from None
    if not isinstance(data, str):
        raise CommitmentError(f"commitment must be text, got {type(data).__name__}")
    if len(data.encode()) > MAX_COMMITMENT_BYTES:
        raise CommitmentError(f"commitment is {len(data.encode())} bytes, over {MAX_COMMITMENT_BYTES}")
    parts = data.split(":")
    if len(parts) < 2 or parts[0] != PREFIX:
        raise CommitmentError("not a q24 commitment (it does not start with 'q24:')")
    if parts[1] in RETIRED_VERSIONS:
        raise CommitmentError(
            f"q24 protocol version {parts[1]} is retired ({RETIRED_VERSIONS[parts[1]]}); upgrade the "
            f"miner: it commits version {VERSION} before publishing the weights"
        )
    if parts[1] != VERSION:
        raise CommitmentError(
            f"unsupported q24 protocol version {parts[1]!r}; this node reads version {VERSION}"
        )
    if len(parts) != 6:
        raise CommitmentError(
            f"expected 6 ':'-separated fields (q24:2:store:repo:revision:binding), got {len(parts)}"
        )
    _, _, store, repo, revision, binding = parts
    return Commitment(store, repo, revision, binding)  # type: ignore[arg-type]
