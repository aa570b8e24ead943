"""GPU benchmark of our Triton kernels against flash-linear-attention, in the same run.

On a CUDA GPU, for B in {1, 4}, T in {4K, 16K, 64K}, H=12, D=128, bf16 (the defaults), it times:

- `quasar_attention(backend="triton")` (EFLA) against flash-linear-attention's `chunk_delta_rule`,
  the closest published peer (the same chunked WY/UT delta-rule algorithm, with beta in place of
  EFLA's key-norm-adaptive step);
- `gla_attention(backend="triton")` against flash-linear-attention's `chunk_gla`;

forward (under `torch.inference_mode()`) and forward+backward (gradients for q, k, v, beta/g), as
the median of CUDA-event timings after warm-up (`triton.testing.do_bench`), with tokens/s = B*T /
time, and our output's error against our `torch` backend on the same inputs. Keys are
L2-normalised for both delta rules, as in their use in models. When flash-linear-attention is not
installed (`pip install flash-linear-attention`), our kernels are timed alone and the table says so.

Without a CUDA GPU the script says so and times the CPU paths instead (`bench/kernels_cpu.py`:
chunked torch against naive); it never fails for lack of a GPU.

    python bench/kernels.py --out BENCHMARKS.md
    python bench/kernels.py --batches 1 --lengths 4096      # a quick look
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

from bench import kernels_cpu  # noqa: E402
from bench.common import (  # noqa: E402
    command_line,
    load_average,
    machine_description,
    machine_line,
    markers,
    publish_section,
    utc_now,
)
from bench.kernels_cpu import parse_int_list  # noqa: E402
from kernels import gla_attention, quasar_attention  # noqa: E402

SECTION = "kernels_gpu"
START_MARKER, END_MARKER = markers(SECTION)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEERS = {"quasar_attention": "fla chunk_delta_rule", "gla_attention": "fla chunk_gla"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=parse_int_list, default=[1, 4], help="batch sizes B (default 1,4)")
    p.add_argument(
        "--lengths", type=parse_int_list, default=None, help="sequence lengths T (default 4096,16384,65536)"
    )
    p.add_argument("--heads", type=int, default=12, help="heads H (default 12)")
    p.add_argument("--dim", type=int, default=128, help="head dimension Dk = Dv (default 128)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--ops", default="quasar_attention,gla_attention", help="comma-separated ops to time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="markdown file whose kernels_gpu section is written"
    )
    args, rest = p.parse_known_args(argv)
    args.ops = [x for x in args.ops.split(",") if x]
    unknown = set(args.ops) - set(PEERS)
    if unknown:
        p.error(f"--ops: unknown op(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    args.cpu_argv = rest  # handed to bench/kernels_cpu.py when there is no GPU
    return args


def load_fla() -> dict[str, Callable] | None:
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    return {"quasar_attention": chunk_delta_rule, "gla_attention": chunk_gla}


def make_inputs(op: str, B: int, T: int, H: int, D: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    device = "cuda"
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=device, dtype=torch.float32), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    if op == "quasar_attention":
        gate = torch.rand(B, T, H, device=device, dtype=dtype)
    else:
        gate = F.logsigmoid(torch.randn(B, T, H, D, device=device, dtype=torch.float32)).div(16).to(dtype)
    return {"q": q, "k": k, "v": v, "gate": gate}


def ours(op: str, backend: str) -> Callable:
    fn = quasar_attention if op == "quasar_attention" else gla_attention
    return lambda q, k, v, gate: fn(q, k, v, gate, backend=backend)[0]


def peer(op: str, fla: dict[str, Callable]) -> Callable:
    fn = fla[op]
    return lambda q, k, v, gate: fn(q, k, v, gate)[0]


def time_forward_and_backward(fn: Callable, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Median forward and forward+backward times in seconds (CUDA events, after warm-up)."""
    from triton.testing import do_bench

    with torch.inference_mode():
        fwd_ms = do_bench(lambda: fn(**inputs), warmup=5, rep=50)
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.items()}
    grad_out = torch.randn_like(fn(**leaves))

    def fwd_bwd():
        for x in leaves.values():
            x.grad = None
        fn(**leaves).backward(grad_out)

    fwdbwd_ms = do_bench(fwd_bwd, warmup=5, rep=50)
    return fwd_ms / 1e3, fwdbwd_ms / 1e3


def relative_error(fn: Callable, reference: Callable, inputs: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        got, ref = fn(**inputs).double(), reference(**inputs).double()
    return ((got - ref).norm() / ref.norm()).item()


def run(args: argparse.Namespace) -> list[dict]:
    fla = load_fla()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    rows = []
    for op in args.ops:
        for B in args.batches:
            for T in args.lengths:
                inputs = make_inputs(op, B, T, args.heads, args.dim, dtype)
                candidates = {"ours (triton)": ours(op, "triton")}
                if fla is not None:
                    candidates[PEERS[op]] = peer(op, fla)
                results = {}
                for name, fn in candidates.items():
                    try:
                        fwd, fwdbwd = time_forward_and_backward(fn, inputs)
                    except torch.cuda.OutOfMemoryError:
                        fwd = fwdbwd = float("nan")
                    torch.cuda.empty_cache()
                    results[name] = (fwd, fwdbwd)
                    print(
                        f"{op:17s} {name:22s} B={B} T={T:6d}  fwd {fwd * 1e3:8.2f} ms  fwd+bwd {fwdbwd * 1e3:8.2f} ms"
                    )
                # correctness of the timed kernel on the same inputs, against our chunked torch path
                err = relative_error(ours(op, "triton"), ours(op, "torch"), inputs) if T <= 16384 else None
                base = results.get(PEERS[op])
                for name, (fwd, fwdbwd) in results.items():
                    row = {"op": op, "impl": name, "B": B, "T": T, "fwd_s": fwd, "fwdbwd_s": fwdbwd}
                    if name.startswith("ours"):
                        row["rel_err"] = err
                        if base is not None:
                            row["speedup_fwd"] = base[0] / fwd
                            row["speedup_fwdbwd"] = base[1] / fwdbwd
                    rows.append(row)
                del inputs
                torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return "–" if x is None or x != x else format(x, fmt)

    lines = [
        "| op | implementation | B | T | fwd (ms) | fwd+bwd (ms) | fwd tokens/s | fwd+bwd tokens/s "
        "| ours vs fla fwd | ours vs fla fwd+bwd | rel. err. vs torch backend |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tokens = r["B"] * r["T"]
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['B']} | {r['T']} | {num(r['fwd_s'] * 1e3, '.2f')} "
            f"| {num(r['fwdbwd_s'] * 1e3, '.2f')} | {num(tokens / r['fwd_s'], ',.0f')} "
            f"| {num(tokens / r['fwdbwd_s'], ',.0f')} "
            f"| {num(r.get('speedup_fwd'), '.2f') + ('x' if r.get('speedup_fwd') else '')} "
            f"| {num(r.get('speedup_fwdbwd'), '.2f') + ('x' if r.get('speedup_fwdbwd') else '')} "
            f"| {num(r.get('rel_err'), '.1e')} |"
        )
    return "\n".join(lines)


def render_section(rows: list[dict], args: argparse.Namespace, meta: dict) -> str:
    fla_note = (
        f"flash-linear-attention {meta['fla_version']}"
        if meta["fla_version"]
        else "flash-linear-attention not installed: our kernels timed alone"
    )
    return "\n".join(
        [
            START_MARKER,
            "## Triton kernels on GPU vs flash-linear-attention (`bench/kernels.py`)",
            "",
            f"{args.dtype}, H={args.heads}, Dk=Dv={args.dim}; L2-normalised keys. Median of CUDA-event "
            "timings (`triton.testing.do_bench`); forward under `torch.inference_mode()`, forward+backward "
            "with gradients for q, k, v and beta/g. Peers: EFLA vs `chunk_delta_rule`, GLA vs `chunk_gla`. "
            "'ours vs fla' > 1 means ours is faster. Relative error: our Triton output against our torch "
            "backend on the same inputs (T <= 16K).",
            "",
            f"- Command: `{command_line('bench/kernels.py', meta['argv'])}`",
            f"- Date: {meta['date']} (total wall time {meta['wall_s']:.0f} s)",
            f"- Device: {meta['device']}; {fla_note}; triton {meta['triton_version']}",
            f"- Host: {machine_line(machine_description())}",
            "",
            format_table(rows),
            END_MARKER,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/kernels.py: no CUDA GPU here, so the Triton kernels and flash-linear-attention cannot be "
            "timed; timing the CPU paths instead (bench/kernels_cpu.py: chunked torch vs naive).",
            file=sys.stderr,
            flush=True,
        )
        cpu_argv = [*args.cpu_argv, "--seed", str(args.seed)]
        if args.lengths is not None:
            cpu_argv += ["--lengths", ",".join(map(str, args.lengths))]
        if args.out is not None:
            cpu_argv += ["--out", str(args.out)]
        kernels_cpu.main(cpu_argv)
        return
    import triton

    if args.lengths is None:
        args.lengths = [4096, 16384, 65536]
    try:
        import fla

        fla_version = getattr(fla, "__version__", "installed")
    except ImportError:
        fla_version = None
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "date": utc_now(),
        "load_start": load_average(),
        "device": torch.cuda.get_device_name(),
        "fla_version": fla_version,
        "triton_version": triton.__version__,
    }
    start = time.perf_counter()
    rows = run(args)
    meta["wall_s"] = time.perf_counter() - start
    section = render_section(rows, args, meta)
    publish_section(args.out, SECTION, section)


if __name__ == "__main__":
    main()
