"""The attacks of issue 22's "How it will be judged" (and the tap's big heads), one after another, on one exporter.

    python benchmarks/bench_tap_hostile.py [--phases idle,uploads,heads,tapheads,flac,parts] [--pythonpath CHECKOUT]

The exporter (the real CLI: process collector and the tap) runs under `ulimit -n 1024`, the
tap in front of a slow fake upstream (it reads the whole upload, waits --upstream-delay, then
answers). /metrics is scraped every 0.2 s throughout (a new connection each, 5 s timeout) and a
legitimate 2 s WAV goes through the tap every 3 s. After a quiet phase (the baseline, same run),
the phases are:

  idle     1,100 idle sockets on the tap (request heads never finished, reopened when closed)
  uploads  200 concurrent 1 MB uploads sent slowly (--upload-rate bytes/s each)
  heads    500 request heads of 785 KB on the metrics port (100 headers of 7.85 KB, never finished)
  tapheads 100 request heads of 960 KB on the tap (120 headers of 8 KB, never finished)
  flac     ten crafted FLACs: fLaC + 01 00 00 00 repeated, 4 MB each, at once
  parts    one multipart upload of a million tiny parts (64 MB)

Per phase: scrape p50/p99/max (and p50 against the quiet phase), failed scrapes, legitimate
uploads answered 200 of those tried, the exporter's peak RSS (VmRSS from /proc). At the end:
how long SIGTERM took to end the exporter. --pythonpath runs another checkout (the code before
a change, as the baseline). Runs in under 5 minutes on 2 shared cores.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import requests  # noqa: E402
from aiohttp import web  # noqa: E402
from slowloris import Slowloris, exporter_under_fd_limit, raise_own_fd_limit  # noqa: E402
from tap_helpers import Upstream, multipart, wav_bytes  # noqa: E402

TRANSCRIPTIONS = "/v1/audio/transcriptions"
BOUNDARY = "benchboundary"
CONTENT_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
PHASES = ("idle", "uploads", "heads", "tapheads", "flac", "parts")


class Phase:
    """What one phase saw."""

    def __init__(self, name: str):
        self.name = name
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.uploads: list[object] = []  # status codes, or the exception's name
        self.peak_rss = 0
        self.note = ""


class Watch:
    """Scrapes, legitimate uploads and RSS samples, filed under the phase running when each began."""

    def __init__(self, metrics_url: str, tap_url: str, pid: int):
        self.metrics_url, self.tap_url, self.pid = metrics_url, tap_url, pid
        self.phase = Phase("quiet")
        self.phases: list[Phase] = [self.phase]
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(32)
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._scrapes, self._uploads, self._rss)]
        self._legit = multipart(BOUNDARY, {"model": "whisper-1", "language": "en"}, "file", "legit.wav", wav_bytes(2))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def begin(self, name: str) -> Phase:
        self.phase = Phase(name)
        self.phases.append(self.phase)
        return self.phase

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        self._pool.shutdown(wait=True)

    def _scrape(self, phase: Phase) -> None:
        began = time.monotonic()
        try:
            r = requests.get(self.metrics_url + "/metrics", timeout=5)
            if r.status_code == 200 and "whisper_exporter_build_info" in r.text:
                phase.latencies.append(time.monotonic() - began)
            else:
                phase.failures.append(f"HTTP {r.status_code}")
        except requests.RequestException as err:
            phase.failures.append(type(err).__name__)

    def _scrapes(self) -> None:
        while not self._stop.wait(0.2):
            self._pool.submit(self._scrape, self.phase)

    def _upload(self, phase: Phase) -> None:
        try:
            r = requests.post(self.tap_url + TRANSCRIPTIONS, data=self._legit, headers=CONTENT_TYPE, timeout=30)
            phase.uploads.append(r.status_code)
        except requests.RequestException as err:
            phase.uploads.append(type(err).__name__)

    def _uploads(self) -> None:
        while not self._stop.wait(3.0):
            self._pool.submit(self._upload, self.phase)

    def _rss(self) -> None:
        while not self._stop.wait(0.1):
            rss = vm_rss(self.pid)
            if rss is not None:
                self.phase.peak_rss = max(self.phase.peak_rss, rss)


def vm_rss(pid: int) -> Optional[int]:
    """Bytes resident, from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def slow_upstream(delay: float) -> Upstream:
    async def transcribe(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        return web.json_response({"text": "hello world"})

    return Upstream({TRANSCRIPTIONS: transcribe})


def _slow_upload(port: int, body: bytes, rate: int) -> str:
    """One upload sent at `rate` bytes/s in 16 KiB pieces; the status line it got, or why none."""
    head = (f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: tap\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nConnection: close\r\n\r\n").encode()
    piece = 16384
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head)
            for i in range(0, len(body), piece):
                s.sendall(body[i:i + piece])
                time.sleep(piece / rate)
            answer = s.recv(200)
    except OSError as err:
        return type(err).__name__
    return answer.split(b"\r\n", 1)[0].decode("latin-1")[9:12] or "closed"


def attack_uploads(port: int, rate: int) -> str:
    body = multipart(BOUNDARY, {"model": "whisper-1"}, "file", "big.wav", wav_bytes(1_000_000 / 32000))
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda _: _slow_upload(port, body, rate), range(200)))
    counts: dict[str, int] = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    return "answers " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _big_head(port: int, size: int, hold: float, lines: int = 100, target: bytes = b"GET /metrics") -> bool:
    """One head of `size` bytes in `lines` lines, never finished, held `hold` seconds: whether the server closed it."""
    line = b"X-H-%03d: " + b"a" * (size // lines - 12) + b"\r\n"
    head = target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(line % i for i in range(lines - 1))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head)
            s.settimeout(hold)
            s.recv(200)  # an answer (431) or the end: closed by the server
        return True
    except socket.timeout:
        return False  # still held
    except OSError:
        return True


def attack_heads(port: int) -> str:
    with concurrent.futures.ThreadPoolExecutor(500) as pool:
        closed = sum(pool.map(lambda _: _big_head(port, 785_000, 5.0), range(500)))
    return f"{closed}/500 closed by the server within 5 s"


def attack_tap_heads(port: int) -> str:
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        closed = sum(pool.map(lambda _: _big_head(port, 960_000, 5.0, 120, b"POST " + TRANSCRIPTIONS.encode()),
                              range(100)))
    return f"{closed}/100 closed by the tap within 5 s"


def _post(url: str, body: bytes, name: str) -> str:
    try:
        return str(requests.post(url + TRANSCRIPTIONS, data=body, headers=CONTENT_TYPE, timeout=120).status_code)
    except requests.RequestException as err:
        return type(err).__name__


def attack_flac(url: str) -> str:
    flac = b"fLaC" + b"\x01\x00\x00\x00" * (1 << 20)  # 4 MB of empty metadata blocks
    body = multipart(BOUNDARY, {"model": "whisper-1"}, "file", "crafted.flac", flac)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: _post(url, body, f"f{i}"), range(10)))
    return "answers " + " ".join(answers)


def attack_parts(url: str) -> str:
    part = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\nx\r\n".encode()
    body = part * 1_000_000 + f"--{BOUNDARY}--\r\n".encode()
    return f"{len(body) / 1e6:.0f} MB, answer {_post(url, body, 'parts')}"


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def report(phases: list[Phase]) -> None:
    base = _ms(phases[0].latencies, 50)
    print(f"{'phase':<8} {'scrapes':>8} {'failed':>6} {'p50 ms':>7} {'x quiet':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'legit uploads':>13} {'peak RSS':>9}  notes")
    for p in phases:
        ok = sum(1 for u in p.uploads if u == 200)
        p50 = _ms(p.latencies, 50)
        top = max(p.latencies) * 1000 if p.latencies else float("nan")
        print(f"{p.name:<8} {len(p.latencies) + len(p.failures):>8} {len(p.failures):>6} {p50:>7.0f} "
              f"{p50 / base:>6.1f}x {_ms(p.latencies, 99):>7.0f} {top:>7.0f} {f'{ok}/{len(p.uploads)}':>13} "
              f"{p.peak_rss / 2**20:>6.0f} MB  {p.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--pythonpath", default=None, help="run the exporter from this checkout")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the idle phase and the quiet one last")
    parser.add_argument("--upload-rate", type=int, default=65536, help="bytes/s of each slow upload")
    parser.add_argument("--upstream-delay", type=float, default=1.0, help="seconds the fake upstream waits")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    raise_own_fd_limit(16384)
    upstream = slow_upstream(args.upstream_delay)
    with tempfile.TemporaryDirectory() as tmp, \
            exporter_under_fd_limit(Path(tmp), args.pythonpath, tap_upstream=upstream.url) as exporter:
        tap_url = f"http://127.0.0.1:{exporter.tap_port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", exporter.tap_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        print(f"exporter pid {exporter.proc.pid} under ulimit -n 1024, code from {args.pythonpath or 'this checkout'}; "
              f"tap :{exporter.tap_port} -> slow upstream ({args.upstream_delay:g} s)", flush=True)
        watch = Watch(exporter.url, tap_url, exporter.proc.pid)
        watch.start()
        time.sleep(min(args.seconds, 5.0))
        for name in phases:
            phase = watch.begin(name)
            began = time.monotonic()
            print(f"-- {name} ...", flush=True)
            if name == "idle":
                attack = Slowloris(exporter.tap_port, count=1100).start()
                time.sleep(args.seconds)
                attack.stop()
                phase.note = f"attacker opened {attack.opened} connections"
            elif name == "uploads":
                phase.note = attack_uploads(exporter.tap_port, args.upload_rate)
            elif name == "heads":
                phase.note = attack_heads(exporter.port)
            elif name == "tapheads":
                phase.note = attack_tap_heads(exporter.tap_port)
            elif name == "flac":
                phase.note = attack_flac(tap_url)
            elif name == "parts":
                phase.note = attack_parts(tap_url)
            phase.note += f"; {time.monotonic() - began:.0f} s"
            time.sleep(3.0)  # what the phase left behind (queued analysis, RSS) still counts for it
        watch.stop()
        began = time.monotonic()
        exporter.proc.send_signal(signal.SIGTERM)
        try:
            exporter.proc.wait(90)
            stopped = f"{time.monotonic() - began:.1f} s"
        except Exception:
            stopped = "did not end within 90 s (killed)"
            os.kill(exporter.proc.pid, signal.SIGKILL)
        report(watch.phases)
        print(f"SIGTERM to exit: {stopped}")
    upstream.stop()


if __name__ == "__main__":
    main()
