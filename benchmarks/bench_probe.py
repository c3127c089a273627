"""What the canary probe costs and how well it measures.

1. Measurement overhead: probes of a local server that answers after an
   injected delay (0 and 1 s); the probe's duration minus the delay is what the
   probe adds (multipart upload of the 128 KB canary, connection, parsing).
2. Exporter-side cost per probe: scoring (Whisper normaliser + jiwer) and
   rendering the probe's metric families at scrape time.
3. The real thing: the bundled canary against faster-whisper-server (tiny.en,
   CPU, int8, temperature 0): duration and real-time factor over N probes.

    python benchmarks/bench_probe.py [--probes 10] [--no-real-server]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_whisper import FakeWhisper  # noqa: E402

from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary  # noqa: E402
from whisper_exporter.config import from_dict  # noqa: E402
from whisper_exporter.whisper import scoring  # noqa: E402

REFERENCE = bundled_canary().reference


def probes(url: str, model: str, n: int) -> list:
    config = from_dict({"service": {"url": url, "model": model}})
    collector = ProbeCollector(config.collectors.probe, config)
    records = []
    for _ in range(n):
        collector.update()
        records.append(collector.recent_probes()["en-short"][0])
    return records, collector


def ms(values) -> str:
    return f"median {statistics.median(values) * 1000:.2f} ms, max {max(values) * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--no-real-server", action="store_true")
    args = parser.parse_args()

    server = FakeWhisper(text=REFERENCE)
    for injected in (0.0, 1.0):
        server.delay = injected
        records, collector = probes(server.url, "tiny", args.probes)
        overhead = [r.duration - injected for r in records]
        worst = max(abs(o) / injected for o in overhead) if injected else None
        print(f"injected delay {injected:.1f} s: probe overhead {ms(overhead)}"
              + (f"; worst relative error {worst * 100:.2f}%" if worst is not None else ""))
    server.close()

    started = time.perf_counter()
    for _ in range(200):
        scoring.score(REFERENCE, "Please call Stella and ask her to bring these things with her from the shop.", "en")
    print(f"scoring one canary transcript (normalise both + jiwer): {(time.perf_counter() - started) / 200 * 1e6:.0f} us")
    started = time.perf_counter()
    for _ in range(1000):
        list(collector.families())
    print(f"rendering the probe collector's families at scrape time: {(time.perf_counter() - started) / 1000 * 1e6:.0f} us")

    if args.no_real_server:
        return
    from whisper_server import start_server

    real = start_server()
    try:
        records, _ = probes(real.url, real.model, args.probes + 1)
        records = records[1:]  # the first request warms the model up
        print(f"faster-whisper-server tiny.en (CPU, int8), bundled canary {records[0].audio_duration:.2f} s, "
              f"{len(records)} probes: duration {ms([r.duration for r in records])}; "
              f"RTF median {statistics.median(r.realtime_factor for r in records):.3f}; "
              f"results {sorted({r.result for r in records})}; WER {records[0].error_rate:.3f}")
    finally:
        real.stop()


if __name__ == "__main__":
    main()
