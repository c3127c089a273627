"""A real Prometheus scrapes a running exporter: the exposition parses, and the contract's names arrive."""
import subprocess
import sys
import uuid

import pytest

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict

pytestmark = pytest.mark.integration


@pytest.fixture
def server_process():
    """A stand-in for the Whisper server's process: a real process with a unique command line."""
    marker = f"fake-whisper-server-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker])
    yield proc, marker
    proc.kill()
    proc.wait()


def test_prometheus_scrapes_the_exporter(prometheus, server_process):
    proc, marker = server_process
    config = from_dict({
        "listen": "127.0.0.1:0",
        "collectors": {
            "gpu": {"enabled": True, "interval": "1s"},  # no GPU here: it must show as down, not break
            "process": {"interval": "1s", "match": marker},
        },
    })
    running = daemon.start(config)
    try:
        prom = prometheus([running.url.removeprefix("http://")])
        up = prom.wait_for('up{job="whisper"} == 1')
        assert len(up) == 1
        found = prom.wait_for("whisper_process_up == 1")
        assert found[0]["metric"]["job"] == "whisper"
        count = prom.query("whisper_process_processes")
        assert float(count[0]["value"][1]) == 1
        collectors = {r["metric"]["collector"]: float(r["value"][1]) for r in prom.query("whisper_exporter_collector_up")}
        assert collectors["process"] == 1
        assert "gpu" in collectors
        assert prom.query("whisper_exporter_build_info")[0]["metric"]["version"] == "0.1.0"
        # Prometheus negotiated OpenMetrics with us and stored no scrape errors.
        target = prom.targets()[0]
        assert target["health"] == "up" and target["lastError"] == ""
    finally:
        running.close()
