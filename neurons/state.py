"""The validator's persistent state: the moving average, the round in progress with every result
it has so far, verdicts on submissions already judged, and the owners of every checkpoint seen.

Written atomically after every change that took work to produce, so a validator killed at any
moment (SIGKILL included) resumes the same round where it stopped and loses no score. The files
are ours, but a damaged one is still refused with a clear error rather than guessed at.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quasar.files import atomic_write

STATE_FORMAT = "q24-validator-state/1"
Status = Literal["ok", "rejected", "copy", "error", "timeout", "unfit", "pending"]
MAX_ATTEMPTS = 2  # a submission the validator died judging this often is skipped for the round


class StateError(RuntimeError):
    pass


class SubmissionResult(BaseModel):
    """One hotkey's submission in one round."""

    model_config = ConfigDict(extra="forbid")

    hotkey: str
    uid: int
    block: int  # of its commitment
    data: str  # the commitment string
    status: Status
    code: str = ""  # verification code or error kind
    reason: str = ""
    content_hash: str | None = None
    copy_of: str | None = None
    kl: list[float] = Field(default_factory=list)  # per prompt
    longctx: list[float] = Field(default_factory=list)  # per sample
    seconds: float = 0.0

    @property
    def mean_kl(self) -> float | None:
        return float(np.mean(self.kl)) if self.kl else None

    @property
    def longctx_accuracy(self) -> float | None:
        return float(np.mean(self.longctx)) if self.longctx else None


class RoundState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: int
    block: int
    block_hash: str
    seed: int
    planned: list[str] = Field(default_factory=list)  # hotkeys with a commitment, in evaluation order
    results: dict[str, SubmissionResult] = Field(default_factory=dict)
    win_rates: dict[str, float] = Field(default_factory=dict)
    round_weights: dict[str, float] = Field(default_factory=dict)
    queued: int = 0  # valid submissions that found no slot this round (they come first next time)
    # "hotkey|commitment" -> times judging it started in this round (a restart mid-judgement counts)
    attempts: dict[str, int] = Field(default_factory=dict)
    scored: bool = False  # win rates computed and folded into the moving average
    weights_block: int | None = None  # when set_weights landed
    weights_error: str = ""


class Origin(BaseModel):
    """The first commitment seen for a checkpoint: its owner for copy detection, across rounds."""

    model_config = ConfigDict(extra="forbid")

    hotkey: str
    block: int


class ValidatorState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["q24-validator-state/1"] = STATE_FORMAT
    netuid: int
    hotkey: str
    moving_average: dict[str, float] = Field(default_factory=dict)
    rounds_completed: int = 0
    current: RoundState | None = None
    last: RoundState | None = None
    # "hotkey|commitment" -> a rejection that holds until the commitment changes (no re-download)
    verdicts: dict[str, SubmissionResult] = Field(default_factory=dict)
    origins: dict[str, Origin] = Field(default_factory=dict)  # content hash -> first commitment
    # "hotkey|commitment" -> the last round it was judged in (planning: least recently judged first)
    judged: dict[str, int] = Field(default_factory=dict)
    # seed of the copy-detection probe: real text only this validator knows, the same every round
    probe_seed: int = Field(default_factory=lambda: secrets.randbits(62))


M = TypeVar("M", bound=BaseModel)


def load_state_file(path: Path, model: type[M], netuid: int, hotkey: str, what: str) -> M | None:
    """A node's own state file (`model`, with `netuid` and `hotkey` fields) if it exists. A file that
    does not validate, or that belongs to another hotkey or subnet, is refused with a StateError
    that says what to do; it is never guessed at or overwritten."""
    if not path.exists():
        return None
    try:
        state = model.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as e:
        raise StateError(
            f"{path} is not a {what} file this version can read ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}); move it away to start fresh"
        ) from None
    if (state.netuid, state.hotkey) != (netuid, hotkey):
        raise StateError(
            f"{path} belongs to hotkey {state.hotkey} on subnet {state.netuid}, not {hotkey} on "
            f"{netuid}; give this node its own --root or wallet"
        )
    return state


def save_state_file(path: Path, state: BaseModel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, state.model_dump_json(indent=1) + "\n")


class StateStore:
    """`dir/state.json` plus `dir/fingerprints/real-text/<content hash>.npy` (write-once,
    content-addressed, so they are read from disk at most once per process; `real-text`: the
    probe of this version, not comparable with the uniform-token probe older versions kept)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / "state.json"
        self.fingerprints = self.dir / "fingerprints" / "real-text"
        self._fingerprints: dict[str, np.ndarray | None] = {}

    def load(self, netuid: int, hotkey: str) -> ValidatorState:
        state = load_state_file(self.path, ValidatorState, netuid, hotkey, "validator state")
        return state if state is not None else ValidatorState(netuid=netuid, hotkey=hotkey)

    def save(self, state: ValidatorState) -> None:
        save_state_file(self.path, state)

    def save_fingerprint(self, content_hash: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        path = self.fingerprints / f"{content_hash}.npy"
        if not path.exists():
            import io

            self.fingerprints.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, values, allow_pickle=False)
            atomic_write(path, buffer.getvalue())
        self._fingerprints[content_hash] = values

    def fingerprint(self, content_hash: str) -> np.ndarray | None:
        if content_hash not in self._fingerprints:
            path = self.fingerprints / f"{content_hash}.npy"
            try:
                self._fingerprints[content_hash] = (
                    np.load(path, allow_pickle=False) if path.exists() else None
                )
            except (ValueError, OSError):
                self._fingerprints[content_hash] = None
        return self._fingerprints[content_hash]
