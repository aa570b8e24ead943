"""`python -m quasar demo`: build a preset, stream a long random context through it with the
recurrent cache, report tokens/s and peak memory, then generate a few tokens from the cache."""

from __future__ import annotations

import argparse
import resource
import sys
import time
import typing

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quasar.configuration import PRESETS, QuasarConfig
from quasar.modeling import QuasarForCausalLM


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("small", description="model preset: " + ", ".join(PRESETS))
    tokens: int = Field(16_384, gt=0, description="length of the random context to stream")
    chunk: int = Field(2048, gt=0, description="tokens per forward call while streaming")
    generate: int = Field(16, ge=0, description="tokens to generate greedily after the context")
    seed: int = 0
    device: str = Field("auto", description="cpu, cuda, or auto")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be cpu, cuda or auto")
        if v == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        return v


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_demo(cfg: DemoConfig) -> dict:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    config = QuasarConfig.from_preset(cfg.preset)
    model = QuasarForCausalLM(config).to(device=device, dtype=dtype).eval()
    counts = model.parameter_counts()
    print(
        f"Quasar preset {cfg.preset!r}: {counts['total'] / 1e6:.1f}M parameters, "
        f"{counts['active'] / 1e6:.1f}M active per token; {config.num_loops} loop(s) of "
        f"{config.num_hidden_layers} blocks ({config.layer_pattern}); device {device}, {cfg.dtype}"
    )

    generator = torch.Generator().manual_seed(cfg.seed)
    context = torch.randint(0, config.vocab_size, (1, cfg.tokens), generator=generator)
    cache = None
    logits = None
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=cfg.tokens, unit="tok", desc="streaming", smoothing=0.1) as bar:
        for pos in range(0, cfg.tokens, cfg.chunk):
            ids = context[:, pos : pos + cfg.chunk].to(device)
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits
            bar.update(ids.shape[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

        generated = []
        for _ in range(cfg.generate):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(nxt))
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits

    result = {
        "preset": cfg.preset,
        "tokens": cfg.tokens,
        "seconds": elapsed,
        "tokens_per_second": cfg.tokens / elapsed,
        "peak_rss_bytes": peak_rss_bytes(),
        "cache_bytes": cache.nbytes(),
        "generated": generated,
    }
    if device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    print(f"streamed {cfg.tokens:,} tokens in {elapsed:.1f}s: {result['tokens_per_second']:,.0f} tokens/s")
    print(
        f"peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB; recurrent cache {result['cache_bytes'] / 2**20:.2f} MiB "
        "(constant in context length)"
    )
    if "peak_cuda_bytes" in result:
        print(f"peak CUDA memory {result['peak_cuda_bytes'] / 2**20:,.0f} MiB")
    print(f"generated {len(generated)} tokens after the context: {generated}")
    return result


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig field; argparse only converts types, pydantic validates values."""
    for name, field in DemoConfig.model_fields.items():
        kind = int if int in (typing.get_args(field.annotation) or (field.annotation,)) else str
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=field.default,
            help=f"{field.description or name} (default: {field.default})",
        )
