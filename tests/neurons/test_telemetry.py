"""Telemetry over real HTTP (a server on port 0): health turning stale, the metrics exposition
format line by line, counters under threads, name checks, port errors; and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from neurons.logs import setup_logging
from neurons.telemetry import CONTENT_TYPE, Health, Metrics, TelemetryError, TelemetryServer

# One sample line of the text format 0.0.4: name, optional {labels}, value.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(
    rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? "
    r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$"
)
_META = re.compile(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _parse(text: str) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, str]]]:
    """Check every line against the format; return HELP texts, TYPEs and samples."""
    helps, types, samples = {}, {}, []
    assert text.endswith("\n")
    for line in text.splitlines():
        if m := _META.match(line):
            kind, name, rest = m.groups()
            (helps if kind == "HELP" else types)[name] = rest
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a valid exposition line: {line!r}"
            name, labels, value = m.groups()
            assert name in types, f"sample {name} before its TYPE line"
            samples.append((name, labels or "", value))
    return helps, types, samples


@pytest.fixture
def server():
    health = Health("validator", hotkey="5Fhot", netuid=24, stale_after_s=30)
    with TelemetryServer(health, Metrics(), port=0) as srv:
        yield srv


def test_health_ok_then_stale_and_404(server) -> None:
    status, _, body = _get(f"{server.url}/health")
    snap = json.loads(body)
    assert status == 200 and snap["status"] == "starting" and snap["last_beat_age_s"] is None
    server.health.beat("evaluate", block=123, round=4)
    server.health.fail(RuntimeError("hub timeout"))
    status, headers, body = _get(f"{server.url}/health")
    snap = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert (
        snap["status"] == "ok" and snap["stage"] == "evaluate" and snap["info"] == {"block": 123, "round": 4}
    )
    assert snap["role"] == "validator" and snap["hotkey"] == "5Fhot" and snap["netuid"] == 24
    assert snap["last_error"] == "RuntimeError: hub timeout" and snap["version"]
    server.health.stale_after_s = 0.2  # shrunk only now, so a slow machine cannot go stale early
    time.sleep(0.3)
    status, _, body = _get(f"{server.url}/health")
    assert status == 503 and json.loads(body)["status"] == "stale"
    server.health.beat("evaluate", block=124)
    assert _get(f"{server.url}/health")[0] == 200
    assert _get(f"{server.url}/nope")[0] == 404
    assert _get(f"{server.url}/")[0] == 404


def test_metrics_exposition_format(server) -> None:
    m = server.metrics
    m.gauge("validator_score", "Score per miner.\nMean over tasks.", ["hotkey"]).labels(
        hotkey='a"b\\c\nd'
    ).set(0.5)
    m.gauge("validator_score", "Score per miner.\nMean over tasks.").labels(hotkey="plain").set(2)
    m.counter("rounds", "Evaluation rounds finished.").inc()
    m.gauge("block", "Last block seen.").set(float("inf"))
    status, headers, body = _get(f"{server.url}/metrics")
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
    helps, types, samples = _parse(body.decode())
    assert helps["validator_score"] == "Score per miner.\\nMean over tasks."
    assert types == {
        "process_resident_memory_bytes": "gauge",
        "process_uptime_seconds": "gauge",
        "validator_score": "gauge",
        "rounds_total": "counter",
        "block": "gauge",
    }
    by_name = {(n, lab): v for n, lab, v in samples}
    assert by_name[("validator_score", '{hotkey="a\\"b\\\\c\\nd"}')] == "0.5"
    assert by_name[("validator_score", '{hotkey="plain"}')] == "2.0"
    assert by_name[("rounds_total", "")] == "1.0" and by_name[("block", "")] == "+Inf"
    assert float(by_name[("process_resident_memory_bytes", "")]) > 1e6
    assert float(by_name[("process_uptime_seconds", "")]) > 0


def test_counter_accumulates_across_threads() -> None:
    m = Metrics(process=False)
    plain, labelled = m.counter("steps_total", "Steps."), m.counter("hits", "Hits.", ["kind"])

    def work() -> None:
        for i in range(1000):
            plain.inc()
            labelled.labels(kind=str(i % 2)).inc(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert plain.get() == 4000
    assert labelled.get(kind="0") == labelled.get(kind="1") == 1000
    assert "steps_total 4000.0" in m.render().splitlines()
    with pytest.raises(ValueError, match="can only go up"):
        plain.inc(-1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: m.gauge("1bad", "x"), "invalid metric name '1bad'"),
        (lambda m: m.gauge("has-dash", "x"), "invalid metric name"),
        (lambda m: m.counter("ok", "x", ["bad-label"]), "invalid label name 'bad-label'"),
        (lambda m: m.gauge("ok", "x", ["__reserved"]), "invalid label name"),
        (lambda m: m.gauge("ok", "x").labels(**{"0x": "1"}), "invalid label name '0x'"),
        (lambda m: m.gauge("ok", ""), "needs a help text"),
        (lambda m: (m.gauge("dup_total", "x"), m.counter("dup", "x")), "already registered as a gauge"),
        (lambda m: m.gauge("l", "x", ["a"]).labels(b=1), r"has labels \['a'\]"),
        (lambda m: m.gauge("l", "x", ["a"]).set(1), r"call \.labels"),
    ],
)
def test_bad_names_and_labels_rejected(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(Metrics(process=False))


def test_port_in_use_and_stop_releases_port() -> None:
    health = Health("miner", stale_after_s=60)
    srv = TelemetryServer(health, port=0).start()
    port = srv.port
    assert port != 0
    with pytest.raises(TelemetryError, match=rf"port {port} is already in use.*--telemetry\.port"):
        TelemetryServer(health, port=port).start()
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 1.0 and not srv.running
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    with TelemetryServer(health, port=port) as again:  # and a server can take it again
        assert _get(f"{again.url}/health")[0] == 200


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    names = ("neurons", "urllib3", "bittensor")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.captureWarnings(False)


def test_json_log_line_with_extra_and_exception(root_logging) -> None:
    setup_logging(json_logs=True, role="miner")
    handler = setup_logging(debug=True, json_logs=True, role="miner")  # idempotent: one handler
    assert sum(getattr(h, "_quasar_node", False) for h in logging.getLogger().handlers) == 1
    stream = io.StringIO()
    handler.setStream(stream)
    log = logging.getLogger("neurons.test")
    try:
        raise ValueError("bad shard")
    except ValueError:
        log.exception("step %d failed", 7, extra={"block": 99, "hotkey": "5F", "obj": object()})
    log.debug("debug is on for our packages")
    logging.getLogger("urllib3.connectionpool").debug("hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["message"] == "step 7 failed" and rec["level"] == "ERROR" and rec["logger"] == "neurons.test"
    assert rec["role"] == "miner" and rec["block"] == 99 and rec["hotkey"] == "5F" and "obj" not in rec
    assert rec["time"].endswith("+00:00") and "ValueError: bad shard" in rec["exc"]
    assert json.loads(lines[1])["level"] == "DEBUG"

    handler = setup_logging(json_logs=False)
    handler.setStream(stream := io.StringIO())
    log.debug("now hidden")
    log.info("plain %s", "text")
    assert re.fullmatch(r"\S+ \S+ INFO neurons\.test: plain text\n", stream.getvalue())
