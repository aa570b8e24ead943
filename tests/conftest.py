import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It is chosen when a kernel is
# defined, so this must happen before `kernels.efla_triton` / `kernels.gla_triton` are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import quasar


def tiny_model(seed: int = 0, **overrides) -> quasar.QuasarForCausalLM:
    """The `tiny` preset with every part switched on and the memory read gate open, so that the
    memory visibly affects the logits (at its near-closed init a leak could hide under tolerance)."""
    torch.manual_seed(seed)
    settings = dict(memory_read_gate_bias_init=0.0, memory_write_rate_init=0.5)
    settings.update(overrides)
    return quasar.QuasarForCausalLM(quasar.QuasarConfig.from_preset("tiny", **settings)).eval()


@pytest.fixture
def model() -> quasar.QuasarForCausalLM:
    return tiny_model()


MULTISCRIPT_DIR = Path(__file__).resolve().parents[1] / "bench" / "data" / "multiscript"


def multiscript_texts() -> dict[str, str]:
    """The original multi-script corpus of bench/data/multiscript: {script: text}."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(MULTISCRIPT_DIR.glob("*.txt"))}


@pytest.fixture(scope="session", autouse=True)
def tokenizer_cache_root(tmp_path_factory) -> Path:
    """Built-in tokenizers go to a session directory, never the user's ~/.cache (built on first use)."""
    from quasar.tokenizers import CACHE_ENV

    root = tmp_path_factory.mktemp("tokenizer-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    yield root
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def qwen35_cache(tokenizer_cache_root) -> Path:
    """A tokenizer cache root holding the Qwen3.5 tokenizer, built once per session (a few seconds)."""
    from quasar.tokenizers import builtin_tokenizer

    builtin_tokenizer("qwen3.5", cache_dir=tokenizer_cache_root)
    return tokenizer_cache_root


@pytest.fixture(scope="session")
def qwen35_dir(qwen35_cache) -> Path:
    from quasar.tokenizers import builtin_tokenizer

    return builtin_tokenizer("qwen3.5", cache_dir=qwen35_cache)


@pytest.fixture(scope="session")
def qwen35_tokenizer(qwen35_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen35_dir))


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    from quasar.tokenizers import builtin_tokenizer

    return AutoTokenizer.from_pretrained(str(builtin_tokenizer("qwen3")))
