"""Helpers every test module shares: a free port, waiting for an event, reading an exposition,
making WAV files and labelled sets, starting and stopping processes and loopback HTTP servers, and the one policy
for a missing external tool.

Import them inside tests or at module top (`from helpers import free_port`): tests/ is on
sys.path under pytest, as for fake_nvml and whisper_server.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Callable, Iterable, Optional, Union

import pytest
import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Debian packages that provide the external programs the tests use (.ci/run installs them).
PACKAGES = {
    "prometheus": "prometheus", "promtool": "prometheus", "amtool": "prometheus-alertmanager", "prometheus-alertmanager": "prometheus-alertmanager",
    "espeak-ng": "espeak-ng", "sox": "sox", "chromium": "chromium", "chromedriver": "chromium-driver",
    "nginx": "nginx", "curl": "curl", "stress-ng": "stress-ng", "systemd-analyze": "systemd",
    "victoria-metrics": "victoria-metrics", "vmalert": "victoria-metrics",
}


def require_tool(name: str) -> str:
    """The path of an external program the test needs. A missing one fails the test (never a
    skip that reads as a pass), naming the package that provides it."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        package = PACKAGES.get(name, name)
        pytest.fail(f"{name} is not installed: apt-get install {package} (bash .ci/run installs it)", pytrace=False)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is truthy or `timeout` seconds pass; True when it became truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def http_ok(url: str, status: Optional[int] = 200) -> Callable[[], bool]:
    """A readiness check for wait_started: `url` answers `status` (None: answers at all)."""
    def ready() -> bool:
        answer = requests.get(url, timeout=1)
        return status is None or answer.status_code == status
    return ready


def wait_started(what: str, proc: subprocess.Popen, ready: Callable[[], object], log: Callable[[], str],
                 timeout: float = 30.0, interval: float = 0.2) -> None:
    """Poll `ready` until it is truthy; raise RuntimeError with `log()` if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            if ready():
                return
        except (requests.RequestException, ValueError):  # not listening yet, or not answering JSON yet
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} did not start in {timeout:g} s:\n{log()}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, log: Optional[IO] = None, grace: float = 10.0) -> None:
    """Terminate `proc`, killing it after `grace` seconds, and close its log file."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if log is not None:
        log.close()


def read_log(path: Path) -> str:
    """A process's log file, or "" before it exists."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class LoopbackHTTP:
    """A ThreadingHTTPServer for `handler` on a free loopback port, serving from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def samples(text: Union[str, Iterable[Metric]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An exposition, or a collector's metric families, as {(sample name, sorted labels): value}."""
    out = {}
    families = text_string_to_metric_families(text) if isinstance(text, str) else text
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> Optional[float]:
    """The value of the one sample `name` whose labels include `labels`, or None."""
    for (sample_name, sample_labels), value in samples(text).items():
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            return value
    return None


def wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A silent mono 16-bit WAV of `seconds` at `rate` Hz (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return path


def write_manifest(folder: Path, entries: Iterable[tuple[str, str, str]]) -> Path:
    """A labelled set in `folder`: a silent WAV per (id, language, reference) and refs.jsonl naming them."""
    lines = []
    for ident, language, reference in entries:
        wav(folder / "audio" / f"{ident}.wav")
        lines.append(json.dumps({"id": ident, "audio": f"audio/{ident}.wav", "reference": reference,
                                 "language": language}, ensure_ascii=False))
    path = folder / "refs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
