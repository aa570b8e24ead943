"""`python -m validator_tasks eval --model DIR --tasks ruler --lengths 4k,16k --seed 7` and
`python -m validator_tasks show REPORT.json`. Flags come from `validator_tasks.config.EvalConfig`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distill.cliconfig import ConfigError, add_model_flags, build_config
from validator_tasks.config import EvalConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validator_tasks",
        description="Long-context evaluation: RULER- and BABILong-style tasks on a length ladder.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    text = (
        "evaluate models on generated long-context tasks; writes a JSON report, prints a table and "
        "saves a heatmap PNG"
    )
    ev = sub.add_parser("eval", help=text, description=text)
    ev.add_argument("--config", metavar="YAML", help="settings file; flags override it")
    ev.add_argument("--logging.debug", dest="logging_debug", action="store_true", help="debug logging")
    add_model_flags(ev, EvalConfig)
    text = "print a report's table and write its heatmap PNG"
    show = sub.add_parser("show", help=text, description=text)
    show.add_argument("report", metavar="REPORT.json")
    show.add_argument("--plot", metavar="PNG", help="heatmap path (default: the report path with .png)")
    show.add_argument("--logging.debug", dest="logging_debug", action="store_true", help="debug logging")
    return parser


def run_eval(cfg: EvalConfig) -> int:
    from validator_tasks.report import format_table, plot_heatmap, write_report
    from validator_tasks.runner import evaluate_models

    report = evaluate_models(cfg, on_model=lambda r: write_report(r, cfg.out))
    print(format_table(report), end="")
    png = plot_heatmap(report, cfg.plot_path())
    print(f"report: {cfg.out}\nheatmap: {png}")
    if all(m.status == "load_error" for m in report.models):
        for m in report.models:
            print(f"error: {m.model}: {m.message}", file=sys.stderr)
        return 1  # nothing was evaluated: most likely a wrong path, say so in the exit code too
    return 0


def run_show(path: str, plot: str | None) -> int:
    from validator_tasks.report import format_table, plot_heatmap, read_report

    report = read_report(path)
    print(format_table(report), end="")
    png = plot_heatmap(report, plot or str(Path(path).with_suffix(".png")))
    print(f"heatmap: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.logging_debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "show":
            return run_show(args.report, args.plot)
        namespace = argparse.Namespace(
            **{k: v for k, v in vars(args).items() if k not in ("command", "config", "logging_debug")}
        )
        return run_eval(build_config(EvalConfig, namespace, args.config))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
