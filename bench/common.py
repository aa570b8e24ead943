"""Helpers shared by the benchmark scripts: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory = f"{total_kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        memory = "RAM unknown"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "memory": memory,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(machine: dict[str, str]) -> str:
    return (
        f"{machine['platform']}; CPU: {machine['cpu']}; {machine['cpu_count']} logical CPUs; "
        f"{machine['memory']}; torch {machine['torch']} ({machine['torch_threads']} threads); "
        f"Python {machine['python']}"
    )


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def command_line(script: str, argv: list[str]) -> str:
    return f"python {script}" + ("" if not argv else " " + shlex.join(argv))


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the `name` section of `path` (between its start and end markers), or append it.

    Everything outside the markers is kept, so each benchmark owns exactly one section of the file.
    `section` must already contain the markers (see `markers`)."""
    start_marker, end_marker = markers(name)
    if not path.exists():
        path.write_text("# Benchmarks\n\n" + section + "\n")
        return
    text = path.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def publish_section(out: Path | None, name: str, section: str) -> None:
    """Print a benchmark's section and, when `out` is given, write it into that markdown file."""
    print(section)
    if out is not None:
        write_section(out, name, section)
        print(f"\nwrote the {name} section of {out}", file=sys.stderr)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"
