"""curl's uploads over 1 MB through the tap against direct: does `Expect: 100-continue` cost a second?

curl sends `Expect: 100-continue` with bodies over 1 MB and waits up to 1 s for the
interim answer before sending the body anyway. An aiohttp upstream (its router answers
100-continue at once) and the tap in front of it, in this process; `curl -F file=@2MB.wav`
run alternately direct and through the tap. Prints each side's median wall time and the
ratio tap / direct from the same run.

    python benchmarks/bench_tap_expect.py [--n 10] [--pythonpath OLD_CHECKOUT]

--pythonpath imports the tap from another checkout (the code before a change), the rest
of the run unchanged.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="uploads each way")
    parser.add_argument("--pythonpath", help="import whisper_exporter from this checkout instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, args.pythonpath or str(ROOT))
    from aiohttp import web
    from tap_helpers import Records, Upstream, wav_bytes

    from whisper_exporter.tap import TapConfig
    from whisper_exporter.tap.proxy import Tap

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"text": "ok"})

    curl = shutil.which("curl")
    if curl is None:
        sys.exit("curl is needed")
    upstream = Upstream({"/v1/audio/transcriptions": answer})
    tap = Tap(TapConfig(enabled=True, listen="127.0.0.1:0"), upstream.url, Records())
    tap.start()
    times: dict[str, list[float]] = {"direct": [], "tap": []}
    with tempfile.TemporaryDirectory() as folder:
        audio = Path(folder) / "upload.wav"
        audio.write_bytes(wav_bytes(64.0))  # 2 MB
        urls = {"direct": upstream.url, "tap": f"http://127.0.0.1:{tap.port}"}
        try:
            for _ in range(args.n):
                for side, base in urls.items():
                    t0 = time.perf_counter()
                    subprocess.run([curl, "-sS", "-o", "/dev/null", "-F", f"file=@{audio}",
                                    f"{base}/v1/audio/transcriptions"], check=True, timeout=60)
                    times[side].append(time.perf_counter() - t0)
        finally:
            tap.stop()
            upstream.stop()
    direct, through = statistics.median(times["direct"]), statistics.median(times["tap"])
    print(f"2 MB curl uploads, {args.n} each way, tap from {args.pythonpath or ROOT}")
    print(f"  direct median {direct * 1000:.1f} ms, tap median {through * 1000:.1f} ms, "
          f"tap / direct {through / direct:.1f}x")


if __name__ == "__main__":
    main()
