"""A stand-in for the chain behind the Bittensor SDK's `Substrate` seam (`bt.Client(substrate=...)`).

It is a small in-memory subnet, not a canned-answer table: it answers the storage reads, runtime
calls and block queries the SDK issues from its state, applies the calls it is sent (a commitment is
stored, weights are stored and `LastUpdate` moves), and refuses them the way the chain does
(unregistered signer, no validator permit, byte quota used up, rate limit). Refusals are built with
the SDK's own decoders (`chain_error_from_dispatch` for module errors found in a block,
`chain_error_from_substrate_request` for pool rejections), so the adapter sees what it would see
behind the real websocket backend.

It is strict: a storage item, runtime call or extrinsic it does not know fails the test loudly,
and `compose` checks call parameters against the chain's shapes (a `Raw<n>` field must hold exactly
n bytes, weights must be u16, ...). Every submission is signed by the signer the SDK hands over and
the signature is verified against the signer's address.

Faults: `inject(method, *actions)` queues, per method name, an exception to raise, `HANG` (never
answer; the await can be cancelled), or `LOST_REPLY` (for `submit`: apply the call, then never
answer). `reject_pool(...)` / `reject_dispatch(name)` make the next submission fail in the pool or
in its block.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import bittensor as bt
import bittensor_core
from bittensor._generated.errors import ERRORS
from bittensor._transport.errors import SubstrateRequestException
from bittensor.result import chain_error_from_dispatch, chain_error_from_substrate_request

HANG = "hang"
LOST_REPLY = "lost-reply"
RAO = 10**9


@dataclass
class NeuronState:
    hotkey: str
    coldkey: str
    stake_rao: int
    permit: bool
    registered_at: int


@dataclass
class Composed:
    """A composed call: the generated builder's fields plus deterministic stand-in call bytes."""

    module: str
    function: str
    params: dict[str, Any]

    @property
    def data(self) -> bytes:
        return repr((self.module, self.function, _plain(self.params))).encode()


@dataclass
class Submission:
    call: Composed
    signer: str
    signature_ok: bool
    options: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _module_error(name: str) -> dict:
    for (pallet, index), info in ERRORS.items():
        if info.name == name:
            return {"Module": {"index": pallet, "error": f"0x{index:02x}000000"}}
    raise KeyError(f"no chain error named {name}")


class SubstrateDouble:
    def __init__(self, netuid: int = 24, block: int = 1000):
        self.netuid = netuid
        self.block = block
        self.token_symbols: dict[int, str] = {}
        self.neurons: list[NeuronState] = []
        # Commitments.CommitmentOf rows as the SDK decodes them; tests may put malformed rows here.
        self.commitment_rows: dict[str, Any] = {}
        self.used_space: dict[str, int] = defaultdict(int)
        self.weights: dict[int, list[tuple[int, int]]] = {}
        self.last_update: dict[int, int] = {}
        self.timelocked_commits: list[dict] = []
        self.hyper: dict[str, Any] = {
            "WeightsSetRateLimit": 100,
            "CommitRevealWeightsEnabled": False,
            "MinAllowedWeights": 1,
            "MaxWeightsLimit": 65535,
            "Tempo": 360,
            "RevealPeriodEpochs": 1,
            "LastEpochBlock": block - 10,
            "PendingEpochAt": 0,
            "SubnetEpochIndex": 7,
            "BlocksSinceLastStep": 10,
            "SubnetEpochConsensus": "Yuma",
        }
        self.max_space = 3100
        self.slot_duration_ms = 12_000
        self.connects = 0
        self.closes = 0
        self.calls: list[tuple] = []
        self.submissions: list[Submission] = []
        self._faults: dict[str, deque] = defaultdict(deque)
        self._rejections: deque = deque()

    # -- test controls ---------------------------------------------------------------------------

    def add_neuron(self, hotkey: str, coldkey: str, stake_tao: float = 0.0, permit: bool = False) -> int:
        self.neurons.append(NeuronState(hotkey, coldkey, int(stake_tao * RAO), permit, self.block - 500))
        return len(self.neurons) - 1

    def uid_of(self, hotkey: str) -> int | None:
        return next((uid for uid, n in enumerate(self.neurons) if n.hotkey == hotkey), None)

    def inject(self, method: str, *actions: Any) -> None:
        self._faults[method].extend(actions)

    def reject_pool(self, message: str, data: str | None = None, code: int = 1010) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self._rejections.append(("pool", {"error": error}))

    def reject_dispatch(self, name: str, then: Any = None) -> None:
        """The next submission lands in a block and fails there with chain error `name`; `then(self)`
        runs after that block (e.g. to model another submission that won the race)."""
        self._rejections.append(("dispatch", (name, then)))

    def hash_of(self, block: int) -> str:
        return "0x" + hashlib.sha256(f"double|{block}".encode()).hexdigest()

    async def _fault(self, method: str, item: str | None = None) -> None:
        """Apply the next queued fault of `method`, or of `method:item` (e.g. `query_map:Commitments.CommitmentOf`)."""
        self.calls.append((method,))
        queue = self._faults.get(f"{method}:{item}") if item else None
        if not queue:
            queue = self._faults.get(method)
        if not queue:
            return
        action = queue.popleft()
        if action == HANG:
            await asyncio.Event().wait()
        if isinstance(action, BaseException):
            raise action
        if action != LOST_REPLY:
            raise AssertionError(f"unknown fault action {action!r}")
        queue.appendleft(action)  # consumed by submit itself

    # -- Substrate protocol: lifecycle -------------------------------------------------------------

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        await self._fault("connect")
        self.connects += 1

    async def close(self) -> None:
        self.closes += 1

    # -- reads -------------------------------------------------------------------------------------

    async def block_hash(self, block: int | None = None) -> str:
        await self._fault("block_hash")
        number = self.block if block is None else int(block)
        if number > self.block:
            raise chain_error_from_substrate_request(
                SubstrateRequestException(f"no block at height {number}")
            )
        return self.hash_of(number)

    async def block_number(self) -> int:
        await self._fault("block_number")
        return self.block

    async def finalized_block_number(self) -> int:
        return self.block - 2

    async def block_time(self) -> float:
        return int(await self.constant("Aura", "SlotDuration")) / 1000.0

    async def spec_version(self) -> int:
        return 400

    async def constant(self, module: str, name: str) -> Any:
        if (module, name) == ("Aura", "SlotDuration"):
            return self.slot_duration_ms
        raise AssertionError(f"unexpected constant {module}.{name}")

    def _check_netuid(self, params: list | None, at: int = 0) -> None:
        if not params or params[at] != self.netuid:
            raise AssertionError(f"expected netuid {self.netuid}, got params {params}")

    def _commitment_row(self, hotkey: str) -> Any:
        return self.commitment_rows.get(hotkey)

    async def query(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> Any:
        await self._fault("query", f"{module}.{storage_function}")
        self.calls.append(("query", module, storage_function, tuple(params or ())))
        item = (module, storage_function)
        if module == "SubtensorModule" and storage_function in self.hyper:
            self._check_netuid(params)
            return self.hyper[storage_function]
        if item == ("SubtensorModule", "Uids"):
            self._check_netuid(params)
            return self.uid_of(params[1])
        if item == ("SubtensorModule", "LastUpdate"):
            self._check_netuid(params)
            return [self.last_update.get(uid, n.registered_at) for uid, n in enumerate(self.neurons)]
        if item == ("SubtensorModule", "ValidatorPermit"):
            self._check_netuid(params)
            return [n.permit for n in self.neurons]
        if item == ("Commitments", "CommitmentOf"):
            self._check_netuid(params)
            row = self._commitment_row(params[1])
            if isinstance(row, BaseException):
                raise row
            return row
        if item == ("Commitments", "MaxSpace"):
            return self.max_space
        raise AssertionError(f"unexpected storage read {module}.{storage_function}{params}")

    async def query_map(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> list:
        await self._fault("query_map", f"{module}.{storage_function}")
        self.calls.append(("query_map", module, storage_function, tuple(params or ())))
        item = (module, storage_function)
        if item == ("SubtensorModule", "Uids"):
            self._check_netuid(params)
            return [(n.hotkey, uid) for uid, n in enumerate(self.neurons)]
        if item == ("SubtensorModule", "Weights"):
            self._check_netuid(params)
            return [(uid, list(row)) for uid, row in sorted(self.weights.items())]
        if item == ("Commitments", "CommitmentOf"):
            self._check_netuid(params)
            return list(self.commitment_rows.items())
        if item == ("SubtensorModule", "TokenSymbol"):
            return []
        raise AssertionError(f"unexpected storage map read {module}.{storage_function}{params}")

    async def query_batch(
        self, module: str, storage_function: str, param_sets: list, block_hash: str | None = None
    ) -> list:
        return [await self.query(module, storage_function, list(p), block_hash) for p in param_sets]

    async def map_has_entries(
        self, module: str, storage_function: str, params: list, block_hash: str | None = None
    ) -> bool:
        return bool(await self.query_map(module, storage_function, params, block_hash))

    async def runtime_call(self, api: str, method: str, params: list, block_hash: str | None = None) -> Any:
        await self._fault("runtime_call")
        self.calls.append(("runtime_call", api, method, tuple(params)))
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise AssertionError(f"unexpected runtime call {api}.{method}{params}")
        if params != [self.netuid]:
            return None  # no such subnet
        n = len(self.neurons)
        return {
            "netuid": self.netuid,
            "name": list(b"quasar"),
            "symbol": list("\u03b1".encode()),
            "block": self.block,
            "tempo": self.hyper["Tempo"],
            "last_step": self.block - 10,
            "blocks_since_last_step": 10,
            "owner_hotkey": self.neurons[0].hotkey if n else "",
            "owner_coldkey": self.neurons[0].coldkey if n else "",
            "network_registered_at": 1,
            "num_uids": n,
            "max_uids": 256,
            "hotkeys": [x.hotkey for x in self.neurons],
            "coldkeys": [x.coldkey for x in self.neurons],
            "active": [True] * n,
            "validator_permit": [x.permit for x in self.neurons],
            "last_update": [self.last_update.get(u, x.registered_at) for u, x in enumerate(self.neurons)],
            "block_at_registration": [x.registered_at for x in self.neurons],
            "total_stake": [x.stake_rao for x in self.neurons],
            "alpha_stake": [x.stake_rao for x in self.neurons],
            "tao_stake": [0] * n,
            "emission": [0] * n,
        }

    async def decode_scale(self, type_string: str, data: Any) -> Any:
        raise AssertionError("the double has no runtime metadata to decode with")

    async def get_block(self, block_number: int | None = None, block_hash: str | None = None) -> dict | None:
        raise AssertionError("unexpected get_block")

    async def blocks(self, *, finalized: bool = False):
        raise AssertionError("unexpected block subscription")
        yield  # pragma: no cover

    async def events(self, block_hash: str | None = None) -> list[dict]:
        return []

    # -- calls and fees ----------------------------------------------------------------------------

    async def compose(self, call: Any) -> Composed:
        if isinstance(call, Composed):
            return call
        module, function, params = call
        checks = {
            ("Commitments", "set_commitment"): self._check_set_commitment,
            ("SubtensorModule", "set_mechanism_weights"): self._check_set_weights,
            ("SubtensorModule", "commit_timelocked_mechanism_weights"): self._check_timelocked,
        }
        check = checks.get((module, function))
        if check is None:
            raise AssertionError(f"unexpected call {module}.{function}")
        check(dict(params))
        return Composed(module, function, dict(params))

    def _check_set_commitment(self, params: dict) -> None:
        assert set(params) == {"netuid", "info"}, params
        fields = params["info"]["fields"]
        assert isinstance(fields, list) and all(isinstance(group, list) for group in fields), fields
        for group in fields:
            for entry in group:
                ((variant, value),) = entry.items()
                size = re.fullmatch(r"Raw(\d+)", variant)
                assert size, f"unexpected commitment field {variant}"
                assert isinstance(value, bytes) and len(value) == int(size.group(1)) <= 128, (variant, value)

    def _check_set_weights(self, params: dict) -> None:
        assert set(params) == {"netuid", "mecid", "dests", "weights", "version_key"}, params
        assert len(params["dests"]) == len(params["weights"])
        assert all(isinstance(v, int) and 0 <= v <= 65535 for v in params["dests"] + params["weights"])

    def _check_timelocked(self, params: dict) -> None:
        assert set(params) == {"netuid", "mecid", "commit", "reveal_round", "commit_reveal_version"}, params
        assert isinstance(params["commit"], bytes) and params["commit"], params
        assert isinstance(params["reveal_round"], int) and params["reveal_round"] > 0

    async def estimate_fee(self, call: Any, keypair: Any) -> bt.Balance:
        return bt.Balance.from_rao(125_000)

    async def estimate_weight(self, call: Any, keypair: Any) -> dict:
        return {"ref_time": 1_000_000, "proof_size": 4_000}

    async def account_next_index(self, address: str) -> int:
        return sum(1 for s in self.submissions if s.signer == address)

    async def mev_next_key(self) -> bytes | None:
        return None

    # -- writes ------------------------------------------------------------------------------------

    async def submit(
        self,
        call: Composed,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = None,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> bt.ExtrinsicResult:
        await self._fault("submit")
        signature = bytes(keypair.sign(call.data))
        ok = bittensor_core.verify(call.data, signature, keypair.ss58_address)
        self.submissions.append(
            Submission(
                call,
                keypair.ss58_address,
                ok,
                {"inclusion": wait_for_inclusion, "final": wait_for_finalization},
            )
        )
        if self._rejections:
            kind, detail = self._rejections.popleft()
            if kind == "pool":  # turned away before any block: nothing moves
                error = chain_error_from_substrate_request(SubstrateRequestException(detail))
                return bt.ExtrinsicResult(success=False, message=error.message, error=error)
            name, then = detail
            result = self._in_block(failure=name)
            if then is not None:
                then(self)
            return result
        refusal = self._refusal(call, keypair.ss58_address)
        if refusal is not None:
            return self._in_block(failure=refusal)
        result = self._in_block(apply=(call, keypair.ss58_address))
        queue = self._faults.get("submit")
        if queue and queue[0] == LOST_REPLY:
            queue.popleft()
            await asyncio.Event().wait()
        return result

    def _refusal(self, call: Composed, signer: str) -> str | None:
        """The chain's own checks at dispatch."""
        uid = self.uid_of(signer)
        if (call.module, call.function) == ("Commitments", "set_commitment"):
            if uid is None:
                return "AccountNotAllowedCommit"
            size = sum(len(v) for group in call.params["info"]["fields"] for e in group for v in e.values())
            if self.used_space[signer] + max(100, size) > self.max_space:
                return "SpaceLimitExceeded"
            return None
        if uid is None:
            return "HotKeyNotRegisteredInSubNet"
        if not self.neurons[uid].permit:
            return "NeuronNoValidatorPermit"
        last = self.last_update.get(uid)
        if last is not None and self.block + 1 - last < self.hyper["WeightsSetRateLimit"]:
            return "SettingWeightsTooFast"
        return None

    def _in_block(self, *, failure: str | None = None, apply: tuple | None = None) -> bt.ExtrinsicResult:
        self.block += 1
        block_hash, extrinsic_id = self.hash_of(self.block), f"{self.block}-0002"
        if failure is not None:
            error = chain_error_from_dispatch(_module_error(failure))
            return bt.ExtrinsicResult(
                success=False,
                message=error.message,
                block_hash=block_hash,
                extrinsic_id=extrinsic_id,
                error=error,
            )
        call, signer = apply
        uid = self.uid_of(signer)
        if call.function == "set_commitment":
            payload = b"".join(
                v for group in call.params["info"]["fields"] for e in group for v in e.values()
            )
            self.used_space[signer] += max(100, len(payload))
            self.commitment_rows[signer] = {
                "block": self.block,
                "deposit": 0,
                "info": {"fields": [{f"Raw{len(payload)}": "0x" + payload.hex()}]},
            }
        elif call.function == "set_mechanism_weights":
            self.weights[uid] = list(zip(call.params["dests"], call.params["weights"]))
            self.last_update[uid] = self.block
        elif call.function == "commit_timelocked_mechanism_weights":
            self.timelocked_commits.append({"uid": uid, "block": self.block, **call.params})
            self.last_update[uid] = self.block
        return bt.ExtrinsicResult(
            success=True,
            message="Success",
            block_hash=block_hash,
            extrinsic_id=extrinsic_id,
            fee=bt.Balance.from_rao(125_000),
        )

    async def submit_signed(self, *args: Any, **kwargs: Any) -> bt.ExtrinsicResult:
        raise AssertionError("unexpected submit_signed")

    async def sign_extrinsic(self, *args: Any, **kwargs: Any) -> tuple[bytes, str]:
        raise AssertionError("unexpected sign_extrinsic")

    async def find_extrinsic(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unexpected find_extrinsic")

    async def prepare(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unexpected prepare")

    async def submit_signature(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unexpected submit_signature")

    def multisig_account(self, signatories: list[str], threshold: int) -> Any:
        raise AssertionError("unexpected multisig_account")

    async def submit_multisig(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unexpected submit_multisig")
