"""Health and Prometheus metrics for a long-running node (miner or validator).

The node's main loop stays synchronous: it calls `Health.beat` as it makes progress and sets gauges
and counters on a `Metrics` registry; a `TelemetryServer` serves both over HTTP (aiohttp, its own
event loop in a daemon thread), by default on localhost only:

- `GET /health`: a JSON snapshot, HTTP 200 while the node is starting or beating, 503 once its last
  beat is older than `stale_after_s` (for a supervisor or a load balancer to restart or route on).
- `GET /metrics`: the Prometheus text exposition format 0.0.4, for a Prometheus scrape.

The registry is deliberately tiny (gauges and counters, optional labels) so the node does not need
`prometheus_client`; everything is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 9100
PORT_FLAG = "--telemetry.port"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class TelemetryError(RuntimeError):
    """The telemetry server cannot start; the message says why and which flag to change."""


def _version() -> str:
    try:
        return metadata.version("quasar-sn24")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def _check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        raise ValueError(
            f"invalid metric name {name!r}: use letters, digits, '_' and ':', not starting with a digit"
        )


def _check_label_names(metric: str, names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    for n in names:
        if not isinstance(n, str) or not _LABEL_NAME.match(n) or n.startswith("__"):
            raise ValueError(
                f"invalid label name {n!r} on metric {metric!r}: use letters, digits and '_', "
                "not starting with a digit or '__'"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names {names} on metric {metric!r}")
    return names


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Series:
    """One time series (a metric with one set of label values); shares its family's lock."""

    __slots__ = ("_counter", "_lock", "_name", "_value")

    def __init__(self, lock: threading.Lock, name: str, counter: bool) -> None:
        self._lock, self._name, self._counter, self._value = lock, name, counter, 0.0

    def inc(self, v: float = 1.0) -> None:
        v = float(v)
        if self._counter and not v >= 0:  # also refuses NaN
            raise ValueError(f"counter {self._name} can only go up; got inc({v})")
        with self._lock:
            self._value += v

    def set(self, v: float) -> None:
        if self._counter:
            raise ValueError(f"counter {self._name} cannot be set, only incremented")
        with self._lock:
            self._value = float(v)

    def dec(self, v: float = 1.0) -> None:
        if self._counter:
            raise ValueError(f"counter {self._name} cannot go down")
        with self._lock:
            self._value -= float(v)

    def get(self) -> float:
        with self._lock:
            return self._value


class Metric:
    """A gauge or counter family. Label names are fixed when declared or, if not declared, by the
    first `.labels(...)` call (every series of one metric must carry the same labels)."""

    def __init__(self, name: str, help: str, kind: str, labelnames: Sequence[str] | None) -> None:
        self.name, self.help, self.kind = name, help, kind
        self._lock = threading.Lock()
        self._labelnames = None if labelnames is None else _check_label_names(name, labelnames)
        self._series: dict[tuple[str, ...], _Series] = {}

    @property
    def labelnames(self) -> tuple[str, ...] | None:
        return self._labelnames

    def labels(self, **labels: Any) -> _Series:
        """The series with these label values (created at 0 on first use)."""
        if not labels:
            raise ValueError(f"metric {self.name}: labels() needs at least one label")
        with self._lock:
            if self._labelnames is None:
                self._labelnames = _check_label_names(self.name, sorted(labels))
            if set(labels) != set(self._labelnames):
                raise ValueError(
                    f"metric {self.name} has labels {list(self._labelnames)}, got {sorted(labels)}"
                )
            key = tuple(str(labels[n]) for n in self._labelnames)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(self._lock, self.name, self.kind == "counter")
            return series

    def remove(self, **labels: Any) -> None:
        """Drop one series (e.g. a hotkey that left the subnet), so it stops being exported."""
        with self._lock:
            if self._labelnames is not None and set(labels) == set(self._labelnames):
                self._series.pop(tuple(str(labels[n]) for n in self._labelnames), None)

    def _unlabelled(self) -> _Series:
        with self._lock:
            if self._labelnames is None:
                self._labelnames = ()
            if self._labelnames:
                raise ValueError(
                    f"metric {self.name} has labels {list(self._labelnames)}; call .labels(...) first"
                )
            series = self._series.get(())
            if series is None:
                series = self._series[()] = _Series(self._lock, self.name, self.kind == "counter")
            return series

    def inc(self, v: float = 1.0) -> None:
        self._unlabelled().inc(v)

    def set(self, v: float) -> None:
        self._unlabelled().set(v)

    def dec(self, v: float = 1.0) -> None:
        self._unlabelled().dec(v)

    def get(self, **labels: Any) -> float:
        return (self.labels(**labels) if labels else self._unlabelled()).get()

    def render(self) -> list[str]:
        with self._lock:
            names = self._labelnames or ()
            samples = [(key, s._value) for key, s in self._series.items()]
            if names == () and self._labelnames is not None and not samples:
                samples = [((), 0.0)]  # a declared unlabelled metric reads 0 until first set
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, value in samples:
            label_text = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, key))
            series = f"{self.name}{{{label_text}}}" if label_text else self.name
            lines.append(f"{series} {_format_value(value)}")
        return lines


class Metrics:
    """A thread-safe registry of gauges and counters, rendered in the Prometheus text format 0.0.4.

    With `process=True` (the default) it also exports `process_resident_memory_bytes` and
    `process_uptime_seconds`, read at render time."""

    def __init__(self, process: bool = True) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []
        if process:
            self._add_process_metrics()

    def gauge(self, name: str, help: str, labelnames: Sequence[str] | None = None) -> Metric:
        """A value that goes up and down. Declaring the same gauge again returns the existing one."""
        return self._register(name, help, "gauge", labelnames)

    def counter(self, name: str, help: str, labelnames: Sequence[str] | None = None) -> Metric:
        """A value that only goes up; exported as `<name>_total` (a trailing `_total` is not doubled)."""
        _check_metric_name(name)
        return self._register(
            name if name.endswith("_total") else f"{name}_total", help, "counter", labelnames
        )

    def on_render(self, collect: Callable[[], None]) -> None:
        """Call `collect` before each render, to set gauges that are read rather than pushed."""
        with self._lock:
            self._collectors.append(collect)

    def get(self, name: str) -> Metric:
        with self._lock:
            return self._metrics[name]

    def render(self) -> str:
        with self._lock:
            collectors, metrics = list(self._collectors), list(self._metrics.values())
        for collect in collectors:
            try:
                collect()
            except Exception:  # a broken collector must not break the scrape
                log.warning("metrics collector %r failed", collect, exc_info=True)
        lines = [line for m in metrics for line in m.render()]
        return "\n".join(lines) + "\n" if lines else ""

    def _register(self, name: str, help: str, kind: str, labelnames: Sequence[str] | None) -> Metric:
        _check_metric_name(name)
        if not isinstance(help, str) or not help.strip():
            raise ValueError(f"metric {name} needs a help text")
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                metric = self._metrics[name] = Metric(name, help, kind, labelnames)
                return metric
        if existing.kind != kind:
            raise ValueError(f"metric {name} is already registered as a {existing.kind}, not a {kind}")
        if labelnames is not None and existing.labelnames not in (None, tuple(labelnames)):
            raise ValueError(
                f"metric {name} is already registered with labels {list(existing.labelnames)}, "
                f"not {list(labelnames)}"
            )
        return existing

    def _add_process_metrics(self) -> None:
        import psutil

        process = psutil.Process()
        rss = self.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", ())
        uptime = self.gauge("process_uptime_seconds", "Seconds since the process started.", ())
        created = process.create_time()

        def collect() -> None:
            rss.set(process.memory_info().rss)
            uptime.set(max(0.0, time.time() - created))

        self.on_render(collect)


class Health:
    """What the node reports about itself: who it is, and how recently it made progress.

    The node calls `beat(stage, **info)` at each step; a node whose last beat (or, before its first
    beat, whose start) is older than `stale_after_s` is "stale", so a hung startup is caught too.
    `fail` records the last error without changing the status: a node that retries and beats again
    is healthy, one that keeps failing stops beating and goes stale."""

    def __init__(
        self,
        role: str,
        hotkey: str | None = None,
        netuid: int | None = None,
        *,
        stale_after_s: float = 600.0,
        version: str | None = None,
    ) -> None:
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self.role, self.hotkey, self.netuid = role, hotkey, netuid
        self.stale_after_s = float(stale_after_s)
        self.version = version or _version()
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._beat_t: float | None = None
        self._stage: str | None = None
        self._info: dict[str, Any] = {}
        self._error: str | None = None
        self._error_t: float | None = None

    def beat(self, stage: str, **info: Any) -> None:
        """Record progress: the stage reached and context such as block, round, step."""
        safe = {k: _json_safe(v) for k, v in info.items()}
        with self._lock:
            self._beat_t, self._stage, self._info = time.monotonic(), str(stage), safe

    def fail(self, error: str | BaseException) -> None:
        """Record the last error (an exception is reported as `Type: message`)."""
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        with self._lock:
            self._error, self._error_t = text, time.monotonic()

    @property
    def status(self) -> str:
        return self.snapshot()["status"]

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            beat_t, stage, info = self._beat_t, self._stage, dict(self._info)
            error, error_t = self._error, self._error_t
        since = now - (beat_t if beat_t is not None else self._t0)
        if since > self.stale_after_s:
            status = "stale"
        else:
            status = "ok" if beat_t is not None else "starting"
        return {
            "status": status,
            "role": self.role,
            "hotkey": self.hotkey,
            "netuid": self.netuid,
            "version": self.version,
            "started_at": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(),
            "uptime_s": round(now - self._t0, 3),
            "last_beat_age_s": None if beat_t is None else round(now - beat_t, 3),
            "stale_after_s": self.stale_after_s,
            "stage": stage,
            "info": info,
            "last_error": error,
            "last_error_age_s": None if error_t is None else round(now - error_t, 3),
        }


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


class TelemetryServer:
    """Serves `/health` and `/metrics` from a daemon thread with its own event loop.

    `start()` returns once the socket listens (port 0 picks a free port; `.port` is the bound one);
    `stop()` returns within about a second. Also a context manager."""

    def __init__(
        self,
        health: Health,
        metrics: Metrics | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self.health = health
        self.metrics = metrics if metrics is not None else Metrics()
        self.host = host
        self._requested_port = int(port)
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port once started, else the one asked for."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> TelemetryServer:
        if self.running:
            raise RuntimeError(f"telemetry server already running on {self.url}")
        self._ready.clear()
        self._error, self._bound_port = None, None
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TelemetryError(
                f"telemetry server on {self.host}:{self._requested_port} did not start in {timeout}s"
            )
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._explain(self._error) from self._error
        log.info("telemetry on %s (/health, /metrics)", self.url)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("telemetry server thread did not stop within %.1fs", timeout)
        self._thread = None

    def __enter__(self) -> TelemetryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _explain(self, err: BaseException) -> TelemetryError:
        where = f"{self.host}:{self._requested_port}"
        if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
            return TelemetryError(
                f"telemetry port {self._requested_port} is already in use on {self.host} (another node "
                f"running?); choose another with {PORT_FLAG} (0 picks a free port)"
            )
        return TelemetryError(
            f"cannot serve telemetry on {where}: {err}; check the host, or change {PORT_FLAG}"
        )

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        snap = self.health.snapshot()
        return web.json_response(snap, status=503 if snap["status"] == "stale" else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        # No access log: a scrape every few seconds would drown the node's own log.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.5)
        try:
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, self._requested_port)
                loop.run_until_complete(site.start())
                self._bound_port = int(runner.addresses[0][1])
            except BaseException as e:
                self._error = e
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(runner.cleanup())
            finally:
                loop.close()
                self._loop = None
