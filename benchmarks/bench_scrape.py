"""/metrics rendering at realistic and high cardinality, against prometheus_client's own path.

Ours: the log collector fed with request lines spanning L languages x E endpoints x
S status codes, rendered through the exporter's one custom Collector (families built
at scrape time from the collector's state), as /metrics does.
Baseline, same run, same series: prometheus_client's own instrumentation (a Counter
and Histograms with the same labels, buckets and observations) in a registry of
its own. Both rendered with `generate_latest` (text format) and, for the
realistic case, served over HTTP by each side's server.

    python benchmarks/bench_scrape.py [--rounds 200]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import requests
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_exporter.collectors.logs import (  # noqa: E402
    LogField,
    LogFile,
    LogsCollector,  # noqa: E402
    LogsConfig,
)
from whisper_exporter.config import from_dict  # noqa: E402
from whisper_exporter.runtime.exporter import ExporterCollector  # noqa: E402
from whisper_exporter.runtime.requests import AUDIO_BUCKETS, LATENCY_BUCKETS, RTF_BUCKETS  # noqa: E402
from whisper_exporter.runtime.scheduler import Scheduler  # noqa: E402
from whisper_exporter.web.server import make_app, serve  # noqa: E402

LANGUAGES = ["en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id",
             "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg",
             "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br",
             "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so",
             "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt",
             "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su", "yue"]
STATUS = [200, 400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504, 201, 204, 301, 302, 304, 409]


def request_lines(languages: int, endpoints: int, statuses: int) -> list[dict]:
    rng = random.Random(7)
    lines = []
    for lang, ep, status in itertools.product(LANGUAGES[:languages], range(endpoints), STATUS[:statuses]):
        for _ in range(3):
            audio = rng.uniform(1, 60)
            inference = audio * rng.uniform(0.05, 0.9)
            lines.append({"path": f"/v1/endpoint{ep}", "status": status, "language": lang,
                          "total_ms": inference * 1000 + 30, "inference_ms": inference * 1000, "audio_s": audio})
    return lines


def ours(lines: list[dict], languages: int, endpoints: int, statuses: int) -> tuple[CollectorRegistry, Scheduler]:
    tmp = Path(tempfile.mkdtemp()) / "requests.jsonl"
    tmp.write_text("")
    section = LogsConfig(
        enabled=True,
        files=[LogFile(path=str(tmp), format="json", fields={
            "endpoint": "path", "status_code": "status", "language": "language",
            "duration": LogField(field="total_ms", unit="ms"),
            "inference": LogField(field="inference_ms", unit="ms"),
            "audio_duration": LogField(field="audio_s", unit="s"),
        })],
        endpoints=[f"/v1/endpoint{i}" for i in range(endpoints)],
        status_codes=STATUS[:statuses],
        languages=LANGUAGES[:languages],
        max_series=1_000_000,
    )
    collector = LogsCollector(section)
    collector.feed(collector.sources[0], [json.dumps(line).encode() for line in lines])
    scheduler = Scheduler([(collector, 1.0, 1.0)])
    state = scheduler.entries[0][1]
    state.started, state.ok, state.runs = True, True, 1  # as after a successful run; no threads needed
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(scheduler))
    return registry, scheduler


def baseline(lines: list[dict]) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests_total = Counter("whisper_requests", "r", ["endpoint", "status_code", "language"], registry=registry)
    duration = Histogram("whisper_request_duration_seconds", "d", ["endpoint"], buckets=LATENCY_BUCKETS,
                         registry=registry)
    inference = Histogram("whisper_inference_duration_seconds", "i", ["language"], buckets=LATENCY_BUCKETS,
                          registry=registry)
    audio = Histogram("whisper_audio_duration_seconds", "a", ["language"], buckets=AUDIO_BUCKETS, registry=registry)
    rtf = Histogram("whisper_realtime_factor", "f", ["language"], buckets=RTF_BUCKETS, registry=registry)
    processed = Counter("whisper_audio_processed_seconds", "p", ["language"], registry=registry)
    for line in lines:
        requests_total.labels(line["path"], str(line["status"]), line["language"]).inc()
        duration.labels(line["path"]).observe(line["total_ms"] / 1000)
        inference.labels(line["language"]).observe(line["inference_ms"] / 1000)
        audio.labels(line["language"]).observe(line["audio_s"])
        rtf.labels(line["language"]).observe(line["inference_ms"] / 1000 / line["audio_s"])
        processed.labels(line["language"]).inc(line["audio_s"])
    return registry


def series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def timed(fn, rounds: int) -> tuple[float, float]:
    fn()  # warm
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    times.sort()
    return statistics.median(times) * 1000, times[max(0, int(len(times) * 0.99) - 1)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    disable_created_metrics()  # the baseline's *_created series have no counterpart in ours
    print(f"Python {sys.version.split()[0]}; {args.rounds} renders each (fewer at 25k); times in ms")
    print(f"{'case':46} {'series ours/base':>17} {'ours p50':>9} {'ours p99':>9} {'base p50':>9} {'base p99':>9} "
          f"{'p50 ratio':>9}")
    for name, (langs, eps, stats), rounds in (
        ("realistic (30 lang x 5 ep x 10 st)", (30, 5, 10), args.rounds),
        ("high (100 lang x 10 ep x 20 st)", (100, 10, 20), max(20, args.rounds // 10)),
    ):
        lines = request_lines(langs, eps, stats)
        our_registry, scheduler = ours(lines, langs, eps, stats)
        base_registry = baseline(lines)
        n_ours, n_base = series(generate_latest(our_registry)), series(generate_latest(base_registry))
        for gc_note in ("", " + gc.freeze"):
            if gc_note:
                gc.freeze()  # what the exporter's daemon does after start-up (helps both sides alike)
            o50, o99 = timed(lambda: generate_latest(our_registry), rounds)
            b50, b99 = timed(lambda: generate_latest(base_registry), rounds)
            print(f"{name + gc_note:46} {n_ours:>8}/{n_base:<8} {o50:9.2f} {o99:9.2f} {b50:9.2f} {b99:9.2f} "
                  f"{o50 / b50:8.2f}x")
        gc.unfreeze()
        if langs == 30:
            # The same, over HTTP: our server (asyncio, WSGI app in a pool) vs prometheus_client's start_http_server.
            config = from_dict({"listen": "127.0.0.1:0"})
            current = types.SimpleNamespace(config=config, scheduler=scheduler)
            server = serve("127.0.0.1", 0, make_app(current, our_registry))
            # start_http_server returns (server, thread) since prometheus_client 0.20.
            base_server, _ = start_http_server(0, addr="127.0.0.1", registry=base_registry) or (None, None)
            session = requests.Session()
            our_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
            base_url = f"http://127.0.0.1:{base_server.server_address[1]}/metrics" if base_server else None
            h50, h99 = timed(lambda: session.get(our_url).content, rounds)
            line = f"{'  over HTTP, same series':46} {'':17} {h50:9.2f} {h99:9.2f}"
            if base_url:
                c50, c99 = timed(lambda: session.get(base_url).content, rounds)
                line += f" {c50:9.2f} {c99:9.2f} {h50 / c50:8.2f}x"
            print(line)
            server.shutdown()
            server.server_close()
    print("goals: no slower than prometheus_client's own path; p99 < 20 ms at ~3,000 series")


if __name__ == "__main__":
    main()
