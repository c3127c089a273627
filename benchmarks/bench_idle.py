"""Idle cost of the exporter with its default collectors, and /metrics latency.

Starts `whisper-exporter` (built-in defaults, its own port) and, as the baseline
in the same run, a bare prometheus_client server (`start_http_server` with the
library's default process/platform/gc metrics) - the least any Python exporter
costs. Measures, for each: CPU used while idle (scraped every 15 s as Prometheus
would), resident memory, and /metrics latency p50/p99 over many scrapes.
--compare runs another checkout's exporter (the code before a change) in the same
run, beside this one: `git archive COMMIT | tar -x -C /tmp/base`.

    python benchmarks/bench_idle.py [--seconds 60] [--scrapes 500] [--compare CHECKOUT]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import free_port  # noqa: E402

BASELINE = """
import time
from prometheus_client import start_http_server
start_http_server({port}, addr="127.0.0.1")
while True:
    time.sleep(3600)
"""


# The exporter of the checkout at `root`, on built-in defaults. collectors/ sits beside
# whisper_exporter/ in a checkout and is installed as whisper_exporter.collectors: the
# package's path gets the checkout, so each checkout runs its own collectors.
LAUNCH = """
import sys
sys.path.insert(0, {root!r})
import whisper_exporter
whisper_exporter.__path__.append({root!r})
from whisper_exporter.cli import main
sys.argv = ["whisper-exporter", "--listen", "127.0.0.1:{port}", "--log-level", "error"]
main()
"""


def exporter(root: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH.format(root=str(root.resolve()), port=port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def idle_cost(proc: psutil.Process, url: str, seconds: float) -> tuple[float, float]:
    """CPU share of one core and RSS (MB) over `seconds`, scraped every 15 s like Prometheus."""
    before = proc.cpu_times()
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        requests.get(url, timeout=5)
        time.sleep(min(15, max(0.0, seconds - (time.monotonic() - began))))
    after = proc.cpu_times()
    wall = time.monotonic() - began
    cpu = (after.user - before.user) + (after.system - before.system)
    return 100 * cpu / wall, proc.memory_info().rss / 1e6


def latency(url: str, scrapes: int) -> tuple[float, float, int]:
    session = requests.Session()
    times = []
    size = 0
    for _ in range(scrapes):
        began = time.perf_counter()
        response = session.get(url, timeout=5)
        times.append(time.perf_counter() - began)
        size = len(response.content)
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99) - 1] * 1000, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--compare", type=Path, default=None, help="also run the exporter of this checkout")
    args = parser.parse_args()

    ours_port, base_port, other_port = free_port(), free_port(), free_port()
    ours = exporter(ROOT, ours_port)
    base = subprocess.Popen([sys.executable, "-c", BASELINE.format(port=base_port)])
    other = exporter(args.compare, other_port) if args.compare else None
    runs = [("whisper-exporter", ours, ours_port), ("prometheus_client bare", base, base_port)]
    if other is not None:
        runs.append((f"compare: {args.compare}"[:24], other, other_port))
    try:
        for _, _, port in runs:
            wait_up(f"http://127.0.0.1:{port}/metrics")
        time.sleep(5)  # warm-up: first collector runs, imports settle
        rows = []
        for name, proc, port in runs:
            url = f"http://127.0.0.1:{port}/metrics"
            cpu, rss = idle_cost(psutil.Process(proc.pid), url, args.seconds)
            p50, p99, size = latency(url, args.scrapes)
            rows.append((name, cpu, rss, p50, p99, size))
        print(f"idle {args.seconds:.0f}s (one scrape per 15 s), then {args.scrapes} sequential scrapes; "
              f"{psutil.cpu_count()} cores, Python {sys.version.split()[0]}")
        print(f"{'':24} {'idle CPU %':>10} {'RSS MB':>8} {'p50 ms':>8} {'p99 ms':>8} {'bytes':>8}")
        for name, cpu, rss, p50, p99, size in rows:
            print(f"{name:24} {cpu:10.3f} {rss:8.1f} {p50:8.2f} {p99:8.2f} {size:8d}")
        (_, cpu_o, rss_o, p50_o, p99_o, _), (_, cpu_b, rss_b, p50_b, p99_b, _) = rows[:2]
        print(f"ratio ours/baseline: CPU {cpu_o / max(cpu_b, 1e-9):.2f}x, RSS {rss_o / rss_b:.2f}x, "
              f"p50 {p50_o / p50_b:.2f}x, p99 {p99_o / p99_b:.2f}x")
        if len(rows) > 2:
            _, cpu_c, rss_c, p50_c, p99_c, _ = rows[2]
            print(f"ratio ours/compare: CPU {cpu_o / max(cpu_c, 1e-9):.2f}x, RSS {rss_o / rss_c:.2f}x "
                  f"({rss_o - rss_c:+.1f} MB), p50 {p50_o / p50_c:.2f}x, p99 {p99_o / p99_c:.2f}x")
        print(f"goals: idle CPU < 0.5% -> {'met' if cpu_o < 0.5 else 'MISSED'}; "
              f"RSS < 60 MB -> {'met' if rss_o < 60 else 'MISSED'}")
    finally:
        for _, proc, _ in runs:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
