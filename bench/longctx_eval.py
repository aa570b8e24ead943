"""Cost of long-context evaluation through the real runner: a Quasar preset against a same-size
transformers softmax model (Qwen3), seconds per sample and peak memory by prompt length, same run.

Both models are saved as checkpoints and evaluated by `validator_tasks.runner.evaluate_path`, exactly
as `python -m validator_tasks eval` does: generated RULER/BABILong-style samples, each model in its own
process under a time budget, greedy answers. Quasar streams each prompt in `--chunk`-token calls with
its recurrent cache; Qwen3 (same width, heads, vocabulary and effective depth, SDPA attention) runs
its normal forward over the whole prompt. Every (model, length) gets a fresh process, so its peak RSS
is that length's. The models are randomly initialised: this measures cost, not accuracy (accuracy is
reported and is ~0). Once the baseline fails a length (time budget or error) it is not run longer.

    python bench/longctx_eval.py --out BENCHMARKS.md            # 4K-64K both, Quasar also 256K
    python bench/longctx_eval.py --preset tiny --lengths 1k,4k --quasar-lengths ""   # a quick look
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

from bench.common import (  # noqa: E402
    command_line,
    load_average,
    machine_description,
    machine_line,
    markers,
    publish_section,
    utc_now,
)
from validator_tasks.config import format_length  # noqa: E402

SECTION = "longctx_eval"
RESULTS = BENCH_DIR / "results"


def build_checkpoints(preset: str, workdir: Path) -> dict[str, Path]:
    """A tokenizer with the preset's vocabulary, trained on local text, and both models saved with it."""
    import torch

    from bench.streaming import build_model
    from distill.tiny import local_corpus, train_tokenizer
    from quasar import QuasarConfig
    from quasar.checkpoint import save_checkpoint

    vocab = QuasarConfig.from_preset(preset).vocab_size
    tokenizer = train_tokenizer(local_corpus(), vocab)
    dirs = {"quasar": workdir / "quasar", "qwen3": workdir / "qwen3"}
    torch.manual_seed(0)
    save_checkpoint(build_model("quasar", preset), dirs["quasar"])
    torch.manual_seed(0)
    build_model("qwen3", preset).save_pretrained(dirs["qwen3"])
    for d in dirs.values():
        tokenizer.save_pretrained(d)
    return dirs


def row_from(result, length: int) -> dict:
    ok = [s for s in result.samples if s.status == "ok"]
    summary = next(s for s in result.lengths if s.length == length)
    return {
        "length": length,
        "status": result.status,
        "message": result.message,
        "samples": len(result.samples),
        "answered": len(ok),
        "prompt_tokens": statistics.mean(s.prompt_tokens for s in ok) if ok else None,
        "seconds_per_sample": statistics.mean(s.seconds for s in ok) if ok else None,
        "prefill_tokens_per_second": (
            statistics.mean(s.prompt_tokens / s.prefill_seconds for s in ok if s.prefill_seconds > 0)
            if ok
            else None
        ),
        "peak_rss_bytes": summary.peak_memory_bytes,
        "cache_bytes": summary.cache_bytes,
        "accuracy": summary.accuracy,
        "load_seconds": result.load_seconds,
        "parameters": result.parameters,
    }


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="longctx_bench_") as workdir:
        print(f"building the {args.preset} checkpoints in {workdir}", file=sys.stderr)
        return measure(args, build_checkpoints(args.preset, Path(workdir)))


def measure(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    from validator_tasks.config import EvalConfig
    from validator_tasks.runner import SampleBank, evaluate_path

    bank = SampleBank()  # both models answer the same samples
    rows: dict[str, list[dict]] = {"quasar": [], "qwen3": []}
    plan = [(n, "quasar") for n in args.lengths + args.quasar_lengths] + [(n, "qwen3") for n in args.lengths]
    plan.sort()
    baseline_failed = None
    for length, model in plan:
        if model == "qwen3" and baseline_failed is not None:
            rows[model].append(
                {"length": length, "status": "skipped", "message": f"failed at {baseline_failed}"}
            )
            continue
        cfg = EvalConfig(
            model=[str(dirs[model])],
            tasks=args.tasks,
            lengths=[length],
            samples=args.samples,
            seed=args.seed,
            time_budget=args.budget,
            chunk=args.chunk,
            baseline_chunk=args.baseline_chunk,
            threads=args.threads,
            progress=True,
        )
        print(f"{model} at {length:,} tokens", file=sys.stderr)
        result = evaluate_path(str(dirs[model]), cfg, bank)
        row = row_from(result, length)
        rows[model].append(row)
        print(json.dumps(row), file=sys.stderr)
        if model == "qwen3" and row["status"] != "ok":
            baseline_failed = length
    return {"rows": rows, "sample_generation_seconds": bank.seconds}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for model, style in (("quasar", "o-"), ("qwen3", "s--")):
        ok = [r for r in report["rows"][model] if r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        ax_t.plot(xs, [r["seconds_per_sample"] for r in ok], style, label=model)
        ax_m.plot(xs, [r["peak_rss_bytes"] / 2**20 for r in ok], style, label=model)
    lengths = sorted({r["length"] for rs in report["rows"].values() for r in rs})
    for ax, label in ((ax_t, "seconds per sample"), (ax_m, "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [format_length(x) for x in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    fig.suptitle(f"Long-context evaluation on CPU, {report['args']['preset']} preset vs same-size Qwen3")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_section(report: dict) -> str:
    start_marker, end_marker = markers(SECTION)
    args = report["args"]
    q = next((r["parameters"] for r in report["rows"]["quasar"] if r.get("parameters")), {})
    b = next((r["parameters"] for r in report["rows"]["qwen3"] if r.get("parameters")), {})
    lines = [
        start_marker,
        "## Long-context evaluation cost (`bench/longctx_eval.py`)",
        "",
        f"The evaluation runner (`validator_tasks`), as `python -m validator_tasks eval` runs it, on a `{args['preset']}` "
        f"Quasar ({q.get('total', 0) / 1e6:.1f}M parameters, {q.get('active', 0) / 1e6:.1f}M active) streaming each "
        f"prompt in {args['chunk']}-token calls with its recurrent cache, and a same-size transformers Qwen3 "
        f"({b.get('total', 0) / 1e6:.1f}M parameters, SDPA) running its normal forward over the whole prompt, "
        f"on the same generated samples ({', '.join(args['tasks'])}; {args['samples']} per task and length): "
        "tokenise, prefill, greedy answer. fp32, each (model, length) in its own process, so peak RSS is that "
        "length's. Randomly initialised models: this measures cost, not accuracy.",
        "",
        f"- Command: `{command_line('bench/longctx_eval.py', report['argv'])}`",
        f"- Date: {report['date']} (total wall time {report['wall_s'] / 60:.0f} min)",
        f"- Machine: {machine_line(report['machine'])}",
        f"- Load average (1/5/15 min) at start: {report['load_start']}, at end: {report['load_end']}",
        "",
        "| length | model | status | s/sample | prefill tokens/s | peak RSS (MiB) | cache (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lengths = sorted({r["length"] for rs in report["rows"].values() for r in rs})
    for length in lengths:
        for model in ("quasar", "qwen3"):
            r = next((r for r in report["rows"][model] if r["length"] == length), None)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(
                    f"| {format_length(length)} | {model} | {r['status']}: {r['message'][:80]} | – | – | – | – |"
                )
                continue
            lines.append(
                f"| {format_length(length)} | {model} | ok | {r['seconds_per_sample']:.1f} | "
                f"{r['prefill_tokens_per_second']:,.0f} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
                f"{r['cache_bytes'] / 2**20:,.1f} |"
            )
    ratios = []
    for length in lengths:
        q_row = next(
            (r for r in report["rows"]["quasar"] if r["length"] == length and r["status"] == "ok"), None
        )
        b_row = next(
            (r for r in report["rows"]["qwen3"] if r["length"] == length and r["status"] == "ok"), None
        )
        if q_row and b_row:
            ratios.append(
                f"{format_length(length)}: time x{b_row['seconds_per_sample'] / q_row['seconds_per_sample']:.2f}, "
                f"peak RSS x{b_row['peak_rss_bytes'] / q_row['peak_rss_bytes']:.2f}"
            )
    if ratios:
        lines += ["", "- Qwen3 relative to Quasar (above 1: Quasar is cheaper): " + "; ".join(ratios) + "."]
    else:
        lines += [""]
    lines += [
        f"- Sample generation (not part of any model's time): {report['sample_generation_seconds']:.0f} s in all.",
        "",
        "![long-context evaluation cost](bench/results/longctx_eval.png)",
        end_marker,
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from validator_tasks.config import parse_length, split_list

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--lengths", default="4k,16k,64k", help="lengths for both models")
    p.add_argument("--quasar-lengths", default="256k", help="further lengths for Quasar only")
    p.add_argument("--tasks", default="niah_single,variable_tracking,babilong_qa1")
    p.add_argument("--samples", type=int, default=1, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=4096, help="Quasar's streaming chunk")
    p.add_argument("--baseline-chunk", type=int, default=0, help="Qwen3's forward size (0: whole prompt)")
    p.add_argument("--budget", type=float, default=1800.0, help="time budget per model and length (s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write the section into")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    args = p.parse_args(argv)
    args.lengths = [parse_length(x) for x in split_list(args.lengths)]
    args.quasar_lengths = [parse_length(x) for x in split_list(args.quasar_lengths)]
    args.tasks = split_list(args.tasks)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start, load_start = time.time(), load_average()
    result = run(args)
    report = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "argv": argv,
        "date": utc_now(),
        "wall_s": time.time() - start,
        "machine": machine_description(),
        "load_start": load_start,
        "load_end": load_average(),
        **result,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "longctx_eval.json").write_text(json.dumps(report, indent=1))
    plot(report, args.results_dir / "longctx_eval.png")
    publish_section(args.out, SECTION, render_section(report))


if __name__ == "__main__":
    main()
