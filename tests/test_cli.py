"""The command line as a user runs it: a real process, real signals, real HTTP."""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers import free_port
from whisper_exporter import __version__
from whisper_exporter.config import DEFAULT_PORT

EXE = [sys.executable, "-m", "whisper_exporter"]
ROOT = Path(__file__).resolve().parents[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def cli(*args, timeout=30):
    return subprocess.run(EXE + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def start(*args):
    return subprocess.Popen(EXE + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_healthy(url, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if requests.get(url + "/-/healthy", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("exporter did not become healthy")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_version():
    result = cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"whisper-exporter {__version__}"


def test_check_config_accepts_the_example():
    result = cli("check-config", "config/example.yml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "gpu, process" in result.stdout


def test_check_config_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("collectors:\n  gpu:\n    interval: soon\n")
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "collectors.gpu.interval" in result.stderr
    assert "expected a duration" in result.stderr


def test_run_with_bad_config_exits_2_before_listening(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("colectors: {}\n")
    result = cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "colectors" in result.stderr and "a known key" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = cli("run", "--config", str(tmp_path / "absent.yml"))
    assert result.returncode == 2
    assert "absent.yml" in result.stderr


def test_bad_listen_flag_exits_2():
    result = cli("run", "--web.listen-address", "nonsense")
    assert result.returncode == 2
    assert "--web.listen-address" in result.stderr


def test_run_serves_metrics_and_stops_cleanly_on_sigterm():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start("run", "--web.listen-address", f"127.0.0.1:{port}")
    try:
        wait_healthy(url, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = requests.get(url + "/metrics", timeout=5).text
            if 'whisper_process_up' in body:
                break
            time.sleep(0.2)
        assert 'whisper_exporter_collector_up{collector="process"} 1.0' in body
        assert 'whisper_exporter_collector_up{collector="gpu"}' in body
        assert "whisper_exporter_build_info" in body
        assert "process_resident_memory_bytes" in body
        page = requests.get(url + "/", timeout=5).text
        assert "<h1>whisper-exporter</h1>" in page and "gpu" in page and "process" in page
    finally:
        code = stop(proc)
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert f"listening on http://127.0.0.1:{port}/metrics" in stderr
    assert "shutting down" in stderr


def test_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = cli("run", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_no_arguments_runs_on_built_in_defaults():
    if not port_is_free(DEFAULT_PORT):
        pytest.skip(f"port {DEFAULT_PORT} is taken on this machine; the default run cannot be tried here")
    proc = start()
    try:
        wait_healthy(f"http://127.0.0.1:{DEFAULT_PORT}", proc)
        body = requests.get(f"http://127.0.0.1:{DEFAULT_PORT}/metrics", timeout=5).text
        assert 'whisper_exporter_collector_up{collector="gpu"}' in body
        assert 'whisper_exporter_collector_up{collector="process"}' in body
    finally:
        code = stop(proc)
    assert code == 0
    assert f"listening on http://0.0.0.0:{DEFAULT_PORT}/metrics" in proc.stderr.read()


def test_sigint_also_stops_cleanly():
    port = free_port()
    proc = start("--listen", f"127.0.0.1:{port}")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    assert code == 0


def test_bad_web_config_exits_2_naming_the_key(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  prom: plaintext-password\n")
    result = cli("run", "--web.config.file", str(web), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "basic_auth_users.prom" in result.stderr and "bcrypt" in result.stderr
    assert "plaintext-password" not in result.stderr


def test_web_config_protects_the_running_exporter(tmp_path):
    import bcrypt

    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}'\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start("run", "--listen", f"127.0.0.1:{port}", "--web.config.file", str(web), "--web.health-open")
    try:
        wait_healthy(url, proc)  # open: --web.health-open
        assert requests.get(url + "/metrics", timeout=5).status_code == 401
        assert requests.get(url + "/metrics", auth=("prom", "pw"), timeout=5).status_code == 200
    finally:
        assert stop(proc) == 0
