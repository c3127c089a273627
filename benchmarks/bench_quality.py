"""What the quality collector costs, and whether it keeps to its share of the server.

1. Log hot path: lines per second through the log collector with and without
   production sampling (json lines carrying audio path and transcript, 1%).
2. Manifest: loading a 5,000-line manifest (every audio header read) and
   drawing a stratified sample from it.
3. Scoring: Whisper normaliser + jiwer per utterance, English words and
   Mandarin characters; and with the punctuation error rate beside it.
4. The real thing (unless --no-real-server): the quality collector against
   faster-whisper-server (tiny.en, CPU) on the labeled test set with
   max_server_share 0.5: the share of the run's wall time with a request in
   flight, measured.

    python benchmarks/bench_quality.py [--no-real-server]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from whisper_exporter.collectors.logs import LogsCollector  # noqa: E402
from whisper_exporter.collectors.quality import QualityCollector  # noqa: E402
from whisper_exporter.config import from_dict  # noqa: E402
from whisper_exporter.quality import manifest as mf  # noqa: E402
from whisper_exporter.quality.sampling import ProductionSampler, ReviewQueue, StratifiedSampler  # noqa: E402
from whisper_exporter.whisper import punctuation, scoring  # noqa: E402


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def log_hot_path(tmp: Path) -> None:
    fields = {"endpoint": "path", "status_code": "status", "language": "language",
              "audio_duration": "audio_seconds", "audio_path": "audio", "transcript": "text"}
    section = from_dict({"collectors": {"logs": {"files": [
        {"path": str(tmp / "none.log"), "format": "json", "fields": fields}]}}}).collectors.logs
    lines = [json.dumps({"path": "/v1/audio/transcriptions", "status": 200, "language": ("en", "zh", "yue")[n % 3],
                         "audio_seconds": 1.0 + n % 50, "audio": f"/srv/uploads/{n}.wav",
                         "text": "the quick brown fox jumps over the lazy dog " * 3}).encode()
             for n in range(50_000)]
    for label, sampler in (("without sampling", None),
                           ("with sampling 1%", lambda: ProductionSampler(
                               ReviewQueue(str(tmp / f"queue-{time.monotonic_ns()}.jsonl"), 10**6), 0.01))):
        def run():
            collector = LogsCollector(section, sampler=sampler() if sampler else None)
            collector.feed(collector.sources[0], lines)
        seconds = best_of(run, 3)
        print(f"  {label:<18} {len(lines) / seconds:>10,.0f} lines/s  ({seconds / len(lines) * 1e6:.2f} us/line)")


def manifest_and_sampling(tmp: Path) -> None:
    audio = tmp / "a.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    path = tmp / "big.jsonl"
    with open(path, "w") as f:
        for n in range(5000):
            f.write(json.dumps({"id": f"u{n}", "audio": "a.wav", "reference": "the quick brown fox jumps",
                                "language": ("en", "de", "zh", "yue", "fr")[n % 5],
                                "audio_quality": ("clean", "noisy")[n % 2], "source": f"s{n % 7}"}) + "\n")
    holder = {}
    seconds = best_of(lambda: holder.setdefault("m", mf.load(path)), 3)
    items = mf.load(path).items
    print(f"  load 5,000 lines (audio headers read): {seconds * 1000:.0f} ms ({seconds / 5000 * 1e6:.0f} us/line)")
    sampler = StratifiedSampler()
    seconds = best_of(lambda: sampler.sample(items, 50), 5)
    print(f"  stratified sample of 50 from 5,000 items ({len({i.cell for i in items})} cells): {seconds * 1000:.1f} ms")


def scoring_cost() -> None:
    en_ref = "Please call Stella and ask her to bring these things with her from the store."
    en_hyp = "Please call Stella, ask her to bring these things with her from the store"
    zh_ref, zh_hyp = "我们明天早上八点在学校门口见面。", "我们明天早上八点在学校门口见"
    scoring.score(en_ref, en_hyp, "en")  # load the normalisers
    for label, args in (("en (15 words)", (en_ref, en_hyp, "en")), ("zh (15 chars)", (zh_ref, zh_hyp, "zh"))):
        n = 2000
        seconds = best_of(lambda: [scoring.score(*args) for _ in range(n)], 3)
        # What punctuation scoring adds where the reference keeps its marks (docs/quality.md, PER).
        both = best_of(lambda: [(scoring.score(*args), punctuation.score(args[0], args[1])) for _ in range(n)], 3)
        print(f"  score {label}: {seconds / n * 1e6:.0f} us/utterance; with PER {both / n * 1e6:.0f} us "
              f"({both / seconds:.2f}x)")


def real_server(tmp: Path) -> None:
    from importlib.util import module_from_spec, spec_from_file_location

    from whisper_server import start_server

    spec = spec_from_file_location("make_set", ROOT / "tests" / "data" / "quality" / "make_set.py")
    make_set = module_from_spec(spec)
    spec.loader.exec_module(make_set)
    manifest = make_set.build(tmp / "set")
    server = start_server(tmp / "server")
    try:
        for share in (1.0, 0.5):
            config = from_dict({"service": {"url": server.url, "model": server.model},
                                "collectors": {"probe": {"enabled": False}, "quality": {
                                    "enabled": True, "manifest": str(manifest), "per_run": 8,
                                    "max_server_share": share}}})
            collector = QualityCollector(config.collectors.quality, config)
            started = time.monotonic()
            collector.update()
            wall = time.monotonic() - started
            busy = sum(r.elapsed for r in collector.last_round())
            print(f"  max_server_share {share:g}: {len(collector.last_round())} utterances, busy {busy:.1f} s "
                  f"of {wall:.1f} s wall = {busy / wall:.0%} "
                  f"(steady state, with the pause before the next run's first request: "
                  f"{busy / (wall + collector.last_round()[-1].elapsed * (1 - share) / share):.0%})")
            collector.stop()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-real-server", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("1. Log collector hot path, 50,000 JSON lines with audio path and transcript")
        log_hot_path(tmp)
        print("2. Manifest and sampling")
        manifest_and_sampling(tmp)
        print("3. Scoring")
        scoring_cost()
        if not args.no_real_server:
            print("4. faster-whisper-server (tiny.en, CPU), 8 utterances of the labeled set per run")
            real_server(tmp)


if __name__ == "__main__":
    main()
