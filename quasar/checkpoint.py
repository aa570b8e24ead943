"""Saving and strictly loading Quasar checkpoints (config.json + safetensors, never pickle).

Checkpoints come from strangers (validators load miners' uploads), so loading checks everything
before it trusts anything: the config parses and validates, matches the expected architecture
field by field, the weights are safetensors only, every tensor has the name, shape and (optionally)
finite values the config implies. Each failure raises `CheckpointError` naming what was wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quasar.configuration import PUBLISHED_FORMAT_KEYS, QuasarConfig
from quasar.errors import CheckpointError
from quasar.files import fsync_dir
from quasar.modeling import QuasarForCausalLM

# Fields that choose how the model runs, not what it is: they may differ between checkpoint and expectation.
RUNTIME_FIELDS = frozenset({"attention_backend", "use_cache"})
MAX_CONFIG_BYTES = 1 << 20


def architecture_fields() -> list[str]:
    """QuasarConfig fields that define the architecture (compared between checkpoint and expectation)."""
    import inspect

    params = inspect.signature(QuasarConfig.__init__).parameters
    return [name for name in params if name not in ("self", "kwargs") and name not in RUNTIME_FIELDS]


def config_differences(found: QuasarConfig, expected: QuasarConfig) -> list[str]:
    diffs = []
    for name in architecture_fields():
        a, b = getattr(found, name, None), getattr(expected, name, None)
        if a != b:
            diffs.append(f"{name}: checkpoint has {a!r}, expected {b!r}")
    return diffs


def save_checkpoint(
    model: QuasarForCausalLM, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write config.json + model.safetensors atomically: into a temporary sibling directory, fsynced,
    then renamed over `path`. A crash leaves either the old checkpoint or the new one, never a mix.
    `state_dict` replaces the model's own tensors (e.g. the gathered full weights of a sharded model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | Path) -> QuasarConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path}: no config.json; a Quasar checkpoint is a directory with config.json and *.safetensors"
        )
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{cfg_file}: {cfg_file.stat().st_size} bytes, larger than the {MAX_CONFIG_BYTES} allowed"
        )
    try:
        raw: dict[str, Any] = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "quasar":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{cfg_file}: model_type is {found!r}, expected 'quasar'")
    published = sorted(PUBLISHED_FORMAT_KEYS & set(raw))
    if published:
        raise CheckpointError(
            f"{cfg_file}: a checkpoint in the published silx-ai Quasar format (fields "
            f"{', '.join(published[:3])}, ...), not ours: convert it once with "
            f"`python -m quasar import-published {path} OUT` and load OUT"
        )
    if raw.get("auto_map"):
        raise CheckpointError(
            f"{cfg_file}: declares auto_map (custom code); only the built-in Quasar classes are loaded"
        )
    fields = {
        k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    try:
        return QuasarConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """Every *.safetensors file of a checkpoint directory; CheckpointError (naming any pickle files) if none."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(
            p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
        )
        hint = f" (found {', '.join(others)}: pickle-based formats are refused)" if others else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    return files


def expected_tensor_shapes(config: QuasarConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, with its shape (a tied lm_head is not stored)."""
    with torch.device("meta"):
        model = QuasarForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_weight_files(path: str | Path, config: QuasarConfig) -> list[Path]:
    """Check the safetensors headers of a checkpoint against its config, reading no tensor data:
    every tensor present once, none missing or unexpected, each with the implied shape and a
    floating-point dtype. Returns the weight files; raises CheckpointError naming the first problem."""
    path = Path(path)
    expected = expected_tensor_shapes(config)
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    files = weight_files(path)
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if name in found:
                        raise CheckpointError(
                            f"{f.name}: tensor {name!r} appears in more than one weight file"
                        )
                    sl = handle.get_slice(name)
                    found[name] = (f.name, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt or truncated header
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "(the weights are not those of the model config.json describes)"
        )
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, (file, shape, dtype) in found.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {shape}, the config implies {expected[name]}"
            )
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise CheckpointError(
                f"{path}: tensor {name!r} in {file} has dtype {dtype}, expected floating point"
            )
    return files


def load_checkpoint(
    path: str | Path,
    expected_config: QuasarConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> QuasarForCausalLM:
    """Load a Quasar checkpoint strictly. Raises CheckpointError naming the first problem found."""
    path = Path(path)
    config = read_checkpoint_config(path)
    if expected_config is not None:
        diffs = config_differences(config, expected_config)
        if diffs:
            raise CheckpointError(f"{path}: config does not match the expected model: " + "; ".join(diffs))
        for name in RUNTIME_FIELDS:
            setattr(config, name, getattr(expected_config, name))

    files = check_weight_files(path, config)  # names, shapes and dtypes, before any data is read
    with torch.device("meta"):
        model = QuasarForCausalLM(config)
    tied = config.tie_word_embeddings

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    if check_finite:
        for name, tensor in state.items():
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: tensor {name!r} contains NaN or infinite values")

    if dtype is not None:
        keep_fp32 = {k for k in state if k.startswith("model.router_balance.")}
        state = {k: (v if k in keep_fp32 else v.to(dtype)) for k, v in state.items()}
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.tie_weights()
    return model.eval()
