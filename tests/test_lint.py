"""Every exposition passes Prometheus' own linter, `promtool check metrics`: one real scrape of the
exporter with every bundled collector on (GPU on the fake NVML, the probe and the quality
collector against a loopback Whisper API, the logs collector on a uvicorn access log)."""
import json
import subprocess

import pytest
import requests
from fake_nvml import FakeNVML
from helpers import require_tool, wait_for
from test_probe import FakeWhisper

import whisper_exporter.collectors.gpu as gpu
from whisper_exporter import wiring
from whisper_exporter.collectors.probe import bundled_canary
from whisper_exporter.config import from_dict

ACCESS_LINE = '127.0.0.1:50312 - "POST /v1/audio/transcriptions HTTP/1.1" 200 OK\n'


def lint(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def everything_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "load_nvml", lambda: FakeNVML("under_load"))
    server = FakeWhisper()
    log = tmp_path / "server.log"
    log.write_text("INFO:     " + ACCESS_LINE * 3)
    canary = bundled_canary()
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text(json.dumps({"id": "en-1", "audio": canary.audio, "reference": canary.reference,
                                    "language": "en"}) + "\n")
    config = from_dict({"listen": "127.0.0.1:0", "service": {"url": server.url, "model": "tiny"}, "collectors": {
        "gpu": {"enabled": True, "interval": "1s"},
        "process": {"interval": "1s", "deprecated_count_metric": False},
        "logs": {"enabled": True, "interval": "200ms", "start_at": "beginning",
                 "files": [{"path": str(log), "format": "uvicorn-access"}]},
        "probe": {"interval": "1s"},
        "quality": {"enabled": True, "interval": "1s", "manifest": str(manifest), "thresholds": {"en": 0.2}},
        "tap": {"enabled": True, "listen": "127.0.0.1:0"},
    }})
    running = wiring.start(config)
    # one request of real traffic through the tap, so its families (and traffic's) have samples
    (tap,) = [c for c, _ in running.scheduler.entries if c.name == "tap"]
    assert wait_for(lambda: tap.tap.port, timeout=30)
    with open(canary.audio, "rb") as audio:
        requests.post(f"http://127.0.0.1:{tap.tap.port}/v1/audio/transcriptions", files={"file": ("en.wav", audio)},
                      data={"model": "tiny", "language": "en"}, timeout=30)
    try:
        yield running
    finally:
        running.close()
        server.close()


def test_a_scrape_with_every_collector_on_passes_promtool(everything_on):
    running = everything_on

    def scrape() -> str:
        return requests.get(running.url + "/metrics", timeout=10).text

    wanted = ("whisper_gpu_utilization_ratio{", "whisper_process_processes ", "whisper_requests_total{",
              'whisper_probe_success{probe="en-short"} 1.0', "whisper_quality_utterances_total{",
              "whisper_exporter_log_lines_total{", "whisper_tap_requests_in_flight ",
              'whisper_hallucination_checked_total{language="en",source="traffic"}')
    assert wait_for(lambda: running.scheduler.ready() and all(w in scrape() for w in wanted), timeout=30), \
        [w for w in wanted if w not in scrape()]
    body = scrape()
    up = [line for line in body.splitlines() if line.startswith("whisper_exporter_collector_up{")]
    assert len(up) == 6 and all(line.endswith(" 1.0") for line in up), up
    result = lint(body)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr


def test_the_lint_bites_on_the_old_process_count_name():
    """The reason for the rename: a gauge named *_count is rejected."""
    result = lint("# HELP whisper_process_count n\n# TYPE whisper_process_count gauge\nwhisper_process_count 1\n")
    assert result.returncode != 0 and "_count" in result.stdout + result.stderr
