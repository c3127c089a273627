"""Real traffic through the request tap, scraped by a real Prometheus: faster-whisper-server
(tiny.en) behind the exporter's tap, the official `openai` client and `curl` sending espeak-ng
speech through it, and every Overview and Performance dashboard query that needs no GPU
returning data, with no log that records timings anywhere."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from helpers import free_port, require_tool, wait_for
from test_dashboards import load_dashboards, metric_names, queries, substitute
from test_stack import RATE_INTERVAL, api, present_names

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ("whisper-overview.json", "whisper-performance.json")
# What needs what this setup does not have: a GPU, a log with queue wait or inference time, a
# reference set with thresholds, a week of history, a streaming canary (service.api wyoming,
# openai-realtime or whisperlive: this probe speaks HTTP), a user's streaming session (the
# server speaks HTTP only; test_stack_streaming.py fills the Streaming row).
NOT_HERE = ("whisper_gpu_", "whisper_queue_wait_seconds", "whisper_inference_duration_seconds",
            "whisper_quality_max_error_rate", "offset1w", "language:whisper_quality",
            "whisper_probe_finalisation_lag_seconds", "whisper_probe_transcript_lag_seconds",
            "whisper_probe_first_partial_seconds", "whisper_wyoming_", "whisper_stream_first_partial_seconds",
            "whisper_stream_finalisation_lag_seconds", "whisper_stream_transcript_lag_seconds")


def test_dashboards_have_data_from_tap_traffic_alone(prometheus, tmp_path):
    from openai import OpenAI
    from whisper_server import make_speech, start_server

    curl = require_tool("curl")
    server = start_server(tmp_path / "server")
    port, tap_port = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "service": {"url": server.url, "model": server.model, "timeout": "30s"},
        "collectors": {
            "gpu": {"enabled": False},
            "process": {"interval": "1s", "match": None, "pid": server.proc.pid},
            "probe": {"interval": "5s", "timeout": "20s"},
            # the server's own log: uvicorn access lines, no timings (the tap gives those)
            "logs": {"enabled": True, "interval": "200ms", "files": [
                {"path": str(server.log_path), "format": "uvicorn-access"}]},
            "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}"},
        },
    }
    (tmp_path / "exporter.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "exporter.log", "w")
    exporter = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config",
                                 str(tmp_path / "exporter.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert wait_for(lambda: _up(f"http://127.0.0.1:{tap_port}/health"), timeout=60), \
            (tmp_path / "exporter.log").read_text()
        prom = prometheus([f"127.0.0.1:{port}"], rule_files=[str(p) for p in sorted((ROOT / "rules").glob("*.yml"))])
        speech = {
            "en": make_speech("Please send the quarterly report to the finance team by Friday.",
                              tmp_path / "en.wav"),
            "de": make_speech("Bitte schicken Sie den Bericht bis Freitag.", tmp_path / "de.wav", voice="de"),
        }
        client = OpenAI(base_url=f"http://127.0.0.1:{tap_port}/v1", api_key="not-needed")
        deadline = time.monotonic() + 240

        def gaps() -> list[str]:
            present = present_names(prom)
            missing = []
            for name in DASHBOARDS:
                for where, expr in queries(load_dashboards()[name]):
                    names = metric_names(expr)
                    if any(part in n for n in names for part in NOT_HERE) or "annotation" in where \
                            or "offset 1w" in expr or "offset1w" in expr:
                        continue
                    if not names <= present:
                        missing.append(f"{where}: metrics missing: {sorted(names - present)}")
                        continue
                    result = api(prom, "/api/v1/query", query=substitute(expr, RATE_INTERVAL))["result"]
                    if not result or ("histogram_quantile" in expr
                                      and all(math.isnan(float(r["value"][1])) for r in result)):
                        missing.append(f"{where}: no data")
            return missing

        left: list[str] = ["not checked yet"]
        while left and time.monotonic() < deadline:
            # real clients, real speech, several languages and formats
            for language, path in speech.items():
                with open(path, "rb") as f:
                    # faster-whisper-server reads the model from `model_name`, not `model`
                    client.audio.transcriptions.create(model="whisper-1", file=f, language=language,
                                                       extra_body={"model_name": server.model})
            out = subprocess.run([curl, "-sS", "-F", f"file=@{speech['en']}", "-F", f"model_name={server.model}",
                                  "-F", "response_format=verbose_json",
                                  f"http://127.0.0.1:{tap_port}/v1/audio/transcriptions"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and '"segments"' in out.stdout, out.stderr
            # and a failing one: not audio at all (the server answers 500)
            requests.post(f"http://127.0.0.1:{tap_port}/v1/audio/transcriptions", data={"model_name": server.model},
                          files={"file": ("broken.wav", b"RIFF this is not audio at all", "audio/wav")}, timeout=60)
            left = gaps()
        assert not left, "no data for:\n" + "\n".join(left)
        present = present_names(prom)
        # the request half came from the tap: latency, RTF and audio of real traffic, by language
        for name in ("whisper_request_duration_seconds_bucket", "whisper_realtime_factor_bucket",
                     "whisper_audio_duration_seconds_bucket", "whisper_tap_time_to_first_byte_seconds_bucket"):
            assert name in present, name
        languages = {r["metric"]["language"] for r in prom.query("whisper_requests_total")}
        assert {"en", "de"} <= languages
        # the probe's own requests went to the server directly and show in its log as canaries,
        # not as user traffic
        assert prom.query('whisper_canary_requests_seen_total{source="log"} > 0')
    finally:
        exporter.terminate()
        try:
            exporter.wait(timeout=15)
        except subprocess.TimeoutExpired:
            exporter.kill()
        log.close()
        server.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False
