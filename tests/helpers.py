"""Helpers every test module shares: a free port, waiting for an event, reading an exposition,
making WAV files, and the one policy for a missing external tool.

Import them inside tests or at module top (`from helpers import free_port`): tests/ is on
sys.path under pytest, as for fake_nvml and whisper_server.
"""
from __future__ import annotations

import shutil
import socket
import time
import wave
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import pytest
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
