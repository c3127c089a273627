"""Issue 12, defect 1: slowloris must not take /metrics down.

The exporter runs as a subprocess under `ulimit -n 1024`, as under systemd. 1,100 connections
that never finish their request head, reopened as the server closes them, plus one that drips
a byte a second: Prometheus-style scrapes (a new connection each, 10 s timeout) are all
answered, and the exporter's threads and descriptors stay bounded. The figures (latency under
attack against without, threads, RSS) are benchmarks/bench_slowloris.py's.
"""
import threading

import pytest
import requests
from helpers import sample
from slowloris import FD_LIMIT, Drip, Slowloris, exporter_under_fd_limit, raise_own_fd_limit, scrape_like_prometheus

pytestmark = pytest.mark.integration

ATTACK_SECONDS = 15


def test_scrapes_answered_under_slowloris_at_a_1024_fd_limit(tmp_path):
    raise_own_fd_limit(4096)
    with exporter_under_fd_limit(tmp_path) as exporter:
        attack = Slowloris(exporter.port, count=1100).start()
        drip = Drip(exporter.port, every=1.0, nbytes=40).start()
        peak = {"threads": 0, "fds": 0}
        stop = threading.Event()

        def watch():
            while not stop.wait(0.5):
                peak["threads"] = max(peak["threads"], exporter.ps.num_threads())
                peak["fds"] = max(peak["fds"], exporter.ps.num_fds())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            scrapes = scrape_like_prometheus(exporter.url, seconds=ATTACK_SECONDS)
        finally:
            stop.set()
            watcher.join()
            attack.stop()
        drip.join(timeout=60)
        print(f"\nunder attack: {len(scrapes.latencies)} scrapes answered, failures {scrapes.failures}; "
              f"attacker opened {attack.opened}; peak threads {peak['threads']}, fds {peak['fds']}")
        assert scrapes.failures == []
        assert len(scrapes.latencies) >= ATTACK_SECONDS // 2
        assert attack.opened >= 1100  # the attack did hold that many, and more as they were closed
        # Bounded: no thread per connection, and descriptors under the limit with room to spare.
        assert peak["threads"] < 40, peak
        assert peak["fds"] < FD_LIMIT - 100, peak
        # The slow drip was cut before it finished its head (it would take 40 s).
        assert drip.closed_after is not None and drip.sent < 40, (drip.sent, drip.closed_after)
        text = requests.get(exporter.url + "/metrics", timeout=10).text
        # The collectors never ran out of descriptors.
        assert sample(text, "whisper_exporter_collector_up", collector="process") == 1
        assert sample(text, "whisper_exporter_collector_errors_total", collector="process") == 0
        assert sample(text, "whisper_exporter_http_connections_limit") == FD_LIMIT // 2
        assert sample(text, "whisper_exporter_http_connections_closed_total", reason="evicted") > 0


def test_a_dripping_request_head_is_cut_at_its_deadline(tmp_path):
    """The old server's 30 s timeout applied per recv(): a byte every 10 s lived for ever.
    Here the head has 10 s in all, however it drips."""
    with exporter_under_fd_limit(tmp_path) as exporter:
        drip = Drip(exporter.port, every=1.0, nbytes=30).start()
        drip.join(timeout=60)
        assert drip.closed_after is not None, "the server never closed the dripping connection"
        assert drip.sent < 30
        text = requests.get(exporter.url + "/metrics", timeout=10).text
        assert sample(text, "whisper_exporter_http_connections_closed_total", reason="head_timeout") >= 1


def test_a_real_prometheus_keeps_scraping_through_the_attack(tmp_path, prometheus):
    """Prometheus itself (1 s interval, so a 1 s scrape timeout, kept-alive connection) scrapes
    the exporter while 1,100 half-open connections are held: no scrape fails (`up` stays 1)."""
    import time

    raise_own_fd_limit(4096)
    with exporter_under_fd_limit(tmp_path) as exporter:
        prom = prometheus([f"127.0.0.1:{exporter.port}"])
        prom.wait_for('up{job="whisper"} == 1')
        # Reopening once a second rather than twice: Prometheus' timeout here is its 1 s interval,
        # and on a shared 2-core machine the attacker's own CPU would otherwise be the test.
        attack = Slowloris(exporter.port, count=1100, every=1.0).start()
        try:
            time.sleep(ATTACK_SECONDS)
        finally:
            attack.stop()
        window = f"[{ATTACK_SECONDS - 1}s]"
        scrapes = float(prom.query(f'count_over_time(up{{job="whisper"}}{window})')[0]["value"][1])
        answered = float(prom.query(f'sum_over_time(up{{job="whisper"}}{window})')[0]["value"][1])
        slowest = float(prom.query(f'max_over_time(scrape_duration_seconds{{job="whisper"}}{window})')[0]["value"][1])
        print(f"\nPrometheus under attack: {answered:.0f}/{scrapes:.0f} scrapes up, slowest {slowest * 1000:.0f} ms; "
              f"attacker opened {attack.opened}")
        assert attack.opened >= 1100
        assert scrapes >= ATTACK_SECONDS // 2
        assert answered == scrapes, prom.targets()


EMFILE_SERVER = r"""
import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from whisper_exporter.web.connections import serve

def app(environ, start_response):
    body = str(server.stats.accept_errors).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

server = serve("127.0.0.1", 0, app)
# Hold descriptors as busy collectors would, leaving 6 free: accept() meets EMFILE long
# before the connection limit (32 here).
hold = [open(os.devnull) for _ in range(64 - len(os.listdir("/proc/self/fd")) - 6)]
print(server.server_address[1], flush=True)
time.sleep(60)
"""


def test_accept_backs_off_when_descriptors_run_out(tmp_path):
    """The old server retried accept() on EMFILE in a tight loop (190% CPU). Here accepting
    pauses after it: 4 s of descriptor starvation cost a small fraction of a core, the
    failures are counted and logged once, and it serves again once descriptors are free."""
    import subprocess
    import sys

    from slowloris import ROOT, cpu_while_starved

    stderr = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        port = int(proc.stdout.readline())
        cpu, attackers = cpu_while_starved(proc.pid, port)
        for s in attackers:
            s.close()
        answer = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert answer.status_code == 200
        assert int(answer.text) >= 1  # accept() did run out of descriptors
        assert cpu < 1.0, f"{cpu:.2f} CPU-seconds in 4 s: accept() is spinning"
    finally:
        proc.kill()
        proc.wait()
    stderr.seek(0)
    logged = [line for line in stderr.read().splitlines() if "Too many open files" in line]
    assert len(logged) == 1, logged  # one line per 10 s, however many attempts
