"""Loading a model to evaluate, and the one code path that answers a sample with it.

`StreamingPredictor` reads `prompt + answer_prefix` and decodes greedily for any Hugging Face causal
LM: a Quasar model streams the context in `chunk`-token forward calls carrying its recurrent cache
(memory constant in length); any other model gets a `DynamicCache` and runs its normal forward over
the whole prompt (or `baseline_chunk`-token calls, chunked prefill). Between forward calls the
predictor checks a deadline, so a slow model is stopped at the next call boundary.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from validator_tasks.base import Sample


class BudgetExceeded(RuntimeError):
    """The model's time budget ran out while it was answering."""


class ModelLoadError(ValueError):
    """A model directory that cannot be evaluated; the message says why."""


@dataclass
class Prediction:
    text: str
    generated_tokens: int = 0
    input_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0
    cache_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Predictor(Protocol):
    """Answers one sample before `deadline` (a `time.monotonic()` value, or None for no limit)."""

    def predict(self, sample: Sample, deadline: float | None = None) -> Prediction: ...


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from quasar.demo import peak_rss_bytes

    return peak_rss_bytes()


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a model's cache: QuasarCache's tensors, or a transformers cache's keys/values."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{path}: no config.json; expected a model directory saved with save_pretrained")
    if file.stat().st_size > 1 << 20:
        raise ModelLoadError(f"{path}: config.json is larger than 1 MiB")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: config.json must hold an object")
    return config


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "float32"):
    """A model from a local directory, never running remote code and never unpickling: a Quasar
    checkpoint through `quasar.checkpoint.load_checkpoint` (strict checks), anything else through
    transformers with safetensors required. Returns the model in eval mode on `device`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    config = _read_config(path)
    torch_dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    if config.get("model_type") == "quasar":
        from quasar.checkpoint import CheckpointError, load_checkpoint

        try:
            model = load_checkpoint(path, dtype=torch_dtype)
        except CheckpointError as e:
            raise ModelLoadError(str(e)) from e
    else:
        from transformers import AutoModelForCausalLM

        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path}: no *.safetensors weights (pickle-based formats are refused)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), trust_remote_code=False, use_safetensors=True, dtype=torch_dtype
            )
        except Exception as e:  # transformers raises many kinds; the message is what the user needs
            raise ModelLoadError(f"{path}: transformers cannot load it: {e}") from e
    return model.to(dev).eval()


def load_tokenizer(path: str | Path):
    """`distill.cli.load_tokenizer` (local directory, no remote code), failing as ModelLoadError."""
    from distill.cli import load_tokenizer as load
    from distill.cliconfig import ConfigError

    try:
        return load(str(path))
    except ConfigError as e:
        raise ModelLoadError(str(e)) from e


def model_kind(model) -> str:
    return "quasar" if getattr(model.config, "model_type", None) == "quasar" else "transformers"


def parameter_counts(model) -> dict[str, int]:
    if hasattr(model, "parameter_counts"):
        return dict(model.parameter_counts())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": total}


class StreamingPredictor:
    """Greedy answers from a causal LM, the context streamed through the model's cache.

    `chunk` is the forward size for a recurrent (Quasar) model, `baseline_chunk` for any other model
    (0: the whole prompt at once). `max_new_tokens` overrides the tasks' answer budgets."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        chunk: int = 4096,
        baseline_chunk: int = 0,
        max_new_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.recurrent = model_kind(model) == "quasar"
        self.chunk = chunk if self.recurrent else baseline_chunk
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])

    def _new_cache(self):
        if self.recurrent:
            return None  # QuasarForCausalLM creates its recurrent cache on the first call
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, cache):
        kwargs = {"logits_to_keep": 1} if self._keep_kw else {}
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
        logits = out.logits[:, -1]
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model produced non-finite logits")
        return logits, out.past_key_values

    @staticmethod
    def _check(deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise BudgetExceeded("time budget spent")

    @torch.inference_mode()
    def predict_text(self, text: str, max_new_tokens: int, deadline: float | None = None) -> Prediction:
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
        n = ids.shape[1]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        step = self.chunk if self.chunk > 0 else n
        cache = self._new_cache()
        start = time.perf_counter()
        logits = None
        for pos in range(0, n, step):
            self._check(deadline)
            logits, cache = self._forward(ids[:, pos : pos + step], cache)
        prefill = time.perf_counter() - start
        generated: list[int] = []
        start = time.perf_counter()
        while len(generated) < max_new_tokens:
            token = int(logits.argmax(-1)[0])
            if token in self.eos_ids:
                break
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            self._check(deadline)
            logits, cache = self._forward(torch.tensor([[token]], device=self.device), cache)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Prediction(
            text=self.tokenizer.decode(generated, skip_special_tokens=True),
            generated_tokens=len(generated),
            input_tokens=n,
            prefill_seconds=prefill,
            decode_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak_memory_bytes(self.device),
            cache_bytes=cache_nbytes(cache),
        )

    def predict(self, sample: Sample, deadline: float | None = None) -> Prediction:
        budget = self.max_new_tokens or sample.max_new_tokens
        return self.predict_text(sample.prompt + sample.answer_prefix, budget, deadline)
