"""BittensorChain through the real SDK: its `bt.Client`, the `SetWeights` intent and executor, the
generated call builders and its result/error decoding all run for real; only the chain behind the
`Substrate` seam is a double (tests/neurons/substrate_double.py), and the wallet is a real
`bt.Wallet` on disk whose coldkey private key has been deleted (nothing may need it).

Covered: the metagraph mapping; commitments read row by row (malformed rows skipped with a reason)
and the per-hotkey fallback; the commitment call (exact bytes, hotkey signature, size check before
anything is sent); weights on the plain and the commit-reveal path; every refusal mapped to its
error class; timeouts, retries, reconnects and the block-freshness watchdog; a lost write reply
that must not be submitted twice; limits, block hashes, a missing wallet, and the lazy import.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import bittensor as bt
import bittensor_core
import pytest
from bittensor._transport.errors import SubstrateRequestException
from bittensor.result import chain_error_from_substrate_request

from neurons.chain import (
    MAX_COMMITMENT_BYTES,
    Chain,
    ChainError,
    ChainLimits,
    ChainUnavailable,
    CommitmentRecord,
    CommitmentTooLarge,
    InvalidWeights,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    WeightsRecord,
    weights_to_u16,
)
from neurons.chain.bittensor_chain import BittensorChain
from tests.neurons.substrate_double import HANG, LOST_REPLY, SubstrateDouble

ALICE, BOB, CHARLIE, DAVE, EVE, FERDIE = (
    bittensor_core.Keypair.create_from_uri(f"//{name}").ss58_address
    for name in ("Alice", "Bob", "Charlie", "Dave", "Eve", "Ferdie")
)
OWNER = bittensor_core.Keypair.create_from_uri("//Owner").ss58_address
START = 1000  # the double's head block when a test starts


@pytest.fixture(scope="module")
def wallet(tmp_path_factory):
    path = tmp_path_factory.mktemp("wallets")
    w = bt.Wallet("validator", "default", path=str(path))
    w.create_new_coldkey(use_password=False, suppress=True)
    w.create_new_hotkey(use_password=False, suppress=True)
    (path / "validator" / "coldkey").unlink()  # reads and hotkey-signed writes must not need it
    return bt.Wallet("validator", "default", path=str(path))


@pytest.fixture
def double(wallet):
    d = SubstrateDouble(netuid=24, block=START)
    d.add_neuron(wallet.hotkeypub.ss58_address, wallet.coldkeypub.ss58_address, stake_tao=1000.0, permit=True)
    d.add_neuron(ALICE, OWNER, stake_tao=12.5)
    d.add_neuron(BOB, OWNER)
    d.add_neuron(CHARLIE, OWNER)
    return d


@pytest.fixture
def make_chain(double, wallet):
    made = []

    def make(**overrides):
        settings = dict(substrate=double, wallet=wallet, timeout_s=2.0, retries=2, backoff_s=0.01)
        settings.update(overrides)
        chain = BittensorChain(24, **settings)
        made.append(chain)
        return chain

    yield make
    for chain in made:
        chain.close()


@pytest.fixture
def chain(make_chain):
    return make_chain()


def raw_row(block: int, *parts: bytes) -> dict:
    """A Commitments.CommitmentOf record as the SDK decodes it."""
    return {
        "block": block,
        "deposit": 0,
        "info": {"fields": [{f"Raw{len(p)}": "0x" + p.hex()} for p in parts]},
    }


def calls_of(double: SubstrateDouble, method: str) -> int:
    return sum(1 for call in double.calls if call == (method,))


# -- identity, connection, metagraph -----------------------------------------------------------------


def test_is_a_chain_bound_to_the_wallet_hotkey_with_one_lazy_connection(chain, double, wallet):
    assert isinstance(chain, Chain)
    assert chain.netuid == 24 and chain.hotkey == wallet.hotkeypub.ss58_address
    assert double.connects == 0  # nothing is opened before the first call
    assert chain.current_block() == START
    chain.metagraph()
    chain.commitments()
    assert (double.connects, double.closes) == (1, 0)  # one long-lived connection
    chain.close()
    assert double.closes == 1
    with pytest.raises(ChainError, match="closed"):
        chain.current_block()


def test_metagraph_maps_the_sdk_metagraph(chain, double, wallet):
    double.block = START + 5
    graph = chain.metagraph()
    assert ("runtime_call", "SubnetInfoRuntimeApi", "get_metagraph", (24,)) in double.calls
    assert (graph.netuid, graph.block) == (24, START + 5)
    assert [n.uid for n in graph.neurons] == [0, 1, 2, 3]
    assert graph.hotkeys == [wallet.hotkeypub.ss58_address, ALICE, BOB, CHARLIE]
    assert [n.coldkey for n in graph.neurons] == [wallet.coldkeypub.ss58_address, OWNER, OWNER, OWNER]
    assert [n.stake for n in graph.neurons] == [1000.0, 12.5, 0.0, 0.0]
    assert all(isinstance(n.stake, float) for n in graph.neurons)
    assert [n.validator_permit for n in graph.neurons] == [True, False, False, False]
    assert {n.registered_block for n in graph.neurons} == {START - 500}
    assert graph.uid_of(ALICE) == 1


def test_metagraph_of_a_missing_subnet_is_a_chain_error(make_chain):
    chain = make_chain()
    chain.netuid = 25  # the double only has subnet 24
    with pytest.raises(ChainError, match="subnet 25 does not exist"):
        chain.metagraph()


# -- commitments ------------------------------------------------------------------------------------


def test_commitments_are_decoded_row_by_row_and_malformed_rows_are_skipped(chain, double, wallet, caplog):
    me = wallet.hotkeypub.ss58_address
    double.add_neuron(EVE, OWNER)  # uid 4
    double.add_neuron(FERDIE, OWNER)  # uid 5
    double.commitment_rows.update(
        {
            ALICE: raw_row(990, b"hf:org/", b"repo@main"),  # split over two fields: joined
            me: raw_row(995, "modèle-a".encode()),
            BOB: raw_row(991, b"\xff\xfe not utf-8"),
            CHARLIE: {
                "block": 992,
                "deposit": 0,
                "info": {"fields": [{"TimelockEncrypted": {"reveal_round": 5}}]},
            },
            DAVE: raw_row(993, b"deregistered"),  # not on the subnet: ignored
            EVE: "not a record",
            FERDIE: {"block": "soon", "info": {"fields": [{"Raw2": "0x6869"}]}},
        }
    )
    with caplog.at_level(logging.WARNING, logger="neurons.chain.bittensor"):
        found = chain.commitments()
    assert found == {
        me: CommitmentRecord(hotkey=me, block=995, data="modèle-a"),
        ALICE: CommitmentRecord(hotkey=ALICE, block=990, data="hf:org/repo@main"),
    }
    assert list(found) == [me, ALICE]  # by uid
    reasons = {
        hk: r.getMessage()
        for hk in (BOB, CHARLIE, EVE, FERDIE)
        for r in caplog.records
        if hk in r.getMessage()
    }
    assert "not UTF-8" in reasons[BOB]
    assert "TimelockEncrypted" in reasons[CHARLIE]
    assert "not a mapping" in reasons[EVE]
    assert "bad block" in reasons[FERDIE]
    assert not any(DAVE in r.getMessage() for r in caplog.records)


def test_commitments_fall_back_to_one_read_per_hotkey_when_the_map_cannot_be_read(
    chain, double, wallet, caplog
):
    me = wallet.hotkeypub.ss58_address
    undecodable = chain_error_from_substrate_request(
        SubstrateRequestException("failed to decode storage value")
    )
    double.inject("query_map:Commitments.CommitmentOf", undecodable)
    double.commitment_rows.update(
        {me: raw_row(995, b"mine"), ALICE: raw_row(996, b"alice"), BOB: ValueError("cannot decode this row")}
    )
    with caplog.at_level(logging.WARNING, logger="neurons.chain.bittensor"):
        found = chain.commitments()
    assert found == {me: CommitmentRecord(me, 995, "mine"), ALICE: CommitmentRecord(ALICE, 996, "alice")}
    point_reads = [c for c in double.calls if c[:3] == ("query", "Commitments", "CommitmentOf")]
    assert len(point_reads) == 4  # one per registered hotkey
    assert "hotkey by hotkey" in caplog.text and BOB in caplog.text


def test_commit_submits_a_raw_set_commitment_signed_by_the_hotkey(chain, double, wallet):
    data = "hf:quasar/student@3f2a9c"
    block = chain.commit(data)
    (sub,) = double.submissions
    assert (sub.call.module, sub.call.function) == ("Commitments", "set_commitment")
    assert sub.call.params == {"netuid": 24, "info": {"fields": [[{"Raw24": data.encode()}]]}}
    assert sub.signer == wallet.hotkeypub.ss58_address and sub.signature_ok
    assert sub.options == {"inclusion": True, "final": False}
    assert block == double.block == START + 1
    assert chain.commitments()[chain.hotkey] == CommitmentRecord(chain.hotkey, START + 1, data)
    assert not (Path(wallet.path) / "validator" / "coldkey").exists()

    full = "é" * (MAX_COMMITMENT_BYTES // 2)  # exactly 128 bytes in UTF-8
    assert chain.commit(full) == START + 2
    assert double.submissions[-1].call.params["info"] == {"fields": [[{"Raw128": full.encode()}]]}
    assert chain.commitments()[chain.hotkey].data == full


@pytest.mark.parametrize("data", ["x" * (MAX_COMMITMENT_BYTES + 1), "€" * 43])
def test_an_oversized_commitment_is_refused_before_anything_is_sent(chain, double, data):
    with pytest.raises(CommitmentTooLarge, match="129 bytes"):
        chain.commit(data)
    assert double.submissions == [] and double.connects == 0


def test_a_commitment_must_be_text(chain, double):
    with pytest.raises(ChainError, match="must be a str"):
        chain.commit(b"bytes")  # type: ignore[arg-type]
    assert double.connects == 0


# -- weights ----------------------------------------------------------------------------------------


def test_set_weights_plain_path_submits_the_u16_weights(chain, double, wallet):
    weights = {2: 1.0, 1: 0.2, 3: 0.0, 0: 0.05}
    expected = weights_to_u16(weights)
    block = chain.set_weights(weights)
    (sub,) = double.submissions
    assert (sub.call.module, sub.call.function) == ("SubtensorModule", "set_mechanism_weights")
    assert sub.call.params == {
        "netuid": 24,
        "mecid": 0,
        "dests": sorted(expected),
        "weights": [expected[uid] for uid in sorted(expected)],
        "version_key": 0,
    }
    assert sub.signer == wallet.hotkeypub.ss58_address and sub.signature_ok
    assert block == double.block == START + 1
    assert chain.weights() == [WeightsRecord(validator_uid=0, block=START + 1, weights=expected)]
    double.block += 7
    assert chain.blocks_since_last_update(0) == 7
    assert chain.blocks_since_last_update(99) is None


def test_set_weights_commit_reveal_path_commits_a_timelocked_payload(chain, double):
    double.hyper["CommitRevealWeightsEnabled"] = True
    block = chain.set_weights({1: 1.0, 2: 0.5})
    (sub,) = double.submissions
    assert (sub.call.module, sub.call.function) == ("SubtensorModule", "commit_timelocked_mechanism_weights")
    params = sub.call.params
    assert (params["netuid"], params["mecid"], params["commit_reveal_version"]) == (24, 0, 4)
    assert isinstance(params["commit"], bytes) and len(params["commit"]) > 100
    assert params["reveal_round"] > bt.timelock.current_round()  # sealed until a future drand round
    assert double.weights == {}  # nothing in the clear
    assert block == START + 1 and sub.signature_ok
    # The SDK read the epoch schedule it needs for the reveal round.
    for item in ("Tempo", "RevealPeriodEpochs", "LastEpochBlock", "SubnetEpochIndex"):
        assert ("query", "SubtensorModule", item, (24,)) in double.calls


@pytest.mark.parametrize(
    "weights",
    [{1: -1.0}, {1: math.nan}, {1: 0.0, 2: 0.0}, {}, {True: 1.0}, {70000: 1.0}, {"1": 1.0}, [(1, 1.0)]],
    ids=["negative", "nan", "all-zero", "empty", "bool-uid", "uid-too-big", "str-uid", "not-a-mapping"],
)
def test_invalid_weights_are_refused_before_anything_is_sent(chain, double, weights):
    with pytest.raises(InvalidWeights):
        chain.set_weights(weights)
    assert double.submissions == [] and double.connects == 0


# -- refusals ---------------------------------------------------------------------------------------


def _unregister_me(d: SubstrateDouble) -> None:
    d.neurons[0].hotkey = FERDIE


def _lose_the_race(d: SubstrateDouble) -> None:
    d.last_update[0] = d.block  # another submission of this hotkey landed first


REFUSALS = [
    # id, setup, action, expected error, text fragments, blocks_left, submitted?
    (
        "rate-limit-preflight",
        lambda d: d.last_update.update({0: START - 40}),
        "weights",
        RateLimited,
        ["too soon", "60 blocks left"],
        60,
        False,
    ),
    (
        "SettingWeightsTooFast",
        lambda d: d.reject_dispatch("SettingWeightsTooFast", then=_lose_the_race),
        "weights",
        RateLimited,
        ["SettingWeightsTooFast"],
        100,
        True,
    ),
    (
        "CommittingWeightsTooFast",
        lambda d: (
            d.hyper.update(CommitRevealWeightsEnabled=True),
            d.reject_dispatch("CommittingWeightsTooFast", then=_lose_the_race),
        ),
        "weights",
        RateLimited,
        ["CommittingWeightsTooFast"],
        100,
        True,
    ),
    (
        "pool-custom-error-6",
        lambda d: d.reject_pool("Invalid Transaction", data="Custom error: 6"),
        "weights",
        RateLimited,
        ["RateLimitExceeded"],
        1,
        True,
    ),
    (
        "no-validator-permit",
        lambda d: setattr(d.neurons[0], "permit", False),
        "weights",
        NoValidatorPermit,
        ["validator permit", "NeuronNoValidatorPermit"],
        None,
        True,
    ),
    (
        "priority-too-low",
        lambda d: d.reject_pool(
            "Priority is too low: (10 vs 10)",
            data="The transaction has too low priority to replace another transaction already in the pool.",
            code=1014,
        ),
        "weights",
        ChainUnavailable,
        ["transient", "PriorityTooLow"],
        None,
        True,
    ),
    (
        "bare-1014",
        lambda d: d.reject_pool("RPC call failed with code 1014"),
        "commit",
        ChainUnavailable,
        ["transient", "1014"],
        None,
        True,
    ),
    (
        "transaction-outdated",
        lambda d: d.reject_pool("Invalid Transaction", data="Transaction is outdated"),
        "commit",
        ChainUnavailable,
        ["transient", "Stale"],
        None,
        True,
    ),
    (
        "weights-not-registered",
        _unregister_me,
        "weights",
        NotRegistered,
        ["not registered", "btcli subnets register"],
        None,
        False,
    ),
    (
        "commit-not-registered",
        _unregister_me,
        "commit",
        NotRegistered,
        ["not registered", "AccountNotAllowedCommit"],
        None,
        True,
    ),
    (
        "space-limit",
        lambda d: setattr(d, "max_space", 150),
        "commit-twice",
        CommitmentTooLarge,
        ["quota", "SpaceLimitExceeded"],
        None,
        True,
    ),
    (
        "too-few-weights",
        lambda d: d.hyper.update(MinAllowedWeights=3),
        "weights",
        InvalidWeights,
        ["requires at least 3 weights"],
        None,
        False,
    ),
    (
        "other-refusal",
        lambda d: d.reject_dispatch("IncorrectWeightVersionKey"),
        "weights",
        ChainError,
        ["IncorrectWeightVersionKey"],
        None,
        True,
    ),
]


@pytest.mark.parametrize(
    ("setup", "action", "error", "fragments", "blocks_left", "submitted"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusals_map_to_our_errors(
    chain, double, caplog, setup, action, error, fragments, blocks_left, submitted
):
    setup(double)
    if action == "commit-twice":
        chain.commit("first")  # uses 100 of the 150 byte quota
        double.submissions.clear()
    run = chain.commit if action.startswith("commit") else chain.set_weights
    with (
        caplog.at_level(logging.WARNING, logger="neurons.chain.bittensor"),
        pytest.raises(ChainError) as caught,
    ):
        run("model" if run == chain.commit else {1: 1.0, 2: 0.5})
    assert type(caught.value) is error
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    if blocks_left is not None:
        assert caught.value.blocks_left == blocks_left
    assert bool(double.submissions) is submitted
    assert len(double.submissions) <= 1  # refusals are never resubmitted
    assert "refused" in caplog.text


# -- timeouts, retries, reconnects, watchdog ---------------------------------------------------------


def test_a_hung_call_times_out_is_retried_and_then_raises_chain_unavailable(make_chain, double):
    chain = make_chain(timeout_s=0.5, retries=1, backoff_s=0.05)
    double.inject("block_number", HANG, HANG)
    started = time.monotonic()
    with pytest.raises(ChainUnavailable, match=r"after 2 attempt\(s\).*timed out"):
        chain.current_block()
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4.0
    assert calls_of(double, "block_number") == 2
    assert (double.connects, double.closes) == (1, 1)  # dropped after two failures in a row
    assert chain.current_block() == START  # and a fresh connection answers
    assert double.connects == 2


def test_connection_errors_are_retried_with_a_reconnect(make_chain, double):
    chain = make_chain(retries=3)
    double.inject(
        "block_number", bt.RpcConnectionError("connection reset by peer"), ConnectionResetError("reset")
    )
    assert chain.current_block() == START
    assert calls_of(double, "block_number") == 3
    assert (double.connects, double.closes) == (2, 1)


def test_the_watchdog_reconnects_when_blocks_stop_advancing(make_chain, double, caplog):
    chain = make_chain(max_block_age_s=0.3)
    assert chain.current_block() == START
    time.sleep(0.4)
    with caplog.at_level(logging.WARNING, logger="neurons.chain.bittensor"):
        assert chain.current_block() == START  # stuck: reconnect and read again
    assert (double.connects, double.closes) == (2, 1)
    assert calls_of(double, "block_number") == 3
    assert f"stayed at {START}" in caplog.text and "reconnecting" in caplog.text
    # Idle time alone is not staleness: the head moved meanwhile.
    double.block += 1
    time.sleep(0.4)
    assert chain.metagraph().block == START + 1
    assert double.connects == 2


@pytest.mark.parametrize("action", ["commit", "set_weights"])
def test_a_write_whose_reply_was_lost_is_not_submitted_twice(make_chain, double, caplog, action):
    chain = make_chain(timeout_s=0.5, retries=2)
    double.inject("submit", LOST_REPLY)
    with caplog.at_level(logging.INFO, logger="neurons.chain.bittensor"):
        block = chain.commit("once") if action == "commit" else chain.set_weights({1: 1.0})
    assert block == START + 1
    assert len(double.submissions) == 1
    assert "landed at block" in caplog.text


def test_a_write_that_never_reached_the_chain_is_sent_again(make_chain, double):
    chain = make_chain(retries=2)
    double.inject("submit", bt.RpcConnectionError("socket closed"))
    assert chain.commit("again") == START + 1
    assert len(double.submissions) == 1 and calls_of(double, "submit") == 2


def test_an_unreachable_node_gives_chain_unavailable_through_the_real_backend(tmp_path):
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chain = BittensorChain(
        24, chain_endpoint=f"ws://127.0.0.1:{port}", wallet_path=str(tmp_path), retries=1, backoff_s=0.01
    )
    try:
        with pytest.raises(ChainUnavailable, match=r"after 2 attempt\(s\).*RpcConnectionError"):
            chain.current_block()
    finally:
        chain.close()


# -- limits, hashes, wallet, construction ------------------------------------------------------------


def test_limits_come_from_the_chain(chain, double):
    assert chain.limits() == ChainLimits(100, 100, MAX_COMMITMENT_BYTES, 12.0)
    double.hyper["WeightsSetRateLimit"] = 7
    double.max_space = 256  # two full-size commitments per 360-block epoch
    double.slot_duration_ms = 250
    assert chain.limits() == ChainLimits(7, 180, MAX_COMMITMENT_BYTES, 0.25)


def test_block_hash(chain, double):
    value = chain.block_hash(START - 1)
    assert value == double.hash_of(START - 1) and re.fullmatch(r"0x[0-9a-f]{64}", value)
    assert chain.block_hash(START) != value
    with pytest.raises(ChainError, match="future"):
        chain.block_hash(START + 1)
    with pytest.raises(ChainError, match=">= 0"):
        chain.block_hash(-1)


def test_a_missing_wallet_is_reported_with_its_path_and_the_fix(tmp_path, double):
    chain = BittensorChain(
        24, substrate=double, wallet_name="nope", wallet_hotkey="hk", wallet_path=str(tmp_path)
    )
    try:
        with pytest.raises(ChainError) as caught:
            chain.hotkey
        message = str(caught.value)
        assert str(tmp_path / "nope" / "hotkeys" / "hk") in message
        assert "btcli wallet new-hotkey --wallet nope --wallet-hotkey hk" in message
        assert getattr(chain, "hotkey", None) is None
        assert chain.current_block() == START and len(chain.metagraph().neurons) == 4  # reads need no wallet
        with pytest.raises(ChainError, match="no hotkey file"):
            chain.commit("x")
        assert double.submissions == []
    finally:
        chain.close()


def test_construction_checks_its_arguments(double, wallet):
    with BittensorChain(24, chain_endpoint="ws://127.0.0.1:9944", substrate=double, wallet=wallet) as chain:
        assert chain.endpoint == "ws://127.0.0.1:9944"
    assert BittensorChain(24).endpoint.startswith("wss://")  # finney, opened lazily: no network here
    for bad in (
        dict(netuid=-1),
        dict(netuid=True),
        dict(netuid=1, chain_endpoint="http://x"),
        dict(netuid=1, network="nowhere"),
        dict(netuid=1, timeout_s=0),
        dict(netuid=1, retries=-1),
    ):
        netuid = bad.pop("netuid")
        with pytest.raises(ChainError):
            BittensorChain(netuid, **bad)


def test_importing_neurons_chain_does_not_import_the_sdk():
    code = (
        "import sys, neurons.chain as c\n"
        "assert 'bittensor' not in sys.modules\n"
        "assert c.BittensorChain.__name__ == 'BittensorChain' and 'bittensor' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
