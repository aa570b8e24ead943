"""`python -m neurons demo`: the whole subnet on one CPU machine, offline, in a few minutes.

Two miners distil the dev kit's tiny teacher (one trains ten times longer than the other), publish
to the local store and commit on the embedded chain; then a validator runs a round (KL fidelity on
block-hash-seeded prompts, the long-context suite, pairwise comparison) and sets weights. Each node
is its own process running the real entry point (`neurons/miner.py`, `neurons/validator.py`); the
demo prints their logs, a table of the outcome and writes a plot.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINERS = {  # name: (optimizer steps, learning rate)
    "alice": (40, 3e-3),
    "bob": (4, 3e-3),
}


def _stream(name: str, proc: subprocess.Popen, log_file: Path) -> threading.Thread:
    def pump() -> None:
        with open(log_file, "w") as out:
            for line in proc.stdout:
                out.write(line)
                # progress bars and weight-loading chatter stay in the log file
                if " INFO " in line or " WARNING " in line or " ERROR " in line:
                    text = line.rstrip().split(" ", 2)[-1]
                    print(f"[{name:>9}] {text}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _launch(
    name: str, script: str, args: list[str], logs: Path, threads: int
) -> tuple[subprocess.Popen, threading.Thread]:
    # Processes that run side by side share the cores: oversubscribed torch threads are many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "neurons" / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
    )
    return proc, _stream(name, proc, logs / f"{name}.log")


def _wait(procs: dict[str, tuple[subprocess.Popen, threading.Thread]]) -> None:
    failed = []
    for name, (proc, thread) in procs.items():
        code = proc.wait()
        thread.join(timeout=5)
        if code != 0:
            failed.append(f"{name} (exit {code})")
    if failed:
        raise SystemExit(f"demo: {', '.join(failed)} failed; see the logs above")


def summary(root: Path, wallet: str = "validator", netuid: int = 24) -> list[dict]:
    """One row per submission of the validator's last round, with the weight the chain holds."""
    from neurons.chain import EmbeddedChain
    from neurons.state import StateStore

    state = StateStore(root / "validators" / f"{wallet}.default").load(netuid, f"{wallet}/default")
    chain = EmbeddedChain(root / "chain.sqlite", netuid)
    try:
        metagraph = chain.metagraph()
        records = chain.weights()
    finally:
        chain.close()
    on_chain = {}
    for record in records:
        if record.validator_uid == metagraph.uid_of(state.hotkey):
            total = sum(record.weights.values()) or 1
            on_chain = {uid: w / total for uid, w in record.weights.items()}
    rows = []
    last = state.last
    for hotkey, r in last.results.items() if last else []:
        uid = metagraph.uid_of(hotkey)
        rows.append(
            {
                "uid": uid,
                "hotkey": hotkey,
                "status": r.status,
                "mean_kl": r.mean_kl,
                "longctx": r.longctx_accuracy,
                "win_rate": last.win_rates.get(hotkey),
                "weight": on_chain.get(uid, 0.0),
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        f"{'uid':>3}  {'hotkey':<16} {'status':<8} {'mean KL':>8} {'long ctx':>8} {'win rate':>8} {'weight':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['uid']:>3}  {r['hotkey']:<16} {r['status']:<8} {fmt(r['mean_kl'], '.4f'):>8} "
            f"{fmt(r['longctx'], '.3f'):>8} {fmt(r['win_rate'], '.2f'):>8} {r['weight']:>7.3f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["hotkey"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(names, [r["mean_kl"] or 0 for r in rows], color="tab:blue")
    ax1.set_ylabel("mean KL to the teacher (lower is better)")
    ax1.set_title("distillation fidelity")
    ax2.bar(names, [r["weight"] for r in rows], color="tab:green")
    ax2.set_ylabel("weight set on chain")
    ax2.set_ylim(0, 1)
    ax2.set_title("validator weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(args: argparse.Namespace) -> int:
    from neurons.devkit import ensure_devkit

    started = time.monotonic()
    root = Path(args.root).expanduser() if args.root else Path(tempfile.mkdtemp(prefix="q24-demo-"))
    if (root / "chain.sqlite").exists():
        raise SystemExit(
            f"demo: {root} already holds a chain; give an empty --root (or none for a fresh one)"
        )
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"demo root: {root}\nbuilding the dev kit (tokenizer, tiny teacher, corpus)...", flush=True)
    ensure_devkit(root)
    common = [
        "--netuid",
        "24",
        "--subtensor.network",
        "embedded",
        "--root",
        str(root),
        "--telemetry.port",
        "0",
    ]
    common += ["--device", "cpu"]
    miners = {
        name: _launch(
            name,
            "miner.py",
            [
                *common,
                "--wallet.name",
                name,
                "--train.steps_per_round",
                str(steps),
                "--train.lr",
                str(lr),
                "--max_rounds",
                "1",
            ],
            logs,
            threads=max(1, (os.cpu_count() or 1) // len(MINERS)),
        )
        for name, (steps, lr) in MINERS.items()
    }
    _wait(miners)
    validator = {
        "validator": _launch(
            "validator",
            "validator.py",
            [*common, "--wallet.name", "validator", "--max_rounds", "1"],
            logs,
            os.cpu_count() or 1,
        )
    }
    _wait(validator)
    rows = summary(root)
    print("\n" + _table(rows))
    plot(rows, root / "demo.png")
    print(f"\nplot: {root / 'demo.png'}   logs: {logs}   ({time.monotonic() - started:.0f}s)")
    best = max(rows, key=lambda r: r["weight"], default=None)
    return 0 if best is not None and best["weight"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neurons", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="two miners and a validator on the embedded chain, offline")
    p.add_argument(
        "--root", help="directory for the demo's chain, store and nodes (default: a new temporary one)"
    )
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
