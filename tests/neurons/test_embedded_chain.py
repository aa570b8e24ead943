"""The embedded dev chain: registration and permits, clock blocks and hashes, commitments, weights,
several processes on one file, and files that are not ours."""

from __future__ import annotations

import multiprocessing as mp
import re
import sqlite3
import time
from contextlib import closing

import pytest

from neurons.chain import (
    U16_MAX,
    Chain,
    ChainError,
    CommitmentTooLarge,
    EmbeddedChain,
    InvalidWeights,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
)

# Long enough that the clock never moves a block during a test: blocks move only by `advance`.
FROZEN = 3600.0


@pytest.fixture
def path(tmp_path):
    return tmp_path / "chain.db"


@pytest.fixture
def chain(path):
    with EmbeddedChain(path, netuid=24, seconds_per_block=FROZEN, seed="test") as c:
        yield c


def bound(path, hotkey: str, netuid: int = 24) -> EmbeddedChain:
    return EmbeddedChain(path, netuid=netuid, hotkey=hotkey)


def test_is_a_chain(chain):
    assert isinstance(chain, Chain)
    assert chain.netuid == 24 and chain.hotkey is None
    limits = chain.limits()
    assert (limits.weights_rate_limit, limits.commitment_rate_limit, limits.max_commitment_bytes) == (
        5,
        5,
        128,
    )
    assert limits.seconds_per_block == FROZEN


# -- registration and permits ------------------------------------------------------------------------


def test_register_assigns_lowest_free_uid_and_is_idempotent(chain):
    assert [chain.register(f"hk{i}", "ck") for i in range(3)] == [0, 1, 2]
    assert chain.register("hk1", "ck", stake=99.0) == 1  # again: same uid, nothing changes
    meta = chain.metagraph()
    assert meta.hotkeys == ["hk0", "hk1", "hk2"]
    assert meta.neuron(1).stake == 0.0
    assert meta.uid_of("hk2") == 2 and meta.block == chain.current_block()
    with pytest.raises(ChainError, match="coldkey"):
        chain.register("hk1", "other-ck")


def test_validator_permits_go_to_top_stake(path):
    with EmbeddedChain(path, 1, seconds_per_block=FROZEN, max_validators=2) as c:
        for hotkey, stake in [("a", 0.0), ("b", 5.0), ("c", 10.0), ("d", 5.0)]:
            c.register(hotkey, "ck", stake=stake)
        # c first; b and d tie on stake and the lower uid (b) wins; a has no stake.
        assert {n.hotkey for n in c.metagraph().neurons if n.validator_permit} == {"c", "b"}
        c.set_stake("d", 20.0)
        assert {n.hotkey for n in c.metagraph().neurons if n.validator_permit} == {"c", "d"}
        with pytest.raises(NotRegistered):
            c.set_stake("nobody", 1.0)


def test_full_subnet_and_separate_netuids(path):
    with EmbeddedChain(path, 7, seconds_per_block=FROZEN) as c:
        assert [c.register(f"hk{i}", "ck") for i in range(256)] == list(range(256))
        with pytest.raises(ChainError, match="full"):
            c.register("one-too-many", "ck")
    with EmbeddedChain(path, 8) as other:  # the same file, another subnet: empty
        assert other.metagraph().neurons == ()
        assert other.register("hk0", "ck") == 0


# -- blocks --------------------------------------------------------------------------------------


def test_clock_advances_blocks(path):
    with EmbeddedChain(path, 1, seconds_per_block=0.05) as c:
        start = c.current_block()
        time.sleep(0.2)
        assert c.current_block() >= start + 2


def test_advance_is_shared_and_hashes_are_deterministic(path, chain, tmp_path):
    first = chain.current_block()
    assert chain.advance(10) == first + 10
    with EmbeddedChain(path, 24, seconds_per_block=1.0, seed="ignored") as later:
        # The first opener's parameters and seed win; the advance is visible here.
        assert later.seconds_per_block == FROZEN and later.genesis_seed == "test"
        assert later.current_block() == chain.current_block() == first + 10
        assert later.block_hash(first + 3) == chain.block_hash(first + 3)
    h = chain.block_hash(first + 3)
    assert h.startswith("0x") and len(h) == 66 and int(h, 16) >= 0
    assert h != chain.block_hash(first + 4)
    with EmbeddedChain(tmp_path / "other.db", 24, seconds_per_block=FROZEN, seed="other") as other:
        other.advance(first + 10)
        assert other.block_hash(first + 3) != h
    with pytest.raises(ChainError, match="future"):
        chain.block_hash(chain.current_block() + 1)
    with pytest.raises(ChainError):
        chain.advance(-1)


# -- commitments ---------------------------------------------------------------------------------


def test_commit_size_limit_in_utf8_bytes(path, chain):
    chain.register("miner", "ck")
    with bound(path, "miner") as c:
        assert c.commit("x" * 128) == c.current_block()
        chain.advance(5)
        with pytest.raises(CommitmentTooLarge, match="129 bytes"):
            c.commit("x" * 129)
        with pytest.raises(CommitmentTooLarge, match="130 bytes"):
            c.commit("é" * 65)  # 65 characters, 130 bytes
        c.commit("é" * 64)
        assert c.commitments()["miner"].data == "é" * 64
        with pytest.raises(ChainError, match="str"):
            c.commit(b"bytes")


def test_commit_needs_a_registered_bound_hotkey(path, chain):
    with pytest.raises(ChainError, match="hotkey"):
        chain.commit("data")
    with bound(path, "stranger") as c, pytest.raises(NotRegistered, match="register"):
        c.commit("data")


def test_commit_rate_limit_latest_wins_and_only_registered(path, chain):
    chain.register("miner", "ck")
    with bound(path, "miner") as c:
        block = c.commit("v1")
        chain.advance(2)
        with pytest.raises(RateLimited, match="too soon: 3 blocks left") as err:
            c.commit("v2")
        assert err.value.blocks_left == 3
        chain.advance(3)
        assert c.commit("v2") == block + 5
    # A commitment under another netuid's registration is not visible on this subnet.
    with EmbeddedChain(path, 25) as sub25:
        sub25.register("other", "ck")
        with bound(path, "other", netuid=25) as o:
            o.commit("elsewhere")
    records = chain.commitments()
    assert list(records) == ["miner"]
    assert (records["miner"].data, records["miner"].block) == ("v2", block + 5)


# -- weights -------------------------------------------------------------------------------------


def test_set_weights_needs_permit_and_known_uids(path, chain):
    chain.register("validator", "ck")
    chain.register("miner", "ck")
    with bound(path, "validator") as v:
        with pytest.raises(NoValidatorPermit, match="stake"):
            v.set_weights({1: 1.0})
        chain.set_stake("validator", 100.0)
        with pytest.raises(ChainError, match=r"\[5, 9\]"):
            v.set_weights({1: 1.0, 5: 1.0, 9: 1.0})
        for bad in ({1: -1.0}, {1: float("nan")}, {1: 0.0}, {-1: 1.0}):
            with pytest.raises(InvalidWeights):
                v.set_weights(bad)
    with bound(path, "stranger") as s, pytest.raises(NotRegistered):
        s.set_weights({0: 1.0})


def test_set_weights_rate_limit_normalisation_and_visibility(path, chain):
    chain.register("validator", "ck", stake=1.0)
    for i in range(3):
        chain.register(f"m{i}", "ck")
    assert chain.blocks_since_last_update(0) is None
    with bound(path, "validator") as v:
        block = v.set_weights({1: 2.0, 2: 1.0, 3: 0.0})
        chain.advance(4)
        with pytest.raises(RateLimited) as err:
            v.set_weights({1: 1.0})
        assert err.value.blocks_left == 1
        assert v.blocks_since_last_update(0) == 4
    [record] = chain.weights()  # read from another instance
    assert (record.validator_uid, record.block) == (0, block)
    assert record.weights == {1: U16_MAX, 2: round(U16_MAX / 2)}  # the zero weight is dropped
    chain.advance(1)
    with bound(path, "validator") as v:
        assert v.set_weights({3: 1.0}) == block + 5
    assert chain.weights()[0].weights == {3: U16_MAX}
    assert chain.blocks_since_last_update(0) == 0


# -- several processes ---------------------------------------------------------------------------


def _worker(path: str, hotkey: str, barrier, results) -> None:
    try:
        barrier.wait(timeout=30)  # everyone opens the fresh file at once, racing for genesis
        with EmbeddedChain(path, 24, hotkey=hotkey, seconds_per_block=FROZEN, seed="shared") as c:
            uid = c.register(hotkey, f"ck-{hotkey}")
            block = c.commit(f"model-of-{hotkey}")
            for _ in range(10):  # reads interleaved with the others' writes
                c.metagraph()
                c.commitments()
            results.put((hotkey, uid, block, None))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((hotkey, None, None, f"{type(e).__name__}: {e}"))


def test_processes_share_one_file(path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    hotkeys = [f"hk{i}" for i in range(4)]
    procs = [ctx.Process(target=_worker, args=(str(path), hk, barrier, results)) for hk in hotkeys]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [e for *_, e in got if e] == []
    uids = {hk: uid for hk, uid, _, _ in got}
    assert sorted(uids.values()) == [0, 1, 2, 3]
    with EmbeddedChain(path, 24) as c:
        assert c.genesis_seed == "shared"
        assert {hk: c.metagraph().uid_of(hk) for hk in hotkeys} == uids
        assert {hk: r.data for hk, r in c.commitments().items()} == {hk: f"model-of-{hk}" for hk in hotkeys}


# -- files that are not ours ---------------------------------------------------------------------


def test_garbage_file_is_rejected(path):
    text = "this is not a database, just some text that happens to be here\n" * 10
    path.write_text(text)
    with pytest.raises(ChainError, match=re.escape(f"{path} is not an embedded chain database")):
        EmbeddedChain(path, 24)
    assert path.read_text() == text  # left as it was
    assert sorted(p.name for p in path.parent.iterdir()) == ["chain.db"]  # no -wal / -shm beside it


def test_foreign_sqlite_and_newer_schema_are_rejected(path, tmp_path):
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(
        ChainError, match=re.escape(f"{foreign} is not an embedded chain database") + ".*users"
    ):
        EmbeddedChain(foreign, 24)
    EmbeddedChain(path, 24).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(ChainError, match=r"newer .*schema version 99"):
        EmbeddedChain(path, 24)


def test_closed_chain_refuses(chain):
    chain.close()
    chain.close()  # idempotent
    with pytest.raises(ChainError, match="closed"):
        chain.current_block()
