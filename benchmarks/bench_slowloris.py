"""Slowloris against the exporter under `ulimit -n 1024` (systemd's default soft limit).

    python benchmarks/bench_slowloris.py [--seconds 20] [--connections 1100] [--pythonpath CHECKOUT]

The exporter (the real CLI, process collector on) is scraped like Prometheus does (a new
connection a second, 10 s timeout), first with nothing else going on (the baseline, in the
same run), then while an attacker holds --connections connections whose request head never
ends (reopening those the server closes) plus one that drips a byte a second. Prints answered
scrapes, latency p50/p99 and their ratio to the baseline, and the exporter's peak threads,
descriptors and resident memory. --pythonpath runs another checkout (e.g. the previous
release's, to see the attack it answers).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slowloris import Drip, Slowloris, exporter_under_fd_limit, raise_own_fd_limit, scrape_like_prometheus  # noqa: E402


def measure(exporter, seconds: float, attack: bool, connections: int) -> dict:
    peak = {"threads": 0, "fds": 0, "rss": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                ps = exporter.ps
                peak["threads"] = max(peak["threads"], ps.num_threads())
                peak["fds"] = max(peak["fds"], ps.num_fds())
                peak["rss"] = max(peak["rss"], ps.memory_info().rss)
            except Exception:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    attacker = Slowloris(exporter.port, count=connections).start() if attack else None
    drip = Drip(exporter.port, every=1.0, nbytes=int(seconds) + 20).start() if attack else None
    try:
        scrapes = scrape_like_prometheus(exporter.url, seconds=seconds)
    finally:
        stop.set()
        watcher.join()
        if attacker is not None:
            attacker.stop()
    return {"scrapes": scrapes, "peak": peak, "opened": attacker.opened if attacker else 0,
            "drip": drip.closed_after if drip else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--pythonpath", default=None, help="run the exporter from this checkout")
    args = parser.parse_args()
    raise_own_fd_limit(4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with exporter_under_fd_limit(Path(tmp), args.pythonpath) as exporter:
            rows.append(("baseline", measure(exporter, args.seconds, False, 0)))
            rows.append((f"{args.connections} half-open + 1 drip", measure(exporter, args.seconds, True,
                                                                           args.connections)))
            after = scrape_like_prometheus(exporter.url, seconds=3)
    print(f"exporter under ulimit -n 1024; one Prometheus-style scrape a second for {args.seconds:g} s each"
          + (f"; checkout {args.pythonpath}" if args.pythonpath else ""))
    print(f"{'':28} {'answered':>9} {'p50 ms':>8} {'p99 ms':>8} {'threads':>8} {'fds':>5} {'RSS MB':>7} "
          f"{'attacker conns':>14} {'drip cut after':>14}")
    for name, r in rows:
        s = r["scrapes"]
        total = len(s.latencies) + len(s.failures)
        drip = f"{r['drip']:.1f} s" if r["drip"] is not None else ("-" if name == "baseline" else "never")
        print(f"{name:28} {len(s.latencies):>4}/{total:<4} {s.percentile(50) * 1000:8.1f} "
              f"{s.percentile(99) * 1000:8.1f} {r['peak']['threads']:8d} {r['peak']['fds']:5d} "
              f"{r['peak']['rss'] / 2**20:7.1f} {r['opened']:14d} {drip:>14}")
    base, attack = rows[0][1]["scrapes"], rows[1][1]["scrapes"]
    if attack.latencies and base.latencies:
        print(f"under attack / baseline: p50 {attack.percentile(50) / base.percentile(50):.2f}x, "
              f"p99 {attack.percentile(99) / base.percentile(99):.2f}x; failed scrapes under attack: "
              f"{len(attack.failures)} (goal 0)")
    print(f"after the attack: {len(after.latencies)}/{len(after.latencies) + len(after.failures)} answered")


if __name__ == "__main__":
    main()
