"""A slowloris attacker and a Prometheus-style scraper, for tests/test_slowloris.py and
benchmarks/bench_slowloris.py: the exporter runs as a subprocess under a 1024 open-file limit
(systemd's default soft limit), as in the report."""
from __future__ import annotations

import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import psutil
import requests
import yaml
from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
FD_LIMIT = 1024
# What Prometheus sends (scrape_timeout 10 s by default).
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
              "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.53.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n"  # never finished


def cpu_while_starved(pid: int, port: int, connections: int = 30,
                      seconds: float = 4.0) -> tuple[float, list[socket.socket]]:
    """Open `connections` to a server that is out of descriptors and leave them there for
    `seconds`: the CPU-seconds (user + system) it spent meanwhile, and the connections (the
    caller closes them). A server that retries accept() on EMFILE in a loop spins a core."""
    ps = psutil.Process(pid)
    attackers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(connections)]
    before = sum(ps.cpu_times()[:2])
    time.sleep(seconds)  # the measuring window itself, not a wait for an event
    return sum(ps.cpu_times()[:2]) - before, attackers


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def raise_own_fd_limit(want: int = 4096) -> None:
    """The attacker (this process) needs more descriptors than the exporter gets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


@dataclass
class Exporter:
    proc: subprocess.Popen
    url: str
    port: int
    tap_port: Optional[int] = None  # with the tap on (tap_upstream given)

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)


@contextmanager
def exporter_under_fd_limit(tmp: Path, pythonpath: Optional[str] = None, tap_upstream: Optional[str] = None,
                            tap: Optional[dict] = None) -> Iterator[Exporter]:
    """The CLI with the process collector on (it opens /proc files: it notices descriptor
    exhaustion) and nothing else, under `ulimit -n 1024`; with `tap_upstream`, the tap too
    (`tap`: more of its settings)."""
    port = free_port()
    config = tmp / "config.yml"
    collectors: dict = {
        "gpu": {"enabled": False}, "quality": {"enabled": False}, "probe": {"enabled": False},
        "logs": {"enabled": False}, "process": {"enabled": True, "interval": "1s", "match": "python"},
    }
    tap_port = free_port() if tap_upstream else None
    if tap_upstream:
        collectors["tap"] = {"enabled": True, "listen": f"127.0.0.1:{tap_port}", "upstream": tap_upstream,
                             **(tap or {})}
    config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "collectors": collectors}))
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    stderr = open(tmp / "exporter.stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(config)],
                            cwd=pythonpath or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                            preexec_fn=_limit_fds)
    exporter = Exporter(proc, f"http://127.0.0.1:{port}", port, tap_port)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp / "exporter.stderr").read_text()
            try:
                return requests.get(exporter.url + "/-/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        assert wait_for(up, timeout=30)
        yield exporter
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr.close()


def _closed_by_peer(socks: list[socket.socket]) -> set[socket.socket]:
    """The sockets the server has closed (readable: it never sends anything else). poll(), not
    select(): descriptors here go past 1024."""
    poller = select.poll()
    by_fd = {}
    for s in socks:
        by_fd[s.fileno()] = s
        poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    return {by_fd[fd] for fd, _ in poller.poll(0)}


class Slowloris:
    """Keeps `count` connections open, each with a request head that never ends; reopens those
    the server closes (as a real attacker does), at most every `every` seconds."""

    def __init__(self, port: int, count: int = 1100, every: float = 0.5):
        self.port, self.count, self.every = port, count, every
        self.socks: list[socket.socket] = []
        self.opened = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> None:
        while len(self.socks) < self.count and not self._stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                s.sendall(HALF_REQUEST)
                s.setblocking(False)
                self.socks.append(s)
                self.opened += 1
            except OSError:
                self.failed += 1
                return

    def _reap(self) -> None:
        gone = _closed_by_peer(self.socks)
        for s in gone:
            s.close()
        self.socks = [s for s in self.socks if s not in gone]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._open()
            self._stop.wait(self.every)
            self._reap()

    def start(self) -> "Slowloris":
        self._open()  # all of them before the first scrape
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()


@dataclass
class Scrapes:
    latencies: list[float] = field(default_factory=list)  # seconds, of the answered ones
    failures: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def scrape_like_prometheus(url: str, seconds: float, interval: float = 1.0) -> Scrapes:
    """One scrape each `interval`, each on a new connection, 10 s timeout, like Prometheus."""
    result = Scrapes()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            with requests.Session() as session:
                r = session.get(url + "/metrics", headers=PROMETHEUS_HEADERS, timeout=10)
            if r.status_code == 200 and "whisper_exporter_build_info" in r.text:
                result.latencies.append(time.monotonic() - began)
            else:
                result.failures.append(f"HTTP {r.status_code}")
        except requests.RequestException as err:
            result.failures.append(type(err).__name__)
        time.sleep(max(0.0, interval - (time.monotonic() - began)))
    return result


class Drip:
    """One connection that sends a request head a byte every `every` seconds; notes when the
    server closed it."""

    def __init__(self, port: int, every: float = 1.0, nbytes: int = 40):
        self.port, self.every, self.nbytes = port, every, nbytes
        self.sent = 0
        self.closed_after: Optional[float] = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        data = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * self.nbytes
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            for i in range(self.nbytes):
                try:
                    if _closed_by_peer([s]):
                        raise ConnectionResetError
                    s.sendall(data[i:i + 1])
                    self.sent += 1
                except OSError:
                    self.closed_after = time.monotonic() - began
                    return
                time.sleep(self.every)

    def start(self) -> "Drip":
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
