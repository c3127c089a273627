"""Reliability under load, with a real faster-whisper-server (tiny.en) and the real CLI.

    python benchmarks/bench_reliability.py storm [--seconds 60] [--scrapers 50]
    python benchmarks/bench_reliability.py soak  [--seconds 600]

storm: 50 concurrent scrapers for 60 s while every collector is busy (probe every 1 s,
       a log growing at 100 lines/s, the process collector on the server): failed scrapes
       and latency p50/p99; baseline in the same run: the same storm against the exporter
       with nothing to do (its collectors idle), so the ratio shows what busy costs.
soak:  10 minutes of a growing log, probes every 2 s and one scrape a second: the
       exporter's resident memory after warm-up (first minute) and at the end.
Loopback only; every loop is bounded in time.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from busy import busy_exporter, metric, scrape_storm  # noqa: E402
from whisper_server import start_server  # noqa: E402


def storm(args: argparse.Namespace, server, workdir: Path) -> None:
    match = re.escape(str(server.workdir))
    rows = []
    for name, url, interval, rate in (("busy", server.url, "1s", 100), ("idle baseline", "http://127.0.0.1:9", "1h", 0.001)):
        with busy_exporter(workdir / name, url, match, probe_interval=interval, log_rate=rate) as busy:
            time.sleep(3)
            result = scrape_storm(busy.url, scrapers=args.scrapers, seconds=args.seconds)
            probes = metric(busy.url, "whisper_probe_runs_total", result="success") if rate > 1 else 0
            rows.append((name, result, probes, busy.written[0]))
    print(f"{args.scrapers} concurrent scrapers for {args.seconds:g} s each")
    print(f"{'exporter':15} {'scrapes':>8} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'probes ok':>9} {'log lines':>9}")
    for name, r, probes, lines in rows:
        print(f"{name:15} {r.scrapes:8d} {len(r.failures):7d} {r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.max_ms:8.1f} "
              f"{probes:9.0f} {lines:9d}")
    busy, idle = rows[0][1], rows[1][1]
    print(f"busy/idle: p50 {busy.p50_ms / idle.p50_ms:.2f}x, p99 {busy.p99_ms / idle.p99_ms:.2f}x; "
          f"failed scrapes: {len(busy.failures)} (goal 0)")


def soak(args: argparse.Namespace, server, workdir: Path) -> None:
    import requests

    match = re.escape(str(server.workdir))
    with busy_exporter(workdir / "soak", server.url, match, probe_interval="2s", log_rate=100) as busy:
        proc = psutil.Process(busy.proc.pid)
        session = requests.Session()
        began = time.monotonic()
        samples = []
        failures = 0
        while (elapsed := time.monotonic() - began) < args.seconds:
            if session.get(busy.url + "/metrics", timeout=10).status_code != 200:
                failures += 1
            if not samples or elapsed - samples[-1][0] >= 30:
                samples.append((elapsed, proc.memory_info().rss / 1e6))
            time.sleep(1)
        samples.append((time.monotonic() - began, proc.memory_info().rss / 1e6))
        probes = metric(busy.url, "whisper_probe_runs_total", result="success")
        lines = busy.written[0]
    warm = next(rss for t, rss in samples if t >= 60)
    end = samples[-1][1]
    print(f"soak {args.seconds:g} s: log lines written {lines}, successful probes {probes:.0f}, "
          f"failed scrapes {failures}")
    print("RSS MB over time: " + ", ".join(f"{t:.0f}s {rss:.1f}" for t, rss in samples))
    print(f"RSS after warm-up (60 s) {warm:.1f} MB, at the end {end:.1f} MB: growth {end - warm:+.1f} MB "
          f"(goal < 5 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["storm", "soak"])
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--scrapers", type=int, default=50)
    args = parser.parse_args()
    args.seconds = args.seconds or (60 if args.mode == "storm" else 600)
    workdir = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    server = start_server(workdir / "server")
    try:
        (storm if args.mode == "storm" else soak)(args, server, workdir)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
