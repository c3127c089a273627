"""A real Label Studio for tests: the PyPI `label-studio` package in its own virtualenv, on loopback.

`label_studio` is a session-scoped pytest fixture (use it with `pytest_plugins = ["label_studio"]`,
as for whisper_server). Label Studio pins its own Django and friends, so it lives in a virtualenv
of its own, made once and kept at $WHISPER_EXPORTER_LABEL_STUDIO_VENV (default
~/.cache/whisper-exporter/label-studio-venv; about 1 GB, 80 s to install here). It starts offline:
the update check off, a fresh data folder, one user with a legacy API token (1.23 accepts
`Authorization: Token` only with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN), local-file serving under
a folder the test chooses. `start_label_studio()` works outside pytest too (making the fixture
files in tests/data/labelstudio/).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import requests
from helpers import free_port, read_log, stop_process, wait_started

VERSION = "1.23.2"  # the version the fixture files were exported with
STARTUP_TIMEOUT = 600.0  # seconds: its first start migrates a new database (30 s on a quiet machine, over 240 s on a loaded one)
DEFAULT_VENV = Path.home() / ".cache" / "whisper-exporter" / "label-studio-venv"


def venv_path() -> Path:
    """Where the Label Studio virtualenv is (made on first use)."""
    return Path(os.environ.get("WHISPER_EXPORTER_LABEL_STUDIO_VENV") or DEFAULT_VENV)


def ensure_installed() -> Path:
    """The `label-studio` program of the virtualenv, installing it first when it is not there."""
    venv = venv_path()
    program = venv / "bin" / "label-studio"
    if program.exists():
        return program
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for command in ([sys.executable, "-m", "venv", str(venv)],
                    [str(venv / "bin" / "pip"), "install", "-q", f"label-studio=={VERSION}"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # a test dependency: fail, naming it (never a skip)
            pytest.fail(f"cannot install label-studio into {venv} ({' '.join(command[-2:])}): "
                        f"{done.stderr.strip()[-2000:]}", pytrace=False)
    print(f"label-studio {VERSION} installed into {venv} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return program


@dataclass
class LabelStudio:
    url: str
    token: str
    proc: subprocess.Popen
    data_dir: Path
    files_root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    log_path: Path
    _log: Any = field(default=None, repr=False)

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A REST call as the test user; raises on an error status, with Label Studio's answer."""
        answer = requests.request(method, self.url + path, headers={"Authorization": f"Token {self.token}"},
                                  timeout=60, **kwargs)
        if answer.status_code >= 400:
            raise AssertionError(f"{method} {path}: {answer.status_code} {answer.text[:2000]}")
        return answer

    def create_project(self, label_config: str, title: str = "whisper review") -> int:
        """A project with this labelling config (Label Studio validates it); its id."""
        return int(self.api("POST", "/api/projects/", json={"title": title, "label_config": label_config}).json()["id"])

    def add_local_storage(self, project: int, folder: Path) -> None:
        """Let the project's tasks play files under `folder` (/data/local-files/?d=... answers 404 without)."""
        self.api("POST", "/api/storages/localfiles/",
                 json={"project": project, "path": str(folder), "title": "audio", "use_blob_urls": False})

    def import_tasks(self, project: int, tasks: list) -> list[dict]:
        """Import tasks (with their predictions); the project's tasks as its tasks API lists them, by id."""
        self.api("POST", f"/api/projects/{project}/import", json=tasks)
        listed = self.api("GET", "/api/tasks/", params={"project": project, "page_size": 1000}).json()["tasks"]
        return sorted(listed, key=lambda t: t["id"])

    def annotate(self, task: int, result: list, **fields: Any) -> dict:
        """Submit an annotation as the test user (what the editor's Submit sends: result, lead_time, ...)."""
        return dict(self.api("POST", f"/api/tasks/{task}/annotations/", json={"result": result, **fields}).json())

    def export(self, project: int) -> list:
        """The project's JSON export as the export API gives it (completed_by as a user id)."""
        answer = self.api("GET", f"/api/projects/{project}/export",
                          params={"exportType": "JSON", "download_all_tasks": "true"})
        return list(answer.json())

    def export_min(self, project: int) -> list:
        """The project's JSON-MIN export (one flat record per annotation)."""
        return list(self.api("GET", f"/api/projects/{project}/export", params={"exportType": "JSON_MIN"}).json())

    def export_snapshot(self, project: int) -> list:
        """The JSON export through a snapshot with the annotators expanded (the Export page's way)."""
        made = self.api("POST", f"/api/projects/{project}/exports/",
                        json={"title": "whisper review", "serialization_options": {
                            "annotations__completed_by": {"only_id": False}}}).json()
        deadline = time.monotonic() + 60
        while self.api("GET", f"/api/projects/{project}/exports/{made['id']}").json()["status"] != "completed":
            if time.monotonic() > deadline:
                raise AssertionError(f"export snapshot {made['id']} did not complete in 60 s")
            time.sleep(0.5)
        return list(self.api("GET", f"/api/projects/{project}/exports/{made['id']}/download",
                             params={"exportType": "JSON"}).json())

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, self._log, grace=20)


def start_label_studio(workdir: Optional[Path] = None, files_root: Optional[Path] = None) -> LabelStudio:
    """Start Label Studio on a free loopback port and wait until /health answers UP."""
    program = ensure_installed()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="label-studio-"))
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root = Path(files_root or workdir / "files")
    files_root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = secrets.token_hex(20)
    env = dict(
        os.environ,
        LABEL_STUDIO_LATEST_VERSION_CHECK="false",  # no call home
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files_root),
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false",
        DJANGO_DB="sqlite",
    )
    env.pop("PYTHONPATH", None)  # its own interpreter and packages only
    log_path = workdir / "label-studio.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(program), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--username", "reviewer@example.org",
         "--password", secrets.token_hex(12), "--user-token", token],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
    )
    studio = LabelStudio(f"http://127.0.0.1:{port}", token, proc, data_dir, files_root, log_path, log)
    try:
        wait_started("label-studio", proc,
                     lambda: requests.get(studio.url + "/health", timeout=2).json().get("status") == "UP",
                     lambda: studio.log()[-5000:], STARTUP_TIMEOUT, interval=0.5)
    except BaseException:
        studio.stop()
        raise
    return studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    studio = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    try:
        yield studio
    finally:
        studio.stop()
