"""What the busy-time accounting (runtime/occupancy.py) costs a request, in the same run as without it.

    PYTHONPATH=.:tests python benchmarks/bench_capacity.py [requests]

1. The accounting alone: a begin() + end() pair against two no-op calls.
2. Through the tap: small transcription requests, interleaved, to one tap that counts busy time
   and one whose occupancy does nothing; p50 of each and the difference.
"""
from __future__ import annotations

import statistics
import sys
import time

import requests
from aiohttp import web
from tap_helpers import Upstream, wav_bytes

from whisper_exporter.runtime.occupancy import Occupancy
from whisper_exporter.tap import TapConfig
from whisper_exporter.tap.proxy import Tap


class NoOccupancy(Occupancy):
    """The same calls, counting nothing: the baseline."""

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


def per_pair(occ: Occupancy, n: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        occ.begin()
        occ.end()
    return (time.perf_counter() - start) / n


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 300
    counted, baseline = per_pair(Occupancy()), per_pair(NoOccupancy())
    print(f"begin+end: {counted * 1e9:.0f} ns, no-op calls {baseline * 1e9:.0f} ns: "
          f"+{(counted - baseline) * 1e9:.0f} ns per request")

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"text": "ok"})

    upstream = Upstream({"/v1/audio/transcriptions": answer})
    taps = {}
    for name, occ in (("counted", Occupancy()), ("without", NoOccupancy())):
        tap = Tap(TapConfig(enabled=True, listen="127.0.0.1:0"), upstream.url, lambda record: None, occupancy=occ)
        tap.start()
        taps[name] = tap
    body = wav_bytes(1.0)
    times: dict[str, list[float]] = {name: [] for name in taps}
    sessions = {name: requests.Session() for name in taps}
    for _ in range(n):
        for name, tap in taps.items():  # interleaved: drift in the machine's load hits both alike
            start = time.perf_counter()
            r = sessions[name].post(f"http://127.0.0.1:{tap.port}/v1/audio/transcriptions",
                                    files={"file": ("a.wav", body)}, timeout=30)
            times[name].append(time.perf_counter() - start)
            assert r.status_code == 200
    p50 = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"tap p50 over {n} requests: counted {p50['counted']:.3f} ms, without {p50['without']:.3f} ms "
          f"({p50['counted'] - p50['without']:+.3f} ms, ratio {p50['counted'] / p50['without']:.3f})")
    busy, _ = taps["counted"].occupancy.totals()
    print(f"busy seconds counted: {busy:.3f} of {sum(times['counted']):.3f} s of client time")
    for tap in taps.values():
        tap.stop()
    upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
