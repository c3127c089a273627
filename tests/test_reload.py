"""Reload and signals, as an operator meets them: the real CLI in a subprocess, real signals, real HTTP.

SIGHUP reloads the configuration; POST /-/reload does too with --web.enable-lifecycle (403
without it, as Prometheus answers); a bad new configuration is refused and the old one keeps
running; a collector whose section did not change keeps counting; SIGUSR1/SIGUSR2 kill nothing.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from fake_whisper import FakeWhisper
from helpers import free_port, sample, samples, wait_for

EXE = [sys.executable, "-m", "whisper_exporter"]
ROOT = Path(__file__).resolve().parents[1]


def line(**fields):
    base = {"path": "/v1/audio/transcriptions", "status": 200, "language": "en", "duration_ms": 500.0,
            "audio_seconds": 8.0}
    base.update(fields)
    return json.dumps(base) + "\n"


class Exporter:
    """The CLI on a config file this test rewrites; its stderr collected in a file."""

    def __init__(self, tmp_path, *flags, data=None):
        self.tmp = tmp_path
        self.log = tmp_path / "app.log"
        self.log.write_text("")
        self.config = tmp_path / "config.yml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if data is None:
            self.write(process_interval="1h")
        else:  # a whole configuration of the test's own, given this exporter's listen address
            self.config.write_text(yaml.safe_dump(data(self.port)))
        self.stderr = open(tmp_path / "stderr.txt", "w+")
        self.proc = subprocess.Popen(EXE + ["run", "--config", str(self.config), *flags], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        assert wait_for(self.healthy, timeout=30), self.errors()

    def write(self, process_interval="1h", logs=True, probe=False, extra="", logs_interval="0.2s"):
        data = {
            "listen": f"127.0.0.1:{self.port}",
            "collectors": {
                "gpu": {"enabled": False},
                "quality": {"enabled": False},
                "probe": {"enabled": probe, "interval": "1h"},
                "process": {"enabled": True, "interval": process_interval, "match": "no-such-program-xyz"},
                "logs": {"enabled": logs, "interval": logs_interval, "start_at": "beginning",
                         "files": [{"path": str(self.log), "format": "json-request"}]},
            },
        }
        self.config.write_text(yaml.safe_dump(data) + extra)

    def healthy(self):
        assert self.proc.poll() is None, self.errors()
        try:
            return requests.get(self.url + "/-/healthy", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def metrics(self):
        return requests.get(self.url + "/metrics", timeout=5).text

    def value(self, name, **labels):
        return sample(self.metrics(), name, **labels)

    def requests_seen(self):
        return self.value("whisper_requests_total", endpoint="/v1/audio/transcriptions", status_code="200",
                          language="en") or 0.0

    def errors(self):
        self.stderr.flush()
        return (self.tmp / "stderr.txt").read_text()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


@pytest.fixture
def exporter(tmp_path):
    started = []

    def start(*flags, data=None):
        e = Exporter(tmp_path, *flags, data=data)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def last_run(e, collector):
    return e.value("whisper_exporter_collector_last_run_timestamp_seconds", collector=collector)


def test_sighup_applies_a_changed_config_and_unchanged_collectors_keep_counting(exporter):
    e = exporter()
    with open(e.log, "a") as f:
        f.write(line() * 3)
    assert wait_for(lambda: e.requests_seen() == 3, timeout=10)
    first_success = e.value("whisper_exporter_config_last_reload_success_timestamp_seconds")
    assert e.value("whisper_exporter_config_last_reload_successful") == 1
    assert wait_for(lambda: last_run(e, "process") is not None, timeout=10)
    before = last_run(e, "process")

    e.write(process_interval="0.3s")  # the process section changes, the logs section does not
    e.signal(signal.SIGHUP)
    # The new interval takes effect: the process collector now runs several times a second.
    assert wait_for(lambda: (last_run(e, "process") or 0) > before + 0.5, timeout=10), e.errors()
    assert e.proc.poll() is None
    assert e.value("whisper_exporter_config_last_reload_successful") == 1
    assert e.value("whisper_exporter_config_last_reload_success_timestamp_seconds") > first_success
    # The logs collector was kept: its counter goes on from 3, not from 0, and the file is not re-read.
    with open(e.log, "a") as f:
        f.write(line() * 2)
    assert wait_for(lambda: e.requests_seen() == 5, timeout=10), e.metrics()
    time.sleep(0.5)
    assert e.requests_seen() == 5
    assert "configuration reloaded" in e.errors() and "kept logs" in e.errors()


def test_a_rebuilt_log_collector_does_not_count_old_lines_again(exporter):
    """start_at: beginning is for start-up: a logs section changed on reload must not read the
    files from the beginning again into request counters that carry on."""
    e = exporter()
    with open(e.log, "a") as f:
        f.write(line() * 3)
    assert wait_for(lambda: e.requests_seen() == 3, timeout=10)
    e.write(logs_interval="0.3s")
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in e.errors(), timeout=10)
    reloaded = time.time()
    assert wait_for(lambda: (last_run(e, "logs") or 0) > reloaded, timeout=10)
    with open(e.log, "a") as f:
        f.write(line())
    assert wait_for(lambda: e.requests_seen() >= 4, timeout=10)
    time.sleep(1)
    assert e.requests_seen() == 4


def test_a_bad_config_is_refused_and_the_old_one_keeps_running(exporter):
    e = exporter()
    with open(e.log, "a") as f:
        f.write(line())
    assert wait_for(lambda: e.requests_seen() == 1, timeout=10)
    good = e.config.read_text()
    e.config.write_text(good.replace("interval: 1h", "interval: soon", 1))
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: e.value("whisper_exporter_config_last_reload_successful") == 0, timeout=10)
    assert e.proc.poll() is None
    assert "reload refused" in e.errors() and "interval" in e.errors()  # the error names the key
    with open(e.log, "a") as f:
        f.write(line())
    assert wait_for(lambda: e.requests_seen() == 2, timeout=10)  # the old collectors run on
    refused_at = e.value("whisper_exporter_config_last_reload_success_timestamp_seconds")

    e.config.write_text(good)  # fixed: the next reload succeeds
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: e.value("whisper_exporter_config_last_reload_successful") == 1, timeout=10)
    assert e.value("whisper_exporter_config_last_reload_success_timestamp_seconds") > refused_at


def test_reload_endpoint_only_with_the_lifecycle_flag(exporter, tmp_path):
    e = exporter()
    forbidden = requests.post(e.url + "/-/reload", timeout=5)
    assert forbidden.status_code == 403 and "--web.enable-lifecycle" in forbidden.text
    assert requests.get(e.url + "/-/reload", timeout=5).status_code == 405
    e.stop()

    e = exporter("--web.enable-lifecycle")
    assert requests.get(e.url + "/-/reload", timeout=5).status_code == 405  # a GET changes nothing
    e.write(logs=False)
    ok = requests.post(e.url + "/-/reload", timeout=10)
    assert ok.status_code == 200, ok.text
    assert e.value("whisper_exporter_collector_up", collector="logs") is None  # logs is off now
    e.config.write_text("collectors: [not, a, mapping]\n")
    refused = requests.post(e.url + "/-/reload", timeout=10)
    assert refused.status_code == 500 and "collectors" in refused.text
    assert e.value("whisper_exporter_config_last_reload_successful") == 0
    assert e.value("whisper_exporter_collector_up", collector="process") is not None  # still running


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_user_signals_do_not_kill(exporter, sig):
    e = exporter()
    e.signal(sig)
    assert wait_for(lambda: "ignored" in e.errors(), timeout=10)
    assert e.proc.poll() is None
    assert requests.get(e.url + "/metrics", timeout=5).status_code == 200


def test_systemd_unit_reloads_and_restarts_after_any_death():
    unit = (ROOT / "deploy" / "systemd" / "whisper-exporter.service").read_text()
    settings = [line for line in unit.splitlines() if line and not line.startswith("#")]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in settings
    # on-failure leaves it down after a death by SIGHUP/SIGTERM (clean signals to systemd)
    assert "Restart=always" in settings
    assert "RestartPreventExitStatus=2" in settings


def test_sighup_reloads_the_web_config_too(exporter, tmp_path):
    """Users (and certificates, headers) of --web.config.file are read again on reload, as
    exporter-toolkit re-reads its file; a bad one is refused with the rest of the reload."""
    import bcrypt

    web = tmp_path / "web.yml"

    def users(password):
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
        web.write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")

    users("first")
    e = exporter("--web.config.file", str(web), "--web.health-open")

    def status(password):
        return requests.get(e.url + "/metrics", auth=("prom", password), timeout=10).status_code

    assert status("first") == 200 and status("second") == 401
    users("second")
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: status("second") == 200, timeout=10), e.errors()
    assert status("first") == 401
    web.write_text("basic_auth_users:\n  prom: plain-text\n")
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in e.errors(), timeout=10)
    assert "plain-text" not in e.errors()
    assert status("second") == 200  # the users that were running stay
    text = requests.get(e.url + "/metrics", auth=("prom", "second"), timeout=10).text
    assert sample(text, "whisper_exporter_config_last_reload_successful") == 0


def tap_config(tmp_path, server_url, tap_port, sampling=False):
    """Probe and tap on a fake server; with `sampling`, the tap's samples and the quality collector
    (production references) too: a change of the tap and quality sections only."""
    queue, references = tmp_path / "queue.jsonl", tmp_path / "references.jsonl"
    references.touch()
    tap = {"enabled": True, "listen": f"127.0.0.1:{tap_port}", "interval": "0.2s"}
    quality = {"enabled": False}
    if sampling:
        tap["sample_dir"] = str(tmp_path / "samples")
        quality = {"enabled": True, "interval": "1h",
                   "production": {"queue": str(queue), "references": str(references), "fraction": 1.0}}
    return lambda port: {
        "listen": f"127.0.0.1:{port}",
        "service": {"url": server_url},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                       "probe": {"enabled": True, "interval": "0.3s", "via_tap": True}, "tap": tap, "quality": quality},
    }


def test_a_reload_of_the_tap_and_quality_only_keeps_the_probe_and_every_counter(exporter, tmp_path):
    """Issue 21, defect 2: turning on the tap's sampling and the quality collector restarted every
    collector ("kept none"), and the probe's, request and canary counters started again from 0."""
    with FakeWhisper() as server:
        tap_port = free_port()
        e = exporter(data=tap_config(tmp_path, server.url, tap_port))
        tap = f"http://127.0.0.1:{tap_port}/v1/audio/transcriptions"
        assert wait_for(lambda: e.value("whisper_exporter_collector_up", collector="tap") == 1, timeout=20)
        for _ in range(2):
            assert requests.post(tap, files={"file": ("a.wav", b"RIFF....WAVE")}, data={"language": "en"},
                                 timeout=10).status_code == 200

        def probe_runs():
            text = e.metrics()
            return sum(v for (name, labels), v in samples(text).items() if name == "whisper_probe_runs_total")

        def user_requests():
            text = e.metrics()
            return sum(v for (name, labels), v in samples(text).items() if name == "whisper_requests_total")

        def canaries():
            return e.value("whisper_canary_requests_seen_total", source="tap") or 0.0

        assert wait_for(lambda: user_requests() == 2 and probe_runs() >= 4, timeout=20), e.metrics()
        e.config.write_text(yaml.safe_dump(tap_config(tmp_path, server.url, tap_port, sampling=True)(e.port)))
        probes_before, canaries_before = probe_runs(), canaries()
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in e.errors(), timeout=20), e.errors()
        reloaded = [line for line in e.errors().splitlines() if "configuration reloaded" in line][-1]
        assert "kept probe" in reloaded, reloaded
        assert "quality" in reloaded.split("(re)started")[1] and "tap" in reloaded.split("(re)started")[1]
        # Counters carry on: the request counts of the first tap, and the probe's runs.
        assert user_requests() == 2, e.metrics()
        assert probe_runs() >= probes_before and canaries() >= canaries_before > 0
        assert e.value("whisper_exporter_collector_up", collector="quality") is not None
        assert wait_for(lambda: e.value("whisper_exporter_collector_up", collector="tap") == 1, timeout=20)
        assert requests.post(tap, files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10).status_code == 200
        assert wait_for(lambda: user_requests() == 3, timeout=10), e.metrics()


def test_a_tap_turned_off_by_reload_gives_the_request_counts_back_to_the_log(exporter, tmp_path):
    """With the tap on, the log feeds no request counts (the tap counts them); once a reload turns
    the tap off, the request metrics carry on, and the log must count into them again."""
    def config(tap):
        return lambda port: {
            "listen": f"127.0.0.1:{port}",
            "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                           "tap": {"enabled": tap, "listen": f"127.0.0.1:{free_port()}"},
                           "logs": {"enabled": True, "interval": "0.2s",
                                    "files": [{"path": str(tmp_path / "app.log"), "format": "json-request"}]}},
        }

    e = exporter(data=config(tap=True))
    e.config.write_text(yaml.safe_dump(config(tap=False)(e.port)))
    e.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in e.errors(), timeout=20), e.errors()
    assert "kept logs" in e.errors()
    with open(e.log, "a") as f:
        f.write(line() * 2)
    assert wait_for(lambda: e.requests_seen() == 2, timeout=10), e.metrics()


def test_a_reload_to_a_tap_address_that_cannot_be_bound_is_refused_and_the_old_tap_serves_on(exporter, tmp_path):
    """As for the metrics port, a reload never leaves the request path without its tap: the new
    address is tried while the old tap serves on; taken, the reload is refused and logged."""
    import socket

    def upload(port):
        return requests.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                             files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10).status_code

    with FakeWhisper() as server, socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken, first, second = holder.getsockname()[1], free_port(), free_port()
        e = exporter(data=tap_config(tmp_path, server.url, first))
        assert upload(first) == 200  # bound before the exporter answered
        e.config.write_text(yaml.safe_dump(tap_config(tmp_path, server.url, taken)(e.port)))
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in e.errors(), timeout=20), e.errors()
        assert f"cannot listen on 127.0.0.1:{taken} (collectors.tap.listen)" in e.errors()
        assert e.value("whisper_exporter_config_last_reload_successful") == 0
        assert upload(first) == 200  # the old tap serves on
        assert e.value("whisper_exporter_collector_up", collector="tap") == 1
        # counted before the next reload rebuilds the tap (a record still queued then is dropped)
        assert wait_for(lambda: user_requests(e) == 2, timeout=20), user_requests(e)

        e.config.write_text(yaml.safe_dump(tap_config(tmp_path, server.url, second)(e.port)))
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: e.value("whisper_exporter_config_last_reload_successful") == 1, timeout=20)
        assert upload(second) == 200
        with pytest.raises(requests.ConnectionError):
            upload(first)  # the old address is given up
        # The probe sends its canaries through the tap: it follows it to its new address.
        seen = e.value("whisper_canary_requests_seen_total", source="tap") or 0.0
        assert wait_for(lambda: (e.value("whisper_canary_requests_seen_total", source="tap") or 0) > seen,
                        timeout=20), e.errors()
        reloaded = [line for line in e.errors().splitlines() if "configuration reloaded" in line][-1]
        assert "probe" in reloaded.split("(re)started")[1], reloaded
        # the request counts carried on through both reloads (a record is counted once the tap's worker has analysed it)
        assert wait_for(lambda: user_requests(e) == 3, timeout=20), user_requests(e)


def user_requests(e) -> float:
    return sum(v for (name, _), v in samples(e.metrics()).items() if name == "whisper_requests_total")


def test_a_tap_that_cannot_take_over_its_port_is_put_back_on_the_old_address(exporter, tmp_path):
    """A new tap on the old one's port (here 0.0.0.0:P after 127.0.0.1:P) must wait for the old
    one to let go; when another process holds that port on another address, the new one cannot
    bind even then: the reload is refused and a tap on the running configuration serves again."""
    import socket

    with FakeWhisper() as server, socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        port = holder.getsockname()[1]
        data = tap_config(tmp_path, server.url, port)
        e = exporter(data=data)
        tap = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
        assert requests.post(tap, files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10).status_code == 200
        # counted before the reload: a record still queued when a tap is rebuilt is dropped, counted
        # in whisper_tap_records_dropped_total{reason="shutdown"} (docs/tap.md)
        assert wait_for(lambda: user_requests(e) == 1, timeout=20), user_requests(e)
        moved = data(e.port)
        moved["collectors"]["tap"]["listen"] = f"0.0.0.0:{port}"
        e.config.write_text(yaml.safe_dump(moved))
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in e.errors(), timeout=20), e.errors()
        assert f"cannot listen on 0.0.0.0:{port} (collectors.tap.listen)" in e.errors()
        assert wait_for(lambda: e.value("whisper_exporter_collector_up", collector="tap") == 1, timeout=20)
        assert requests.post(tap, files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10).status_code == 200
        # the request counts carry on (a record is counted once the tap's worker has analysed it)
        assert wait_for(lambda: user_requests(e) == 2, timeout=20), user_requests(e)

        holder.close()  # the port is free on every address now: the same reload goes through
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: e.value("whisper_exporter_config_last_reload_successful") == 1, timeout=20)
        assert requests.post(tap, files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=10).status_code == 200


def test_new_label_bounds_start_the_request_metrics_again_and_keep_the_probe(exporter, tmp_path):
    """Changed label bounds (collectors.logs.languages) need new request metrics, and so a new log
    collector; the probe holds none of them and carries on, its counters and the canary's
    quality counters with it."""
    with FakeWhisper() as server:
        def config(languages):
            return lambda port: {
                "listen": f"127.0.0.1:{port}",
                "service": {"url": server.url},
                "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                               "probe": {"enabled": True, "interval": "0.3s"},
                               "logs": {"enabled": True, "interval": "0.2s", "languages": languages,
                                        "files": [{"path": str(tmp_path / "app.log"), "format": "json-request"}]}},
            }

        def total(family):
            return sum(v for (name, _), v in samples(e.metrics()).items() if name == family)

        e = exporter(data=config(["en", "de"]))
        with open(e.log, "a") as f:
            f.write(line())
        assert wait_for(lambda: e.requests_seen() == 1 and total("whisper_probe_runs_total") >= 4, timeout=20)
        runs, units = total("whisper_probe_runs_total"), total("whisper_quality_reference_units_total")
        assert units > 0
        e.config.write_text(yaml.safe_dump(config(["en", "fr"])(e.port)))
        e.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in e.errors(), timeout=20), e.errors()
        reloaded = [line for line in e.errors().splitlines() if "configuration reloaded" in line][-1]
        assert "kept probe" in reloaded and "logs" in reloaded.split("(re)started")[1], reloaded
        assert total("whisper_probe_runs_total") >= runs
        assert total("whisper_quality_reference_units_total") >= units
