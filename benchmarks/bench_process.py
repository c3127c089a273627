"""Cost of the process collector's update() and families() on this machine.

Baseline, measured in the same run and interleaved with the collector: one bare
psutil.process_iter(['name', 'cmdline']) walk of the process table, the least any
pattern search has to do. Three ways of finding the server: the fallback pattern,
the listener on the server's port (the default; its pid is asked first, so the
whole socket table is walked only when it stops listening), and that cold walk
alone. Run: .venv/bin/python benchmarks/bench_process.py
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from whisper_exporter.collectors import process  # noqa: E402
from whisper_exporter.collectors.process import ProcessConfig  # noqa: E402

ROUNDS = int(__import__("os").environ.get("ROUNDS", "300"))
FAMILY_ROUNDS = 20000

# A stand-in server the default pattern matches: "faster-whisper" in its command
# line, three sleeping children. Started detached, so it is not the exporter's kin.
FAKE = ("import socket, subprocess, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[2]))); "
        "s.listen(); kids = [subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(120)']) for _ in range(3)]; time.sleep(120)")
LAUNCH = ("import subprocess, sys; D = subprocess.DEVNULL; print(subprocess.Popen(sys.argv[1:], "
          "start_new_session=True, stdin=D, stdout=D, stderr=D).pid)")


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def baseline() -> None:
    for _ in psutil.process_iter(["name", "cmdline"]):
        pass


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(label: str, collector, update=None) -> None:
    update = update or collector.update
    base, upd = [], []
    for _ in range(10):  # warm psutil's Process cache and the page cache
        baseline(), update()
    for _ in range(ROUNDS):
        base.append(timed(baseline))
        upd.append(timed(update))
    fam = []
    for _ in range(FAMILY_ROUNDS):
        t = time.perf_counter()
        list(collector.families())
        fam.append(time.perf_counter() - t)
    (bm, bp), (um, up), (fm, fp) = stats(base), stats(upd), stats(fam)
    print(f"{label}: {collector.status}")
    print(f"  baseline process_iter(['name','cmdline']): median {bm * 1e3:7.3f} ms  p99 {bp * 1e3:7.3f} ms")
    print(f"  update():                                  median {um * 1e3:7.3f} ms  p99 {up * 1e3:7.3f} ms"
          f"  ratio {um / bm:.2f}x (median) {up / bp:.2f}x (p99)")
    print(f"  families():                                median {fm * 1e6:7.1f} us  p99 {fp * 1e6:7.1f} us")


def main() -> None:
    print(f"{len(psutil.pids())} processes on this machine, {psutil.cpu_count()} CPUs, "
          f"psutil {psutil.__version__}, Python {sys.version.split()[0]}; {ROUNDS} rounds each")
    pattern = ProcessConfig(match=process.FALLBACK_PATTERN)
    collector = process.ProcessCollector(pattern)
    measure("fallback pattern, this machine as it is", collector)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-c", FAKE, "faster-whisper", str(port)],
                         capture_output=True, text=True, check=True)
    fake = psutil.Process(int(out.stdout))
    try:
        deadline = time.monotonic() + 10
        while len(fake.children()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the children finish starting Python
        measure("fallback pattern, plus a 4-process fake server", process.ProcessCollector(pattern))
        by_port = process.ProcessCollector(ProcessConfig(), port=port)
        measure(f"by port {port} (the default), the same server", by_port)
        measure("  cold: the whole socket table walked (first update, or after a restart)", by_port,
                update=lambda: process._listeners(port, frozenset()))
    finally:
        procs = [fake, *fake.children(recursive=True)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=5)


if __name__ == "__main__":
    main()
