"""Streaming forward of a Quasar preset against a same-size Qwen3 transformer, on CPU, as context grows.

For each context length (default 16K, 64K, 256K, 1M tokens) and each model, a fresh subprocess
streams a random context through the model in chunks, carrying the model's cache between calls and
keeping only the last position's logits (`logits_to_keep=1`), as long-context evaluation does:

- `quasar`: `QuasarForCausalLM` on a preset (default `small`) with its recurrent cache.
- `qwen3`: `Qwen3ForCausalLM` from transformers with SDPA attention and a `DynamicCache` (chunked
  prefill), built with the same width, vocabulary, heads and effective depth (layers x loops) as the
  Quasar preset. Its run at a length is stopped after `--baseline-budget` seconds (default 600), and
  longer lengths are then skipped: the baseline is reported at the lengths it finishes in time.

Each subprocess reports wall time of the streaming loop and its own peak resident set size, so one
measurement's memory never leaks into another's. Results go to `bench/results/streaming.json`, a plot
to `bench/results/streaming.png`, and with `--out` the `streaming` section of BENCHMARKS.md, which
checks the design targets: time(1M)/time(64K) <= 17.6 and peak RSS(1M) <= 1.2 x peak RSS(64K).

    python bench/streaming.py --out BENCHMARKS.md              # the full run (about an hour on 2 cores)
    python bench/streaming.py --lengths 4096,16384 --preset tiny  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Run as a script, bench/ heads sys.path and bench/kernels.py would shadow the `kernels` package.
sys.path[:] = [str(REPO_ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() not in (BENCH_DIR, REPO_ROOT)
]

SECTION = "streaming"
MODELS = ("quasar", "qwen3")
TIME_RATIO_TARGET = 17.6  # time(1M) / time(64K): 16x the tokens, with 10% slack
MEMORY_RATIO_TARGET = 1.2  # peak RSS(1M) / peak RSS(64K)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --------------------------------------------------------------------------------------------------
# Worker: one model, one length, in its own process. Talks to the parent through stdout lines.


def build_model(model: str, preset: str):
    import torch

    from quasar import QuasarConfig, QuasarForCausalLM

    qcfg = QuasarConfig.from_preset(preset)
    if model == "quasar":
        return QuasarForCausalLM(qcfg)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    bcfg = Qwen3Config(
        vocab_size=qcfg.vocab_size,
        hidden_size=qcfg.hidden_size,
        intermediate_size=qcfg.intermediate_size,
        num_hidden_layers=qcfg.num_hidden_layers * qcfg.num_loops,
        num_attention_heads=qcfg.num_heads,
        num_key_value_heads=qcfg.num_heads,
        head_dim=qcfg.head_dim,
        max_position_embeddings=2**21,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=qcfg.tie_word_embeddings,
    )
    with torch.device("cpu"):
        return Qwen3ForCausalLM._from_config(bcfg, attn_implementation="sdpa")


def count_parameters(model, name: str) -> dict[str, int]:
    if name == "quasar":
        return model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": total}


def worker(model_name: str, preset: str, tokens: int, chunk: int, seed: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(model_name, preset).eval()
    counts = count_parameters(model, model_name)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def new_cache():
        if model_name == "quasar":
            return None  # the model creates its recurrent cache on the first call
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    with torch.inference_mode():
        # Warm-up on a separate cache so that no timed call pays one-time costs.
        model(
            torch.randint(0, vocab, (1, min(chunk, 256)), generator=gen),
            past_key_values=new_cache(),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = new_cache()
        done = 0
        start = time.perf_counter()
        while done < tokens:
            n = min(chunk, tokens - done)
            ids = torch.randint(0, vocab, (1, n), generator=gen)
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if not torch.isfinite(out.logits).all():
                raise RuntimeError(f"non-finite logits after {done + n} tokens")
            done += n
            print(f"PROGRESS {done} {time.perf_counter() - start:.3f} {peak_rss_bytes()}", flush=True)
        seconds = time.perf_counter() - start
    result = {"tokens": tokens, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "parameters": counts}
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent: runs the workers, enforces the baseline's budget, writes results.


def measure(model: str, tokens: int, args: argparse.Namespace, budget: float | None) -> dict:
    """Run one worker; returns its result, or a record of how far it got when it ran out of time."""
    from tqdm import tqdm

    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        model,
        "--tokens",
        str(tokens),
        "--preset",
        args.preset,
        "--chunk",
        str(args.chunk),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    last = {"tokens": 0, "seconds": 0.0, "peak_rss_bytes": 0}
    result = None
    # A watchdog kills the worker at the budget even while it is inside one long forward call.
    watchdog = threading.Timer(budget, proc.kill) if budget is not None else None
    if watchdog is not None:
        watchdog.start()
    try:
        with tqdm(
            total=tokens, unit="tok", desc=f"{model:6s} {tokens:>9,}", smoothing=0.1, file=sys.stderr
        ) as bar:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("PROGRESS "):
                    done, secs, rss = line.split()[1:]
                    bar.update(int(done) - last["tokens"])
                    last = {"tokens": int(done), "seconds": float(secs), "peak_rss_bytes": int(rss)}
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
            proc.wait()
    finally:
        timed_out = watchdog is not None and watchdog.finished.is_set() and result is None
        if watchdog is not None:
            watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if result is not None:
        return {"model": model, "status": "ok", **result}
    if timed_out:
        return {
            "model": model,
            "status": "timeout",
            "budget_s": budget,
            "tokens": tokens,
            "tokens_done": last["tokens"],
            "seconds_done": last["seconds"],
            "peak_rss_bytes": last["peak_rss_bytes"],
        }
    raise RuntimeError(f"{model} worker for {tokens} tokens failed with exit code {proc.returncode}")


def fmt_len(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def ratios(rows: list[dict], model: str, short: int, long: int) -> dict | None:
    by_len = {r["tokens"]: r for r in rows if r["model"] == model and r["status"] == "ok"}
    if short not in by_len or long not in by_len:
        return None
    a, b = by_len[short], by_len[long]
    return {
        "short": short,
        "long": long,
        "time_ratio": b["seconds"] / a["seconds"],
        "memory_ratio": b["peak_rss_bytes"] / a["peak_rss_bytes"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, marker in zip(MODELS, "os"):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        if ok:
            xs = [r["tokens"] for r in ok]
            ax_t.plot(xs, [r["seconds"] for r in ok], marker=marker, label=model)
            ax_m.plot(xs, [r["peak_rss_bytes"] / 2**30 for r in ok], marker=marker, label=model)
        for r in rows:
            if r["model"] == model and r["status"] == "timeout":
                ax_t.scatter(
                    [r["tokens"]],
                    [r["budget_s"]],
                    marker="x",
                    color="red",
                    zorder=3,
                    label=f"{model}: stopped at budget",
                )
    lengths = sorted({r["tokens"] for r in rows})
    quasar_ok = {r["tokens"]: r["seconds"] for r in rows if r["model"] == "quasar" and r["status"] == "ok"}
    if quasar_ok:
        x0 = min(quasar_ok)
        ax_t.plot(
            lengths, [quasar_ok[x0] * x / x0 for x in lengths], ":", color="gray", label="linear in length"
        )
    ax_t.set(
        xscale="log",
        yscale="log",
        xlabel="context tokens",
        ylabel="streaming time (s)",
        title="Time to stream the context",
    )
    ax_m.set(xscale="log", xlabel="context tokens", ylabel="peak RSS (GiB)", title="Peak resident memory")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.set_xticks(lengths, [fmt_len(x) for x in lengths])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_section(report: dict) -> str:
    from bench.common import command_line, machine_line, markers

    start_marker, end_marker = markers(SECTION)
    args = report["args"]
    params = report["parameters"]
    lines = [
        start_marker,
        "## Streaming long contexts on CPU (`bench/streaming.py`)",
        "",
        f"`quasar`: the `{args['preset']}` preset ({params['quasar']['total'] / 1e6:.1f}M parameters, "
        f"{params['quasar']['active'] / 1e6:.1f}M active per token) with its recurrent cache. "
        f"`qwen3`: transformers' Qwen3 of the same width, heads, vocabulary and effective depth "
        f"({params['qwen3']['total'] / 1e6:.1f}M parameters), SDPA attention, `DynamicCache`. Both fp32, "
        f"random tokens streamed in chunks of {args['chunk']} with `logits_to_keep=1`; each measurement in its "
        "own process (peak RSS is that process's). The baseline is stopped after "
        f"{args['baseline_budget']:g} s and not run at longer lengths.",
        "",
        f"- Command: `{command_line('bench/streaming.py', report['argv'])}`",
        f"- Date: {report['date']} (total wall time {report['wall_s'] / 60:.0f} min)",
        f"- Machine: {machine_line(report['machine'])}",
        f"- Load average (1/5/15 min) at start: {report['load_start']}, at end: {report['load_end']}",
        "",
        "| model | context | status | time (s) | tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] == "ok":
            lines.append(
                f"| {r['model']} | {fmt_len(r['tokens'])} | ok | {r['seconds']:.1f} "
                f"| {r['tokens'] / r['seconds']:,.0f} | {r['peak_rss_bytes'] / 2**20:,.0f} |"
            )
        elif r["status"] == "timeout":
            lines.append(
                f"| {r['model']} | {fmt_len(r['tokens'])} | stopped at {r['budget_s']:g} s after "
                f"{r['tokens_done']:,} tokens | > {r['budget_s']:g} | "
                f"{r['tokens_done'] / max(r['seconds_done'], 1e-9):,.0f} (so far) "
                f"| {r['peak_rss_bytes'] / 2**20:,.0f} (so far) |"
            )
        else:
            lines.append(f"| {r['model']} | {fmt_len(r['tokens'])} | skipped: {r['reason']} | – | – | – |")
    lines.append("")
    for model in MODELS:
        rat = report["ratios"].get(model)
        if not rat:
            continue
        verdict = ""
        if model == "quasar" and rat["short"] == 65536 and rat["long"] == 2**20:
            ok_t = rat["time_ratio"] <= TIME_RATIO_TARGET
            ok_m = rat["memory_ratio"] <= MEMORY_RATIO_TARGET
            verdict = (
                f" Targets: time <= {TIME_RATIO_TARGET} ({'met' if ok_t else 'MISSED'}), "
                f"memory <= {MEMORY_RATIO_TARGET}x ({'met' if ok_m else 'MISSED'})."
            )
        lines.append(
            f"- `{model}` {fmt_len(rat['long'])} vs {fmt_len(rat['short'])} "
            f"({rat['long'] / rat['short']:g}x the tokens): time x{rat['time_ratio']:.2f}, "
            f"peak RSS x{rat['memory_ratio']:.2f}.{verdict}"
        )
    lines += ["", f"![streaming time and memory]({report['plot']})", end_marker]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.kernels_cpu import parse_int_list
    from quasar.configuration import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths",
        type=parse_int_list,
        default=[16_384, 65_536, 262_144, 1_048_576],
        help="context lengths in tokens (default 16K,64K,256K,1M)",
    )
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="Quasar preset (default small)")
    p.add_argument("--chunk", type=int, default=2048, help="tokens per forward call (default 2048)")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    p.add_argument(
        "--baseline-budget",
        type=float,
        default=600.0,
        help="seconds the qwen3 baseline may take at one length (default 600)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--results-dir",
        type=Path,
        default=REPO_ROOT / "bench" / "results",
        help="where streaming.json and streaming.png go (default bench/results)",
    )
    p.add_argument("--out", type=Path, default=None, help="markdown file whose streaming section is written")
    p.add_argument("--worker", choices=MODELS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.chunk < 1:
        p.error("--chunk must be a positive number of tokens")
    if args.baseline_budget <= 0:
        p.error("--baseline-budget must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.preset, args.tokens, args.chunk, args.seed, args.threads)
        return
    from bench.common import load_average, machine_description, publish_section, utc_now

    report: dict = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": utc_now(),
        "load_start": load_average(),
        "rows": [],
        "parameters": {},
    }
    start = time.perf_counter()
    baseline_stopped_at = None
    for tokens in sorted(args.lengths):
        for model in args.models:
            if model == "qwen3" and baseline_stopped_at is not None:
                reason = f"did not finish {fmt_len(baseline_stopped_at)} in {args.baseline_budget:g} s"
                report["rows"].append(
                    {"model": model, "tokens": tokens, "status": "skipped", "reason": reason}
                )
                continue
            budget = args.baseline_budget if model == "qwen3" else None
            row = measure(model, tokens, args, budget)
            report["rows"].append(row)
            if "parameters" in row:
                report["parameters"][model] = row.pop("parameters")
            if row["status"] == "timeout":
                baseline_stopped_at = tokens
            print(json.dumps(row), file=sys.stderr, flush=True)
    for model in args.models:
        report["parameters"].setdefault(model, count_parameters(build_model(model, args.preset), model))
    report["wall_s"] = time.perf_counter() - start
    report["load_end"] = load_average()
    report["machine"] = machine_description()
    if args.threads:
        report["machine"]["torch_threads"] = str(args.threads)
    report["args"] = {"preset": args.preset, "chunk": args.chunk, "baseline_budget": args.baseline_budget}
    lengths = sorted(args.lengths)
    short = 65_536 if 65_536 in lengths else lengths[0]
    report["ratios"] = {m: ratios(report["rows"], m, short, lengths[-1]) for m in args.models}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.results_dir / "streaming.png"
    plot(report["rows"], plot_path)
    try:
        report["plot"] = str(plot_path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        report["plot"] = str(plot_path)
    (args.results_dir / "streaming.json").write_text(json.dumps(report, indent=2) + "\n")
    section = render_section(report)
    publish_section(args.out, SECTION, section)


if __name__ == "__main__":
    main()
