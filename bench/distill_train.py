"""CPU benchmark of distillation training: throughput of the real trainer, and a convergence run.

1. Throughput: `distill.trainer.train` (packed windows, chunked KD loss at k = 128, AdamW, SMEBU
   update) on the `tiny` and `small` presets at seq_len 2048, with synthetic teacher targets so
   that only training is timed (cache decoding is measured by bench/cache.py). Reports trained
   tokens/s (median over steps after warmup) and peak RSS.
2. Convergence: a Qwen3 teacher trained on local text (distill.tiny), a logit cache from it
   (k = 64), and a `tiny`-shaped student (d = 128) distilled for `--steps` steps; held-out KL to the
   teacher by step, with the 50% reduction the issue asks for, and a plot.

    python bench/distill_train.py                      # both parts
    python bench/distill_train.py --out BENCHMARKS.md  # also write the distill_train section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Run as a script, bench/ heads sys.path and bench/kernels.py would shadow the `kernels` package.
sys.path[:] = [str(REPO_ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() not in (BENCH_DIR, REPO_ROOT)
]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    command_line,
    load_average,
    machine_description,
    machine_line,
    markers,
    publish_section,
    utc_now,
)
from distill.config import TrainConfig  # noqa: E402
from distill.sources import ListStream  # noqa: E402
from distill.trainer import train  # noqa: E402
from distill.types import TopK  # noqa: E402
from quasar import QuasarConfig  # noqa: E402

RESULTS = BENCH_DIR / "results"


def synthetic_topk(n: int, k: int, vocab: int, rng: np.random.Generator) -> TopK:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    logits = np.sort(rng.normal(size=(n, k)) * 2.0, axis=1)[:, ::-1]
    logprobs = (logits - np.log(np.exp(logits).sum(1, keepdims=True) * 1.05)).astype(np.float32)
    topk = TopK(ids, logprobs, TopK.tail_from_logprobs(logprobs))
    empty = TopK.empty_rows(1, k)
    topk.token_ids[0], topk.logprobs[0], topk.tail_logprob[0] = empty.token_ids[0], empty.logprobs[0], 0.0
    return topk


def throughput(preset: str, seq_len: int, k: int, steps: int, warmup: int) -> dict:
    vocab = QuasarConfig.from_preset(preset).vocab_size
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, vocab, size=seq_len // 4, dtype=np.int32) for _ in range(64)]
    cache = {i: synthetic_topk(len(s), k, vocab, rng) for i, s in enumerate(samples)}
    index = {id(s): i for i, s in enumerate(samples)}
    stream = ListStream(samples, lambda group: [cache[index[id(s)]] for s in group])
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.model_validate(
            dict(
                out_dir=out,
                steps=warmup + steps,
                cache_dir=out,
                k=k,
                student=dict(preset=preset),
                data=dict(seq_len=seq_len, sample_len=seq_len // 4, batch_size=1, eval_samples=0),
                optim=dict(warmup_steps=1),
                save_every=10_000,
                progress=False,
            )
        )
        result = train(cfg, stream, vocab_size=vocab)
        records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("step", 0) > warmup and "tokens_per_s" in r]
    params = result.student.parameter_counts()
    return {
        "preset": preset,
        "seq_len": seq_len,
        "k": k,
        "params_total": params["total"],
        "params_active": params["active"],
        "tokens_per_s": statistics.median(rates),
        "seconds_per_step": seq_len / statistics.median(rates),
        "peak_rss_mib": psutil.Process().memory_info().rss / 2**20,
        "steps_timed": len(rates),
    }


def convergence(steps: int, work: Path) -> dict:
    from distill.cli import main as distill_main
    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    corpus = local_corpus()
    tok = train_tokenizer(corpus, 1024, work / "tokenizer")
    t0 = time.perf_counter()
    build_qwen3_teacher(
        tok, work / "teacher", hidden_size=128, num_layers=4, intermediate_size=384,
        train_texts=corpus, train_steps=400, seq_len=128, batch_size=16, seed=0,
    )  # fmt: skip
    teacher_s = time.perf_counter() - t0
    (work / "text").mkdir(exist_ok=True)
    with open(work / "text" / "corpus.jsonl", "w") as f:
        for doc in corpus:
            f.write(json.dumps({"text": doc}) + "\n")
    common = ["--data.tokenizer", str(work / "tokenizer"), "--data.sample_len", "128"]
    t0 = time.perf_counter()
    assert distill_main([
        "cache", "--cache_dir", str(work / "cache"), "--teacher.kind", "hf", "--teacher.model",
        str(work / "teacher"), "--teacher.device", "cpu", "--data.sources", str(work / "text"),
        "--k", "64", "--no-progress", *common,
    ]) == 0  # fmt: skip
    cache_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert distill_main([
        "train", "--cache_dir", str(work / "cache"), "--out_dir", str(work / "run"), "--steps", str(steps),
        "--data.seq_len", "512", "--data.eval_samples", "48", "--optim.lr", "2e-3", "--optim.warmup_steps", "20",
        "--student.overrides", json.dumps({"hidden_size": 128, "intermediate_size": 256,
                                           "expert_intermediate_size": 128, "shared_expert_intermediate_size": 128}),
        "--eval_every", str(max(1, steps // 10)), "--save_every", str(steps), "--no-progress", *common,
    ]) == 0  # fmt: skip
    train_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_kl"]) for r in records if "eval_kl" in r]
    return {
        "steps": steps,
        "teacher_train_s": teacher_s,
        "cache_s": cache_s,
        "train_s": train_s,
        "eval_kl_curve": curve,
        "kl_start": curve[0][1],
        "kl_end": curve[-1][1],
        "reduction": 1 - curve[-1][1] / curve[0][1],
    }


def plot(conv: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, kl = zip(*conv["eval_kl_curve"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, kl, marker="o")
    ax.axhline(conv["kl_start"] / 2, color="grey", linestyle="--", label="50% of step 0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out KL(teacher || student), nats/token")
    ax.set_title("Distilling a tiny Qwen3 teacher into a Quasar student (CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per preset")
    parser.add_argument("--convergence-steps", type=int, default=300)
    parser.add_argument("--skip-convergence", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = machine_description()
    started = utc_now()
    rows = [throughput(p, args.seq_len, args.k, args.steps, warmup=2) for p in args.presets.split(",")]
    conv = None
    if not args.skip_convergence:
        with tempfile.TemporaryDirectory() as work:
            conv = convergence(args.convergence_steps, Path(work))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_train.json").write_text(
        json.dumps({"machine": machine, "date": started, "throughput": rows, "convergence": conv}, indent=2)
    )
    start, end = markers("distill_train")
    lines = [
        start,
        "## Distillation training on CPU",
        "",
        f"`{command_line('bench/distill_train.py', sys.argv[1:])}` on {started}; {machine_line(machine)}; "
        f"load average at the end {load_average()}.",
        "",
        f"Trainer throughput: the full step (packed windows, chunked KD loss over the vocabulary at k = {args.k}, "
        "backward, AdamW, SMEBU bias update), synthetic teacher targets, batch 1 window, median over "
        f"{args.steps} steps after 2 warmup steps.",
        "",
        "| preset | params (total / active) | seq_len | trained tokens/s | s/step | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['params_total'] / 1e6:.1f}M / {r['params_active'] / 1e6:.1f}M | {r['seq_len']} | "
            f"{r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.2f} | {r['peak_rss_mib']:,.0f} MiB |"
        )
    if conv is not None:
        plot(conv, RESULTS / "distill_train.png")
        lines += [
            "",
            f"Convergence: Qwen3 teacher (d=128, 4 layers, vocab 1,024, trained 400 steps on local text in "
            f"{conv['teacher_train_s']:.0f} s), logit cache at k = 64 ({conv['cache_s']:.0f} s), Quasar student "
            f"(tiny preset at d=128) distilled for {conv['steps']} steps at seq_len 512 ({conv['train_s']:.0f} s). "
            f"Held-out KL (48 samples never trained on): **{conv['kl_start']:.3f} -> {conv['kl_end']:.3f} nats/token, "
            f"{100 * conv['reduction']:.0f}% lower** (the issue asks for at least 50%).",
            "",
            "| step | " + " | ".join(str(s) for s, _ in conv["eval_kl_curve"]) + " |",
            "|---|" + "---|" * len(conv["eval_kl_curve"]),
            "| held-out KL | " + " | ".join(f"{v:.3f}" for _, v in conv["eval_kl_curve"]) + " |",
            "",
            "![held-out KL by step](bench/results/distill_train.png)",
        ]
    lines.append(end)
    publish_section(args.out, "distill_train", "\n".join(lines))


if __name__ == "__main__":
    main()
