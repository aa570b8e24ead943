"""Teacher backends: where the top-k next-token distributions of distillation come from.

- `hf`: any Hugging Face causal LM in this process (exact top-k and exact tail; CPU or GPU).
- `vllm-server`: a running vLLM OpenAI-compatible server (production: its own container).
- `vllm`: an in-process `vllm.LLM` (GPU machines with `pip install '.[vllm]'`).

`build_teacher(TeacherConfig(...))` makes any of them; all satisfy `distill.types.Teacher`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distill.teachers.base import TeacherError, select_topk, topk_from_rows
from distill.teachers.hf import HFTeacher
from distill.teachers.local_server import LocalVllmServer, ensure_vllm_venv
from distill.teachers.vllm_engine import VllmEngineTeacher
from distill.teachers.vllm_server import VllmServerTeacher, parse_completion_response
from distill.types import Teacher

__all__ = [
    "HFTeacher",
    "LocalVllmServer",
    "TeacherConfig",
    "TeacherError",
    "VllmEngineTeacher",
    "VllmServerTeacher",
    "build_teacher",
    "ensure_vllm_venv",
    "parse_completion_response",
    "select_topk",
    "topk_from_rows",
]


class TeacherConfig(BaseModel):
    """Which teacher backend to use and how; each field doubles as a CLI option's help."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["hf", "vllm-server", "vllm"] = Field(
        "vllm-server",
        description="backend: 'hf' (transformers in this process), 'vllm-server' (HTTP client of a running "
        "vLLM OpenAI-compatible server) or 'vllm' (in-process vLLM engine, CUDA machines)",
    )
    model: str | None = Field(
        None,
        description="hf/vllm: local model directory or hub name; vllm-server: the served model name "
        "(--served-model-name; empty = the server's only model)",
    )
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) of the model; part of the teacher's name"
    )
    name: str | None = Field(
        None,
        description="override the teacher name the logit cache keys on (default: backend, model, revision, dtype)",
    )
    url: str = Field(
        "http://127.0.0.1:8000", description="vllm-server: base URL of the vLLM server (without /v1)"
    )
    api_key: str | None = Field(
        None, description="vllm-server: API key, if the server was started with --api-key"
    )
    max_concurrency: int = Field(8, ge=1, description="vllm-server: requests in flight at once")
    request_batch: int = Field(8, ge=1, description="vllm-server: prompts per request")
    max_request_tokens: int = Field(65536, ge=1, description="vllm-server: most prompt tokens in one request")
    timeout_s: float = Field(
        600.0, gt=0, description="vllm-server: seconds to wait for one request's response"
    )
    retries: int = Field(
        3, ge=0, description="vllm-server: retries after a connection error, timeout or HTTP 5xx (never 4xx)"
    )
    backoff_s: float = Field(
        1.0, ge=0, description="vllm-server: wait before the first retry; doubles with each further retry"
    )
    vocab_size: int | None = Field(
        None,
        ge=1,
        description="vllm-server: teacher vocabulary size (default: read from the model or probed)",
    )
    device: str = Field("auto", description="hf: torch device ('auto' = cuda when available, else cpu)")
    dtype: str = Field(
        "auto",
        description="hf/vllm: weight dtype: auto, float32, bfloat16 or float16 (hf auto: bf16 on GPU, fp32 on CPU)",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="hf: sequences per forward (default 8); vllm: prompts per generate call (default all)",
    )
    max_batch_tokens: int = Field(16384, ge=1, description="hf: most padded tokens per forward")
    max_model_len: int | None = Field(
        None, ge=2, description="hf/vllm: longest sequence accepted (vllm: the engine's context length)"
    )
    max_logprobs: int = Field(
        128, ge=1, description="vllm: largest k the engine serves (vLLM's max_logprobs)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of GPU memory the engine may use (weights and KV cache)"
    )
    enforce_eager: bool = Field(False, description="vllm: skip CUDA graph capture (slower, starts faster)")


def build_teacher(config: TeacherConfig) -> Teacher:
    """The teacher backend `config` describes (models are loaded, servers are checked on first use)."""
    if config.kind == "vllm-server":
        return VllmServerTeacher(
            config.url,
            config.model,
            max_concurrency=config.max_concurrency,
            request_batch=config.request_batch,
            max_request_tokens=config.max_request_tokens,
            timeout_s=config.timeout_s,
            retries=config.retries,
            backoff_s=config.backoff_s,
            vocab_size=config.vocab_size,
            revision=config.revision,
            api_key=config.api_key,
            name=config.name,
        )
    if not config.model:
        raise TeacherError(f"kind={config.kind!r} needs model (a local model directory or hub name)")
    if config.kind == "hf":
        return HFTeacher(
            config.model,
            revision=config.revision,
            device=config.device,
            dtype=config.dtype,
            batch_size=config.batch_size or 8,
            max_batch_tokens=config.max_batch_tokens,
            max_model_len=config.max_model_len,
            name=config.name,
        )
    return VllmEngineTeacher(
        config.model,
        max_logprobs=config.max_logprobs,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        revision=config.revision,
        batch_size=config.batch_size,
        name=config.name,
    )
