"""The tap at start-up, as an operator meets it: the real CLI in a subprocess, a port another
process holds (issue 21, items 9b and 9d).

The tap is in the request path: an address it cannot bind stops the exporter from starting
(exit 1, naming the address and collectors.tap.listen), as a taken metrics port does, unless
collectors.tap.required is false; and the start-up log says where the tap listens.
"""
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml
from fake_whisper import FakeWhisper
from helpers import free_port, sample, wait_for

EXE = [sys.executable, "-m", "whisper_exporter"]
ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, port, tap_port, upstream="http://127.0.0.1:9", **tap):
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                       "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}", "upstream": upstream,
                               "interval": "0.2s", **tap}},
    }))
    return config


def held_port():
    """A listening socket of this process, on a port the exporter is then told to use."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def run(config, timeout=30):
    return subprocess.run(EXE + ["run", "--config", str(config)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_a_taken_tap_port_stops_the_start_naming_the_address_and_the_key(tmp_path):
    holder, tap_port = held_port()
    port = free_port()
    with holder:
        result = run(write_config(tmp_path, port, tap_port))
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{tap_port} (collectors.tap.listen)" in result.stderr
    assert "collectors.tap.required: false" in result.stderr  # how to run without it
    assert "listening on http" not in result.stderr  # the metrics port never opened


def test_with_required_false_it_starts_without_the_tap_and_takes_the_port_once_free(tmp_path):
    holder, tap_port = held_port()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(EXE + ["run", "--config", str(write_config(tmp_path, port, tap_port, required=False))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        def up():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            try:
                text = requests.get(url + "/metrics", timeout=2).text
            except requests.ConnectionError:
                return None
            return sample(text, "whisper_exporter_collector_up", collector="tap")

        def failed():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            try:
                text = requests.get(url + "/metrics", timeout=2).text
            except requests.ConnectionError:
                return False
            return (sample(text, "whisper_exporter_collector_errors_total", collector="tap") or 0) >= 1

        # Serving, with the tap down: its start has been tried and failed (before its first run the
        # collector is down too, and the status page says "starting", without a reason yet).
        assert wait_for(failed, timeout=30)
        assert up() == 0
        page = requests.get(url + "/", timeout=5).text
        assert "collectors.tap.listen" in page  # the reason is on the status page
        holder.close()
        assert wait_for(lambda: up() == 1, timeout=30)  # retried every interval: up once the port is free
    finally:
        holder.close()
        proc.terminate()
        proc.wait(timeout=10)
        stderr.close()
    assert f"tap listening on http://127.0.0.1:{tap_port}" in (tmp_path / "stderr.txt").read_text()


def test_the_start_up_log_says_where_the_tap_listens(tmp_path):
    port, tap_port = free_port(), free_port()
    with FakeWhisper() as server:
        proc = subprocess.Popen(EXE + ["run", "--config", str(write_config(tmp_path, port, tap_port, server.url))],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # The tap serves as soon as the exporter answers: it was bound before the metrics port.
            assert wait_for(lambda: _healthy(port, proc), timeout=30)
            answer = requests.post(f"http://127.0.0.1:{tap_port}/v1/audio/transcriptions",
                                   files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10)
            assert answer.status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    stderr = proc.stderr.read()
    assert f"tap listening on http://127.0.0.1:{tap_port}, proxying to {server.url}" in stderr, stderr
    assert stderr.index("tap listening on") < stderr.index(f"listening on http://127.0.0.1:{port}/metrics")


def _healthy(port, proc):
    assert proc.poll() is None
    try:
        return requests.get(f"http://127.0.0.1:{port}/-/healthy", timeout=2).status_code == 200
    except requests.ConnectionError:
        time.sleep(0.05)
        return False


def test_required_must_be_true_or_false(tmp_path):
    config = write_config(tmp_path, free_port(), free_port(), required="maybe")
    result = subprocess.run(EXE + ["check-config", str(config)], capture_output=True, text=True, timeout=30,
                            cwd=ROOT)
    assert result.returncode == 2
    assert "collectors.tap.required" in result.stderr
