"""Configuration of `python -m distill cache` and `python -m distill train` (pydantic, validated once).

Every field's description is its `--help` text; nested sections become dotted flags
(`--optim.lr 3e-4`, `--loss.kind jsd`, `--teacher.kind vllm-server`), and a YAML file given with
`--config` may hold any of them under the same names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.losses import LossConfig
from distill.teachers import TeacherConfig

Strict = ConfigDict(extra="forbid", frozen=True)

# The precisions of distill.cache.Precision (named here so that --help does not import numpy).
CachePrecision = Literal["lossless", "compact"]
CACHE_PRECISION_HELP = (
    "how the logit cache stores log-probs: lossless (ids exact, log-probs at float16) or compact (lossy, "
    "a third fewer bytes or more: per position the lowest ranks holding at most 3 percent of the "
    "probability are folded into the tail, the top 32 always kept; log-probs to the nearest 1/16 nat, "
    "error <= 1/32). Each precision is its own cache directory"
)


class DataConfig(BaseModel):
    model_config = Strict

    sources: list[str] = Field(
        default_factory=list,
        description="training text: .txt/.md files (one document each), .jsonl files, directories, or hf:NAME[:CONFIG][@SPLIT]",
    )
    text_field: str = Field("text", description="JSONL / dataset field holding the text")
    tokenizer: str | None = Field(
        None,
        description="student tokenizer: a directory (transformers format) or a builtin name (qwen3.5, qwen3); the cache and checkpoints record it",
    )
    sample_len: int = Field(
        512,
        ge=2,
        description="tokens per sample: the unit the teacher scores (documents are cut into samples)",
    )
    seq_len: int = Field(2048, ge=2, description="tokens per packed training window (>= sample_len)")
    batch_size: int = Field(
        1, ge=1, description="windows per micro-batch (laid end to end in one packed row)"
    )
    eval_sources: list[str] = Field(
        default_factory=list,
        description="held-out text for evaluation; default: the first eval_samples samples of the training stream, never trained on",
    )
    eval_samples: int = Field(
        32, ge=0, description="held-out samples scored at each evaluation (0: no evaluation)"
    )
    prefetch: int | None = Field(
        None,
        ge=0,
        description="optimizer steps of batches built ahead in a background thread (cache decoding, live "
        "teacher, targets); 0: in the step's own thread; default: 2 on a GPU, 0 on CPU, where the step's "
        "threads take every core and a producer thread slows them more than waiting does. The order is "
        "the same either way",
    )

    @model_validator(mode="after")
    def _fits(self) -> DataConfig:
        if self.sample_len > self.seq_len:
            raise ValueError(f"sample_len ({self.sample_len}) must be <= seq_len ({self.seq_len})")
        return self


# The names of quasar.configuration.PRESETS (kept here so that --help does not import transformers;
# a test checks that the two agree).
PresetName = Literal["tiny", "small", "3b-a1b", "published-3b-a1b"]


class StudentConfig(BaseModel):
    model_config = Strict

    preset: PresetName = Field("tiny", description="Quasar preset for a new student")
    init_from: str | None = Field(
        None,
        description="start from this Quasar checkpoint directory instead of a fresh preset (a published "
        "silx-ai checkpoint: convert it first with python -m quasar import-published)",
    )
    position_mode: Literal["rope", "none"] | None = Field(
        None,
        description="override the position mode; 'none' on a RoPE checkpoint is the DroPE recalibration stage",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='QuasarConfig fields for a new student, as JSON, e.g. {"vocab_size": 512}',
    )
    attention_backend: Literal["auto", "triton", "torch", "naive"] = Field(
        "auto", description="kernel backend (auto: Triton on CUDA, chunked PyTorch elsewhere)"
    )


class OptimConfig(BaseModel):
    model_config = Strict

    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final learning rate as a fraction of lr (cosine)"
    )
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay on matrices (not norms, biases, embeddings)"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm (0: off)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class TrainConfig(BaseModel):
    model_config = Strict

    out_dir: str = Field("runs/distill", description="checkpoints, metrics.jsonl and the final model go here")
    steps: int = Field(
        1000, ge=1, description="optimizer steps to train (a resumed run continues up to this)"
    )
    schedule_steps: int | None = Field(
        None,
        ge=1,
        description="length of the learning-rate schedule (default: steps); a run extended round by round "
        "(the miner) keeps one schedule",
    )
    cache_dir: str | None = Field(
        None,
        description="train from this logit cache (python -m distill cache); with a teacher too, new samples are added to it",
    )
    k: int = Field(128, ge=1, le=4096, description="teacher top-k per position (live teacher)")
    cache_precision: CachePrecision = Field(
        "lossless",
        description="precision of the samples a live teacher adds to --cache_dir (see distill cache "
        "--help); a cache read for training carries its own",
    )
    teacher: TeacherConfig | None = Field(None, description="live teacher (when not training from a cache)")
    teacher_tokenizer: str | None = Field(
        None,
        description="the teacher's tokenizer (a directory or a builtin name: qwen3.5, qwen3), when it differs from the student's (byte-offset alignment)",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    seed: int = Field(0, description="seed for initialisation and data order")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="bf16 autocast (auto: on for CUDA)")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward to save memory"
    )
    fsdp: Literal["auto", "on", "off"] = Field(
        "auto", description="FSDP2 sharding under torchrun (auto: on for the 3b-a1b preset), else DDP"
    )
    save_every: int = Field(100, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    eval_every: int = Field(100, ge=1, description="held-out KL every N steps (and at step 0 and the end)")
    log_every: int = Field(1, ge=1, description="metrics line every N steps")
    resume: bool = Field(True, description="continue from the latest checkpoint in out_dir when there is one")
    wandb_project: str | None = Field(
        None, description="also log to this Weights & Biases project (needs wandb)"
    )
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _source(self) -> TrainConfig:
        if self.cache_dir is None and self.teacher is None:
            raise ValueError("give a logit cache (--cache_dir) or a live teacher (--teacher.kind ...)")
        if self.teacher is not None and not self.data.sources:
            raise ValueError("a live teacher needs training text: --data.sources FILE_OR_DIR ...")
        if self.teacher is not None and self.data.tokenizer is None:
            raise ValueError("a live teacher needs the student tokenizer: --data.tokenizer DIR")
        return self


class CacheConfig(BaseModel):
    model_config = Strict

    cache_dir: str = Field(description="logit cache root (one subdirectory per teacher)")
    teacher: TeacherConfig = Field(description="the teacher to score samples with")
    teacher_tokenizer: str | None = Field(
        None,
        description="the teacher's tokenizer (a directory or a builtin name: qwen3.5, qwen3), when it differs from the student's (byte-offset alignment)",
    )
    k: int = Field(128, ge=1, le=4096, description="top-k log-probs stored per position")
    cache_precision: CachePrecision = Field("lossless", description=CACHE_PRECISION_HELP)
    data: DataConfig = Field(default_factory=DataConfig)
    max_samples: int | None = Field(
        None, ge=1, description="stop after this many samples (default: all text)"
    )
    teacher_batch: int = Field(16, ge=1, description="samples per teacher call")
    pipeline_depth: int = Field(
        3,
        ge=1,
        description="teacher batches in flight: requested ahead while earlier ones are written to the cache "
        "(1: request, then write, one batch at a time). The cache content is the same for any depth",
    )
    fsync: Literal["group", "each"] = Field(
        "group",
        description="journal fsync: 'group' (a background thread; one fsync covers every record written "
        "since the last, nothing waits for it) or 'each' (every record before the next)",
    )
    shard_samples: int = Field(
        4096, ge=1, description="samples per cache shard (the journal is sealed into a shard at this size)"
    )
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _needs(self) -> CacheConfig:
        if not self.data.sources:
            raise ValueError("nothing to cache: give --data.sources FILE_OR_DIR ...")
        if self.data.tokenizer is None:
            raise ValueError("the cache stores student token ids: give --data.tokenizer DIR")
        return self
