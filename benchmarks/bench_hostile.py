"""What a hostile answer under the 8 MiB body cap costs: peak memory and time to parse and score it.

    .venv/bin/python benchmarks/bench_hostile.py

Each answer is parsed by the client and scored against the canary's reference, as a probe does,
in a fresh process (peak RSS is per process). "bounded" is the code as shipped; "unbounded" is
the same code with the answer bounds lifted (clients.MAX_*), which is how it behaved before
them (issue 12). The unbounded cases take minutes on a busy 2-core machine.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

REFERENCE = "Please call Stella. Ask her to bring these things with her from the store."
ANSWERS = {
    "normal verbose_json": lambda: json.dumps({"text": REFERENCE, "segments": [
        {"text": REFERENCE, "start": 0, "end": 4, "avg_logprob": -0.2}]}).encode(),
    "2.79 M empty segments": lambda: b'{"text": "hi", "segments": [' + b",".join([b"{}"] * 2_790_000) + b"]}",
    "7.8 MB transcript": lambda: b'{"text": "' + b"hello " * 1_300_000 + b'"}',
    "JSON nested 200k deep": lambda: b'{"text": "hi", "segments": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
}


def child(name: str, bounded: bool) -> None:
    from whisper_exporter.whisper import clients, scoring

    if not bounded:
        clients.MAX_JSON_CONTAINERS = clients.MAX_JSON_VALUES = clients.MAX_SEGMENTS = 10**12
        clients.MAX_TEXT_CHARS = 10**12
    body = ANSWERS[name]()
    scoring.score(REFERENCE, REFERENCE, "en")  # normaliser loaded before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        t = clients.OpenAIClient("http://unused")._parse(body, "application/json")
        scoring.score(REFERENCE, t.text, "en")
        outcome = f"success, {len(t.segments)} segments"
    except clients._BadResponse:
        outcome = "bad_response"
    except RecursionError:
        outcome = "RecursionError (collector down)"
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "seconds": took, "peak_mb": peak / 1024, "added_mb": (peak - base) / 1024}))


def main() -> None:
    print(f"{'answer':<24} {'mode':<10} {'outcome':<34} {'time':>8} {'peak RSS':>9} {'added':>8}")
    for name in ANSWERS:
        rows = {}
        for bounded in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", name, str(bounded)],
                                 capture_output=True, text=True, check=True).stdout
            rows[bounded] = r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:<24} {'bounded' if bounded else 'unbounded':<10} {r['outcome']:<34} "
                  f"{r['seconds'] * 1000:>6.0f}ms {r['peak_mb']:>7.0f}MB {r['added_mb']:>6.0f}MB")
        if rows[True]["added_mb"] > 1:
            print(f"{'':<24} memory added, unbounded / bounded: {rows[False]['added_mb'] / rows[True]['added_mb']:.0f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "True")
    else:
        main()
