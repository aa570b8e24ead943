"""Benchmark of the teacher logit cache (`distill.cache`): bytes per token, write and read throughput.

Three kinds of teacher output at k=128 in the student's 248,320-token vocabulary (ids need 18 bits):

- `tiny teacher`: the exact top-k (a direct log_softmax of the logits) of a tiny Qwen3 trained on real
  text (`distill.tiny`, standard-library docstrings), on held-out text packed into sequences; its ids
  are spread into the 248,320 vocabulary by a fixed random injective map, so they take 18 bits like
  Qwen's. Its vocabulary is much smaller than a real teacher's, which flatters the id compression.
- `uniform ids`: the same log-probs, tails and tokens, with ids drawn uniformly (distinct per row):
  no structure left in the ids, the worst case for them.
- `uniform ids, synthetic log-probs`: uniform ids and log-probs sorted from an exponential(3) sample:
  nothing to exploit anywhere.

Write: `CacheWriter.add` of every sample (a checksummed journal record each, fsynced) and `close`,
which turns the journal into a shard. Read: `CacheReader.iter_samples` over all samples (decoded
`TopK`), and `iter_batches(...).kd_targets()` (the tensors a trainer consumes). Times are the minimum
over `--repeats` runs in a fresh cache directory each.

    python bench/cache.py                       # defaults: 8 sequences x 512 tokens, k=128
    python bench/cache.py --out BENCHMARKS.md   # also write the `cache` section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Run as a script, bench/ heads sys.path and bench/kernels.py would shadow the `kernels` package.
sys.path[:] = [str(REPO_ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() not in (BENCH_DIR, REPO_ROOT)
]

from bench.common import (  # noqa: E402
    command_line,
    load_average,
    machine_description,
    machine_line,
    markers,
    publish_section,
    utc_now,
)
from distill.cache import LogitCache  # noqa: E402
from distill.types import MISSING_ID, TopK  # noqa: E402

SECTION = "cache"
START_MARKER, END_MARKER = markers(SECTION)
STUDENT_VOCAB = 248_320
TARGET_BYTES_PER_TOKEN = 400

Sample = tuple[np.ndarray, TopK]


def parse_codecs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, level = item.strip().partition(":")
        if name not in ("zlib", "lzma") or not level.isdigit() or not 0 <= int(level) <= 9:
            raise argparse.ArgumentTypeError(f"expected codec:level items like zlib:6,lzma:6, got {item!r}")
        out.append((name, int(level)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=8, help="number of cached sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--k", type=int, default=128, help="top-k")
    p.add_argument("--teacher-vocab", type=int, default=8192, help="tokenizer vocabulary of the tiny teacher")
    p.add_argument("--train-steps", type=int, default=200, help="training steps of the tiny teacher")
    p.add_argument(
        "--codecs", type=parse_codecs, default=parse_codecs("zlib:6,lzma:6"), help="codec:level list"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the minimum is kept)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch for the KD-targets read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="markdown file whose cache section is written")
    args = p.parse_args(argv)
    if min(args.sequences, args.seq_len, args.k, args.repeats, args.batch_size) < 1:
        p.error("sizes and --repeats must be positive")
    return args


def tiny_teacher_samples(args: argparse.Namespace) -> tuple[list[Sample], dict]:
    """Exact top-k of a tiny trained Qwen3 on held-out text, ids spread into the student vocabulary."""
    import torch

    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    start = time.perf_counter()
    docs = local_corpus()
    held_out = docs[-120:]  # the teacher never trains on these
    train = docs[: -len(held_out)]
    tok = train_tokenizer(train, args.teacher_vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only thrash on a shared machine
    try:
        model = build_qwen3_teacher(tok, train_texts=train, train_steps=args.train_steps, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    ids: list[int] = []
    for text in held_out:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    need = args.sequences * args.seq_len
    if len(ids) < need:
        raise SystemExit(
            f"the held-out text has {len(ids)} tokens, fewer than --sequences x --seq-len = {need}; ask for less"
        )
    seqs = torch.tensor(ids[:need]).view(args.sequences, args.seq_len)
    k = min(args.k, len(tok))
    spread = np.random.default_rng(args.seed).choice(STUDENT_VOCAB, len(tok), replace=False).astype(np.int32)
    samples = []
    with torch.no_grad():
        for row in seqs:
            logprobs = torch.log_softmax(model(input_ids=row[None]).logits[0].float(), dim=-1)
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            topk = TopK.empty_rows(args.seq_len, args.k)
            topk.token_ids[1:, :k] = spread[top_ids[:-1].numpy()]  # row t: the prediction of x_t
            topk.logprobs[1:, :k] = top_lp[:-1].numpy()
            topk.tail_logprob[1:] = TopK.tail_from_logprobs(top_lp[:-1].numpy())
            samples.append((spread[row.numpy()], topk))
    info = {"vocab": len(tok), "steps": args.train_steps, "build_s": time.perf_counter() - start}
    return samples, info


def with_uniform_ids(
    samples: list[Sample], rng: np.random.Generator, synthetic_logprobs: bool
) -> list[Sample]:
    out = []
    for tokens, topk in samples:
        n, k = topk.token_ids.shape
        ids = np.full((n, k), MISSING_ID, dtype=np.int32)
        ids[1:] = np.stack([rng.choice(STUDENT_VOCAB, k, replace=False) for _ in range(n - 1)])
        lp, tail = topk.logprobs, topk.tail_logprob
        if synthetic_logprobs:
            lp = np.full((n, k), -np.inf, dtype=np.float32)
            lp[1:] = -np.sort(rng.exponential(3.0, (n - 1, k)), axis=1)
            tail = np.r_[0.0, rng.uniform(-8.0, -0.01, n - 1)].astype(np.float32)
        out.append((tokens, TopK(ids, lp, tail)))
    return out


def measure(samples: list[Sample], k: int, codec: str, level: int, args: argparse.Namespace) -> dict:
    tokens = sum(len(t) for t, _ in samples)
    best = {"add_s": np.inf, "roll_s": np.inf, "write_s": np.inf, "read_s": np.inf, "kd_s": np.inf}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
            cache = LogitCache.for_teacher(root, "bench-teacher", k)
            t0 = time.perf_counter()
            writer = cache.writer(codec=codec, level=level, shard_samples=len(samples) + 1)
            for t, topk in samples:
                writer.add(t, topk)
            t1 = time.perf_counter()
            writer.close()
            t2 = time.perf_counter()
            with cache.reader() as reader:
                stats = reader.stats()
                assert stats.journal_samples == 0 and stats.tokens == tokens
                t3 = time.perf_counter()
                for index, sample in reader.iter_samples():
                    assert sample.tokens.size == len(samples[index][0])
                t4 = time.perf_counter()
                for batch in reader.iter_batches(args.batch_size):
                    batch.kd_targets()
                t5 = time.perf_counter()
            for name, value in (("add_s", t1 - t0), ("roll_s", t2 - t1), ("write_s", t2 - t0)):
                best[name] = min(best[name], value)
            best["read_s"] = min(best["read_s"], t4 - t3)
            best["kd_s"] = min(best["kd_s"], t5 - t4)
    return {
        "tokens": tokens,
        "bytes_per_token": stats.shard_bytes_per_token,
        "shard_bytes": stats.shard_bytes,
        **best,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        "| data | codec | bytes/token | write tokens/s (add + shard) | add tokens/s | shard tokens/s "
        "| read tokens/s (TopK) | read tokens/s (KD targets) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        t = r["tokens"]
        lines.append(
            f"| {r['data']} | {r['codec']} | {r['bytes_per_token']:.1f} | {t / r['write_s']:,.0f} "
            f"| {t / r['add_s']:,.0f} | {t / r['roll_s']:,.0f} | {t / r['read_s']:,.0f} | {t / r['kd_s']:,.0f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(args.seed + 1)
    teacher, info = tiny_teacher_samples(args)
    print(
        f"tiny teacher: vocab {info['vocab']}, {info['steps']} steps, {info['build_s']:.0f} s",
        file=sys.stderr,
    )
    cases = [
        (f"tiny teacher (vocab {info['vocab']}, {info['steps']} steps), ids spread", teacher),
        ("uniform ids, teacher log-probs", with_uniform_ids(teacher, rng, synthetic_logprobs=False)),
        ("uniform ids, synthetic log-probs", with_uniform_ids(teacher, rng, synthetic_logprobs=True)),
    ]
    rows = []
    for name, samples in cases:
        for codec, level in args.codecs:
            r = measure(samples, args.k, codec, level, args)
            rows.append({"data": name, "codec": f"{codec} {level}", **r})
            print(
                f"{name:55s} {codec} {level}: {r['bytes_per_token']:6.1f} B/token, write "
                f"{r['tokens'] / r['write_s']:8,.0f} tok/s, read {r['tokens'] / r['read_s']:9,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows, info


def render_section(rows: list[dict], info: dict, machine: dict[str, str], args, meta: dict) -> str:
    command = command_line("bench/cache.py", meta["argv"])
    default = [r for r in rows if r["codec"] == "zlib 6"] or rows
    real, worst = default[0], max(default, key=lambda r: r["bytes_per_token"])
    verdict = "met" if real["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN else "NOT met"
    return "\n".join(
        [
            START_MARKER,
            "## Teacher logit cache (`bench/cache.py`)",
            "",
            f"{args.sequences} sequences x {args.seq_len} tokens ({real['tokens']:,} tokens), k={args.k}, ids in a "
            f"{STUDENT_VOCAB:,}-token vocabulary (18 bits). Rows: a tiny Qwen3 teacher trained on real text "
            f"({info['vocab']}-token vocabulary, {info['steps']} steps; exact top-k of its log_softmax on held-out "
            "text, ids spread into the big vocabulary by a fixed random injective map), the same with uniformly "
            "random ids (the worst case for ids), and uniform ids with synthetic log-probs (sorted exponential(3) "
            "draws: no structure anywhere). Bytes/token: shard bytes on disk / cached tokens, lossless (ids exact, "
            "log-probs and tails at float16). Write: `add` (journal record + fsync per sequence) and the roll of "
            "the journal into one shard; read: decode every sample (`iter_samples`), and build `KDTargets` "
            f"batches of {args.batch_size}. Minimum over {args.repeats} runs; `zlib 6` is the default codec. Throughput "
            "on a shared 2-core machine is noisy (see the load average); the sizes are exact.",
            "",
            f"- Command: `{command}`",
            f"- Date: {meta['date']} (total wall time {meta['wall_s']:.0f} s, of which {info['build_s']:.0f} s "
            "building the tiny teacher)",
            f"- Machine: {machine_line(machine)}",
            f"- Load average (1/5/15 min) at start: {meta['load_start']}, at end: {meta['load_end']}",
            "",
            format_table(rows),
            "",
            f"- Target <= {TARGET_BYTES_PER_TOKEN} bytes/token at k=128 with real teacher outputs: {verdict} "
            f"({real['bytes_per_token']:.0f} with the tiny teacher, default codec). The structureless worst case "
            f"costs {worst['bytes_per_token']:.0f}: the ids alone are 18 bits x 128 = 288 bytes/token there. A real "
            "teacher's top-k spans far more distinct ids than this tiny one, so expect its figure between the two.",
            END_MARKER,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = {"argv": sys.argv[1:] if argv is None else argv, "date": utc_now(), "load_start": load_average()}
    start = time.perf_counter()
    rows, info = run(args)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = load_average()
    publish_section(args.out, SECTION, render_section(rows, info, machine_description(), args, meta))


if __name__ == "__main__":
    main()
