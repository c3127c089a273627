"""The command line as a user runs it: a real process, real signals, real HTTP."""
import json
import os
import re
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


def test_version_flag():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"whisper-exporter {__version__}\n"


def test_check_config_accepts_the_example():
    result = cli("check-config", "config/example.yml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "collectors: process, probe" in result.stdout
    assert result.stderr == ""  # nothing to warn about in the example


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
    # Log lines in logfmt, the default.
    assert re.search(r'^ts=\S+Z level=info logger=whisper_exporter msg="shutting down"$', stderr, re.M), stderr


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


# -- issue 14: the conventions SREs expect, and a check-config that finds everything ---------

def test_every_error_at_once_then_exit_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("listen: 10111\ncolectors: {}\nservice: {url: ftp://x}\n"
                   "collectors:\n  gpu: {interval: soon}\n  process: {match: '(['}\n")
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    keys = re.findall(r"^whisper-exporter: bad configuration: \S+: (\S+): expected", result.stderr, re.M)
    assert keys == ["colectors", "service.url", "collectors.gpu.interval", "collectors.process.match", "listen"]
    assert "a bare number is not an address: write ':10111'" in result.stderr
    assert result.stderr.rstrip().endswith("5 error(s), 0 warning(s)")
    # run says the same, and does not start.
    assert cli("run", "--config", str(bad)).stderr.count("bad configuration") == 5


def test_warnings_for_settings_that_cannot_work_and_strict(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(f"""
service: {{url: http://127.0.0.1:8000, api_key_env: WX_TEST_UNSET_KEY}}
collectors:
  process: {{pid_file: {tmp_path}/server.pid}}
  logs: {{enabled: true}}
""")
    result = cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    warned = re.findall(r"^whisper-exporter: warning: \S+: (\S+): (.*)$", result.stderr, re.M)
    assert [k for k, _ in warned] == ["service.api_key_env", "collectors.process.pid_file", "collectors.logs.files"]
    assert "WX_TEST_UNSET_KEY is not set" in warned[0][1] and "probe" in warned[0][1]
    assert "no such file" in warned[1][1] and "does nothing" in warned[2][1]
    assert result.stdout.rstrip().endswith("; 3 warning(s))")
    strict = cli("check-config", "--strict", str(config))
    assert strict.returncode == 2 and "3 warning(s), which fail with --strict" in strict.stderr
    # A log path where nothing is.
    config.write_text(f"collectors:\n  logs: {{enabled: true, files: [{{path: {tmp_path}/nope/*.log}}]}}\n")
    result = cli("check-config", "--strict", str(config))
    assert result.returncode == 2 and "collectors.logs.files[0].path" in result.stderr
    assert "nothing there (yet)" in result.stderr
    # The variable set: no warning left.
    config.write_text("service: {api_key_env: WX_TEST_SET_KEY}\n")
    env = subprocess.run(EXE + ["check-config", "--strict", str(config)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "WX_TEST_SET_KEY": "k"}, timeout=30)
    assert env.returncode == 0 and env.stderr == "", env.stderr


def test_check_config_from_the_environment_and_a_web_config(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("listen: 127.0.0.1:0\n")
    env = {**os.environ, "WHISPER_EXPORTER_CONFIG": str(config)}
    result = subprocess.run(EXE + ["check-config"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith(f"{config}: OK"), result.stderr
    assert cli("check-config").returncode == 2  # neither: says which file is wanted
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: plaintext-password\n")
    result = cli("check-config", str(config), "--web.config.file", str(web))
    assert result.returncode == 2 and "basic_auth_users.alice" in result.stderr
    assert "plaintext-password" not in result.stderr


def test_bare_port_flag_gets_a_hint():
    result = cli("run", "--web.listen-address", "10111")
    assert result.returncode == 2 and "write ':10111'" in result.stderr


def test_every_flag_from_the_environment_and_json_logs(tmp_path):
    port = free_port()
    env = {**os.environ, "WHISPER_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{port}",
           "WHISPER_EXPORTER_LOG_FORMAT": "json", "WHISPER_EXPORTER_COLLECTOR_PROBE": "false"}
    proc = subprocess.Popen(EXE + ["run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'collector="probe"' not in body and 'collector="process"' in body
    finally:
        assert stop(proc) == 0
    lines = [json.loads(line) for line in proc.stderr.read().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    assert any(line["msg"] == f"listening on http://127.0.0.1:{port}/metrics" for line in lines)
    # A flag on the command line wins over the environment.
    flag = subprocess.run(EXE + ["run", "--web.listen-address", "nonsense"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=30)
    assert flag.returncode == 2 and "'nonsense'" in flag.stderr
    help_text = cli("run", "--help").stdout
    for name in ("WHISPER_EXPORTER_WEB_LISTEN_ADDRESS", "WHISPER_EXPORTER_LOG_LEVEL", "WHISPER_EXPORTER_LOG_FORMAT",
                 "WHISPER_EXPORTER_COLLECTOR_GPU", "WHISPER_EXPORTER_WEB_CONFIG_FILE"):
        assert name in help_text


def test_run_logs_the_check_config_warnings_at_start(tmp_path):
    config = tmp_path / "c.yml"
    port = free_port()
    config.write_text(f"listen: 127.0.0.1:{port}\ncollectors:\n  logs: {{enabled: true}}\n  probe: {{enabled: false}}\n")
    proc = start("run", "--config", str(config))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        assert stop(proc) == 0
    stderr = proc.stderr.read()
    assert re.search(r'^ts=\S+ level=warning logger=whisper_exporter msg=".*collectors\.logs\.files: the logs '
                     r'collector is enabled with no files: it does nothing', stderr, re.M), stderr
