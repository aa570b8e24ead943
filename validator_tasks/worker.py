"""A model in its own process, so that its time budget can be enforced even when it hangs.

The parent (`IsolatedPredictor`) starts `python -m validator_tasks.worker`, which loads the model and
answers samples one at a time over its stdin/stdout: one JSON request per line in, one `Q24 `-prefixed
JSON line out (anything else the model's libraries print is ignored). The parent waits for each answer
only until the deadline plus a short grace; then it kills the process group, and the model is scored
as failing. Sample generation and scoring stay in the parent, so the model process never sees the
answers.

    python -m validator_tasks.worker --model DIR [--tokenizer DIR] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

from validator_tasks.base import Sample
from validator_tasks.models import BudgetExceeded, ModelLoadError, Prediction

PREFIX = "Q24 "
GRACE_SECONDS = 5.0  # after the deadline, how long a well-behaved worker has to report its timeout


class WorkerFailed(RuntimeError):
    """The model process crashed, exited, or could not load the model; the message says why."""


# ------------------------------------------------------------------------------------------------
# child


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def _default_factory(args: argparse.Namespace):
    from validator_tasks.config import EvalConfig
    from validator_tasks.models import load_tokenizer
    from validator_tasks.runner import load_predictor

    settings = {
        k: getattr(args, k)
        for k in ("device", "dtype", "chunk", "baseline_chunk", "max_new_tokens", "threads")
    }
    cfg = EvalConfig(model=[args.model], progress=False, **settings)
    return load_predictor(args.model, load_tokenizer(args.tokenizer or args.model), cfg)


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validator_tasks.worker", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--baseline-chunk", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    # module:function returning (predictor, info); for custom wrappers and for tests.
    parser.add_argument("--factory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.factory:
            module, _, name = args.factory.partition(":")
            predictor, info = getattr(importlib.import_module(module), name)(args)
        else:
            predictor, info = _default_factory(args)
    except ModelLoadError as e:
        _send({"event": "load_error", "message": str(e)})
        return 2
    except Exception as e:  # a broken model must not look like a broken evaluator
        _send({"event": "load_error", "message": f"{type(e).__name__}: {e}"})
        return 2
    _send({"event": "ready", **info})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sample = Sample(**request["sample"])
        deadline = time.monotonic() + request["seconds_left"] if request["seconds_left"] is not None else None
        try:
            prediction = predictor.predict(sample, deadline)
            _send({"event": "result", "status": "ok", **prediction.to_dict()})
        except BudgetExceeded as e:
            _send({"event": "result", "status": "timeout", "message": str(e)})
        except Exception as e:
            _send({"event": "result", "status": "error", "message": f"{type(e).__name__}: {e}"})
    return 0


# ------------------------------------------------------------------------------------------------
# parent


class IsolatedPredictor:
    """A `Predictor` whose model lives in a child process. Use as a context manager; `start` returns
    the model's description (kind, parameter counts) or raises WorkerFailed."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        chunk: int = 4096,
        baseline_chunk: int = 0,
        max_new_tokens: int | None = None,
        threads: int | None = None,
        factory: str | None = None,
    ):
        self.argv = [sys.executable, "-m", "validator_tasks.worker", "--model", model]
        self.argv += ["--device", device, "--dtype", dtype, "--chunk", str(chunk)]
        self.argv += ["--baseline-chunk", str(baseline_chunk)]
        for flag, value in (
            ("--tokenizer", tokenizer),
            ("--max-new-tokens", max_new_tokens),
            ("--threads", threads),
            ("--factory", factory),
        ):
            if value is not None:
                self.argv += [flag, str(value)]
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=40)

    # -- process plumbing --

    def _pump(self, stream, sink, mark_end: bool) -> None:
        for line in stream:
            sink(line)
        if mark_end:
            self._lines.put(None)  # end of stdout: the process is gone

    def start(self, deadline: float | None = None) -> dict[str, Any]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, so a kill takes its children too
        )
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self._lines.put, True), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(self.proc.stderr, self._stderr.append, False), daemon=True
        ).start()
        message = self._receive(deadline)
        if message["event"] == "load_error":
            self.close()
            raise WorkerFailed(f"cannot load the model: {message['message']}")
        if message["event"] != "ready":
            raise WorkerFailed(f"unexpected first message from the model process: {message}")
        return {k: v for k, v in message.items() if k != "event"}

    def _receive(self, deadline: float | None) -> dict[str, Any]:
        while True:
            timeout = None if deadline is None else max(0.0, deadline + GRACE_SECONDS - time.monotonic())
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise BudgetExceeded("time budget spent; the model process was killed") from None
            if line is None:
                code = self.proc.wait() if self.proc else None
                tail = "".join(self._stderr).strip()[-2000:]
                raise WorkerFailed(
                    f"the model process exited with code {code}"
                    + (f"; its last output:\n{tail}" if tail else "")
                )
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])

    def predict(self, sample: Sample, deadline: float | None = None) -> Prediction:
        if self.proc is None or self.proc.poll() is not None:
            raise WorkerFailed("the model process is not running")
        request = {
            "sample": {**sample.to_dict(), "answers": [], "metadata": {}},  # the model never sees answers
            "seconds_left": None if deadline is None else deadline - time.monotonic(),
        }
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerFailed(f"the model process is gone ({e})") from e
        message = self._receive(deadline)
        status = message.pop("status", "error")
        message.pop("event", None)
        if status == "timeout":
            raise BudgetExceeded(message.get("message", "time budget spent"))
        if status != "ok":
            raise RuntimeError(message.get("message", "the model failed"))
        return Prediction(**message)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> IsolatedPredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(child_main())
