"""The streaming canaries on a real Prometheus: two exporters, one probing a real WhisperLive
(tests/whisperlive_server.py) and one a real wyoming-faster-whisper (tests/wyoming_server.py) on
their built-in canaries, in real time; every query of the Performance dashboard's Streaming row
that reads a canary's figures returns data (before, only users' sessions through the tap were
shown on a real Prometheus: test_stack_streaming.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port, wait_for
from test_dashboards import load_dashboards, queries, substitute
from test_stack import RATE_INTERVAL, api
from test_stack_tap import _up

pytest_plugins = ["whisperlive_server", "wyoming_server"]
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CANARY_FAMILIES = ("whisper_probe_finalisation_lag_seconds", "whisper_probe_transcript_lag_seconds",
                   "whisper_probe_first_partial_seconds", "whisper_wyoming_up")


def canary_queries() -> list[tuple[str, str]]:
    found = [(where, expr) for where, expr in queries(load_dashboards()["whisper-performance.json"])
             if any(name in expr for name in CANARY_FAMILIES)]
    assert len(found) >= 4, found  # two lags, first partial, describe
    return found


def start_exporter(tmp_path: Path, name: str, service: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "service": {**service, "timeout": "60s"},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "logs": {"enabled": False},
                       "probe": {"interval": "2s", "timeout": "60s"}},
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    assert wait_for(lambda: _up(f"http://127.0.0.1:{port}/metrics"), timeout=60), \
        (tmp_path / f"{name}.log").read_text()
    return proc, port


def test_the_streaming_rows_canary_panels_have_data_from_real_servers(prometheus, tmp_path, whisperlive_server,
                                                                      wyoming_server):
    exporters = []
    try:
        exporters.append(start_exporter(tmp_path, "whisperlive", {
            "url": whisperlive_server.url, "api": "whisperlive", "model": "tiny.en"}))
        exporters.append(start_exporter(tmp_path, "wyoming", {"url": wyoming_server.url, "api": "wyoming"}))
        prom = prometheus([f"127.0.0.1:{port}" for _, port in exporters])

        def empty() -> list[str]:
            return [where for where, expr in canary_queries()
                    if not api(prom, "/api/v1/query", query=substitute(expr, RATE_INTERVAL))["result"]]

        left = ["not checked yet"]
        deadline = time.monotonic() + 180
        while left and time.monotonic() < deadline:
            time.sleep(2)
            left = empty()
        logs = "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("whisperlive", "wyoming"))
        assert not left, "no data for:\n" + "\n".join(left) + "\n" + logs
        # Each figure came from the server it names: WhisperLive's transcript lag and first partial,
        # Wyoming's describe; both canaries' finalisation lag.
        apis = {r["metric"]["instance"]: r["value"][1] for r in prom.query("whisper_wyoming_up")}
        assert apis == {f"127.0.0.1:{exporters[1][1]}": "1"}, apis
        lagging = {r["metric"]["instance"] for r in prom.query("whisper_probe_transcript_lag_seconds")}
        assert lagging == {f"127.0.0.1:{exporters[0][1]}"}, lagging
        finalising = {r["metric"]["instance"] for r in prom.query("whisper_probe_finalisation_lag_seconds >= 0")}
        assert finalising == {f"127.0.0.1:{port}" for _, port in exporters}, finalising
    finally:
        for proc, _ in exporters:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
