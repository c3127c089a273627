"""Cost of the request tap: added latency and throughput against nginx, and memory under load.

A trivial upstream (aiohttp: reads the upload, answers a small JSON), the tap (TapCollector:
proxy, multipart analysis, audio header, metrics) and two nginx (Debian `nginx`, from temp
configs, non-daemon, loopback, one worker each), all in front of the same upstream and
measured in the same run:
- `nginx`: `proxy_pass` with its defaults (HTTP/1.0 upstream, a connection per request,
  the body buffered);
- `nginx-ka`: upstream keep-alive (`keepalive 8`, `proxy_http_version 1.1`,
  `Connection ""`), request and answer unbuffered: the fastest nginx setup for this;
- `tap@NAME` (with --pythonpath DIR, repeatable): the tap imported from another checkout
  (the code before a change), a baseline in the same run;
- `tap+sample` (with --sampling FRACTION): the tap with production sampling, each drawn
  request's audio copied to a sample folder and queued for review (docs/quality.md).

1. Added latency: sequential multipart WAV uploads of 1 MB and 25 MB over a kept-alive
   connection, round-robin between all targets; p50 and p99 of each minus direct's, and
   each proxy's CPU time (user + system, all its processes) per request: steadier than
   wall time on a busy machine.
   Goals: at 1 MB, the tap's added p50 within 2 ms of nginx-ka's (and of nginx's) and
   added p99 <= 10 ms; at 25 MB, the tap's added p50 no worse than nginx's.
2. Throughput: requests/s for 10 s of 16 concurrent clients uploading a 32 KB WAV.
3. Memory: the tap's peak RSS while 64 clients upload 25 MB each at once.

    python benchmarks/bench_tap.py [--n1 200] [--n25 30] [--seconds 10] [--only 1mb ...]
                                   [--pythonpath OLD_CHECKOUT ...] [--sampling 1.0]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PATH = "/v1/audio/transcriptions"
BOUNDARY = "benchboundary0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def upload(size: int) -> bytes:
    from tap_helpers import multipart, wav_bytes

    return multipart(BOUNDARY, {"model": "whisper-1", "language": "en"}, "file", "a.wav",
                     wav_bytes((size - 200) / 32000))


# -- the child processes -------------------------------------------------------

def run_upstream(port: int) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.Response(body=b'{"text":"ok"}', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_tap(port: int, upstream: str, spool: str, pythonpath: str = "", sampling: float = 0.0) -> None:
    if pythonpath:  # a baseline: the tap of another checkout
        sys.path.insert(0, pythonpath)
    from whisper_exporter.collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    sampler = keeper = None
    if sampling:  # production sampling as collectors.tap.sample_dir sets it up (collectors/tap.py make)
        from whisper_exporter.quality.sampling import AudioKeeper, ProductionSampler, ReviewQueue

        sampler = ProductionSampler(ReviewQueue(os.path.join(spool, "queue.jsonl"), 10**6), sampling)
        # Old samples go as new ones come (max_files): the bench measures the steady state, not a full folder.
        keeper = AudioKeeper(os.path.join(spool, "samples"), 50, 10**10, 7 * 86400)
    col = TapCollector(TapConfig(enabled=True, listen=f"127.0.0.1:{port}", spool_dir=spool), upstream,
                       sampler=sampler, keeper=keeper)
    col.start()
    threading.Event().wait()


NGINX_DEFAULT = "location / {{ proxy_pass http://127.0.0.1:{upstream}; }}"
# Upstream keep-alive, per nginx's docs (ngx_http_upstream_module, keepalive), and unbuffered.
NGINX_KEEPALIVE = """location / {{
            proxy_pass http://whisper;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}"""


def nginx_config(folder: Path, port: int, upstream_port: int, keepalive: bool = False) -> Path:
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)  # nginx's workers (not root) write request bodies under it
    conf = folder / "nginx.conf"
    location = (NGINX_KEEPALIVE if keepalive else NGINX_DEFAULT).format(upstream=upstream_port)
    pool = f"upstream whisper {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}" if keepalive else ""
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    {pool}
    server {{
        listen 127.0.0.1:{port};
        {location}
    }}
}}
""")
    return conf


# -- measurements --------------------------------------------------------------

def latencies(ports: dict[str, int], body: bytes, n: int) -> dict[str, list[float]]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(len(body))}
    conns = {name: http.client.HTTPConnection("127.0.0.1", port) for name, port in ports.items()}
    out: dict[str, list[float]] = {name: [] for name in ports}
    for i in range(n + 3):  # 3 warm-up rounds
        for name, conn in conns.items():
            start = time.perf_counter()
            conn.request("POST", PATH, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - start
            assert response.status == 200, (name, response.status)
            if i >= 3:
                out[name].append(took)
    for conn in conns.values():
        conn.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _throughput(port: int, body: bytes, seconds: float, clients: int) -> float:
    import aiohttp

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def _concurrent(port: int, body: bytes, clients: int) -> None:
    import aiohttp

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        async def one() -> None:
            async with session.post(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200

        await asyncio.gather(*(one() for _ in range(clients)))


def peak_rss_during(pid: int, work) -> tuple[float, float]:
    """(RSS before, peak RSS during `work()`) of process `pid`, in MB."""
    import psutil

    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return before / 1e6, peak[0] / 1e6


PARTS = ("1mb", "25mb", "throughput", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n1", type=int, default=200, help="requests per target at 1 MB")
    parser.add_argument("--n25", type=int, default=30, help="requests per target at 25 MB")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput run length")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--sampling", type=float, default=0.0, metavar="FRACTION",
                        help="also run a tap with production sampling at FRACTION (1: every request kept for "
                             "review, its audio copied and queued), as tap+sample")
    parser.add_argument("--pythonpath", action="append", default=[],
                        help="also run the tap of this checkout (the code before a change), as tap@NAME")
    args = parser.parse_args()
    parts = set(args.only or PARTS)
    if shutil.which("nginx") is None:
        sys.exit("nginx is needed (apt-get install nginx)")
    import psutil

    folder = Path(tempfile.mkdtemp(prefix="bench-tap-"))
    folder.chmod(0o755)
    me = [sys.executable, __file__]
    upstream_port = free_port()
    upstream = subprocess.Popen(me + ["--child-upstream", str(upstream_port)])
    wait_port(upstream_port)
    spool = folder / "spool"
    spool.mkdir()
    # target -> (port, process); the round-robin order is this order
    targets: dict[str, tuple[int, subprocess.Popen]] = {"direct": (upstream_port, upstream)}
    taps = ["tap"] + [f"tap@{Path(p).resolve().name}" for p in args.pythonpath]
    for name, path in zip(taps, [""] + args.pythonpath):
        port = free_port()
        own = spool / name
        own.mkdir()
        targets[name] = (port, subprocess.Popen(me + ["--child-tap", str(port), f"http://127.0.0.1:{upstream_port}",
                                                      str(own), str(Path(path).resolve()) if path else ""]))
    if args.sampling:
        port = free_port()
        own = spool / "tap+sample"
        own.mkdir()
        targets["tap+sample"] = (port, subprocess.Popen(me + ["--child-tap", str(port), f"http://127.0.0.1:{upstream_port}",
                                                              str(own), "", str(args.sampling)]))
    for name, keepalive in (("nginx", False), ("nginx-ka", True)):
        port = free_port()
        prefix = folder / name
        conf = nginx_config(prefix, port, upstream_port, keepalive)
        targets[name] = (port, subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix)],
                                                stderr=subprocess.DEVNULL))
    try:
        for port, _ in targets.values():
            wait_port(port)
        print(f"bench_tap: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; round-robin: {', '.join(targets)}")
        for name, path in zip(taps[1:], args.pythonpath):
            print(f"  {name}: the tap from {Path(path).resolve()}")
        procs = {name: [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children()
                 for name, (_, proc) in targets.items()}
        ports = {name: port for name, (port, _) in targets.items()}
        goals = []

        def cpu(ps: list) -> float:
            return sum(sum(p.cpu_times()[:2]) for p in ps)

        for part, label, size, n in (("1mb", "1 MB", 1_000_000, args.n1), ("25mb", "25 MB", 25_000_000, args.n25)):
            if part not in parts:
                continue
            cpu0 = {name: cpu(ps) for name, ps in procs.items()}
            got = latencies(ports, upload(size), n)
            spent = {name: (cpu(ps) - cpu0[name]) / (n + 3) * 1e3 for name, ps in procs.items()}
            base50, base99 = pct(got["direct"], 0.5), pct(got["direct"], 0.99)
            print(f"\n{label} WAV upload, {n} requests each: direct p50 {base50 * 1e3:.2f} ms, "
                  f"p99 {base99 * 1e3:.2f} ms, upstream CPU {spent['direct'] / len(targets):.2f} ms per request")
            added = {}
            for name in list(targets)[1:]:
                a50 = (pct(got[name], 0.5) - base50) * 1e3
                a99 = (pct(got[name], 0.99) - base99) * 1e3
                added[name] = (a50, a99)
                print(f"  {name:12}  added p50 {a50:7.2f} ms   added p99 {a99:7.2f} ms   "
                      f"CPU {spent[name]:6.2f} ms per request")
            if size == 1_000_000:
                for nginx in ("nginx-ka", "nginx"):
                    gap = added["tap"][0] - added[nginx][0]
                    goals.append((f"1 MB: tap added p50 within 2 ms of {nginx}'s (tap - {nginx}: {gap:+.2f} ms)",
                                  gap <= 2))
                goals.append((f"1 MB: tap added p99 <= 10 ms ({added['tap'][1]:.2f} ms)", added["tap"][1] <= 10))
            else:
                for nginx in ("nginx", "nginx-ka"):
                    gap = added["tap"][0] - added[nginx][0]
                    goals.append((f"25 MB: tap added p50 no worse than {nginx}'s (tap - {nginx}: {gap:+.2f} ms)",
                                  gap <= 0))

        if "throughput" in parts:
            small = upload(32_000)
            print(f"\nThroughput, 16 clients, 32 KB WAV uploads, {args.seconds:g} s each:")
            for name, port in ports.items():
                rate = asyncio.run(_throughput(port, small, args.seconds, 16))
                print(f"  {name:12} {rate:8.0f} requests/s")

        if "memory" in parts:
            body = upload(25_000_000)
            before, peak = peak_rss_during(targets["tap"][1].pid,
                                           lambda: asyncio.run(_concurrent(ports["tap"], body, 64)))
            deadline = time.monotonic() + 120  # the record worker reads each header, then deletes the spool
            while any((spool / "tap").iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"\nMemory, 64 concurrent 25 MB uploads through the tap: RSS {before:.0f} MB before, "
                  f"peak {peak:.0f} MB (+{peak - before:.0f} MB); spool files left once the records are "
                  f"handled: {len(list((spool / 'tap').iterdir()))}")
        print()
        for goal, ok in goals:
            print(f"  [{'met' if ok else 'MISSED'}] {goal}")
    finally:
        for _, proc in targets.values():
            proc.terminate()
        for _, proc in targets.values():
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-upstream":
        run_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 5 and sys.argv[1] == "--child-tap":
        run_tap(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
                float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
    else:
        main()
