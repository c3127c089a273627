"""What a SIGHUP that changes the tap section costs the clients calling the tap.

Starts `whisper-exporter` with the tap in front of a fake Whisper server, sends
uploads through the tap one after another without pause, and reloads
`--reloads` times, each with a changed tap section on the same address (a new
`max_transcript_chars`, so the tap is rebuilt). Counts the uploads answered,
refused (connection refused: no tap listening) and hung (no answer within 2 s),
and the span of refusals per reload. `--baseline DIR` runs the same against an
older checkout (its `whisper_exporter` first on the path) in the same run:

    git worktree add /tmp/base 32561a5
    python benchmarks/bench_reload.py --baseline /tmp/base
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_whisper import FakeWhisper  # noqa: E402
from helpers import free_port, wait_for  # noqa: E402


def run(checkout: Path, reloads: int, seconds: float) -> dict[str, object]:
    """One exporter from `checkout`, `reloads` reloads under traffic: what the clients saw."""
    folder = Path(tempfile.mkdtemp())
    with FakeWhisper() as server:
        port, tap = free_port(), free_port()

        def config(i: int) -> dict:
            return {"listen": f"127.0.0.1:{port}", "service": {"url": server.url},
                    "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                                   "probe": {"enabled": False},
                                   "tap": {"enabled": True, "listen": f"127.0.0.1:{tap}",
                                           "max_transcript_chars": 1000 + i}}}

        path = folder / "config.yml"
        path.write_text(yaml.safe_dump(config(0)))
        env = dict(os.environ, PYTHONPATH=str(checkout))
        proc = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(path)],
                                env=env, cwd=checkout, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{tap}/v1/audio/transcriptions"

        def upload() -> Optional[str]:
            try:
                requests.post(url, files={"file": ("a.wav", b"RIFF....WAVE")}, timeout=2)
                return None
            except requests.Timeout:
                return "hung"
            except requests.ConnectionError:
                return "refused"

        try:
            assert wait_for(lambda: upload() is None, timeout=30), "the tap never answered"
            counts = {"answered": 0, "refused": 0, "hung": 0}
            spans = []
            for i in range(1, reloads + 1):
                path.write_text(yaml.safe_dump(config(i)))
                proc.send_signal(signal.SIGHUP)
                began = time.monotonic()
                first = last = None
                while time.monotonic() - began < seconds:
                    outcome = upload()
                    counts[outcome or "answered"] += 1
                    if outcome == "refused":
                        now = time.monotonic()
                        first, last = first or now, now
                spans.append(0.0 if first is None or last is None else last - first)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {**counts, "median_span_ms": 1000 * statistics.median(spans), "max_span_ms": 1000 * max(spans)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="of traffic after each reload")
    parser.add_argument("--baseline", type=Path, default=None, help="an older checkout, run in the same run")
    args = parser.parse_args()
    runs = [("this checkout", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    results = {name: run(checkout, args.reloads, args.seconds) for name, checkout in runs}
    print(f"{args.reloads} reloads of the tap section, {args.seconds:g} s of back-to-back uploads after each")
    print(f"{'':14} {'answered':>9} {'refused':>8} {'hung':>5} {'refusal span median':>20} {'max':>9}")
    for name, r in results.items():
        print(f"{name:14} {r['answered']:>9} {r['refused']:>8} {r['hung']:>5} {r['median_span_ms']:>17.1f} ms"
              f" {r['max_span_ms']:>6.1f} ms")
    if args.baseline:
        new, old = results["this checkout"], results["baseline"]
        print(f"refused: {int(new['refused'])} vs {int(old['refused'])} "
              f"(ratio {int(new['refused']) / max(1, int(old['refused'])):.2f})")


if __name__ == "__main__":
    main()
