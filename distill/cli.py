"""`python -m distill cache ...` (teacher -> logit cache) and `python -m distill train ...`
(cache or live teacher -> checkpoints). Flags come from the pydantic configs in `distill.config`."""

from __future__ import annotations

import argparse
import logging
import sys
from itertools import islice
from pathlib import Path

from distill.cliconfig import ConfigError, add_model_flags, build_config
from distill.config import CacheConfig, DataConfig, TrainConfig
from distill.data import iter_samples, iter_texts
from distill.sources import CacheStream, ListStream, SampleStream, TextStream, teacher_fetcher
from distill.types import Teacher
from quasar.errors import CheckpointError

log = logging.getLogger("distill")


def tokenizer_dir(path: str) -> str:
    """The directory behind a tokenizer argument: `path` itself when it is a directory, else the
    cached directory of a builtin name (`quasar.tokenizers.BUILTIN_TOKENIZERS`: qwen3.5, qwen3),
    built on first use. A directory wins over a builtin name it happens to share."""
    from quasar.tokenizers import BUILTIN_TOKENIZERS, BuiltinTokenizerError, builtin_tokenizer

    if Path(path).is_dir():
        return path
    if path not in BUILTIN_TOKENIZERS:
        raise ConfigError(
            f"tokenizer directory {path!r} does not exist (nor is it a builtin tokenizer name: "
            f"{', '.join(BUILTIN_TOKENIZERS)})"
        )
    try:
        return str(builtin_tokenizer(path))
    except (BuiltinTokenizerError, OSError) as e:
        raise ConfigError(f"cannot provide the builtin tokenizer {path!r}: {e}") from e


def load_tokenizer(path: str):
    """A local tokenizer directory (transformers format) or a builtin tokenizer name (`tokenizer_dir`);
    never runs remote code."""
    from transformers import AutoTokenizer

    import quasar  # noqa: F401  (registers model_type "quasar", which AutoTokenizer reads from config.json)

    path = tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}") from e


def make_teacher(cfg: CacheConfig | TrainConfig, student_tokenizer) -> Teacher:
    """The configured backend, wrapped for byte-offset alignment when its tokenizer differs."""
    from distill.teachers import build_teacher

    teacher = build_teacher(cfg.teacher)
    if cfg.teacher_tokenizer:
        from distill.teachers.align import AlignedTeacher

        teacher = AlignedTeacher(teacher, load_tokenizer(cfg.teacher_tokenizer), student_tokenizer)
    return teacher


def open_cache(
    cache_dir: str,
    teacher: Teacher,
    k: int,
    student_tokenizer_dir: str | None,
    precision: str = "lossless",
):
    """The teacher's cache directory under `cache_dir`; `precision` (lossless, compact) picks its own."""
    from distill.cache import LogitCache

    settings = {"student_tokenizer": _tokenizer_fingerprint(student_tokenizer_dir)}
    return LogitCache.for_teacher(cache_dir, teacher.name, k, settings, precision)


def _tokenizer_fingerprint(path: str | None) -> str | None:
    """sha256 of tokenizer.json: cached ids are only valid for the exact student vocabulary."""
    import hashlib

    if path is None:
        return None
    from quasar.tokenizers import BUILTIN_TOKENIZERS

    file = Path(path) / "tokenizer.json"
    if not file.exists() and path in BUILTIN_TOKENIZERS:  # a builtin name: the vocabulary it stands for
        file = Path(tokenizer_dir(path)) / "tokenizer.json"
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.exists() else str(path)


def _text_samples(data: DataConfig, sources: list[str], tokenizer):
    return iter_samples(iter_texts(sources, data.text_field), tokenizer, data.sample_len)


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------


def run_cache(cfg: CacheConfig, teacher: Teacher | None = None) -> dict:
    """Score every sample of the data with the teacher into the cache, skipping samples already
    there (so an interrupted run picks up where it stopped). Requests run `pipeline_depth` batches
    ahead of the cache writer (`distill.cache_pipeline`); the content is the same for any depth.
    `teacher`: use this one instead of building `cfg.teacher` (benchmarks); it is closed at the end."""
    from distill.cache_pipeline import fill_cache

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if teacher is None:
        teacher = make_teacher(cfg, tokenizer)
    cache = open_cache(cfg.cache_dir, teacher, cfg.k, cfg.data.tokenizer, cfg.cache_precision)
    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm(desc="cache", unit="tok", unit_scale=True, dynamic_ncols=True, total=None)
    try:
        with cache.writer(shard_samples=cfg.shard_samples, group_commit=cfg.fsync == "group") as writer:
            filled = fill_cache(
                writer,
                teacher,
                _text_samples(cfg.data, cfg.data.sources, tokenizer),
                k=cfg.k,
                batch=cfg.teacher_batch,
                depth=cfg.pipeline_depth,
                max_samples=cfg.max_samples,
                progress=progress,
            )
        fsyncs = writer.fsyncs  # after close: its last group commit counts too
    finally:
        teacher.close()
        if progress is not None:
            progress.close()
    stats = cache.stats()
    summary = {
        "cache": str(cache.path),
        "added_samples": filled.added_samples,
        "skipped_samples": filled.skipped_samples,
        "added_tokens": filled.added_tokens,
        "teacher_batches": filled.batches,
        "journal_fsyncs": fsyncs,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "bytes": stats.bytes,
        "bytes_per_token": round(stats.bytes_per_token, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def open_streams(cfg: TrainConfig, tokenizer) -> tuple[SampleStream, SampleStream | None, list]:
    """(training stream, held-out stream, things to close). Held-out samples come from
    data.eval_sources, or else the first data.eval_samples samples, which training then skips."""
    closers: list = []
    teacher = make_teacher(cfg, tokenizer) if cfg.teacher is not None else None
    if teacher is not None:
        closers.append(teacher)
    E = cfg.data.eval_samples
    if cfg.cache_dir is not None and teacher is None:
        from distill.cache import LogitCache

        root = Path(cfg.cache_dir)
        cache = LogitCache(root) if (root / "manifest.json").exists() else _only_cache_in(root)
        reader = cache.reader()
        closers.append(reader)
        train = CacheStream(reader, begin=0 if cfg.data.eval_sources else E)
        if cfg.data.eval_sources:
            raise ConfigError(
                "--data.eval_sources needs a live teacher; with a cache, held-out samples come from it"
            )
        held_out = CacheStream(reader, 0, E) if E else None
        return train, held_out, closers

    writer = None
    if cfg.cache_dir is not None:  # live teacher writing through to the cache
        writer = open_cache(cfg.cache_dir, teacher, cfg.k, cfg.data.tokenizer, cfg.cache_precision).writer()
        closers.append(writer)

    def remember(tokens, topk):
        if writer is not None:
            writer.add(tokens, topk)

    fetch = teacher_fetcher(teacher, cfg.k, on_result=remember)
    held_fetch = teacher_fetcher(teacher, cfg.k)
    if cfg.data.eval_sources:
        held = list(islice(_text_samples(cfg.data, cfg.data.eval_sources, tokenizer), E))
        skip = 0
    else:
        held = list(islice(_text_samples(cfg.data, cfg.data.sources, tokenizer), E))
        skip = len(held)
    held_out = ListStream(held, held_fetch) if E and held else None
    # Lazy: a large or streamed corpus (hf:...) is tokenised as training reaches it.
    train = TextStream(lambda: _text_samples(cfg.data, cfg.data.sources, tokenizer), fetch, skip=skip)
    return train, held_out, closers


def _only_cache_in(root: Path):
    from distill.cache import LogitCache

    found = sorted(p.parent for p in root.glob("*/manifest.json"))
    if len(found) != 1:
        raise ConfigError(
            f"--cache_dir {root}: expected one teacher cache directory inside it, found "
            f"{[p.name for p in found] or 'none'}; pass the teacher's own directory"
        )
    return LogitCache(found[0])


def run_train(cfg: TrainConfig):
    from distill.trainer import train

    if cfg.data.tokenizer is None:
        raise ConfigError("give the student tokenizer: --data.tokenizer DIR")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stream, held_out, closers = open_streams(cfg, tokenizer)
    try:
        result = train(
            cfg,
            stream,
            eval_stream=held_out,
            vocab_size=len(tokenizer),
            pad_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0,
        )
    finally:
        for item in closers:
            item.close()
    print(
        f"step={result.step} checkpoint={result.final_checkpoint} metrics={result.metrics_path}"
        + (f" eval_kl={result.last_eval_kl:.4f}" if result.last_eval_kl is not None else "")
    )
    return result


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill",
        description="Distil a teacher LLM into a Quasar student: score text into a top-k logit cache, then train.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, model, text in (
        ("cache", CacheConfig, "score text with a teacher into the logit cache (resumable)"),
        (
            "train",
            TrainConfig,
            "train a student from the cache or a live teacher (resumable, torchrun-ready)",
        ),
    ):
        p = sub.add_parser(
            name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.add_argument("--config", metavar="YAML", help="settings file; flags override it")
        p.add_argument("--logging.debug", dest="logging_debug", action="store_true", help="debug logging")
        add_model_flags(p, model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.logging_debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    namespace = argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in ("command", "config", "logging_debug")}
    )
    try:
        if args.command == "cache":
            run_cache(build_config(CacheConfig, namespace, args.config))
        else:
            run_train(build_config(TrainConfig, namespace, args.config))
    except (ConfigError, CheckpointError) as e:  # bad settings or a checkpoint that is not ours
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
