"""CPU benchmark of the sequence-mixing ops: the chunked `torch` backend against the recurrent `naive` one.

For each op (quasar_attention, gla_attention), backend and sequence length it times, in fp32:

- forward: one call under `torch.inference_mode()`, as in generation or evaluation;
- forward+backward: a call on inputs that require grad, then backward of a random linear loss on the
  output and the final state (gradients for q, k, v, beta or g).

Each measurement is the minimum over `--repeats` runs; a configuration stops repeating once it has
used `--budget` seconds, so the naive backend at long lengths is measured once. The torch backend's
output is checked against the naive one's at every length (relative error column).

    python bench/kernels_cpu.py                       # defaults: B=1, H=4, D=64, T in {1K, 4K, 16K}
    python bench/kernels_cpu.py --out BENCHMARKS.md   # also write the section of BENCHMARKS.md

With --out, the text between `<!-- kernels_cpu:start -->` and `<!-- kernels_cpu:end -->` is replaced
(the section is appended, or the file created, when missing); the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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
from kernels import gla_attention, quasar_attention  # noqa: E402

SECTION = "kernels_cpu"
START_MARKER, END_MARKER = markers(SECTION)
OPS: dict[str, Callable] = {"quasar_attention": quasar_attention, "gla_attention": gla_attention}


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=parse_int_list, default=[1024, 4096, 16384], help="sequence lengths T")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=4, help="heads H")
    p.add_argument("--dim", type=int, default=64, help="head dimension (Dk = Dv)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the minimum is kept)")
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="stop repeating a measurement once its runs have taken this many seconds (default 20)",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--backends", default="torch,naive", help="comma-separated subset of torch, naive")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file (e.g. BENCHMARKS.md) whose kernels_cpu section is written or updated",
    )
    args = p.parse_args(argv)
    args.ops = [x.strip() for x in args.ops.split(",") if x.strip()]
    args.backends = [x.strip() for x in args.backends.split(",") if x.strip()]
    for op in args.ops:
        if op not in OPS:
            p.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    for backend in args.backends:
        if backend not in ("torch", "naive"):
            p.error(f"unknown backend {backend!r}; choose from torch, naive")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def make_inputs(op: str, B: int, T: int, H: int, D: int) -> tuple[torch.Tensor, ...]:
    """Model-like inputs: L2-normalised q and k, beta in (0, 2) / log-sigmoid gates, unit-scale values."""
    q = F.normalize(torch.randn(B, T, H, D), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.randn(B, T, H, D)
    if op == "quasar_attention":
        gate = 2.0 * torch.sigmoid(torch.randn(B, T, H))
    else:
        gate = F.logsigmoid(torch.randn(B, T, H, D)) / 16.0
    return q, k, v, gate


def time_runs(fn: Callable[[], object], repeats: int, budget: float) -> tuple[float, int]:
    """Minimum wall time of fn() over up to `repeats` runs, stopping early once `budget` seconds are used."""
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if spent >= budget:
            break
    return min(times), len(times)


def bench_one(op: str, backend: str, inputs, repeats: int, budget: float) -> dict:
    fn = OPS[op]
    result: dict = {}

    def forward():
        with torch.inference_mode():
            result["o"], _ = fn(*inputs, output_final_state=True, backend=backend)

    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    B, T, H, D = inputs[0].shape
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, inputs[2].shape[-1], generator=gen)
    dS = torch.randn(B, H, D, inputs[2].shape[-1], generator=gen)

    def forward_backward():
        for x in leaves:
            x.grad = None
        o, S = fn(*leaves, output_final_state=True, backend=backend)
        ((o * do).sum() + (S * dS).sum()).backward()

    fwd_s, fwd_runs = time_runs(forward, repeats, budget)
    fwdbwd_s, fwdbwd_runs = time_runs(forward_backward, repeats, budget)
    return {"fwd_s": fwd_s, "fwdbwd_s": fwdbwd_s, "runs": (fwd_runs, fwdbwd_runs), "o": result["o"]}


def warm_up(ops: list[str], backends: list[str], B: int, H: int, D: int) -> None:
    """One small forward+backward per op and backend, so that no timed run pays first-call costs."""
    for op in ops:
        inputs = [x.requires_grad_(True) for x in make_inputs(op, B, 130, H, D)]
        for backend in backends:
            o, S = OPS[op](*inputs, output_final_state=True, backend=backend)
            (o.sum() + S.sum()).backward()


def format_table(rows: list[dict]) -> str:
    header = (
        "| op | backend | T | fwd (s) | fwd+bwd (s) | fwd tokens/s | fwd+bwd tokens/s "
        "| torch speed-up fwd | torch speed-up fwd+bwd | rel. err. of o vs naive | runs (fwd, fwd+bwd) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        speed_fwd = f"{r['speedup_fwd']:.1f}x" if r.get("speedup_fwd") else "–"
        speed_bwd = f"{r['speedup_fwdbwd']:.1f}x" if r.get("speedup_fwdbwd") else "–"
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "–"
        lines.append(
            f"| {r['op']} | {r['backend']} | {r['T']} | {r['fwd_s']:.4f} | {r['fwdbwd_s']:.4f} "
            f"| {r['tokens'] / r['fwd_s']:,.0f} | {r['tokens'] / r['fwdbwd_s']:,.0f} "
            f"| {speed_fwd} | {speed_bwd} | {err} | {r['runs'][0]}, {r['runs'][1]} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[list[dict], dict[str, str]]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    B, H, D = args.batch, args.heads, args.dim
    warm_up(args.ops, args.backends, B, H, D)
    rows = []
    for op in args.ops:
        for T in args.lengths:
            inputs = make_inputs(op, B, T, H, D)
            results = {}
            for backend in args.backends:
                r = bench_one(op, backend, inputs, args.repeats, args.budget)
                results[backend] = r
                print(
                    f"{op:17s} {backend:6s} T={T:6d}  fwd {r['fwd_s']:9.4f} s  fwd+bwd {r['fwdbwd_s']:9.4f} s"
                    f"  runs {r['runs']}",
                    file=sys.stderr,
                    flush=True,
                )
            naive = results.get("naive")
            for backend, r in results.items():
                row = {"op": op, "backend": backend, "T": T, "tokens": B * T, **r}
                if backend == "torch" and naive is not None:
                    row["speedup_fwd"] = naive["fwd_s"] / r["fwd_s"]
                    row["speedup_fwdbwd"] = naive["fwdbwd_s"] / r["fwdbwd_s"]
                    ref = naive["o"].double()
                    row["rel_err"] = ((r["o"].double() - ref).norm() / ref.norm()).item()
                rows.append(row)
    return rows, machine_description()


def render_section(rows: list[dict], machine: dict[str, str], args: argparse.Namespace, meta: dict) -> str:
    command = command_line("bench/kernels_cpu.py", meta["argv"])
    return "\n".join(
        [
            START_MARKER,
            "## Sequence-mixing kernels on CPU (`bench/kernels_cpu.py`)",
            "",
            f"Chunked `torch` backend vs recurrent `naive` backend, fp32, B={args.batch}, H={args.heads}, "
            f"Dk=Dv={args.dim}. Forward under `torch.inference_mode()`; forward+backward includes the "
            "gradients for q, k, v and beta/g. Each time is the minimum over the runs shown (fewer than "
            f"`--repeats {args.repeats}` when a measurement used up its {args.budget:g} s budget). "
            "Tokens/s = B*T / time. The last-but-one column is the torch backend's output error "
            "relative to the naive one.",
            "",
            f"- Command: `{command}`",
            f"- Date: {meta['date']} (total wall time {meta['wall_s']:.0f} s)",
            f"- Machine: {machine_line(machine)}",
            f"- Load average (1/5/15 min) at start: {meta['load_start']}, at end: {meta['load_end']}",
            "",
            format_table(rows),
            END_MARKER,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "date": utc_now(),
        "load_start": load_average(),
    }
    start = time.perf_counter()
    rows, machine = run(args)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = load_average()
    section = render_section(rows, machine, args, meta)
    publish_section(args.out, SECTION, section)


if __name__ == "__main__":
    main()
