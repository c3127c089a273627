"""Users' streaming sessions through the tap, scraped by a real Prometheus: every query of the
Performance dashboard's Streaming row returns data once OpenAI Realtime and WhisperLive sessions
(protocol-faithful servers, tests/stream_servers.py) have gone through the exporter's tap."""
from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port, wait_for
from stream_servers import LiveScript, RealtimeScript, realtime, whisperlive
from tap_helpers import Upstream
from test_dashboards import load_dashboards, queries, substitute
from test_stack import RATE_INTERVAL, api
from test_stack_tap import _up
from test_tap_streaming import _live_client, _realtime_client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def streaming_queries() -> list[tuple[str, str]]:
    found = [(where, expr) for where, expr in queries(load_dashboards()["whisper-performance.json"])
             if "whisper_stream_" in expr]
    assert len(found) >= 5, found  # in flight, rejections, first partial, two lags, errors
    return found


def test_the_streaming_row_has_data_from_users_sessions(prometheus, tmp_path):
    server = Upstream({"/v1/realtime": realtime(RealtimeScript(transcription_delay=0.2)),
                       "/": whisperlive(LiveScript(ready_delay=0.05, first_segment_delay=0.1, lag=1.0))})
    port, tap_port = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "service": {"url": server.url, "timeout": "10s"},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                       "probe": {"enabled": False}, "logs": {"enabled": False},
                       "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}"}},
    }
    (tmp_path / "exporter.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "exporter.log", "w")
    exporter = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config",
                                 str(tmp_path / "exporter.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert wait_for(lambda: _up(f"http://127.0.0.1:{port}/metrics"), timeout=60), \
            (tmp_path / "exporter.log").read_text()
        prom = prometheus([f"127.0.0.1:{port}"])
        base = f"http://127.0.0.1:{tap_port}"

        def empty() -> list[str]:
            left = []
            for where, expr in streaming_queries():
                result = api(prom, "/api/v1/query", query=substitute(expr, RATE_INTERVAL))["result"]
                if not result or ("histogram_quantile" in expr
                                  and all(math.isnan(float(r["value"][1])) for r in result)):
                    left.append(where)
            return left

        left = ["not checked yet"]
        deadline = time.monotonic() + 120
        while left and time.monotonic() < deadline:
            asyncio.run(_realtime_client(base))
            live = asyncio.run(_live_client(base, 4))
            assert "first_segment" in live, live  # the session went through the tap to the server
            left = empty()
        assert not left, "no data for:\n" + "\n".join(left)
        protocols = {r["metric"]["protocol"] for r in prom.query("whisper_stream_sessions_total > 0")}
        assert {"openai-realtime", "whisperlive"} <= protocols
    finally:
        exporter.terminate()
        try:
            exporter.wait(timeout=15)
        except subprocess.TimeoutExpired:
            exporter.kill()
        log.close()
        server.stop()
