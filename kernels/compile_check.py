"""Compile every Triton kernel for real GPU architectures, without a GPU, and report its resources.

The CPU interpreter proves the kernels compute the right thing; it does not prove they compile for a
GPU, nor that they fit one (a kernel that asks for more shared memory than a block may have fails
at launch). This tool runs the forward and backward wrappers with kernel launches recorded instead
of executed, compiles each launch ahead of time with Triton's own compiler and ptxas for the chosen
`sm_XX` targets, and reports shared memory, registers per thread and stack (spilled registers) as
ptxas allocated them, against each architecture's shared-memory limit per block.

    python -m kernels.compile_check                       # sm_80 and sm_90, bf16, H=12, D=128
    python -m kernels.compile_check --arch 89 --dtype fp16 --dim 64

Exit status 1 when a kernel fails to compile or exceeds a limit.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Kernels are defined as compiled (not interpreted) functions only when this is off at import time.
os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton

# Largest shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
}


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))

        return launch


def record_launches(dtype: torch.dtype, heads: int, dim: int) -> list:
    """Every kernel launch of the forward and backward of both ops (with initial and final states)."""
    from kernels import efla_triton, gla_triton

    launches: list = []
    patched = []
    for module in (efla_triton, gla_triton):
        for name, obj in vars(module).copy().items():
            is_kernel = isinstance(obj, triton.runtime.jit.JITFunction) and name.startswith(
                ("_efla_", "_gla_")
            )
            if is_kernel and "tl.program_id" in inspect.getsource(obj.fn):  # kernels, not device helpers
                patched.append((module, name, obj))
                setattr(module, name, _Recorder(obj, launches))
    try:
        T, H, D = 100, heads, dim
        q, k, v = (torch.randn(T, H, D).to(dtype) for _ in range(3))
        beta = torch.rand(T, H).to(dtype)
        g = -torch.rand(T, H, D).to(dtype)
        offsets = (0, T)
        h0 = torch.zeros(1, H, D, D)
        o, ht, saved = efla_triton.efla_fwd(q, k, v, beta, 0.1, h0, True, offsets)
        efla_triton.efla_bwd(q, k, v, beta, 0.1, h0, saved, torch.zeros_like(o), torch.zeros_like(ht))
        o, ht, saved = gla_triton.gla_fwd(q, k, v, g, 0.1, h0, True, offsets)
        gla_triton.gla_bwd(q, k, v, g, 0.1, h0, saved, torch.zeros_like(o), torch.zeros_like(ht), ht)
    finally:
        for module, name, obj in patched:
            setattr(module, name, obj)
    return launches


def _signature(fn, args, kwargs) -> tuple[dict, dict, dict]:
    names = list(inspect.signature(fn.fn).parameters)
    signature, constants = {}, {}
    for name, value in zip(names, args):
        if value is None:
            signature[name], constants[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, int):
            signature[name] = "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot type argument {name}={value!r}")
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    for name, value in kwargs.items():
        if name not in options:
            signature[name], constants[name] = "constexpr", value
    return signature, constants, options


def _resource_usage(cubin: bytes) -> dict[str, int]:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for field in line.split():
                key, _, value = field.partition(":")
                if key in ("REG", "STACK") and value.isdigit():
                    usage[key] = int(value)
    return usage


def compile_all(archs: list[int], dtype: torch.dtype, heads: int, dim: int) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    launches = record_launches(dtype, heads, dim)
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        seen = set()
        for fn, args, kwargs in launches:
            name = fn.fn.__name__
            if name in seen:
                continue
            seen.add(name)
            signature, constants, options = _signature(fn, args, kwargs)
            row = {"arch": arch, "kernel": name, **options}
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constants),
                    target=target,
                    options=options,
                )
            except Exception as e:  # report every kernel, not just the first failure
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                rows.append(row)
                continue
            row["shared"] = compiled.metadata.shared
            row["shared_limit"] = SHARED_LIMIT.get(arch)
            row.update({k.lower(): v for k, v in _resource_usage(compiled.asm.get("cubin", b"")).items()})
            rows.append(row)
    return rows


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"sm_{r['arch']} {r['kernel']}: does not compile: {r['error']}")
        elif r["shared_limit"] is not None and r["shared"] > r["shared_limit"]:
            out.append(
                f"sm_{r['arch']} {r['kernel']}: needs {r['shared']} bytes of shared memory, "
                f"the limit per block is {r['shared_limit']}"
            )
    return out


def format_table(rows: list[dict]) -> str:
    lines = [
        "| arch | kernel | warps | stages | shared (KiB) | limit (KiB) | registers/thread | stack (bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | | | compile error: {r['error']} | | | |")
            continue
        limit = "–" if r["shared_limit"] is None else f"{r['shared_limit'] / 1024:.0f}"
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r.get('num_warps', 4)} | {r.get('num_stages', 3)} "
            f"| {r['shared'] / 1024:.0f} | {limit} | {r.get('reg', '–')} | {r.get('stack', '–')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, e.g. 80,89,90")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128, help="head dimension Dk = Dv")
    args = p.parse_args(argv)
    try:
        archs = [int(x) for x in args.arch.split(",") if x]
    except ValueError:
        p.error(f"--arch: expected comma-separated integers like 80,90, got {args.arch!r}")
    rows = compile_all(archs, DTYPES[args.dtype], args.heads, args.dim)
    print(f"Triton {triton.__version__}, {args.dtype}, H={args.heads}, Dk=Dv={args.dim}\n")
    print(format_table(rows))
    found = problems(rows)
    for line in found:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
