"""Settings of the miner and the validator (pydantic, validated once at start).

Flags follow Bittensor habits (`--netuid`, `--wallet.name`, `--wallet.hotkey`, `--wallet.path`,
`--subtensor.network`, `--subtensor.chain_endpoint`, `--logging.debug`). Values come from the
defaults, then a YAML file (`--config`), then environment variables (`Q24_` + the dotted name in
capitals, a double underscore between sections: `Q24_WALLET__NAME`, `Q24_SUBTENSOR__NETWORK`),
then flags. Every field's description is its `--help` line.

With `--subtensor.network embedded` (the default) the node needs no chain, no GPU and no network:
an embedded dev chain, a local checkpoint store and a tiny local teacher, all under `--root`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.cliconfig import ConfigError, add_model_flags, build_layered_config
from distill.config import PresetName
from distill.teachers import TeacherConfig

Strict = ConfigDict(extra="forbid")
ENV_PREFIX = "Q24_"
NETWORKS = ("finney", "test", "archive", "local", "embedded")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

S = TypeVar("S", bound=BaseModel)


class WalletSettings(BaseModel):
    model_config = Strict

    name: str = Field("default", description="wallet (coldkey) name")
    hotkey: str = Field("default", description="hotkey name inside the wallet")
    path: str = Field("~/.bittensor/wallets", description="directory holding the wallets")

    @field_validator("name", "hotkey")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '_', '.' or '-' (at most 64 characters)")
        return v


class SubtensorSettings(BaseModel):
    model_config = Strict

    network: str = Field(
        "embedded",
        description="finney, test, archive, local, embedded (the offline dev chain) or a ws:// / wss:// URL",
    )
    chain_endpoint: str | None = Field(
        None, description="websocket endpoint of a subtensor node; overrides --subtensor.network"
    )
    timeout_s: float = Field(60.0, gt=0, description="seconds before one chain call is abandoned")
    retries: int = Field(3, ge=0, description="retries of a chain call after a timeout or lost connection")
    embedded_path: str | None = Field(
        None, description="embedded chain: the SQLite file the nodes share (default: ROOT/chain.sqlite)"
    )
    embedded_block_seconds: float = Field(
        1.0, gt=0, description="embedded chain: seconds per block (applies when the file is created)"
    )
    embedded_stake: float | None = Field(
        None,
        ge=0,
        description="embedded chain: register this node with this stake at start "
        "(default: 1000 for validators, 0 for miners)",
    )

    @field_validator("network")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in NETWORKS and not v.startswith(("ws://", "wss://")):
            raise ValueError(f"expected one of {', '.join(NETWORKS)} or a ws:// / wss:// URL")
        return v

    @field_validator("chain_endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("ws://", "wss://")):
            raise ValueError("a chain endpoint is a ws:// or wss:// URL")
        return v

    @property
    def embedded(self) -> bool:
        return self.network == "embedded" and self.chain_endpoint is None


class LoggingSettings(BaseModel):
    model_config = Strict

    debug: bool = Field(False, description="debug logging for the node's own packages")
    trace: bool = Field(False, description="debug logging for everything, the chain SDK included")
    format: Literal["text", "json"] = Field("text", description="log lines as text or one JSON object each")


class TelemetrySettings(BaseModel):
    model_config = Strict

    host: str = Field("127.0.0.1", description="address of the health and Prometheus endpoint")
    port: int = Field(
        9100, ge=-1, le=65535, description="port of GET /health and GET /metrics (0: any free port, -1: off)"
    )
    stale_after_s: float = Field(
        1800.0, gt=0, description="/health answers 503 when the node made no progress for this long"
    )


class ValidatorTelemetrySettings(TelemetrySettings):
    """The validator's own default port, so a miner and a validator on one host do not collide
    (a class default, not a factory value: setting any telemetry field must keep it)."""

    port: int = Field(
        9200, ge=-1, le=65535, description="port of GET /health and GET /metrics (0: any free port, -1: off)"
    )


class StoreSettings(BaseModel):
    model_config = Strict

    kind: Literal["auto", "local", "hf"] = Field(
        "auto", description="checkpoint store: hf (Hugging Face Hub), local, or auto (local on embedded)"
    )
    local_dir: str | None = Field(None, description="local store directory (default: ROOT/store)")
    max_download_gb: float = Field(16.0, gt=0, description="largest submission a validator downloads")


class CompetitionSettings(BaseModel):
    """What a submission must be; every node of the subnet must use the same values."""

    model_config = Strict

    tokenizer: str | None = Field(
        None,
        description="the competition's tokenizer: a directory or a built-in name (qwen3.5); the "
        "students' vocabulary (default: the dev kit's on embedded, qwen3.5 elsewhere)",
    )
    preset: PresetName | None = Field(
        None,
        description="Quasar preset new students start from (miners) and submissions must match "
        "(validators); default tiny. Not with --competition.base",
    )
    base: str | None = Field(
        None,
        description="the base checkpoint every student starts from and whose architecture submissions "
        "must match: a directory of ours, a published silx-ai directory, or a Hub id with "
        "--competition.base_revision (e.g. silx-ai/Quasar-3B-A1B-Preview)",
    )
    base_revision: str | None = Field(
        None, description="the Hub commit sha (40 hex characters) of --competition.base when it is a Hub id"
    )
    fixed_fields: list[str] = Field(
        default_factory=lambda: ["vocab_size", "hidden_size", "num_hidden_layers", "layer_pattern"],
        description="QuasarConfig fields a submission must share with the preset",
    )
    max_parameters: int = Field(3_500_000_000, ge=1, description="parameter budget of a submission")
    max_cost_ratio: float = Field(
        4.0,
        ge=1,
        description="a submission's forward may cost at most this many times the competition "
        "architecture's per token (flops, recurrent state, activation memory; quasar.cost)",
    )

    @model_validator(mode="after")
    def _one_architecture(self) -> CompetitionSettings:
        if self.base is not None and self.preset is not None:
            raise ValueError(
                "give --competition.base or --competition.preset, not both: the base's architecture is the "
                "competition's"
            )
        if self.base_revision is not None and self.base is None:
            raise ValueError("--competition.base_revision needs --competition.base")
        return self

    @property
    def preset_name(self) -> str:
        return self.preset or "tiny"


class NodeSettings(BaseModel):
    """Settings both neurons share."""

    model_config = Strict

    netuid: int = Field(24, ge=0, le=65535, description="subnet uid")
    wallet: WalletSettings = Field(default_factory=WalletSettings)
    subtensor: SubtensorSettings = Field(default_factory=SubtensorSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    competition: CompetitionSettings = Field(default_factory=CompetitionSettings)
    teacher: TeacherConfig | None = Field(
        None,
        description="the teacher (default on embedded: the dev kit's tiny local model through 'hf')",
    )
    root: str = Field(
        "~/.quasar-sn24",
        description="node directory: chain file (embedded), store (local), dev kit, per-node state",
    )
    device: str = Field("auto", description="torch device: auto (cuda when available), cpu, cuda, cuda:N")
    max_rounds: int | None = Field(
        None, ge=1, description="stop after this many rounds (none: run until stopped)"
    )

    @model_validator(mode="after")
    def _needs_real_settings(self) -> NodeSettings:
        if not self.subtensor.embedded:
            if self.teacher is None:
                raise ValueError(
                    f"on network {self.subtensor.chain_endpoint or self.subtensor.network} give "
                    "--teacher.kind/--teacher.model (the dev kit defaults exist only on the embedded chain)"
                )
            if self.store.kind == "local":
                raise ValueError(
                    "the local store is only for the embedded chain: other validators cannot read it; "
                    "use --store.kind hf"
                )
        return self

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()

    @property
    def store_kind(self) -> str:
        if self.store.kind != "auto":
            return self.store.kind
        return "local" if self.subtensor.embedded else "hf"


class MinerTrainSettings(BaseModel):
    """The distillation each round runs (`distill`'s trainer with a live teacher)."""

    model_config = Strict

    steps_per_round: int = Field(50, ge=1, description="optimizer steps between publications")
    sources: list[str] = Field(
        default_factory=list,
        description="training text (files, directories, hf:NAME); default on embedded: the dev kit corpus",
    )
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    total_steps: int = Field(
        10_000, ge=1, description="length of the learning-rate schedule (cosine decay over this many steps)"
    )
    sample_len: int = Field(64, ge=2, description="tokens per teacher-scored sample")
    seq_len: int = Field(128, ge=2, description="tokens per packed training window")
    batch_size: int = Field(4, ge=1, description="windows per micro-batch")
    k: int = Field(32, ge=1, le=4096, description="teacher top-k per position")
    eval_samples: int = Field(24, ge=1, description="held-out samples for the miner's own KL check")
    seed: int = Field(0, description="seed of the student's initialisation and data order")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='more distill TrainConfig fields as JSON, e.g. {"loss": {"kind": "jsd"}}',
    )


class MinerPublishSettings(BaseModel):
    model_config = Strict

    repo: str | None = Field(
        None,
        description="where checkpoints are published: a Hub repo 'user/name' (hf) or a key (local; "
        "default: the wallet and hotkey names)",
    )
    min_improvement: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="commit only when the held-out KL is this fraction below the last committed one",
    )
    longctx_tolerance: float = Field(
        0.05, ge=0, le=1, description="and the self-evaluated long-context accuracy dropped at most this much"
    )
    longctx_lengths: str = Field("1k", description="length ladder of the miner's long-context self-check")
    longctx_samples: int = Field(
        1, ge=0, description="samples per task and length of the self-check (0: off)"
    )


class MinerConfig(NodeSettings):
    """`python neurons/miner.py`: distil, self-evaluate, publish, commit; resumes after a restart."""

    train: MinerTrainSettings = Field(default_factory=MinerTrainSettings)
    publish: MinerPublishSettings = Field(default_factory=MinerPublishSettings)


class KLSettings(BaseModel):
    """Distillation fidelity on prompts seeded by the round's block hash."""

    model_config = Strict

    prompts: int = Field(32, ge=2, description="prompts per round (pairs for the paired test)")
    prompt_tokens: int = Field(96, ge=8, description="tokens per prompt")
    score_from: int = Field(16, ge=0, description="positions before this are context, not scored")
    k: int = Field(32, ge=1, le=4096, description="teacher top-k per position")
    sources: list[str] = Field(
        default_factory=list,
        description="text prompts are cut from (files, directories, hf:NAME); default on embedded: the dev kit corpus",
    )
    max_kl: float = Field(
        8.0, gt=0, description="a model whose mean KL is above this is not a distilled student: score 0"
    )


class LongContextSettings(BaseModel):
    model_config = Strict

    tasks: str = Field(
        "niah_single,variable_tracking", description="validator_tasks tasks (or all, ruler, babilong)"
    )
    lengths: str = Field("1k,2k", description="the length ladder, e.g. 4k,16k,64k,256k,1m")
    samples: int = Field(2, ge=0, description="samples per task and length (0: skip the suite)")
    chunk: int = Field(4096, ge=1, description="tokens per streamed forward call")


class ScoringSettings(BaseModel):
    model_config = Strict

    margin: float = Field(
        0.03, ge=0, lt=1, description="a later submission must beat an earlier one by this relative margin"
    )
    alpha: float = Field(0.03, gt=0, lt=1, description="significance level of the paired one-sided tests")
    temperature: float = Field(0.1, gt=0, description="softmax temperature over win rates")
    ema: float = Field(0.5, gt=0, le=1, description="weight of the newest round in the moving average")
    time_budget_s: float = Field(
        600.0, gt=0, description="seconds per submission per round (download, checks, KL, long context)"
    )
    max_models: int = Field(
        32,
        ge=1,
        description="most submissions evaluated in one round (up to half go to the leaders, the rest to "
        "new and then least recently judged submissions; see README)",
    )
    worker_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory cap of the process a submission runs in, GiB (default: 3x the competition "
        "model in fp32 + 4 GiB)",
    )
    publish_grace_blocks: int = Field(
        300,
        ge=0,
        description="blocks after its commitment a submission has to become downloadable (commit, then "
        "publish); until then it is retried each round, after that rejected",
    )
    resemblance: float = Field(
        0.2,
        ge=0,
        description="a submission whose outputs on the round's prompts are closer to an earlier one's than "
        "this fraction of its KL to the teacher earns only by beating that one by the margin",
    )


class ValidatorConfig(NodeSettings):
    """`python neurons/validator.py`: score the miners' checkpoints each round and set weights."""

    interval_blocks: int = Field(20, ge=1, description="blocks from the start of one round to the next")
    kl: KLSettings = Field(default_factory=KLSettings)
    longctx: LongContextSettings = Field(default_factory=LongContextSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    telemetry: ValidatorTelemetrySettings = Field(default_factory=ValidatorTelemetrySettings)


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Environment variables {ENV_PREFIX}<SECTION>__<FIELD> (e.g. {ENV_PREFIX}WALLET__NAME) "
        "sit between the YAML file and the flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help="settings file; environment and flags override it")
    add_model_flags(parser, model)
    return parser


def parse_config(model: type[S], argv: list[str] | None, prog: str, description: str) -> S:
    """Parse flags (exit 2 with a message on bad input, as argparse does) into a validated `model`."""
    parser = build_parser(model, prog, description)
    args = parser.parse_args(argv)
    yaml_path = args.config
    del args.config
    try:
        return build_layered_config(model, args, yaml_path=yaml_path, env_prefix=ENV_PREFIX)
    except ConfigError as e:
        parser.exit(2, f"{prog}: {e}\n")
