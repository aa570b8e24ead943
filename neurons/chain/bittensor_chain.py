"""The real chain: the `Chain` interface on the Bittensor SDK (bittensor 11.3.0, pinned exactly).

How it talks to the chain:

- **One long-lived connection.** An instance owns one background thread running an asyncio loop,
  and on it one SDK `bt.Client` over one `Substrate` backend (`bt.RpcSubstrate` for a real
  network, or the object passed as `substrate=`, which is how the tests inject a double). It is
  opened on first use and replaced as a whole only on reconnect: never a client per call, which
  leaks sockets and memory on long runs.
- **Every SDK call goes through `_run`.** It applies `timeout_s` to each attempt (the coroutine is
  cancelled on the loop; a loop that ignores cancellation is abandoned and replaced), retries
  connection failures and timeouts `retries` times with exponential backoff (`backoff_s`, doubling),
  reconnects after two failures in a row, and raises `ChainUnavailable` once the attempts are
  spent. Chain-side refusals are never retried; they are mapped to our errors (`_RULES`).
- **Freshness watchdog.** Every read that learns the head block reports it. When the head has not
  advanced for `max_block_age_s` (a node that answers but stopped importing blocks, or a
  half-open socket behind a cache) the connection is dropped and reopened, and the read is repeated
  on the new one.
- **Writes are not blindly repeated.** A write whose reply was lost (timeout, dropped socket) may
  have landed. Before trying again, the chain is read to see whether it did (commitment: our bytes
  at a block after the first attempt; weights: `LastUpdate` moved), and if so that block is
  returned instead of submitting twice.

Reads need no private key; writes sign with the wallet's hotkey only (the coldkey is never opened).
Commitments are one plain `Raw` field (at most `MAX_COMMITMENT_BYTES`, checked before
submitting). Weights go through the SDK's `SetWeights` intent, which preflights registration and
the rate limit and picks the plain or the timelocked commit-reveal path from the subnet's settings.

The chain exposes no block rate limit for commitments any more, only a byte quota per epoch
(`Commitments.MaxSpace`, each commit charged at least 100 bytes; `SpaceLimitExceeded` when used
up). `limits().commitment_rate_limit` is therefore derived: `COMMITMENT_RATE_LIMIT_BLOCKS` (the
former pallet's limit), or more when the quota allows fewer full-size commits per epoch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import bittensor as bt
from bittensor import settings as bt_settings
from bittensor.sp_core import KeyfileError

from neurons.chain.base import (
    MAX_COMMITMENT_BYTES,
    U16_MAX,
    ChainError,
    ChainLimits,
    ChainUnavailable,
    CommitmentRecord,
    CommitmentTooLarge,
    InvalidWeights,
    Metagraph,
    Neuron,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    WeightsRecord,
    as_int,
    weights_to_u16,
)

log = logging.getLogger("neurons.chain.bittensor")

# Blocks between commitments when the chain gives nothing better (the Commitments pallet's former
# `RateLimit`; the chain now meters bytes per epoch instead, see the module docstring).
COMMITMENT_RATE_LIMIT_BLOCKS = 100
# Failures in a row (timeouts, connection errors) after which the connection is replaced.
RECONNECT_AFTER_FAILURES = 2
# Seconds allowed to close a connection being replaced or shut down.
CLOSE_TIMEOUT_S = 5.0
# Extra seconds to wait for an attempt after its timeout before the loop counts as wedged.
_GRACE_S = 2.0
SECONDS_PER_BLOCK = 12.0

_T = TypeVar("_T")
# An operation: a coroutine function of the SDK client and its substrate backend.
_Op = Callable[[Any, Any], Awaitable[_T]]


# -- rejections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """How one kind of SDK refusal maps to our errors. A rule matches on the SDK's exact chain error
    name, its semantic `ErrorCode` value, or (for pool rejections, which carry no name) a regex over
    the message. `advice` is formatted with `hotkey`, `netuid` and `network`."""

    error: type[ChainError]
    advice: str
    names: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()
    pattern: str | None = None

    def matches(self, name: str | None, code: str | None, message: str) -> bool:
        if name is not None and name in self.names:
            return True
        if code is not None and code in self.codes:
            return True
        return self.pattern is not None and re.search(self.pattern, message, re.IGNORECASE) is not None


# Checked in order, first match wins: the SDK classifies "Priority is too low" as rate limited, so
# the transient pool rejections must come before the rate-limit rule. Extend here.
_RULES: tuple[_Rule, ...] = (
    _Rule(
        ChainUnavailable,
        "the transaction pool turned the extrinsic away (another one from this key is pending, or "
        "its nonce is stale); this is transient: retry in a block or two",
        names=frozenset({"PriorityTooLow", "Stale"}),
        pattern=r"priority is too low|transaction is outdated|\b1014\b",
    ),
    _Rule(
        NoValidatorPermit,
        "hotkey {hotkey} has no validator permit on subnet {netuid}: permits go to the neurons with "
        "the most stake and are recomputed every epoch; add stake, or wait for the next epoch",
        names=frozenset({"NeuronNoValidatorPermit"}),
        pattern=r"validator permit",
    ),
    _Rule(
        NotRegistered,
        "hotkey {hotkey} is not registered on subnet {netuid} of {network}; register it first "
        "(`btcli subnets register --netuid {netuid}`)",
        names=frozenset(
            {
                "HotKeyNotRegisteredInSubNet",
                "HotKeyNotRegisteredInNetwork",
                "HotKeyAccountNotExists",
                "AccountNotAllowedCommit",
            }
        ),
        codes=frozenset({"not_registered"}),
        pattern=r"not registered",
    ),
    _Rule(
        CommitmentTooLarge,
        "the commitment byte quota of hotkey {hotkey} on subnet {netuid} is used up for this epoch "
        "(each commitment is charged at least 100 bytes); wait for the next epoch",
        names=frozenset({"SpaceLimitExceeded"}),
    ),
    _Rule(
        InvalidWeights,
        "the chain refused these weights for subnet {netuid} (uids, count or size)",
        names=frozenset(
            {
                "WeightVecLengthIsLow",
                "UidVecContainInvalidOne",
                "DuplicateUids",
                "WeightVecNotEqualSize",
                "MaxWeightExceeded",
                "UidsLengthExceedUidsInSubNet",
            }
        ),
        pattern=r"requires at least \d+ weights",
    ),
    _Rule(
        RateLimited,
        "too soon: the chain's rate limit for hotkey {hotkey} on subnet {netuid} has not passed",
        names=frozenset(
            {
                "SettingWeightsTooFast",
                "CommittingWeightsTooFast",
                "RateLimitExceeded",
                "CommitmentSetRateLimitExceeded",
            }
        ),
        codes=frozenset({"rate_limited"}),
        pattern=r"too soon|rate limit|too fast",
    ),
)

_RETRY_IN = re.compile(r"retry in ~?(\d+) blocks?", re.IGNORECASE)
# Chain errors from the SDK that are really a lost connection (the transport reports some as
# request failures).
_CONNECTIONISH = re.compile(
    r"connection|timed? ?out|no response|closed|unreachable|could not connect", re.IGNORECASE
)
_NOT_NETWORK_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _is_connection_failure(error: BaseException) -> bool:
    """Whether `error` means the chain could not be reached (worth another attempt)."""
    if isinstance(error, (_LoopWedged, TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)):
        return True
    if isinstance(error, (bt.RpcConnectionError, bt.ConnectionNotReady, ConnectionError)):
        return True
    if isinstance(error, OSError):
        return not isinstance(error, _NOT_NETWORK_OSERRORS)
    if isinstance(error, bt.ChainError):
        # Unnamed and about the connection: the transport's report of a dropped socket (for writes
        # too; `_run` checks whether an earlier attempt landed before sending again).
        return error.name is None and _CONNECTIONISH.search(str(error)) is not None
    return False


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no answer"
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)):
        return "timed out"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _LoopWedged(Exception):
    """An attempt outlived its timeout because the event loop did not let it be cancelled."""


class _BadRow(Exception):
    """A commitment row that is not one of ours: skipped, with this reason logged."""


# -- decoding ----------------------------------------------------------------------------------------


def _field_bytes(value: Any) -> bytes:
    """The bytes of one decoded `Raw` field: 0x-hex text (what the SDK hands over), bytes, or a list
    of byte values."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            raise _BadRow(f"its Raw field is not hex: {value[:40]!r}") from None
    if isinstance(value, (list, tuple)):
        try:
            return bytes(value)
        except (TypeError, ValueError):
            raise _BadRow("its Raw field is not a list of byte values") from None
    raise _BadRow(f"its Raw field is a {type(value).__name__}")


def _decode_commitment(hotkey: str, record: Any) -> CommitmentRecord:
    """One `Commitments.CommitmentOf` record (`{"block", "deposit", "info": {"fields": [...]}}`) as
    a CommitmentRecord, or `_BadRow` saying why it is not a plain text commitment."""
    if not isinstance(record, Mapping):
        raise _BadRow(f"the record is a {type(record).__name__}, not a mapping")
    block = record.get("block")
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise _BadRow(f"bad block {block!r}")
    info = record.get("info")
    fields = info.get("fields") if isinstance(info, Mapping) else None
    if not isinstance(fields, (list, tuple)) or not fields:
        raise _BadRow("it has no fields")
    # Tolerate one level of nesting: the call takes `[[field]]`, storage decodes to `[field]`.
    flat = [f for entry in fields for f in (entry if isinstance(entry, (list, tuple)) else [entry])]
    payload = b""
    for entry in flat:
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise _BadRow(f"unexpected field {str(entry)[:60]}")
        ((variant, value),) = entry.items()
        size = re.fullmatch(r"Raw(\d+)", str(variant))
        if size is None:
            raise _BadRow(f"it holds a {variant} field, not plain bytes (timelocked or hashed)")
        raw = _field_bytes(value)
        if len(raw) != int(size.group(1)):
            raise _BadRow(f"its {variant} field holds {len(raw)} bytes")
        payload += raw
    if len(payload) > MAX_COMMITMENT_BYTES:
        raise _BadRow(f"it is {len(payload)} bytes, more than {MAX_COMMITMENT_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRow("its bytes are not UTF-8") from None
    return CommitmentRecord(hotkey=hotkey, block=block, data=text)


def _commitment_bytes(data: Any) -> bytes:
    if not isinstance(data, str):
        raise ChainError(f"commitment data must be a str, got {type(data).__name__}")
    try:
        payload = data.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChainError(f"commitment data is not encodable as UTF-8: {e}") from None
    if len(payload) > MAX_COMMITMENT_BYTES:
        raise CommitmentTooLarge(
            f"commitment is {len(payload)} bytes in UTF-8; the chain holds at most {MAX_COMMITMENT_BYTES}"
        )
    return payload


def _check_hash(value: Any, block: int) -> str:
    text = ("0x" + bytes(value).hex()) if isinstance(value, (bytes, bytearray)) else str(value)
    if re.fullmatch(r"0x[0-9a-fA-F]{64}", text) is None:
        raise ChainError(f"the chain returned a malformed hash for block {block}: {text[:80]!r}")
    return text.lower()


def _included_at(result: Any) -> int | None:
    """The block an extrinsic landed in, from its `"<block>-<index>"` id."""
    height, _, _ = str(getattr(result, "extrinsic_id", None) or "").partition("-")
    return int(height) if height.isdigit() else None


def _commitment_rate_limit(max_space: Any, tempo: Any) -> int:
    """Blocks between full-size commitments that stay within the per-epoch byte quota."""
    try:
        space, tempo = int(max_space), int(tempo)
    except (TypeError, ValueError):
        return COMMITMENT_RATE_LIMIT_BLOCKS
    if space <= 0 or tempo <= 0:
        return COMMITMENT_RATE_LIMIT_BLOCKS
    per_epoch = space // MAX_COMMITMENT_BYTES
    spacing = tempo if per_epoch == 0 else math.ceil(tempo / per_epoch)
    return max(COMMITMENT_RATE_LIMIT_BLOCKS, spacing)


# -- the connection ----------------------------------------------------------------------------------


class _Connection:
    """One event loop thread, one SDK client, one substrate backend; replaced as a whole."""

    def __init__(self, substrate: Any, network: str, generation: int):
        self.substrate = substrate
        self.client = bt.Client(network, substrate=substrate)
        self.generation = generation
        self.connected = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=f"bittensor-chain-{generation}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def run(self, op: _Op[_T], timeout: float) -> _T:
        async def attempt() -> _T:
            if not self.connected:
                await self.substrate.connect()
                self.connected = True
            return await op(self.client, self.substrate)

        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(attempt(), timeout), self.loop)
        try:
            return future.result(timeout + _GRACE_S)
        except concurrent.futures.TimeoutError:
            if future.done():  # the attempt's own timeout (the same exception type on 3.11+)
                raise
            # Our wait ran out before the attempt's: the loop did not let the call be cancelled.
            future.cancel()
            raise _LoopWedged(
                f"no answer within {timeout:g} s, and the call could not be cancelled"
            ) from None

    def shutdown(self) -> None:
        if self.connected and self.thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self.substrate.close(), CLOSE_TIMEOUT_S), self.loop
            )
            try:
                closing.result(CLOSE_TIMEOUT_S + _GRACE_S)
            except BaseException as e:
                closing.cancel()
                log.debug("closing the chain connection failed: %s", _describe(e))
        self.connected = False
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(_GRACE_S)


# -- the chain -----------------------------------------------------------------------------------------


class BittensorChain:
    """Subnet `netuid` of a Bittensor network, seen through the SDK and acting as one wallet hotkey.

    `network` is a name the SDK knows (`finney`, `test`, `local`, ...); `chain_endpoint` (a `ws://`
    or `wss://` URL) overrides it. `substrate` and `wallet` are test seams: a `bt.Substrate`
    implementation to use instead of the websocket backend, and an already built `bt.Wallet`.
    Nothing touches the network until the first call.
    """

    def __init__(
        self,
        netuid: int,
        *,
        network: str = "finney",
        chain_endpoint: str | None = None,
        wallet_name: str = "default",
        wallet_hotkey: str = "default",
        wallet_path: str = "~/.bittensor/wallets",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 2.0,
        max_block_age_s: float = 120.0,
        substrate: Any = None,
        wallet: Any = None,
    ):
        self.netuid = as_int(netuid, "netuid")
        if not 0 <= self.netuid <= 0xFFFF:
            raise ChainError(f"netuid must be in 0..65535, got {self.netuid}")
        for what, value in (("timeout_s", timeout_s), ("max_block_age_s", max_block_age_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ChainError(f"{what} must be a number of seconds > 0, got {value!r}")
        if isinstance(backoff_s, bool) or not isinstance(backoff_s, (int, float)) or not backoff_s >= 0:
            raise ChainError(f"backoff_s must be a number of seconds >= 0, got {backoff_s!r}")
        self.retries = as_int(retries, "retries")
        if self.retries < 0:
            raise ChainError(f"retries must be >= 0, got {retries}")
        self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
        self.max_block_age_s = float(max_block_age_s)

        if chain_endpoint is not None and not str(chain_endpoint).startswith(("ws://", "wss://")):
            raise ChainError(f"chain_endpoint must be a ws:// or wss:// URL, got {chain_endpoint!r}")
        try:
            self.network, self.endpoint = bt_settings.resolve_endpoint(chain_endpoint or network)
        except ValueError as e:
            raise ChainError(f"unknown network {network!r}: {e}") from None
        self._injected_substrate = substrate

        if wallet is None:
            wallet = bt.Wallet(wallet_name, wallet_hotkey, path=str(Path(wallet_path).expanduser()))
        self._wallet = wallet
        self._hotkey: str | None = None

        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._generation = 0
        self._closed = False
        # Freshness watchdog: the newest head seen, when it last advanced, and a pending alarm.
        self._head: int | None = None
        self._head_moved_at = 0.0
        self._stale: str | None = None

    # -- identity ------------------------------------------------------------------------------------

    @property
    def hotkey(self) -> str:
        """The ss58 address of the wallet's hotkey, read from its public file (nothing unlocked).

        A missing wallet raises `ChainError` (which is also an `AttributeError`, so `getattr(chain,
        "hotkey", None)` gives None) saying where the file was expected and how to create it."""
        if self._hotkey is None:
            self._hotkey = self._read_hotkey()
        return self._hotkey

    def _read_hotkey(self) -> str:
        wallet = self._wallet
        try:
            try:
                keypair = wallet.hotkeypub
            except (AttributeError, FileNotFoundError):
                keypair = wallet.hotkey
            return str(keypair.ss58_address)
        except FileNotFoundError:
            name, hotkey = getattr(wallet, "name", "?"), getattr(wallet, "hotkey_str", "?")
            root = Path(str(getattr(wallet, "path", "."))).expanduser()
            raise _WalletMissing(
                f"no hotkey file at {root / str(name) / 'hotkeys' / str(hotkey)}: create it with "
                f"`btcli wallet new-hotkey --wallet {name} --wallet-hotkey {hotkey} --wallet-path {root}` "
                "(or pass wallet_name / wallet_hotkey / wallet_path for an existing one)"
            ) from None
        except Exception as e:
            raise _WalletMissing(f"cannot read the hotkey of wallet {wallet!r}: {e}") from e

    # -- connection ----------------------------------------------------------------------------------

    def _connection(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise ChainError(f"this BittensorChain ({self.endpoint}) is closed")
            if self._conn is None:
                self._generation += 1
                substrate = self._injected_substrate
                if substrate is None:
                    substrate = bt.RpcSubstrate(
                        self.endpoint,
                        fallback_endpoints=[
                            url
                            for url in bt_settings.default_fallback_endpoints(self.network)
                            if url != self.endpoint
                        ],
                        archive_endpoints=bt_settings.default_archive_endpoints(self.network),
                    )
                self._conn = _Connection(substrate, self.network, self._generation)
            return self._conn

    def _reconnect(self, conn: _Connection, why: str) -> None:
        """Drop `conn` (if it is still the current one) so the next call opens a fresh connection."""
        with self._lock:
            if self._conn is not conn:
                return  # another thread already replaced it
            self._conn = None
            self._head_moved_at = time.monotonic()  # give the new connection a full window
            self._stale = None
        log.warning("reconnecting to %s (connection %d): %s", self.endpoint, conn.generation, why)
        conn.shutdown()

    def _observe(self, block: int) -> None:
        """Freshness watchdog: note the head block a read saw; raise the alarm when it is stuck."""
        now = time.monotonic()
        with self._lock:
            if self._head is None or block > self._head:
                self._head, self._head_moved_at = block, now
            elif now - self._head_moved_at > self.max_block_age_s:
                self._stale = (
                    f"the head block has stayed at {self._head} for {now - self._head_moved_at:.1f} s "
                    f"(more than max_block_age_s={self.max_block_age_s:g})"
                )

    def _take_stale(self) -> str | None:
        with self._lock:
            stale, self._stale = self._stale, None
            return stale

    def _run(
        self,
        what: str,
        op: _Op[_T],
        *,
        write: bool = False,
        landed: _Op[int | None] | None = None,
        blocks_left: Callable[[], int | None] | None = None,
    ) -> _T:
        """Run `op` on the connection with a timeout per attempt, retries with exponential backoff on
        connection failures, reconnects, and the watchdog; map what the chain refuses."""
        attempts = self.retries + 1
        failures = 0
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.info("%s: retrying in %.2f s (attempt %d of %d)", what, delay, attempt + 1, attempts)
                time.sleep(delay)
                if landed is not None:
                    block = self._try_once(f"{what} (did it land?)", landed)
                    if block is not None:
                        log.info(
                            "%s: the earlier attempt landed at block %d; not submitting again", what, block
                        )
                        return block  # type: ignore[return-value]
            conn = self._connection()
            try:
                result = conn.run(op, self.timeout_s)
            except Exception as e:
                if not _is_connection_failure(e):
                    raise self._translate(what, e, blocks_left) from e
                last, failures = e, failures + 1
                log.warning("%s: attempt %d of %d failed: %s", what, attempt + 1, attempts, _describe(e))
                if failures >= RECONNECT_AFTER_FAILURES or isinstance(e, _LoopWedged):
                    failures = 0
                    self._reconnect(conn, f"{what} failed: {_describe(e)}")
                continue
            stale = self._take_stale()
            if stale is None:
                return result
            self._reconnect(conn, stale)
            if write or attempt == attempts - 1:
                return result
            log.info("%s: reading again on the new connection", what)
        raise ChainUnavailable(
            f"{what}: no answer from the chain at {self.endpoint} after {attempts} attempt(s) "
            f"(last: {_describe(last)}); check the node and the network, or raise timeout_s/retries"
        ) from last

    def _try_once(self, what: str, op: _Op[_T]) -> _T | None:
        """One attempt of a best-effort read; None when it fails for any reason."""
        try:
            return self._connection().run(op, self.timeout_s)
        except Exception as e:
            log.debug("%s: %s", what, _describe(e))
            return None

    def _translate(
        self, what: str, error: BaseException, blocks_left: Callable[[], int | None] | None
    ) -> ChainError:
        """Our error for something the SDK raised (the first matching rule of `_RULES`)."""
        if isinstance(error, ChainError):
            return error
        if isinstance(error, (*_NOT_NETWORK_OSERRORS, KeyfileError)):
            return ChainError(f"{what}: cannot use wallet {self._wallet!r}: {error}")
        if not isinstance(error, bt.ChainError):
            if isinstance(error, bt.BittensorError):
                return ChainError(f"{what}: {error}")
            return ChainError(f"{what} failed: {_describe(error)}")
        message = str(getattr(error, "message", None) or error)
        name = getattr(error, "name", None)
        code = getattr(getattr(error, "code", None), "value", None)
        for rule in _RULES:
            if not rule.matches(name, code, message):
                continue
            advice = rule.advice.format(
                hotkey=self._hotkey or "(this hotkey)", netuid=self.netuid, network=self.network
            )
            chain_said = f"{name}: {message}" if name else message
            text = f"{what} refused: {advice} (chain: {chain_said})"
            if rule.error is RateLimited:
                left = _RETRY_IN.search(message)
                count = int(left.group(1)) if left else (blocks_left() if blocks_left else None)
                text += f"; {count} blocks left" if count is not None else "; blocks left unknown"
                log.warning("%s", text)
                return RateLimited(text, blocks_left=max(1, count) if count is not None else 1)
            log.warning("%s", text)
            return rule.error(text)
        text = f"{what} refused by the chain: {f'{name}: ' if name else ''}{message}"
        log.warning("%s", text)
        return ChainError(text)

    # -- reads -----------------------------------------------------------------------------------------

    async def _head_view(self, client: Any) -> Any:
        """A snapshot of the client pinned to the current head (reported to the watchdog)."""
        view = await client.at()
        self._observe(int(view.block))
        return view

    def current_block(self) -> int:
        async def op(client: Any, substrate: Any) -> int:
            block = int(await client.block())
            self._observe(block)
            return block

        return self._run("current_block", op)

    def block_hash(self, block: int) -> str:
        block = as_int(block, "block")
        if block < 0:
            raise ChainError(f"block must be >= 0, got {block}")

        async def op(client: Any, substrate: Any) -> str:
            head = int(await client.block())
            self._observe(head)
            if block > head:
                raise ChainError(f"block {block} is in the future (current block {head}); wait for it")
            return _check_hash(await substrate.block_hash(block), block)

        return self._run(f"block_hash({block})", op)

    def metagraph(self) -> Metagraph:
        async def op(client: Any, substrate: Any) -> Metagraph:
            view = await self._head_view(client)
            graph = await view.subnets.metagraph(self.netuid, commitments=False)
            if graph is None:
                raise ChainError(f"subnet {self.netuid} does not exist on {self.network} ({self.endpoint})")
            neurons = tuple(
                Neuron(
                    uid=int(n.uid),
                    hotkey=str(n.hotkey),
                    coldkey=str(n.coldkey),
                    # The subnet stake weight in its own token units (rao / 1e9): what permits follow.
                    stake=float(n.total_stake.amount),
                    validator_permit=bool(n.validator_permit),
                    registered_block=int(n.block_at_registration),
                )
                for n in graph.neurons
            )
            return Metagraph(netuid=self.netuid, block=int(graph.block), neurons=neurons)

        return self._run("metagraph", op)

    def commitments(self) -> dict[str, CommitmentRecord]:
        """The latest plain commitment of every registered hotkey, ordered by uid. Rows that are not
        plain UTF-8 commitments (timelocked, hashed, malformed) are skipped one by one, each with a
        logged reason; if the storage map cannot be read as a whole, hotkeys are read one at a time."""

        async def op(client: Any, substrate: Any) -> dict[str, CommitmentRecord]:
            view = await self._head_view(client)
            uids = {
                str(hk): int(uid)
                for hk, uid in await view.query_map(bt.storage.SubtensorModule.Uids, [self.netuid])
            }
            try:
                rows = await view.query_map(bt.storage.Commitments.CommitmentOf, [self.netuid])
            except (bt.ChainError, ValueError, TypeError, KeyError) as e:
                if _is_connection_failure(e):
                    raise
                log.warning(
                    "commitments on subnet %d: cannot read the map at once (%s); reading hotkey by hotkey",
                    self.netuid,
                    _describe(e),
                )
                rows = await self._commitments_one_by_one(view, sorted(uids, key=uids.__getitem__))
            found: dict[str, CommitmentRecord] = {}
            for key, record in rows:
                hotkey = str(key[0] if isinstance(key, (tuple, list)) and len(key) == 1 else key)
                if hotkey not in uids:
                    continue  # left behind by a hotkey that is no longer registered
                try:
                    found[hotkey] = _decode_commitment(hotkey, record)
                except _BadRow as why:
                    log.warning(
                        "skipping the commitment of %s (uid %d) on subnet %d: %s",
                        hotkey,
                        uids[hotkey],
                        self.netuid,
                        why,
                    )
            return dict(sorted(found.items(), key=lambda item: uids[item[0]]))

        return self._run("commitments", op)

    async def _commitments_one_by_one(self, view: Any, hotkeys: list[str]) -> list[tuple[str, Any]]:
        results = await asyncio.gather(
            *(view.query(bt.storage.Commitments.CommitmentOf, [self.netuid, hk]) for hk in hotkeys),
            return_exceptions=True,
        )
        rows = []
        for hotkey, result in zip(hotkeys, results):
            if isinstance(result, BaseException):
                if _is_connection_failure(result) or not isinstance(result, Exception):
                    raise result
                log.warning(
                    "skipping the commitment of %s on subnet %d: cannot read it (%s)",
                    hotkey,
                    self.netuid,
                    _describe(result),
                )
            elif result is not None:
                rows.append((hotkey, result))
        return rows

    def weights(self) -> list[WeightsRecord]:
        async def op(client: Any, substrate: Any) -> list[WeightsRecord]:
            view = await self._head_view(client)
            # Mechanism 0 is stored under the netuid itself.
            rows = await view.query_map(bt.storage.SubtensorModule.Weights, [self.netuid])
            last_update = await view.query(bt.storage.SubtensorModule.LastUpdate, [self.netuid]) or []
            records = []
            for key, row in rows:
                try:
                    uid = as_int(key[0] if isinstance(key, (tuple, list)) else key, "uid")
                    values = {as_int(d, "uid"): as_int(w, "weight") for d, w in row or []}
                except (ChainError, TypeError, ValueError) as e:
                    log.warning("skipping a weights row on subnet %d: %s", self.netuid, e)
                    continue
                values = {d: w for d, w in sorted(values.items()) if 0 < w <= U16_MAX}
                if values:
                    block = int(last_update[uid]) if uid < len(last_update) else int(view.block)
                    records.append(WeightsRecord(validator_uid=uid, block=block, weights=values))
            return sorted(records, key=lambda r: r.validator_uid)

        return self._run("weights", op)

    def limits(self) -> ChainLimits:
        async def op(client: Any, substrate: Any) -> ChainLimits:
            view = await self._head_view(client)
            rate = await view.hyperparameters.weights_rate_limit(self.netuid)
            max_space = await view.query(bt.storage.Commitments.MaxSpace)
            tempo = await view.query(bt.storage.SubtensorModule.Tempo, [self.netuid])
            try:
                seconds = float(await client.block_time())
            except (bt.BittensorError, TypeError, ValueError) as e:
                if _is_connection_failure(e):
                    raise
                log.debug("block time unknown (%s); assuming %g s", e, SECONDS_PER_BLOCK)
                seconds = SECONDS_PER_BLOCK
            return ChainLimits(
                weights_rate_limit=int(rate),
                commitment_rate_limit=_commitment_rate_limit(max_space, tempo),
                max_commitment_bytes=MAX_COMMITMENT_BYTES,
                seconds_per_block=seconds if seconds > 0 else SECONDS_PER_BLOCK,
            )

        return self._run("limits", op)

    def blocks_since_last_update(self, uid: int) -> int | None:
        uid = as_int(uid, "uid")

        async def op(client: Any, substrate: Any) -> int | None:
            view = await self._head_view(client)
            return await view.epochs.blocks_since_last_update(self.netuid, uid)

        return self._run(f"blocks_since_last_update({uid})", op)

    # -- writes --------------------------------------------------------------------------------------

    async def _inclusion_block(self, client: Any, result: Any) -> int:
        result.raise_for_failure()
        block = _included_at(result)
        if block is None:
            block = int(await client.block())
            log.debug("the result carries no inclusion block; using the head, %d", block)
        return block

    def commit(self, data: str) -> int:
        payload = _commitment_bytes(data)
        hotkey = self.hotkey
        # One plain field, `Raw<n>` with n the exact byte count; the call takes a list of field lists.
        call = bt.calls.Commitments.set_commitment(
            netuid=self.netuid, info={"fields": [[{f"Raw{len(payload)}": payload}]]}
        )
        first: dict[str, int] = {}

        async def op(client: Any, substrate: Any) -> int:
            first.setdefault("head", int(await client.block()))
            result = await client.submit_call(
                call, self._wallet, signer="hotkey", wait_for_inclusion=True, wait_for_finalization=False
            )
            return await self._inclusion_block(client, result)

        async def landed(client: Any, substrate: Any) -> int | None:
            if "head" not in first:
                return None
            record = await client.query(bt.storage.Commitments.CommitmentOf, [self.netuid, hotkey])
            try:
                found = _decode_commitment(hotkey, record)
            except _BadRow:
                return None
            return found.block if found.data == data and found.block > first["head"] else None

        block = self._run("commit", op, write=True, landed=landed)
        log.info(
            "committed %d bytes as %s on subnet %d at block %d", len(payload), hotkey, self.netuid, block
        )
        return block

    def set_weights(self, weights: dict[int, float]) -> int:
        """Raises `InvalidWeights` (from `weights_to_u16`) for negative, non-finite or all-zero weights
        before anything is sent. The SDK then picks the plain or the commit-reveal path."""
        if not isinstance(weights, Mapping):
            raise InvalidWeights(f"weights must be a {{uid: weight}} mapping, got {type(weights).__name__}")
        u16 = weights_to_u16({as_int(u, "uid", InvalidWeights): w for u, w in weights.items()})
        hotkey = self.hotkey
        intent = bt.SetWeights(netuid=self.netuid, weights={uid: float(v) for uid, v in u16.items()})
        first: dict[str, Any] = {}

        async def op(client: Any, substrate: Any) -> int:
            first.setdefault("head", int(await client.block()))
            result = await client.execute(
                intent, self._wallet, wait_for_inclusion=True, wait_for_finalization=False
            )
            block = await self._inclusion_block(client, result)
            first["reveal_round"] = (getattr(result, "data", None) or {}).get("reveal_round")
            return block

        async def landed(client: Any, substrate: Any) -> int | None:
            if "head" not in first:
                return None
            uid = await client.query(bt.storage.SubtensorModule.Uids, [self.netuid, hotkey])
            last = await client.query(bt.storage.SubtensorModule.LastUpdate, [self.netuid]) or []
            if uid is None or int(uid) >= len(last) or int(last[int(uid)]) <= first["head"]:
                return None
            return int(last[int(uid)])

        block = self._run(
            "set_weights",
            op,
            write=True,
            landed=landed,
            blocks_left=lambda: self._weights_blocks_left(hotkey),
        )
        if first.get("reveal_round") is not None:
            log.info(
                "committed weights for %d uids as %s on subnet %d at block %d (commit-reveal: the chain "
                "reveals them at drand round %s)",
                len(u16),
                hotkey,
                self.netuid,
                block,
                first["reveal_round"],
            )
        else:
            log.info(
                "set weights for %d uids as %s on subnet %d at block %d", len(u16), hotkey, self.netuid, block
            )
        return block

    def _weights_blocks_left(self, hotkey: str) -> int | None:
        """Best effort: blocks until `hotkey` may set weights again."""

        async def op(client: Any, substrate: Any) -> int | None:
            view = await client.at()
            uid = await view.query(bt.storage.SubtensorModule.Uids, [self.netuid, hotkey])
            rate = await view.query(bt.storage.SubtensorModule.WeightsSetRateLimit, [self.netuid])
            last = await view.query(bt.storage.SubtensorModule.LastUpdate, [self.netuid]) or []
            if uid is None or rate is None or int(uid) >= len(last):
                return None
            return max(1, int(rate) - (int(view.block) - int(last[int(uid)])))

        return self._try_once("rate limit lookup", op)

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.shutdown()

    def __enter__(self) -> BittensorChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BittensorChain(netuid={self.netuid}, network={self.network!r}, endpoint={self.endpoint!r})"


class _WalletMissing(ChainError, AttributeError):
    """The wallet's hotkey cannot be read. An AttributeError too, so that `hasattr`/`getattr` with a
    default (and `isinstance(chain, Chain)`) treat the hotkey as absent instead of blowing up."""
