"""Reliability, with real parts: many scrapers while every collector is busy, and a Whisper
server killed and restarted under a running exporter. Bounded in time; loopback only.
The long versions (60 s storm, 10-minute soak) are benchmarks/bench_reliability.py."""
import os
import re
import time

import pytest
from busy import busy_exporter, metric, scrape_storm

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration

STORM_SECONDS = float(os.environ.get("RELIABILITY_SECONDS", "10"))


def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except KeyError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_fifty_scrapers_while_every_collector_is_busy(whisper_server, tmp_path):
    match = re.escape(str(whisper_server.workdir))
    with busy_exporter(tmp_path, whisper_server.url, match, probe_interval="1s") as busy:
        wait_until(lambda: metric(busy.url, "whisper_probe_runs_total", result="success") >= 1, what="a probe")
        storm = scrape_storm(busy.url, scrapers=50, seconds=STORM_SECONDS)
        print(f"\n50 scrapers x {STORM_SECONDS:g}s: {storm.scrapes} scrapes, p50 {storm.p50_ms:.1f} ms, "
              f"p99 {storm.p99_ms:.1f} ms, max {storm.max_ms:.1f} ms, failures {len(storm.failures)}")
        assert storm.failures == []
        assert storm.scrapes > 50
        # The collectors kept working under the storm: probes went on, every log line was counted.
        assert metric(busy.url, "whisper_probe_runs_total", result="success") >= 2
        assert metric(busy.url, "whisper_process_up") == 1
        written = busy.written[0]
        assert written > 0
        wait_until(lambda: sum_requests(busy.url) >= written, timeout=10, what="log lines counted")
        for collector in ("process", "logs", "probe"):
            assert metric(busy.url, "whisper_exporter_collector_up", collector=collector) == 1


def sum_requests(url):
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "whisper_requests_total":
                total += sample.value
    return total


def test_server_killed_and_restarted_under_a_running_exporter(tmp_path):
    from whisper_server import free_port, start_server

    port = free_port()
    server = start_server(tmp_path / "server", port=port)
    try:
        match = re.escape(str(server.workdir))
        with busy_exporter(tmp_path / "exporter", server.url, match, probe_interval="1s") as busy:
            exporter_pid = busy.proc.pid
            wait_until(lambda: metric(busy.url, "whisper_probe_success", probe="en-short") == 1, what="first success")
            first_start = metric(busy.url, "whisper_process_start_time_seconds")
            exporter_started = metric(busy.url, "process_start_time_seconds")

            server.proc.kill()
            server.proc.wait()
            wait_until(lambda: metric(busy.url, "whisper_probe_success", probe="en-short") == 0, what="probe failure")
            assert metric(busy.url, "whisper_probe_runs_total", result="connection_error") >= 1
            wait_until(lambda: metric(busy.url, "whisper_process_up") == 0, what="process gone")

            server = start_server(tmp_path / "server", port=port)  # same port, a new pid
            wait_until(lambda: metric(busy.url, "whisper_probe_success", probe="en-short") == 1, what="recovery")
            wait_until(lambda: metric(busy.url, "whisper_process_up") == 1, what="process found again")
            assert metric(busy.url, "whisper_process_start_time_seconds") > first_start
            # Nothing in the exporter restarted: same process, same start time, collectors up.
            assert busy.proc.poll() is None and busy.proc.pid == exporter_pid
            assert metric(busy.url, "process_start_time_seconds") == exporter_started
            for collector in ("process", "logs", "probe"):
                assert metric(busy.url, "whisper_exporter_collector_up", collector=collector) == 1
    finally:
        server.stop()
