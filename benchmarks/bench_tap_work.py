"""The tap's memory and CPU under hostile load (issue 22, items 3, 5, 6, 9), against a baseline checkout.

The tap runs in a process of its own (so its RSS and CPU are its own), in front of an
aiohttp upstream in another; the clients are raw sockets in this process. Each scenario
runs once per checkout given, and prints the tap's figures side by side with the ratio
new / baseline from the same run:

- uploads: N concurrent 1 MB uploads against a server that holds every answer until all
  have arrived: the tap's peak RSS (the report: 54 -> 301 MB at 100, 536 MB at 200).
- flac: ten 4 MB `fLaC` + `01 00 00 00`... uploads: the tap's CPU seconds until their
  records are done; then SIGTERM with ten more queued: seconds to exit.
- upgrade: a 60 MB verbose_json of 20 M `{}` segments with upgrade_response_format: peak
  RSS, and the slowest of small requests sent meanwhile (the loop blocked).
- parts: a 50 MB upload of a million tiny parts: CPU seconds, and the slowest small request.

    python benchmarks/bench_tap_work.py [--uploads 200] [--baseline OLD_CHECKOUT] [--only uploads,flac] [--exporter]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
PATH = "/v1/audio/transcriptions"
MB = 1 << 20

UPSTREAM = r'''
import asyncio, sys
from aiohttp import web
release = None
arrived = 0
BOMB = b'{"text":"hi","segments":[' + b"{}," * 19_999_999 + b"{}]}"

async def answer(request):
    global release, arrived
    if release is None:
        release = asyncio.Event()
    slow = request.headers.get("X-Slow")
    async for _ in request.content.iter_chunked(65536):
        if slow:
            await asyncio.sleep(0.05)
    arrived += 1
    if request.headers.get("X-Hold"):
        await release.wait()
    if request.headers.get("X-Bomb"):
        return web.Response(body=BOMB, content_type="application/json")
    return web.json_response({"text": "ok"})

async def free(request):
    global release
    if release is None:
        release = asyncio.Event()
    release.set()
    return web.Response(text="ok")

app = web.Application(client_max_size=1 << 34)
app.router.add_route("*", "/v1/audio/transcriptions", answer)
app.router.add_get("/release", free)
app.router.add_get("/arrived", lambda request: web.Response(text=str(arrived)))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''

TAP = r'''
import json, signal, sys, threading
from whisper_exporter.tap import TapConfig
from whisper_exporter.tap.proxy import Tap
options = json.loads(sys.argv[1])
def seen(record):
    print("R", record.analysis_error, flush=True)
tap = Tap(TapConfig(enabled=True, **options), sys.argv[2], seen)
tap.start()
print("PORT", tap.port, flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
tap.stop()
print("STOPPED", flush=True)
'''


# --exporter: the whole exporter (whisper-exporter run) with only the tap on, as deployed.
EXPORTER = r'''
import sys
from whisper_exporter.cli import main
sys.argv = ["whisper-exporter", "run", "--config", sys.argv[1]]
main()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form(data: bytes, fields: bytes = b"") -> tuple[bytes, str]:
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
    return fields + head + data + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"


def request(port: int, body: bytes, ctype: str, extra: str = "") -> float:
    """One raw POST; seconds to its whole answer."""
    t0 = time.perf_counter()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nContent-Type: {ctype}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall(head)
        s.sendall(body)
        while s.recv(1 << 16):
            pass
    return time.perf_counter() - t0


class Child:
    """A Python process with PYTHONPATH set to a checkout; its stdout lines read in a thread."""

    def __init__(self, code: str, args: list[str], checkout: Optional[str]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [checkout or str(ROOT),
                                                                       os.environ.get("PYTHONPATH")])))
        # cwd "/": `python -c` puts the working directory first on sys.path, before PYTHONPATH
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True,
                                     cwd="/")
        self.ps = psutil.Process(self.proc.pid)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()

    def wait_lines(self, prefix: str, n: int, timeout: float = 600) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len([x for x in self.lines if x.startswith(prefix)]) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{prefix} x{n}")
                self.cond.wait(left)
            return [x for x in self.lines if x.startswith(prefix)]

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Peak:
    """The peak RSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, ps: psutil.Process):
        self.ps, self.peak, self.stop = ps, ps.memory_info().rss, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)


def wait_port(port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


WHOLE = {"exporter": False}


def start(checkout: Optional[str], options: dict) -> tuple[Child, Child, int]:
    up_port = free_port()
    upstream = Child(UPSTREAM, [str(up_port)], checkout)
    wait_port(up_port)
    if WHOLE["exporter"]:
        port = free_port()
        config = {"listen": f"127.0.0.1:{free_port()}", "service": {"url": f"http://127.0.0.1:{up_port}"},
                  "collectors": {"gpu": {"enabled": False}, "probe": {"enabled": False},
                                 "tap": {"enabled": True, "listen": f"127.0.0.1:{port}", **options}}}
        path = Path(tempfile.mkdtemp()) / "config.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        tap = Child(EXPORTER, [str(path)], checkout)
        wait_port(port)
        return upstream, tap, port
    tap = Child(TAP, [json.dumps({"listen": "127.0.0.1:0", **options}), f"http://127.0.0.1:{up_port}"], checkout)
    port = int(tap.wait_lines("PORT", 1, 60)[0].split()[1])
    return upstream, tap, port


def get(upstream: Child, path: str) -> str:
    with socket.create_connection(("127.0.0.1", int(upstream.proc.args[-1])), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while piece := s.recv(65536):
            answer += piece
    return answer.split(b"\r\n\r\n", 1)[1].decode()


def slowest_small(port: int, stop: threading.Event, out: list[float]) -> None:
    body, ctype = form(b"RIFF")
    while not stop.is_set():
        out.append(request(port, body, ctype))
        time.sleep(0.05)


def uploads(checkout: Optional[str], n: int) -> dict:
    spool = tempfile.mkdtemp()
    upstream, tap, port = start(checkout, {"spool_dir": spool})
    try:
        time.sleep(0.5)
        base = tap.ps.memory_info().rss
        peak = Peak(tap.ps)
        body, ctype = form(b"\0" * 1_000_000)
        clients = [threading.Thread(target=request, args=(port, body, ctype, "X-Hold: 1\r\n")) for _ in range(n)]
        for c in clients:
            c.start()
        while get(upstream, "/arrived") != str(n):  # every upload is in the tap and the server at once
            time.sleep(0.1)
        get(upstream, "/release")
        for c in clients:
            c.join()
        if WHOLE["exporter"]:
            time.sleep(2)  # the records are handled in the background
        else:
            tap.wait_lines("R", n)
        peak.stop.set()
        return {"rss_start_MB": base / MB, "rss_peak_MB": peak.peak / MB}
    finally:
        tap.stop()
        upstream.stop()


def flac(checkout: Optional[str]) -> dict:
    upstream, tap, port = start(checkout, {})
    try:
        body, ctype = form(b"fLaC" + b"\x01\x00\x00\x00" * MB)  # 4 MB
        cpu0 = tap.cpu()
        for _ in range(10):
            request(port, body, ctype)
        tap.wait_lines("R", 10)
        cpu = tap.cpu() - cpu0
        for _ in range(10):
            request(port, body, ctype)
        t0 = time.perf_counter()
        tap.proc.send_signal(signal.SIGTERM)
        try:
            tap.proc.wait(120)
            stop = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            stop = float("inf")
        return {"cpu_s_10_flacs": cpu, "sigterm_exit_s": stop}
    finally:
        tap.stop()
        upstream.stop()


def upgrade(checkout: Optional[str]) -> dict:
    upstream, tap, port = start(checkout, {"upgrade_response_format": True})
    try:
        time.sleep(0.5)
        peak = Peak(tap.ps)
        stop, small = threading.Event(), []
        prober = threading.Thread(target=slowest_small, args=(port, stop, small))
        prober.start()
        body, ctype = form(b"RIFF", b'--b\r\nContent-Disposition: form-data; name="response_format"\r\n\r\njson\r\n')
        took = request(port, body, ctype, "X-Bomb: 1\r\n")
        stop.set()
        prober.join()
        peak.stop.set()
        return {"rss_peak_MB": peak.peak / MB, "bomb_s": took, "slowest_small_s": max(small)}
    finally:
        tap.stop()
        upstream.stop()


def parts(checkout: Optional[str]) -> dict:
    upstream, tap, port = start(checkout, {})
    try:
        stop, small = threading.Event(), []
        prober = threading.Thread(target=slowest_small, args=(port, stop, small))
        prober.start()
        part = b'--b\r\nContent-Disposition: form-data; name="p"\r\n\r\n\r\n'
        body, ctype = form(b"RIFF", part * (50 * MB // len(part)))
        cpu0 = tap.cpu()
        took = request(port, body, ctype)
        cpu = tap.cpu() - cpu0
        stop.set()
        prober.join()
        return {"cpu_s": cpu, "upload_s": took, "slowest_small_s": max(small)}
    finally:
        tap.stop()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=200, help="concurrent 1 MB uploads")
    parser.add_argument("--baseline", help="a checkout of the code before the change (git worktree add ...)")
    parser.add_argument("--only", default="uploads,flac,upgrade,parts")
    parser.add_argument("--exporter", action="store_true",
                        help="uploads: run the whole exporter with the tap on, not the tap alone")
    args = parser.parse_args()
    WHOLE["exporter"] = args.exporter
    scenarios = {"uploads": lambda c: uploads(c, args.uploads), "flac": flac, "upgrade": upgrade, "parts": parts}
    sides = {"this": None} if not args.baseline else {"baseline": args.baseline, "this": None}
    for name in args.only.split(","):
        results = {side: scenarios[name](checkout) for side, checkout in sides.items()}
        for key in results["this"]:
            line = f"{name:8} {key:18}" + "".join(f" {side}={r[key]:9.2f}" for side, r in results.items())
            if "baseline" in results and results["baseline"][key]:
                line += f"  ratio={results['this'][key] / results['baseline'][key]:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
