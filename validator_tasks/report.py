"""The evaluation report: a validated JSON document, a readable table and a task x length heatmap.

Every planned sample has a record and a score; a sample the model did not answer (time budget spent,
ladder stopped, model error) scores 0 and its `status` says why. A cell's accuracy is the mean over
its planned samples, so a model cannot look better by running out of time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from validator_tasks.config import format_length

REPORT_FORMAT = "q24-longctx-report/1"
SampleStatus = Literal["ok", "timeout", "error", "not_run"]


class SampleRecord(BaseModel):
    """One planned sample. `seconds` is the model's wall time on it (prefill + decode + transport);
    `peak_memory_bytes` is the CUDA peak allocated during the sample, or on CPU the model process's
    peak RSS so far (per length when each length runs in a fresh process, as the benchmark does)."""

    model_config = ConfigDict(extra="forbid")

    task: str
    length: int
    seed: int
    prompt_tokens: int
    status: SampleStatus
    score: float = Field(ge=0.0, le=1.0)
    prediction: str = ""
    answers: list[str]
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    peak_memory_bytes: int = 0
    cache_bytes: int = 0
    message: str = ""


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    length: int
    accuracy: float
    n: int
    n_ok: int
    mean_seconds: float | None = None


class LengthSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    length: int
    status: Literal["ran", "partial", "skipped"]
    accuracy: float
    n: int
    n_ok: int
    mean_seconds: float | None = None
    peak_memory_bytes: int = 0
    cache_bytes: int = 0
    reason: str = ""


class ModelResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    kind: str = ""
    parameters: dict[str, int] = Field(default_factory=dict)
    status: Literal["ok", "timeout", "error", "load_error"]
    message: str = ""
    score: float
    seconds: float
    load_seconds: float = 0.0
    budget_seconds: float
    lengths: list[LengthSummary]
    cells: list[Cell]
    samples: list[SampleRecord]

    def cell(self, task: str, length: int) -> Cell:
        for c in self.cells:
            if c.task == task and c.length == length:
                return c
        raise KeyError((task, length))


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["q24-longctx-report/1"] = REPORT_FORMAT
    created: str
    base_seed: int
    tasks: list[str]
    lengths: list[int]
    samples_per_cell: int
    config: dict[str, Any]
    machine: dict[str, str]
    models: list[ModelResult]


# ------------------------------------------------------------------------------------------------
# aggregation


def summarise(records: list[SampleRecord], tasks: list[str], lengths: list[int], skipped: dict[int, str]):
    """Cells (task x length) and per-length summaries from sample records."""
    cells: list[Cell] = []
    summaries: list[LengthSummary] = []
    for length in lengths:
        at_length = [r for r in records if r.length == length]
        for task in tasks:
            rs = [r for r in at_length if r.task == task]
            ok = [r for r in rs if r.status == "ok"]
            cells.append(
                Cell(
                    task=task,
                    length=length,
                    accuracy=sum(r.score for r in rs) / len(rs) if rs else 0.0,
                    n=len(rs),
                    n_ok=len(ok),
                    mean_seconds=sum(r.seconds for r in ok) / len(ok) if ok else None,
                )
            )
        ok = [r for r in at_length if r.status == "ok"]
        ran = [r for r in at_length if r.status != "not_run"]
        status = "skipped" if not ran else "ran" if len(ok) == len(at_length) else "partial"
        summaries.append(
            LengthSummary(
                length=length,
                status=status,
                accuracy=sum(r.score for r in at_length) / len(at_length) if at_length else 0.0,
                n=len(at_length),
                n_ok=len(ok),
                mean_seconds=sum(r.seconds for r in ok) / len(ok) if ok else None,
                peak_memory_bytes=max((r.peak_memory_bytes for r in ran), default=0),
                cache_bytes=max((r.cache_bytes for r in ran), default=0),
                reason=skipped.get(length, ""),
            )
        )
    return cells, summaries


# ------------------------------------------------------------------------------------------------
# files


def write_report(report: Report, path: str | Path) -> Path:
    """Atomically: a reader sees the previous report or the new one, never half of one."""
    from quasar.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, report.model_dump_json(indent=1))


def read_report(path: str | Path) -> Report:
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"report {str(path)!r} does not exist")
    try:
        return Report.model_validate_json(path.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(
            f"{path} is not a {REPORT_FORMAT} report: {where}: {first['msg']} "
            f"({e.error_count()} problem(s)); write one with `python -m validator_tasks eval`"
        ) from None


# ------------------------------------------------------------------------------------------------
# table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}" if n else "-"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def format_table(report: Report) -> str:
    """Per model: accuracy by task (rows) and length (columns) with sample counts, then time and
    memory per length. Cells not fully answered show how many of their samples were."""
    out: list[str] = []
    heads = [format_length(x) for x in report.lengths]
    for m in report.models:
        params = m.parameters.get("total")
        desc = f"{m.kind}, {params / 1e6:.1f}M parameters" if params else m.kind or "not loaded"
        out.append(f"{m.model} ({desc}): score {m.score:.3f}, status {m.status}, {m.seconds:.0f}s")
        if m.message:
            out.append(f"  {m.message}")
        width = max([len(t) for t in report.tasks] + [len("mean"), len("s/sample")])
        out.append("  " + "task".ljust(width) + "".join(h.rjust(12) for h in heads))
        for task in report.tasks:
            row = []
            for length in report.lengths:
                c = m.cell(task, length)
                text = f"{c.accuracy:.2f}" if c.n_ok == c.n else f"{c.accuracy:.2f} {c.n_ok}/{c.n}"
                row.append(text.rjust(12))
            out.append("  " + task.ljust(width) + "".join(row))
        out.append("  " + "mean".ljust(width) + "".join(f"{s.accuracy:.3f}".rjust(12) for s in m.lengths))
        out.append(
            "  " + "s/sample".ljust(width) + "".join(_secs(s.mean_seconds).rjust(12) for s in m.lengths)
        )
        out.append(
            "  " + "peak MiB".ljust(width) + "".join(_mib(s.peak_memory_bytes).rjust(12) for s in m.lengths)
        )
        for s in m.lengths:
            if s.reason:
                out.append(f"  {format_length(s.length)}: {s.reason}")
        out.append(f"  samples per cell: {report.samples_per_cell}; base seed {report.base_seed}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# heatmap


def plot_heatmap(report: Report, path: str | Path) -> Path:
    """One panel per model: accuracy by task x length, each cell annotated; lengths that were not
    run are hatched grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, lengths = report.tasks, report.lengths
    n = len(report.models)
    fig, axes = plt.subplots(
        1,
        n,
        figsize=(1.6 + (1.0 + 0.9 * len(lengths)) * n + 0.8, 1.4 + 0.42 * len(tasks)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, m in zip(axes[0], report.models):
        grid = np.full((len(tasks), len(lengths)), np.nan)
        skipped = {s.length for s in m.lengths if s.status == "skipped"}
        for i, task in enumerate(tasks):
            for j, length in enumerate(lengths):
                if length not in skipped:
                    grid[i, j] = m.cell(task, length).accuracy
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_facecolor("#d0d0d0")
        for i in range(len(tasks)):
            for j in range(len(lengths)):
                v = grid[i, j]
                if math.isnan(v):
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", lw=0))
                    continue
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 else "black",
                )
        ax.set_xticks(range(len(lengths)), [format_length(x) for x in lengths])
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks))
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{Path(m.model).name or m.model}\nscore {m.score:.3f} ({m.status})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    fig.suptitle(f"Long-context accuracy, {report.samples_per_cell} sample(s) per cell", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
