"""An exporter with every collector busy, for the reliability tests and benchmarks/bench_reliability.py.

`busy_exporter()` starts the real CLI (`python -m whisper_exporter run --config ...`) as its
own process, watching a real Whisper server: the canary probe every few seconds, the
process collector on the server's processes, and the log collector tailing a JSON request
log that a writer thread grows at a steady rate. The GPU collector stays enabled; on a
machine with no NVIDIA driver it is down, which is part of "busy" too. Loopback only.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
import yaml
from helpers import free_port, sample

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Busy:
    url: str
    proc: subprocess.Popen
    log_path: Path
    written: list  # [lines written so far]


def _write_log(path: Path, rate: float, stop: threading.Event, written: list) -> None:
    i = 0
    with open(path, "a", buffering=1) as log:
        while not stop.wait(1.0 / rate):
            i += 1
            log.write(json.dumps({"path": "/v1/audio/transcriptions", "status": 200 if i % 20 else 500,
                                  "language": ("en", "de", "zh", "yue")[i % 4], "duration_ms": 400 + i % 300,
                                  "queue_ms": i % 50, "inference_ms": 300 + i % 200,
                                  "audio_seconds": 5 + i % 10}) + "\n")
            written[0] = i


@contextmanager
def busy_exporter(workdir: Path, server_url: str, server_match: str, model: str = "tiny",
                  probe_interval: str = "2s", log_rate: float = 100) -> Iterator[Busy]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "requests.jsonl"
    log_path.write_text("")
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "log_level": "warning",
        "service": {"url": server_url, "model": model, "timeout": "20s"},
        "collectors": {
            "gpu": {"interval": "1s"},
            "process": {"interval": "1s", "match": server_match},
            "logs": {"enabled": True, "interval": "500ms",
                     "files": [{"path": str(log_path), "format": "json-request"}]},
            "probe": {"interval": probe_interval, "timeout": "20s"},
        },
    }
    config_path = workdir / "exporter.yml"
    config_path.write_text(yaml.safe_dump(config))
    stop, written = threading.Event(), [0]
    writer = threading.Thread(target=_write_log, args=(log_path, log_rate, stop, written), daemon=True)
    proc = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(config_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(workdir / "exporter.log", "w"))
    busy = Busy(f"http://127.0.0.1:{port}", proc, log_path, written)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (workdir / "exporter.log").read_text()
            try:
                if requests.get(busy.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "exporter not ready in 30 s"
            time.sleep(0.2)
        writer.start()
        yield busy
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class StormResult:
    scrapes: int
    failures: list
    p50_ms: float
    p99_ms: float
    max_ms: float


def scrape_storm(url: str, scrapers: int, seconds: float) -> StormResult:
    """`scrapers` threads scraping /metrics back to back for `seconds`. Bounded in time and count."""
    latencies: list[float] = []
    failures: list = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def scrape() -> None:
        session = requests.Session()
        mine, bad = [], []
        while time.monotonic() < end and len(mine) < 100_000:
            began = time.perf_counter()
            try:
                response = session.get(url + "/metrics", timeout=10)
                if response.status_code != 200 or b"whisper_exporter_build_info" not in response.content:
                    bad.append(response.status_code)
            except requests.RequestException as err:
                bad.append(type(err).__name__)
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    threads = [threading.Thread(target=scrape) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    latencies.sort()
    return StormResult(
        scrapes=len(latencies), failures=failures,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        max_ms=latencies[-1] * 1000,
    )


def metric(url: str, name: str, **labels: str) -> float:
    """One sample's value from /metrics (the first whose labels include `labels`)."""
    value = sample(requests.get(url + "/metrics", timeout=10).text, name, **labels)
    if value is None:
        raise KeyError(f"{name}{labels} not in /metrics")
    return value
