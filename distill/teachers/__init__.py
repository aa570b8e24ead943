"""Teacher backends: where the top-k next-token distributions of distillation come from.

- `hf`: any Hugging Face causal LM in this process (exact top-k and exact tail; CPU or GPU).
- `vllm-server`: a running vLLM OpenAI-compatible server (production: its own container).
- `vllm`: an in-process `vllm.LLM` (GPU machines with `pip install '.[vllm]'`).

`build_teacher(TeacherConfig(...))` makes any of them; all satisfy `distill.types.Teacher`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.teachers.errors import TeacherError

if TYPE_CHECKING:
    from distill.teachers.hf import HFTeacher
    from distill.teachers.local_server import LocalVllmServer, ensure_vllm_venv
    from distill.teachers.vllm_engine import VllmEngineTeacher
    from distill.teachers.vllm_server import VllmServerTeacher, parse_completion_response
    from distill.types import Teacher

# The backends load on first use: importing a submodule (a parse worker process imports only
# distill.teachers.vllm_parse) then costs neither torch nor transformers.
_LAZY = {
    "HFTeacher": "distill.teachers.hf",
    "LocalVllmServer": "distill.teachers.local_server",
    "ensure_vllm_venv": "distill.teachers.local_server",
    "VllmEngineTeacher": "distill.teachers.vllm_engine",
    "VllmServerTeacher": "distill.teachers.vllm_server",
    "parse_completion_response": "distill.teachers.vllm_server",
}

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
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    max_in_flight: int = Field(
        4,
        ge=1,
        description="vllm-server: requests in flight at once (sent, or answered and not yet parsed); "
        "each reply is ~11 KB per token at k=128",
    )
    parse_workers: int = Field(
        0,
        ge=0,
        description="vllm-server: worker processes that parse replies (0: in the client's own thread, "
        "~20-30K tokens/s per core at k=128; a GPU teacher can outpace one core: give it more)",
    )
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

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """`max_concurrency` (a config written before max_in_flight) still means max_in_flight."""
        if isinstance(data, dict) and "max_concurrency" in data:
            data = dict(data)
            value = data.pop("max_concurrency")
            data.setdefault("max_in_flight", value)
        return data


def build_teacher(config: TeacherConfig) -> Teacher:
    """The teacher backend `config` describes (models are loaded, servers are checked on first use)."""
    if config.kind == "vllm-server":
        from distill.teachers.vllm_server import VllmServerTeacher

        return VllmServerTeacher(
            config.url,
            config.model,
            max_in_flight=config.max_in_flight,
            parse_workers=config.parse_workers,
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
        from distill.teachers.hf import HFTeacher

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
    from distill.teachers.vllm_engine import VllmEngineTeacher

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
