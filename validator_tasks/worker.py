"""A model in its own process, so that its time budget can be enforced even when it hangs.

The parent (`IsolatedPredictor`) starts `python -m validator_tasks.worker`, which loads the model and
answers samples one at a time over its stdin/stdout: one JSON request per line in, one `Q24 `-prefixed
JSON line out (anything else the model's libraries print is ignored). The parent waits for each answer
only until the deadline plus a short grace; then it kills the process group, and the model is scored
as failing. Sample generation and scoring stay in the parent, so the model process never sees the
answers.

Besides long-context samples the worker answers the validator's other forwards on a submission, so
that every forward a miner's model runs is bounded in time and memory and killable: `kl` (per-prompt
KL to the teacher's top-k and the model's own bucketed log-probs on those prompts, read from and
written to .npz files) and `fingerprint` (centred logits on a probe). With `memory_bytes` the worker
runs under a memory cap: an address-space limit on CPU, a per-process fraction on CUDA, and in both
cases the parent kills it when its resident memory passes the cap.

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
from pathlib import Path
from typing import Any

from validator_tasks.base import Sample
from validator_tasks.models import BudgetExceeded, ModelLoadError, Prediction

PREFIX = "Q24 "
GRACE_SECONDS = 5.0  # after the deadline, how long a well-behaved worker has to report its timeout


MEMORY_POLL_SECONDS = 0.2


class WorkerFailed(RuntimeError):
    """The model process crashed, exited, or could not load the model; the message says why."""


class ModelRejected(WorkerFailed):
    """The model's files could not be loaded as a model (bad tensors, NaN, wrong shapes): the
    submission's fault, not the process's."""


class MemoryCapExceeded(WorkerFailed):
    """The model process went over its memory cap and was killed (or its allocation was refused)."""


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
    parser.add_argument("--memory-bytes", type=int, default=None, help="memory cap of this process")
    # module:function returning (predictor, info); for custom wrappers and for tests.
    parser.add_argument("--factory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_bytes:
        _cap_memory(args.memory_bytes, args.device)
    try:
        if args.factory:
            module, _, name = args.factory.partition(":")
            predictor, info = getattr(importlib.import_module(module), name)(args)
        else:
            predictor, info = _default_factory(args)
    except ModelLoadError as e:
        _send({"event": "load_error", "message": str(e), "rejected": True})
        return 2
    except Exception as e:  # a broken model must not look like a broken evaluator
        _send({"event": "load_error", "message": f"{type(e).__name__}: {e}"})
        return 2
    _send({"event": "ready", **info})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        deadline = time.monotonic() + request["seconds_left"] if request["seconds_left"] is not None else None
        kind = request.get("kind", "sample")
        try:
            if kind == "sample":
                prediction = predictor.predict(Sample(**request["sample"]), deadline)
                _send({"event": "result", "status": "ok", **prediction.to_dict()})
            elif kind == "kl":
                _send({"event": "result", "status": "ok", **_kl_request(predictor, request, deadline)})
            elif kind == "fingerprint":
                _send({"event": "result", "status": "ok", **_fingerprint_request(predictor, request)})
            else:
                raise ValueError(f"unknown request kind {kind!r}")
        except BudgetExceeded as e:
            _send({"event": "result", "status": "timeout", "message": str(e)})
        except MemoryError as e:
            _send({"event": "result", "status": "memory", "message": f"MemoryError: {e}"})
        except Exception as e:
            status = "memory" if "can't allocate memory" in str(e) or "out of memory" in str(e) else "error"
            _send({"event": "result", "status": status, "message": f"{type(e).__name__}: {e}"})
    return 0


def _cap_memory(limit: int, device: str) -> None:
    """An address-space limit on CPU (allocations beyond it fail at once); on CUDA, where the
    driver maps far more address space than it uses, a cap on this process's share of the GPU."""
    import resource

    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
    else:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _model_of(predictor):
    model = getattr(predictor, "model", None)
    if model is None:
        raise TypeError(f"{type(predictor).__name__} holds no model to run KL or fingerprint requests on")
    return model


def _kl_request(predictor, request: dict[str, Any], deadline: float | None) -> dict[str, Any]:
    """Per-prompt KL and the model's bucketed log-probs on the prompts of an .npz file (see
    `validator_tasks.kl_eval.save_prompts`); the log-probs go to request["out"]."""
    from validator_tasks.kl_eval import load_prompts, per_prompt_kl, save_behaviour

    prompts = load_prompts(request["prompts"])
    model = _model_of(predictor)
    device = next(model.parameters()).device
    kl, behaviour = per_prompt_kl(
        model, prompts, score_from=request["score_from"], device=device, deadline=deadline,
        behaviour=True,
    )  # fmt: skip
    save_behaviour(request["out"], behaviour)
    return {"kl": kl.tolist()}


def _fingerprint_request(predictor, request: dict[str, Any]) -> dict[str, Any]:
    from validator_tasks.kl_eval import probe_logits

    values = probe_logits(_model_of(predictor), request["tokens"], request["ids"])
    return {"values": values.tolist()}


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
        memory_bytes: int | None = None,
    ):
        self.argv = [sys.executable, "-m", "validator_tasks.worker", "--model", model]
        self.argv += ["--device", device, "--dtype", dtype, "--chunk", str(chunk)]
        self.argv += ["--baseline-chunk", str(baseline_chunk)]
        for flag, value in (
            ("--tokenizer", tokenizer),
            ("--max-new-tokens", max_new_tokens),
            ("--threads", threads),
            ("--factory", factory),
            ("--memory-bytes", memory_bytes),
        ):
            if value is not None:
                self.argv += [flag, str(value)]
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=40)
        self.memory_bytes = memory_bytes
        self.peak_rss = 0  # bytes, as last seen by the memory watch
        self._over_memory = False

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
        if self.memory_bytes:
            threading.Thread(target=self._watch_memory, args=(self.proc,), daemon=True).start()
        message = self._receive(deadline)
        if message["event"] == "load_error":
            self.close()
            kind = ModelRejected if message.get("rejected") else WorkerFailed
            raise kind(f"cannot load the model: {message['message']}")
        if message["event"] != "ready":
            raise WorkerFailed(f"unexpected first message from the model process: {message}")
        return {k: v for k, v in message.items() if k != "event"}

    def _watch_memory(self, proc: subprocess.Popen) -> None:
        """Kill the process group when the worker's resident memory passes the cap (the address-space
        limit does not apply on CUDA, and resident memory is what takes a machine down)."""
        while proc.poll() is None:
            rss = _resident_bytes(proc.pid)
            self.peak_rss = max(self.peak_rss, rss)
            if rss > self.memory_bytes:
                self._over_memory = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(MEMORY_POLL_SECONDS)

    def _memory_message(self) -> str:
        return (
            f"the model process went over its memory cap of {self.memory_bytes / 2**30:.2f} GiB "
            "and was stopped"
        )

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
                if self._over_memory:
                    raise MemoryCapExceeded(self._memory_message())
                tail = "".join(self._stderr).strip()[-2000:]
                raise WorkerFailed(
                    f"the model process exited with code {code}"
                    + (f"; its last output:\n{tail}" if tail else "")
                )
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])

    def _request(self, request: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            raise WorkerFailed("the model process is not running")
        request = {**request, "seconds_left": None if deadline is None else deadline - time.monotonic()}
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
        if status == "memory":
            self.kill()
            raise MemoryCapExceeded(f"{self._memory_message()} ({message.get('message', '')})")
        if status != "ok":
            raise RuntimeError(message.get("message", "the model failed"))
        return message

    def predict(self, sample: Sample, deadline: float | None = None) -> Prediction:
        # the model never sees the answers
        request = {"kind": "sample", "sample": {**sample.to_dict(), "answers": [], "metadata": {}}}
        return Prediction(**self._request(request, deadline))

    def kl(self, prompts: str, out: str, *, score_from: int, deadline: float | None = None) -> list[float]:
        """Per-prompt KL on the prompts saved at `prompts`; the model's bucketed log-probs are written
        to `out` (see `validator_tasks.kl_eval`)."""
        request = {"kind": "kl", "prompts": prompts, "out": out, "score_from": score_from}
        return self._request(request, deadline)["kl"]

    def fingerprint(
        self, tokens: list[list[int]], ids: list[int], deadline: float | None = None
    ) -> list[float]:
        request = {"kind": "fingerprint", "tokens": tokens, "ids": ids}
        return self._request(request, deadline)["values"]

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


def _resident_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (one level is enough: tokenizer or compile
    helpers), from /proc; 0 where /proc is not there."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


if __name__ == "__main__":
    sys.exit(child_main())
