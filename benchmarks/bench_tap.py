"""Cost of the request tap: added latency and throughput against nginx, and memory under load.

Three processes: a trivial upstream (aiohttp: reads the upload, answers a small JSON), the
tap (TapCollector: proxy, multipart analysis, audio header, metrics) and nginx (Debian
`nginx`, `proxy_pass` with its defaults, from a temp config, non-daemon, loopback), all in
front of the same upstream, measured in the same run:

1. Added latency: sequential multipart WAV uploads of 1 MB and 25 MB over a kept-alive
   connection, round-robin direct / tap / nginx; p50 and p99 of each minus direct's, and
   each proxy's CPU time (user + system, all its processes) per request: steadier than
   wall time on a busy machine.
   Goals: at 1 MB, the tap's added p50 within 2 ms of nginx's and added p99 <= 10 ms;
   at 25 MB, the tap's added p50 no worse than nginx's.
2. Throughput: requests/s for 10 s of 16 concurrent clients uploading a 32 KB WAV.
3. Memory: the tap's peak RSS while 64 clients upload 25 MB each at once.

    python benchmarks/bench_tap.py [--n1 200] [--n25 30] [--seconds 10]
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


def run_tap(port: int, upstream: str, spool: str) -> None:
    from whisper_exporter.collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    col = TapCollector(TapConfig(enabled=True, listen=f"127.0.0.1:{port}", spool_dir=spool), upstream)
    col.start()
    threading.Event().wait()


def nginx_config(folder: Path, port: int, upstream_port: int) -> Path:
    conf = folder / "nginx.conf"
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
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{upstream_port}; }}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n1", type=int, default=200, help="requests per target at 1 MB")
    parser.add_argument("--n25", type=int, default=30, help="requests per target at 25 MB")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput run length")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        sys.exit("nginx is needed (apt-get install nginx)")

    folder = Path(tempfile.mkdtemp(prefix="bench-tap-"))
    folder.chmod(0o755)  # nginx's workers (not root) write request bodies under it
    ports = {"direct": free_port(), "tap": free_port(), "nginx": free_port()}
    me = [sys.executable, __file__]
    procs = [subprocess.Popen(me + ["--child-upstream", str(ports["direct"])])]
    wait_port(ports["direct"])
    spool = folder / "spool"
    spool.mkdir()
    procs.append(subprocess.Popen(me + ["--child-tap", str(ports["tap"]), f"http://127.0.0.1:{ports['direct']}",
                                        str(spool)]))
    procs.append(subprocess.Popen(["nginx", "-c", str(nginx_config(folder, ports["nginx"], ports["direct"])),
                                   "-p", str(folder)], stderr=subprocess.DEVNULL))
    try:
        for port in ports.values():
            wait_port(port)
        print(f"bench_tap: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        goals = []
        import psutil

        nginx_procs = [psutil.Process(procs[2].pid)] + psutil.Process(procs[2].pid).children()
        tap_proc = psutil.Process(procs[1].pid)

        def cpu(ps: list) -> float:
            return sum(sum(p.cpu_times()[:2]) for p in ps)

        for label, size, n in (("1 MB", 1_000_000, args.n1), ("25 MB", 25_000_000, args.n25)):
            cpu0 = (cpu([tap_proc]), cpu(nginx_procs))
            got = latencies(ports, upload(size), n)
            cpu1 = (cpu([tap_proc]), cpu(nginx_procs))
            per = [(b - a) / (n + 3) * 1e3 for a, b in zip(cpu0, cpu1)]
            base50, base99 = pct(got["direct"], 0.5), pct(got["direct"], 0.99)
            print(f"\n{label} WAV upload, {n} requests each: direct p50 {base50 * 1e3:.2f} ms, "
                  f"p99 {base99 * 1e3:.2f} ms")
            added = {}
            for name in ("tap", "nginx"):
                a50 = (pct(got[name], 0.5) - base50) * 1e3
                a99 = (pct(got[name], 0.99) - base99) * 1e3
                added[name] = (a50, a99)
                spent = per[0] if name == "tap" else per[1]
                print(f"  {name:5}  added p50 {a50:7.2f} ms   added p99 {a99:7.2f} ms   "
                      f"CPU {spent:6.2f} ms per request")
            if size == 1_000_000:
                goals.append(("1 MB: tap added p50 within 2 ms of nginx's", added["tap"][0] <= added["nginx"][0] + 2))
                goals.append(("1 MB: tap added p99 <= 10 ms", added["tap"][1] <= 10))
            else:
                goals.append(("25 MB: tap added p50 no worse than nginx's", added["tap"][0] <= added["nginx"][0]))

        small = upload(32_000)
        print(f"\nThroughput, 16 clients, 32 KB WAV uploads, {args.seconds:g} s each:")
        for name, port in ports.items():
            rate = asyncio.run(_throughput(port, small, args.seconds, 16))
            print(f"  {name:6} {rate:8.0f} requests/s")

        body = upload(25_000_000)
        before, peak = peak_rss_during(procs[1].pid, lambda: asyncio.run(_concurrent(ports["tap"], body, 64)))
        deadline = time.monotonic() + 120  # the record worker reads each header, then deletes the spool
        while any(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"\nMemory, 64 concurrent 25 MB uploads through the tap: RSS {before:.0f} MB before, "
              f"peak {peak:.0f} MB (+{peak - before:.0f} MB); spool files left once the records are "
              f"handled: {len(list(spool.iterdir()))}")
        print()
        for goal, ok in goals:
            print(f"  [{'met' if ok else 'MISSED'}] {goal}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-upstream":
        run_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 4 and sys.argv[1] == "--child-tap":
        run_tap(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
