"""`python -m quasar`: the model's command-line tools.

- `demo`: stream a long random context through a preset and generate a few tokens;
- `import-published SRC OUT`: convert a checkpoint in the published silx-ai format into ours;
- `tokenizer NAME OUT`: write a built-in tokenizer (the Qwen3.5 competition tokenizer) as a directory.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from quasar.demo import DemoConfig, run_demo

    values = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    try:
        cfg = DemoConfig(**values)
    except ValidationError as e:
        for err in e.errors():
            parser.error(f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}")
    run_demo(cfg)
    return 0


def _import(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from quasar.importer import ImportRefused, import_published

    try:
        report = import_published(
            args.src,
            args.out,
            dtype=args.dtype,
            add_memory=args.add_memory,
            revision=args.revision,
            force=args.force,
            seed=args.seed,
            progress=not args.no_progress,
            cache_dir=args.cache_dir,
            max_gb=args.max_gb,
            tokenizer=args.tokenizer,
        )
    except ImportRefused as e:
        print(f"import-published: refused: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(
        f"load it with QuasarForCausalLM.from_pretrained({str(report.out)!r}), or distil from it with "
        f"python -m distill train --student.init_from {report.out} ..."
    )
    return 0


def _tokenizer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from quasar.tokenizers import run_tokenizer

    return run_tokenizer(args)


def build_parser() -> argparse.ArgumentParser:
    from quasar.demo import add_demo_arguments
    from quasar.tokenizers import TOKENIZER_DESCRIPTION, add_tokenizer_arguments

    parser = argparse.ArgumentParser(prog="python -m quasar", description="Quasar student model tools")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="stream a long random context through a preset and generate a few tokens"
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo)

    imp = sub.add_parser(
        "import-published",
        help="convert a checkpoint in the published silx-ai Quasar format into one of ours",
        description="Convert a checkpoint in the published silx-ai Quasar format (config.json + "
        "safetensors; no code is read or run) into a normal checkpoint of ours at OUT. Prints what it "
        "maps and what it drops, and why.",
    )
    imp.add_argument("src", metavar="SRC", help="a local directory, or a Hub id (owner/name) with --revision")
    imp.add_argument("out", metavar="OUT", help="directory to write (must be empty or absent, or --force)")
    imp.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="weights dtype of OUT (default: bf16; SMEBU bias and momentum stay fp32)",
    )
    imp.add_argument(
        "--add-memory",
        action="store_true",
        help="add our causal latent memory to every Quasar block, its read contributing exactly zero "
        "until distillation trains it (the logits are unchanged at import)",
    )
    imp.add_argument(
        "--revision",
        default=None,
        help="the Hub commit sha (40 hex characters) to import; required for Hub ids",
    )
    imp.add_argument(
        "--tokenizer",
        default="auto",
        help="the model's tokenizer, written beside the weights, its bos/eos/pad ids replacing the published "
        "config's placeholders: auto (qwen3.5 for the published 248,320-row vocabulary, else none), none, "
        "a built-in name (qwen3.5, qwen3) or a directory",
    )
    imp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    imp.add_argument(
        "--seed", type=int, default=0, help="seed of the added memory's initial values (default: 0)"
    )
    imp.add_argument(
        "--max-gb", type=float, default=16.0, help="refuse a Hub checkpoint larger than this (default: 16)"
    )
    imp.add_argument("--cache-dir", default=None, help="Hugging Face cache directory for Hub downloads")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.set_defaults(handler=_import)

    tok = sub.add_parser(
        "tokenizer",
        help="write a built-in tokenizer directory (qwen3.5: the competition tokenizer; qwen3: a teacher's)",
        description=TOKENIZER_DESCRIPTION,
    )
    add_tokenizer_arguments(tok)
    tok.set_defaults(handler=_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(parser, args)
