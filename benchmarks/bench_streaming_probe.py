"""How well the streaming canaries measure, and what pacing costs.

1. Finalisation lag accuracy: a loopback Wyoming server (the framing of
   whisper/wyoming.py) answers `transcript` a known delay after `audio-stop`;
   the probe's lag against that delay, at pace 0 (unpaced) and 4.
2. Pacing: the end-to-end time of the bundled 4 s canary at pace 1, 2 and 4
   against the clip's length / pace, and the unpaced run as the baseline.
3. The real thing: the bundled canary against wyoming-faster-whisper (tiny.en,
   CPU) at pace 1: end to end, finalisation lag, WER, describe time.

    python benchmarks/bench_streaming_probe.py [--runs 5] [--no-real-server]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary  # noqa: E402
from whisper_exporter.config import from_dict  # noqa: E402
from whisper_exporter.whisper import wyoming  # noqa: E402

REFERENCE = bundled_canary().reference


def delayed_server(delay: float) -> tuple[str, socket.socket]:
    """A Wyoming server that answers every utterance `delay` seconds after its audio-stop."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        decoder = wyoming.Decoder()
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                for event in decoder.feed(chunk):
                    if event.type == "describe":
                        conn.sendall(wyoming.encode("info", {"asr": [{"name": "bench", "version": "0"}]}))
                    elif event.type == "audio-stop":
                        time.sleep(delay)
                        conn.sendall(wyoming.encode("transcript", {"text": REFERENCE}))

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}", sock


def records(url: str, pace: float, runs: int) -> list:
    config = from_dict({"service": {"url": url, "api": "wyoming"},
                        "collectors": {"probe": {"pace": pace, "canaries": [
                            {"name": "en", "audio": bundled_canary().audio, "reference": REFERENCE}]}}})
    collector = ProbeCollector(config.collectors.probe, config)
    out = []
    for _ in range(runs):
        collector.update()
        out.append(collector.recent_probes()["en"][0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-real-server", action="store_true")
    args = parser.parse_args()

    delay = 0.5
    url, sock = delayed_server(delay)
    try:
        for pace in (0.0, 4.0):
            lags = [r.stream.finalisation_lag for r in records(url, pace, args.runs)]
            errors = [abs(lag - delay) / delay for lag in lags]
            print(f"finalisation lag, server delay {delay:.3f} s, pace {pace:g}: median {statistics.median(lags):.4f} s, "
                  f"worst relative error {max(errors):.2%} over {len(lags)} runs")
        base = statistics.median(r.duration for r in records(url, 0.0, args.runs))
        print(f"end to end unpaced (baseline): median {base * 1000:.1f} ms")
        for pace in (1.0, 2.0, 4.0):
            rs = records(url, pace, max(2, args.runs // 2))
            audio = rs[0].stream.audio_seconds
            durations = [r.duration for r in rs]
            expected = audio / pace + delay  # the last chunk goes out once the whole clip is spoken
            print(f"end to end at pace {pace:g}: median {statistics.median(durations):.3f} s for {audio:.2f} s of audio; "
                  f"audio/pace + delay = {expected:.3f} s; ratio {statistics.median(durations) / expected:.4f}")
    finally:
        sock.close()

    if not args.no_real_server:
        import wyoming_server

        started = time.monotonic()
        server = wyoming_server.start_server()
        print(f"wyoming-faster-whisper tiny.en: ready in {time.monotonic() - started:.2f} s")
        try:
            rs = records(server.url, 1.0, args.runs)
            ok = [r for r in rs if r.success]
            print(f"bundled canary at pace 1, {len(rs)} probes: results {sorted({r.result for r in rs})}; "
                  f"end to end median {statistics.median(r.duration for r in rs):.3f} s; finalisation lag median "
                  f"{statistics.median(r.stream.finalisation_lag for r in ok):.3f} s; WER "
                  f"{statistics.median(r.error_rate for r in ok):.3f}")
            client = wyoming.WyomingClient(server.url, timeout=5)
            took = sorted(client.describe().elapsed for _ in range(20))
            print(f"describe: median {took[10] * 1000:.2f} ms, max {took[-1] * 1000:.2f} ms over 20")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
