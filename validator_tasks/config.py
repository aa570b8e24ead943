"""Typed settings of a long-context evaluation run, validated once at the boundary.

Lengths are written as a length ladder, `4k,16k,64k,256k,1m` (k = 1024, m = 1024^2, plain
integers too); tasks as names, or the groups `all`, `ruler`, `babilong`. Seeds either come from
`seed` or, so that validators agree and miners cannot precompute, from a block hash.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from validator_tasks.base import TASKS

_LENGTH = re.compile(r"^(\d+)\s*([kKmM]?)$")
_BLOCK_HASH = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def parse_length(text: str | int) -> int:
    """`4k` -> 4096, `1m` -> 1048576, `5000` -> 5000."""
    if isinstance(text, int):
        return text
    m = _LENGTH.match(str(text).strip())
    if not m:
        raise ValueError(f"cannot read {text!r} as a length: write a token count like 4096, 4k or 1m")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def format_length(tokens: int) -> str:
    """Inverse of parse_length where exact: 4096 -> 4K, 1048576 -> 1M, 5000 -> 5000."""
    if tokens % 1024**2 == 0:
        return f"{tokens // 1024**2}M"
    if tokens % 1024 == 0:
        return f"{tokens // 1024}K"
    return str(tokens)


def split_list(value: Any) -> list:
    """Accept `a,b`, `["a,b", "c"]` or `[1, 2]` (flags, YAML and Python alike)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list = []
    for item in items:
        out.extend(p.strip() for p in item.split(",") if p.strip()) if isinstance(item, str) else out.append(
            item
        )
    return out


TASK_GROUPS = {
    "all": lambda: sorted(TASKS),
    "ruler": lambda: sorted(n for n, s in TASKS.items() if s.family == "ruler"),
    "babilong": lambda: sorted(n for n, s in TASKS.items() if s.family == "babilong"),
}


def _expand_tasks(value: Any) -> list[str]:
    names: list[str] = []
    for item in split_list(value):
        expanded = TASK_GROUPS[item]() if item in TASK_GROUPS else [item]
        names.extend(n for n in expanded if n not in names)
    return names


# Items are annotated (not bare int) so that the command line hands them over as text ("4k").
Length = Annotated[int, BeforeValidator(parse_length)]
TaskList = Annotated[list[str], BeforeValidator(_expand_tasks)]
LengthList = Annotated[list[Length], BeforeValidator(split_list)]
ModelList = Annotated[list[str], BeforeValidator(split_list)]


def seed_from_block_hash(block_hash: str) -> int:
    """A 48-bit evaluation seed from a chain block hash (`0x` + 64 hex digits): every validator
    reading the same block draws the same samples, and nobody knows them before the block exists."""
    if not isinstance(block_hash, str) or not _BLOCK_HASH.match(block_hash.strip()):
        raise ValueError(f"block hash must be 64 hex digits, optionally with 0x, got {block_hash!r}")
    digest = hashlib.sha256(b"q24-longctx|" + bytes.fromhex(block_hash.strip().removeprefix("0x"))).digest()
    return int.from_bytes(digest[:6], "little")


def sample_seeds(base_seed: int, count: int) -> list[int]:
    """`count` per-sample seeds from one base seed. The same seeds serve every task (the task name is
    mixed in by `task_rng`) and every length (a seed names the same story at every rung)."""
    return [
        int.from_bytes(hashlib.sha256(f"{base_seed}|{i}".encode()).digest()[:6], "little")
        for i in range(count)
    ]


class EvalConfig(BaseModel):
    """`python -m validator_tasks eval`: every field is a flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    model: ModelList = Field(
        description="model directories to evaluate (a Quasar checkpoint or any transformers causal LM "
        "saved with safetensors); comma-separated or repeated after the flag"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer directory for every model (none: each model's own directory)"
    )
    tasks: TaskList = Field(
        default_factory=lambda: sorted(TASKS),
        description="tasks, comma-separated; or all, ruler, babilong",
    )
    lengths: LengthList = Field(
        default_factory=lambda: [4096, 16384],
        description="the length ladder in prompt tokens, comma-separated, e.g. 4k,16k,64k,256k,1m",
    )
    samples: int = Field(4, ge=1, le=10_000, description="samples per task and length")
    seed: int = Field(0, ge=0, description="base seed for the samples (ignored when block_hash is given)")
    block_hash: str | None = Field(
        None, description="derive the seed from this block hash (0x + 64 hex digits), as validators do"
    )
    stop_below: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="stop climbing the ladder once a length's mean accuracy falls below this; "
        "the lengths not run score 0",
    )
    time_budget: float = Field(
        3600.0,
        gt=0,
        description="seconds per model, loading included; a model still running when it is spent is "
        "stopped and its remaining samples score 0",
    )
    chunk: int = Field(
        4096, ge=1, description="tokens per forward call when streaming a context through a recurrent model"
    )
    baseline_chunk: int = Field(
        0,
        ge=0,
        description="tokens per forward call for models without a recurrent cache "
        "(0: the whole prompt in one forward, their normal forward)",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="answer token budget (default: each task's own, as RULER sets them)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the models run")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="model weights and compute"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads in the model process")
    isolate: bool = Field(
        True,
        description="run each model in its own process, killed when its time budget is spent "
        "(--no-isolate runs in this process and checks the budget between forward calls)",
    )
    out: str = Field("longctx_report.json", description="where the JSON report is written")
    plot: str | None = Field(None, description="heatmap PNG path (default: the report path with .png)")
    progress: bool = Field(True, description="show a progress bar over samples")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(
                f"unknown task(s) {', '.join(unknown)}; available: {', '.join(sorted(TASKS))} "
                f"(or the groups {', '.join(TASK_GROUPS)})"
            )
        if not v:
            raise ValueError("no tasks given")
        return v

    @field_validator("lengths")
    @classmethod
    def _ladder(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("no lengths given")
        if any(x < 64 for x in v):
            raise ValueError(f"every length must be at least 64 tokens, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"lengths repeat: {v}")
        return sorted(v)

    @field_validator("model")
    @classmethod
    def _some_model(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one model directory")
        return v

    @field_validator("block_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        if v is not None:
            seed_from_block_hash(v)  # raises with the reason
        return v

    @model_validator(mode="after")
    def _cuda_present(self) -> EvalConfig:
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        return self

    @property
    def base_seed(self) -> int:
        return seed_from_block_hash(self.block_hash) if self.block_hash else self.seed

    def plot_path(self) -> str:
        return self.plot or re.sub(r"\.json$", "", self.out) + ".png"
