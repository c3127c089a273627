"""Cost of WebSocket through the tap: added latency per message against a direct connection and nginx.

An aiohttp echo upstream, the tap (TapCollector: relay and realtime parsing) and nginx (Debian
`nginx`, one worker, `proxy_http_version 1.1` with the Upgrade headers passed: the usual
WebSocket proxy setup) in front of it, each in its own process, measured in the same run:
1. Added latency: sequential round trips (send, wait for the echo) on one session per target,
   round-robin between the targets, for a 200-byte OpenAI Realtime append event, a 64 KB
   binary frame (2 s of 16 kHz float32, WhisperLive's kind) and a 1 MB text message; p50 and
   p99 of each minus direct's, and the tap's CPU time per message.
2. Memory: the tap's RSS while a client floods 1 MB binary frames for --seconds at an upstream
   that reads one a second: bounded by the socket buffers, not by what the client sends.

    python benchmarks/bench_tap_websocket.py [--n 400] [--seconds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def run_upstream(port: int) -> None:
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 25)
        await ws.prepare(request)
        slow = request.path == "/slow"
        async for msg in ws:
            if slow:
                await asyncio.sleep(1.0)
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_tap(port: int, upstream: str) -> None:
    sys.path.insert(0, str(ROOT))
    import whisper_exporter.runtime.collector  # noqa: F401  (the collectors' sections)
    from whisper_exporter.collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    col = TapCollector(TapConfig(enabled=True, listen=f"127.0.0.1:{port}"), upstream)
    col.start()
    while True:
        time.sleep(3600)


NGINX = """
worker_processes 1; daemon off; error_log {folder}/error.log; pid {folder}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {folder}; proxy_temp_path {folder};
  fastcgi_temp_path {folder}; uwsgi_temp_path {folder}; scgi_temp_path {folder};
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h;
    }}
  }}
}}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(ports: dict[str, int], messages: dict[str, object], n: int) -> dict:
    import aiohttp

    out: dict = {(t, m): [] for t in ports for m in messages}
    async with aiohttp.ClientSession() as client:
        sessions = {t: await client.ws_connect(f"http://127.0.0.1:{p}/echo", max_msg_size=1 << 25)
                    for t, p in ports.items()}
        for name, message in messages.items():
            for i in range(n + 20):
                for target, ws in sessions.items():
                    began = time.perf_counter()
                    await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
                    await ws.receive()
                    if i >= 20:  # warm-up
                        out[(target, name)].append(time.perf_counter() - began)
        for ws in sessions.values():
            await ws.close()
    return out


async def flood(port: int, seconds: float) -> int:
    import aiohttp

    sent = 0
    frame = bytes(1 << 20)
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(f"http://127.0.0.1:{port}/slow", max_msg_size=1 << 25) as ws:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    await asyncio.wait_for(ws.send_bytes(frame), timeout=max(0.01, end - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                sent += 1
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--child-upstream", type=int)
    parser.add_argument("--child-tap", nargs=2)
    args = parser.parse_args()
    if args.child_upstream:
        return run_upstream(args.child_upstream)
    if args.child_tap:
        return run_tap(int(args.child_tap[0]), args.child_tap[1])
    me = [sys.executable, __file__]
    up_port, tap_port = free_port(), free_port()
    procs = [subprocess.Popen(me + ["--child-upstream", str(up_port)])]
    wait_port(up_port)
    tap = subprocess.Popen(me + ["--child-tap", str(tap_port), f"http://127.0.0.1:{up_port}"])
    procs.append(tap)
    ports = {"direct": up_port, "tap": tap_port}
    folder = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    if shutil.which("nginx"):
        ports["nginx"] = free_port()
        (folder / "nginx.conf").write_text(NGINX.format(folder=folder, port=ports["nginx"], upstream=up_port))
        procs.append(subprocess.Popen(["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)],
                                      stderr=subprocess.DEVNULL))
    try:
        for port in ports.values():
            wait_port(port)
        append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(96)).decode()})
        messages = {"append 200 B": append, "binary 64 KB": bytes(65536),
                    "text 1 MB": json.dumps({"type": "input_audio_buffer.append",
                                             "audio": base64.b64encode(bytes(786000)).decode()})}
        ps = psutil.Process(tap.pid)
        cpu0 = sum(ps.cpu_times()[:2])
        result = asyncio.run(latencies(ports, messages, args.n))
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        print(f"1. added latency per message round trip, {args.n} each (ms; direct's own in brackets)")
        for name in messages:
            base50, base99 = pct(result[("direct", name)], 0.5), pct(result[("direct", name)], 0.99)
            line = [f"   {name:13s} [p50 {base50 * 1e3:.3f}, p99 {base99 * 1e3:.3f}]"]
            for target in ports:
                if target != "direct":
                    got = result[(target, name)]
                    line.append(f"{target}: +{(pct(got, 0.5) - base50) * 1e3:.3f} p50, "
                                f"+{(pct(got, 0.99) - base99) * 1e3:.3f} p99")
            print("  ".join(line))
        print(f"   tap CPU: {cpu / (args.n + 20) / len(messages) * 1e3:.3f} ms per round trip (two messages)")
        rss0 = ps.memory_info().rss
        peak = [rss0]

        async def watched() -> int:
            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], ps.memory_info().rss)
                    await asyncio.sleep(0.1)
            watcher = asyncio.ensure_future(watch())
            try:
                return await flood(tap_port, args.seconds)
            finally:
                watcher.cancel()
        sent = asyncio.run(watched())
        print(f"2. flood: the client got {sent} MB out in {args.seconds:.0f} s to an upstream reading 1 MB/s; "
              f"tap RSS {rss0 / 2**20:.1f} MB -> peak {peak[0] / 2**20:.1f} MB (+{(peak[0] - rss0) / 2**20:.1f})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
