"""The chain as the node sees it: a small interface with two implementations, the real Bittensor
SDK (`neurons.chain.bittensor_chain`) and the embedded dev chain (`neurons.chain.embedded`).

An instance is bound to one hotkey (the wallet's): `commit` and `set_weights` act as that hotkey.
Reads never need a wallet. Every failure the chain reports comes back as a `ChainError` subclass
whose message says what happened and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# A chain commitment field holds at most 128 bytes (substrate `Data::Raw128`).
MAX_COMMITMENT_BYTES = 128
U16_MAX = 65535


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    coldkey: str
    stake: float
    validator_permit: bool
    registered_block: int = 0


@dataclass(frozen=True)
class Metagraph:
    """The subnet at one block: neurons ordered by uid."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...] = ()

    @property
    def hotkeys(self) -> list[str]:
        return [n.hotkey for n in self.neurons]

    def uid_of(self, hotkey: str) -> int | None:
        return next((n.uid for n in self.neurons if n.hotkey == hotkey), None)

    def neuron(self, uid: int) -> Neuron:
        for n in self.neurons:
            if n.uid == uid:
                return n
        raise KeyError(f"no neuron with uid {uid} on subnet {self.netuid}")


@dataclass(frozen=True)
class CommitmentRecord:
    """The latest commitment of a hotkey and the block it was written in (the block decides who
    owns identical weights committed by several hotkeys: the earliest)."""

    hotkey: str
    block: int
    data: str


@dataclass(frozen=True)
class ChainLimits:
    """Rate limits in blocks, and the commitment size limit in bytes."""

    weights_rate_limit: int
    commitment_rate_limit: int
    max_commitment_bytes: int = MAX_COMMITMENT_BYTES
    seconds_per_block: float = 12.0


@dataclass(frozen=True)
class WeightsRecord:
    """Weights a validator set, as the chain stores them (u16, the largest scaled to 65535)."""

    validator_uid: int
    block: int
    weights: dict[int, int] = field(default_factory=dict)


class ChainError(RuntimeError):
    """Something the chain refused or could not do; the message says what and what to do."""


class NotRegistered(ChainError):
    pass


class NoValidatorPermit(ChainError):
    pass


class RateLimited(ChainError):
    def __init__(self, message: str, blocks_left: int):
        super().__init__(message)
        self.blocks_left = blocks_left


class CommitmentTooLarge(ChainError):
    pass


class InvalidWeights(ChainError, ValueError):
    """Weights the chain would refuse: negative, non-finite, all zero, or bad uids."""


class ChainUnavailable(ChainError):
    """The chain could not be reached (timeout, connection lost); retrying later may work."""


@runtime_checkable
class Chain(Protocol):
    netuid: int
    hotkey: str | None

    def current_block(self) -> int: ...

    def block_hash(self, block: int) -> str:
        """`0x` + 64 hex digits; the same for every reader of the same block."""
        ...

    def metagraph(self) -> Metagraph: ...

    def commitments(self) -> dict[str, CommitmentRecord]:
        """The latest commitment of every hotkey registered on the subnet that has one."""
        ...

    def commit(self, data: str) -> int:
        """Write this hotkey's commitment; returns the block it landed in."""
        ...

    def set_weights(self, weights: dict[int, float]) -> int:
        """Set this hotkey's weights by uid (non-negative, normalised by the chain); returns the block."""
        ...

    def weights(self) -> list[WeightsRecord]:
        """The latest weights of every validator on the subnet."""
        ...

    def limits(self) -> ChainLimits: ...

    def blocks_since_last_update(self, uid: int) -> int | None:
        """Blocks since `uid` last set weights (None: never; the real chain counts from registration)."""
        ...

    def close(self) -> None: ...


def as_int(value: object, what: str, error: type[ChainError] = ChainError) -> int:
    """An integer argument (ints and numpy-style integers; not bools, not floats), else `error`."""
    import operator

    if isinstance(value, bool):
        raise error(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(f"{what} must be an integer, got {value!r}") from None


def weights_to_u16(weights: dict[int, float]) -> dict[int, int]:
    """Normalise as the chain does: the largest weight becomes 65535, the rest in proportion;
    zero weights are dropped. Raises InvalidWeights for bad uids or values, or all-zero weights."""
    import math

    bad_uids = [u for u in weights if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u <= U16_MAX]
    if bad_uids:
        raise InvalidWeights(f"uids must be integers in 0..{U16_MAX}, got {bad_uids[:5]}")
    bad = {
        u: w for u, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
    }
    if bad:
        raise InvalidWeights(f"weights must be finite and non-negative, got {bad}")
    top = max(weights.values(), default=0.0)
    if top <= 0:
        raise InvalidWeights("all weights are zero: nothing to set")
    return {u: round(w / top * U16_MAX) for u, w in sorted(weights.items()) if round(w / top * U16_MAX) > 0}
