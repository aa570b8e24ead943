"""The embedded dev chain: a `Chain` that lives in one SQLite file, for offline runs and tests.

Why it looks like this:

- **Several processes share it.** A dev run starts a miner and a validator (and tests start
  several workers) against the same chain, so the state is a SQLite file in WAL mode: readers never
  block, and every write is one `BEGIN IMMEDIATE` transaction, so concurrent writers queue on the
  file lock (up to `timeout` seconds) instead of failing with "database is locked". A transaction
  is also what makes each write atomic: a crash mid-write leaves the previous state. The file must
  be on a local disk (WAL needs shared memory; network file systems do not provide it).
- **Blocks come from the clock**, as on the real chain, so nobody has to produce them:
  block = floor((now - genesis) / seconds_per_block) + blocks added by `advance()`. Tests call
  `advance(n)` instead of sleeping; the jump is stored in the file, so every process sees it.
- **Everyone agrees on the parameters.** The first process to open a file records genesis (wall
  clock time, a random seed unless `seed` is given) and the chain parameters (`seconds_per_block`,
  rate limits, `max_validators`). Later openers use the stored values and ignore their own
  arguments: the first opener's values win, so two processes can never disagree about the chain.
- **Block hashes are deterministic**: `0x` + sha256 of the seed and the block number, the same for
  every reader, and unknown before the block exists (validator prompts are seeded from them).
- **Registration and stake are dev operations** (`register`, `set_stake`), not part of `Chain`:
  on the real network they happen outside the node. Validator permits follow stake: the top
  `max_validators` neurons with stake > 0 (ties to the lower uid). There is no deregistration.

One file can hold several subnets (`netuid`); the parameters are per file. Rules enforced as the
real chain does: commitments of at most 128 UTF-8 bytes, rate limits on commitments and weights,
weights only from registered hotkeys with a validator permit and only for existing uids, stored
as u16 (`weights_to_u16`). Bad weight values (negative, non-finite, all zero) raise
`InvalidWeights` (a `ChainError` and a `ValueError`) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from neurons.chain.base import (
    MAX_COMMITMENT_BYTES,
    ChainError,
    ChainLimits,
    ChainUnavailable,
    CommitmentRecord,
    CommitmentTooLarge,
    Metagraph,
    Neuron,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    WeightsRecord,
    as_int,
    weights_to_u16,
)

log = logging.getLogger(__name__)

APP_ID = "q24-embedded-chain"
SCHEMA_VERSION = 1
MAX_UIDS = 256  # uids per subnet, as on the real chain

_T = TypeVar("_T")

_SCHEMA = (
    # `value` has no declared type, so ints, floats and strings round-trip exactly.
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL)",
    """CREATE TABLE IF NOT EXISTS neurons (
        netuid INTEGER NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL,
        stake REAL NOT NULL, registered_block INTEGER NOT NULL,
        PRIMARY KEY (netuid, uid), UNIQUE (netuid, hotkey))""",
    # Every commitment is kept (history); the latest per hotkey is the one with the largest id.
    """CREATE TABLE IF NOT EXISTS commitments (
        id INTEGER PRIMARY KEY AUTOINCREMENT, netuid INTEGER NOT NULL, hotkey TEXT NOT NULL,
        block INTEGER NOT NULL, data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS commitments_by_hotkey ON commitments (netuid, hotkey, id)",
    # Only the latest weights per validator: that is all the chain exposes.
    """CREATE TABLE IF NOT EXISTS weights (
        netuid INTEGER NOT NULL, validator_uid INTEGER NOT NULL, hotkey TEXT NOT NULL,
        block INTEGER NOT NULL, weights TEXT NOT NULL, PRIMARY KEY (netuid, validator_uid))""",
)


def _as_stake(stake: Any) -> float:
    number = isinstance(stake, (int, float)) and not isinstance(stake, bool)
    if not (number and math.isfinite(stake) and stake >= 0):
        raise ChainError(f"stake must be a finite number >= 0, got {stake!r}")
    return float(stake)


def _as_key(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ChainError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _permits(neurons: list[sqlite3.Row], max_validators: int) -> set[int]:
    """Uids holding a validator permit: the top `max_validators` by stake among those with stake."""
    staked = sorted((n for n in neurons if n["stake"] > 0), key=lambda n: (-n["stake"], n["uid"]))
    return {n["uid"] for n in staked[:max_validators]}


def _is_busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


class EmbeddedChain:
    """The dev chain in the SQLite file `path`, seen from subnet `netuid`, acting as `hotkey`.

    The parameters after `hotkey` apply only when this call creates the chain (see the module
    docstring); the attributes of the same names hold the values in force. `timeout` (seconds) is
    how long a write waits for other writers before giving up with `ChainUnavailable`.
    """

    def __init__(
        self,
        path: str | Path,
        netuid: int,
        hotkey: str | None = None,
        *,
        seconds_per_block: float = 1.0,
        weights_rate_limit: int = 5,
        commitment_rate_limit: int = 5,
        max_validators: int = 64,
        timeout: float = 30.0,
        seed: str | int | None = None,
    ):
        self.path = Path(path)
        self.netuid = as_int(netuid, "netuid")
        if not 0 <= self.netuid <= 0xFFFF:
            raise ChainError(f"netuid must be in 0..65535, got {self.netuid}")
        self.hotkey = None if hotkey is None else _as_key(hotkey, "hotkey")
        wanted = {
            "seconds_per_block": float(seconds_per_block),
            "weights_rate_limit": as_int(weights_rate_limit, "weights_rate_limit"),
            "commitment_rate_limit": as_int(commitment_rate_limit, "commitment_rate_limit"),
            "max_validators": as_int(max_validators, "max_validators"),
        }
        if not (math.isfinite(wanted["seconds_per_block"]) and wanted["seconds_per_block"] > 0):
            raise ChainError(f"seconds_per_block must be > 0, got {seconds_per_block!r}")
        if wanted["weights_rate_limit"] < 0 or wanted["commitment_rate_limit"] < 0:
            raise ChainError("rate limits must be >= 0 blocks")
        if not 1 <= wanted["max_validators"] <= MAX_UIDS:
            raise ChainError(f"max_validators must be in 1..{MAX_UIDS}, got {max_validators!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ChainError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        # One connection per instance; the lock lets threads share an instance safely.
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = self._connect()
        try:
            meta = self._init_schema(wanted, None if seed is None else str(seed))
        except BaseException:
            self.close()
            raise
        self.genesis_time: float = meta["genesis_time"]
        self.genesis_seed: str = meta["genesis_seed"]
        self.seconds_per_block: float = meta["seconds_per_block"]
        self.weights_rate_limit: int = meta["weights_rate_limit"]
        self.commitment_rate_limit: int = meta["commitment_rate_limit"]
        self.max_validators: int = meta["max_validators"]
        ignored = {k: v for k, v in wanted.items() if meta[k] != v}
        if ignored:
            log.info(
                "%s: chain created earlier with %s; using those, not %s (the first opener's values win)",
                self.path,
                {k: meta[k] for k in ignored},
                ignored,
            )

    # -- opening -----------------------------------------------------------------------------------

    def _not_ours(self, why: str) -> ChainError:
        return ChainError(
            f"{self.path} is not an embedded chain database ({why}); delete or move it, or choose another path"
        )

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise ChainError(f"{self.path} is a directory; the embedded chain needs a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. `timeout` is SQLite's busy
            # timeout: how long a statement waits on another process's lock before failing.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise ChainError(f"cannot open the embedded chain at {self.path}: {e}") from e
        conn.row_factory = sqlite3.Row
        try:
            # Look before touching: switching to WAL writes to the file, which must not happen to a
            # stranger's database. Reading the schema also fails fast on a file that is not SQLite.
            self._check_ours(conn)
            mode = self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise ChainError(
                    f"cannot put {self.path} in WAL mode (got {mode!r}); use a file on a local disk"
                )
            # In WAL mode, NORMAL survives any process crash (only a power cut can lose the last
            # commits, never consistency), and it spares an fsync per write.
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise self._db_error(e) from e
            raise
        return conn

    def _check_ours(self, db: sqlite3.Connection) -> dict[str, Any] | None:
        """The meta table of our database; None for an empty database; ChainError for anything else."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            if tables - {"sqlite_sequence"}:
                raise self._not_ours(f"it holds other tables: {', '.join(sorted(tables))}")
            return None
        meta = {r[0]: r[1] for r in db.execute("SELECT key, value FROM meta")}
        if meta.get("app") != APP_ID:
            raise self._not_ours("its meta table belongs to something else")
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise self._not_ours(f"bad schema version {version!r}")
        if version > SCHEMA_VERSION:
            raise ChainError(
                f"{self.path} was written by a newer embedded chain (schema version {version}, this code "
                f"reads {SCHEMA_VERSION}); update the code, or use another file"
            )
        return meta

    def _init_schema(self, wanted: dict[str, Any], seed: str | None) -> dict[str, Any]:
        # One transaction, so when several processes open a new file at once exactly one of them
        # records genesis and the others read it.
        with self._write() as db:
            meta = self._check_ours(db)
            for statement in _SCHEMA:
                db.execute(statement)
            if meta is None or "genesis_time" not in meta:
                meta = {
                    "app": APP_ID,
                    "schema_version": SCHEMA_VERSION,
                    "genesis_time": time.time(),
                    "genesis_seed": seed if seed is not None else secrets.token_hex(16),
                    "block_offset": 0,
                    **wanted,
                }
                db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
        missing = {"genesis_time", "genesis_seed", "block_offset", *wanted} - meta.keys()
        if missing:
            raise self._not_ours(f"its meta table lacks {', '.join(sorted(missing))}")
        return meta

    def _retry_busy(self, fn: Callable[[], _T]) -> _T:
        """Run `fn`, retrying while the file is locked. Statements wait via SQLite's busy timeout,
        but a journal mode switch can report busy at once while another process holds the file."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _db_error(self, e: sqlite3.Error) -> ChainError:
        if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
            return ChainUnavailable(
                f"{self.path} stayed locked by another process for {self.timeout:g} s; retry later, "
                "or raise `timeout`"
            )
        if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
            return self._not_ours("not a SQLite file")
        return ChainError(f"embedded chain {self.path}: {e}")

    # -- transactions --------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise ChainError(f"the embedded chain at {self.path} is closed")
            db = self._conn
            try:
                db.execute(begin)
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise self._db_error(e) from e

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction: takes the file's write lock first, so writers serialize and never
        fail half way through when another process wrote in between."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries (WAL: blocks nobody)."""
        return self._transaction("BEGIN")

    # -- blocks --------------------------------------------------------------------------------------

    def _block(self, db: sqlite3.Connection) -> int:
        offset = db.execute("SELECT value FROM meta WHERE key = 'block_offset'").fetchone()[0]
        # A wall clock stepped back before genesis must not give a negative block.
        elapsed = max(0.0, time.time() - self.genesis_time)
        return math.floor(elapsed / self.seconds_per_block) + int(offset)

    def current_block(self) -> int:
        with self._read() as db:
            return self._block(db)

    def advance(self, blocks: int) -> int:
        """Dev/tests: jump the chain `blocks` blocks ahead, for every process; returns the new block."""
        blocks = as_int(blocks, "blocks")
        if blocks < 0:
            raise ChainError(f"blocks only move forward; cannot advance by {blocks}")
        with self._write() as db:
            db.execute("UPDATE meta SET value = value + ? WHERE key = 'block_offset'", (blocks,))
            return self._block(db)

    def block_hash(self, block: int) -> str:
        block = as_int(block, "block")
        if block < 0:
            raise ChainError(f"block must be >= 0, got {block}")
        current = self.current_block()
        if block > current:
            raise ChainError(f"block {block} is in the future (current block {current}); wait for it")
        return "0x" + hashlib.sha256(f"q24-embedded|{self.genesis_seed}|{block}".encode()).hexdigest()

    def limits(self) -> ChainLimits:
        return ChainLimits(
            weights_rate_limit=self.weights_rate_limit,
            commitment_rate_limit=self.commitment_rate_limit,
            max_commitment_bytes=MAX_COMMITMENT_BYTES,
            seconds_per_block=self.seconds_per_block,
        )

    # -- registration (dev only) -------------------------------------------------------------------

    def register(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        """Dev/tests: register `hotkey` on this subnet at the lowest free uid and return the uid.
        Registering a hotkey again returns its uid and changes nothing (use `set_stake`)."""
        hotkey, coldkey = _as_key(hotkey, "hotkey"), _as_key(coldkey, "coldkey")
        stake = _as_stake(stake)
        with self._write() as db:
            row = db.execute(
                "SELECT uid, coldkey FROM neurons WHERE netuid = ? AND hotkey = ?", (self.netuid, hotkey)
            ).fetchone()
            if row is not None:
                if row["coldkey"] != coldkey:
                    raise ChainError(
                        f"hotkey {hotkey} is already registered on subnet {self.netuid} (uid {row['uid']}) "
                        f"under coldkey {row['coldkey']}, not {coldkey}"
                    )
                return row["uid"]
            used = {r[0] for r in db.execute("SELECT uid FROM neurons WHERE netuid = ?", (self.netuid,))}
            uid = next((u for u in range(MAX_UIDS) if u not in used), None)
            if uid is None:
                raise ChainError(
                    f"subnet {self.netuid} is full ({MAX_UIDS} uids); the embedded chain does not "
                    "deregister, so use another netuid or a new chain file"
                )
            db.execute(
                "INSERT INTO neurons (netuid, uid, hotkey, coldkey, stake, registered_block) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.netuid, uid, hotkey, coldkey, stake, self._block(db)),
            )
            return uid

    def set_stake(self, hotkey: str, stake: float) -> None:
        """Dev/tests: set the stake of a registered hotkey (validator permits follow stake)."""
        hotkey, stake = _as_key(hotkey, "hotkey"), _as_stake(stake)
        with self._write() as db:
            cur = db.execute(
                "UPDATE neurons SET stake = ? WHERE netuid = ? AND hotkey = ?", (stake, self.netuid, hotkey)
            )
            if cur.rowcount == 0:
                raise self._not_registered(hotkey)

    def _not_registered(self, hotkey: str) -> NotRegistered:
        return NotRegistered(
            f"hotkey {hotkey} is not registered on subnet {self.netuid} of the embedded chain "
            f"{self.path}; register it first (EmbeddedChain.register)"
        )

    def _require_hotkey(self, action: str) -> str:
        if self.hotkey is None:
            raise ChainError(f"{action} acts as a hotkey, but this chain has none; pass hotkey=...")
        return self.hotkey

    def _neurons(self, db: sqlite3.Connection) -> list[sqlite3.Row]:
        return db.execute("SELECT * FROM neurons WHERE netuid = ? ORDER BY uid", (self.netuid,)).fetchall()

    def metagraph(self) -> Metagraph:
        with self._read() as db:
            block, rows = self._block(db), self._neurons(db)
        permits = _permits(rows, self.max_validators)
        neurons = tuple(
            Neuron(
                uid=r["uid"],
                hotkey=r["hotkey"],
                coldkey=r["coldkey"],
                stake=r["stake"],
                validator_permit=r["uid"] in permits,
                registered_block=r["registered_block"],
            )
            for r in rows
        )
        return Metagraph(netuid=self.netuid, block=block, neurons=neurons)

    # -- commitments ---------------------------------------------------------------------------------

    def commit(self, data: str) -> int:
        hotkey = self._require_hotkey("commit")
        if not isinstance(data, str):
            raise ChainError(f"commitment data must be a str, got {type(data).__name__}")
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ChainError(f"commitment data is not encodable as UTF-8: {e}") from None
        if size > MAX_COMMITMENT_BYTES:
            raise CommitmentTooLarge(
                f"commitment is {size} bytes in UTF-8; the chain holds at most {MAX_COMMITMENT_BYTES}"
            )
        with self._write() as db:
            block = self._block(db)
            query = "SELECT 1 FROM neurons WHERE netuid = ? AND hotkey = ?"
            if db.execute(query, (self.netuid, hotkey)).fetchone() is None:
                raise self._not_registered(hotkey)
            last = db.execute(
                "SELECT MAX(block) FROM commitments WHERE netuid = ? AND hotkey = ?", (self.netuid, hotkey)
            ).fetchone()[0]
            self._check_rate(last, block, self.commitment_rate_limit, f"commitment from {hotkey}")
            db.execute(
                "INSERT INTO commitments (netuid, hotkey, block, data) VALUES (?, ?, ?, ?)",
                (self.netuid, hotkey, block, data),
            )
        return block

    @staticmethod
    def _check_rate(last: int | None, block: int, limit: int, what: str) -> None:
        if last is None:
            return
        left = limit - (block - last)
        if left > 0:
            raise RateLimited(
                f"too soon: {left} blocks left before another {what} (last at block {last}, now {block}, "
                f"rate limit {limit} blocks); retry at block {last + limit}",
                blocks_left=left,
            )

    def commitments(self) -> dict[str, CommitmentRecord]:
        with self._read() as db:
            rows = db.execute(
                """SELECT c.hotkey, c.block, c.data FROM commitments c
                   JOIN neurons n ON n.netuid = c.netuid AND n.hotkey = c.hotkey
                   WHERE c.netuid = ? AND c.id = (
                       SELECT MAX(id) FROM commitments WHERE netuid = c.netuid AND hotkey = c.hotkey)
                   ORDER BY n.uid""",
                (self.netuid,),
            ).fetchall()
        return {
            r["hotkey"]: CommitmentRecord(hotkey=r["hotkey"], block=r["block"], data=r["data"]) for r in rows
        }

    # -- weights -------------------------------------------------------------------------------------

    def set_weights(self, weights: dict[int, float]) -> int:
        """Raises `InvalidWeights` (from `weights_to_u16`) for negative, non-finite or all-zero weights."""
        hotkey = self._require_hotkey("set_weights")
        uids = {as_int(u, "uid"): w for u, w in weights.items()}
        u16 = weights_to_u16(uids)
        with self._write() as db:
            block, rows = self._block(db), self._neurons(db)
            me = next((r for r in rows if r["hotkey"] == hotkey), None)
            if me is None:
                raise self._not_registered(hotkey)
            if me["uid"] not in _permits(rows, self.max_validators):
                raise NoValidatorPermit(
                    f"hotkey {hotkey} (uid {me['uid']}, stake {me['stake']:g}) has no validator permit on "
                    f"subnet {self.netuid}: permits go to the top {self.max_validators} neurons by stake; "
                    "add stake (EmbeddedChain.set_stake)"
                )
            unknown = sorted(set(uids) - {r["uid"] for r in rows})
            if unknown:
                raise ChainError(f"uids {unknown} are not registered on subnet {self.netuid}")
            last = db.execute(
                "SELECT block FROM weights WHERE netuid = ? AND validator_uid = ?", (self.netuid, me["uid"])
            ).fetchone()
            last_block = None if last is None else last[0]
            self._check_rate(last_block, block, self.weights_rate_limit, f"set_weights from {hotkey}")
            db.execute(
                "INSERT OR REPLACE INTO weights (netuid, validator_uid, hotkey, block, weights) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.netuid, me["uid"], hotkey, block, json.dumps(u16)),
            )
        return block

    def weights(self) -> list[WeightsRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT validator_uid, block, weights FROM weights WHERE netuid = ? ORDER BY validator_uid",
                (self.netuid,),
            ).fetchall()
        return [
            WeightsRecord(
                validator_uid=r["validator_uid"],
                block=r["block"],
                weights={int(u): int(w) for u, w in json.loads(r["weights"]).items()},
            )
            for r in rows
        ]

    def blocks_since_last_update(self, uid: int) -> int | None:
        uid = as_int(uid, "uid")
        with self._read() as db:
            row = db.execute(
                "SELECT block FROM weights WHERE netuid = ? AND validator_uid = ?", (self.netuid, uid)
            ).fetchone()
            return None if row is None else self._block(db) - row[0]

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> EmbeddedChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddedChain({str(self.path)!r}, netuid={self.netuid}, hotkey={self.hotkey!r})"
