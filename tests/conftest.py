"""Shared fixtures: a real Prometheus server (Debian's `prometheus`) on loopback."""
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from helpers import free_port, require_tool

# The runtime hands the installed collectors' sections to config.load/from_dict (config imports no
# runtime), so tests that only import config get them too.
import whisper_exporter.runtime.collector  # noqa: F401


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen

    def query(self, expr: str) -> list[dict]:
        response = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """Poll until `expr` returns at least one series."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no result for {expr!r} after {timeout}s; targets: {self.targets()}")

    def targets(self) -> list[dict]:
        return requests.get(self.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]


@pytest.fixture
def prometheus(tmp_path):
    """Start a real Prometheus scraping the given targets every second; stopped after the test."""
    binary = require_tool("prometheus")
    started = []

    def start(targets: list[str], rule_files: list[str] = (), job: str = "whisper") -> Prometheus:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(Path(r).resolve()) for r in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Prometheus(f"http://127.0.0.1:{port}", proc)
        started.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if requests.get(server.url + "/-/ready", timeout=1).status_code == 200:
                    return server
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    yield start
    for server in started:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
