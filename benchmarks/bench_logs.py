"""Cost of the log collector: throughput against mtail and the bare JSON decoders, and idle-ish CPU.

1. Throughput on a generated 200,000-line JSON request log (the json-request preset's
   format), in lines per CPU-second of process time (user + system, not wall), each
   contender in a fresh child process in the same run:
     - whisper-exporter's log path: follow (read, split) + parse + aggregate into the
       design's counters and histograms, with orjson and with the standard json module;
     - mtail (Debian package `mtail`) running an equivalent program (one regular
       expression over the same lines, the same counters and histograms with the same
       buckets) with --one_shot;
     - json.loads / orjson.loads alone on the same lines: the ceiling for a Python parser.
   Peak resident memory of each child is shown as well.
2. CPU of the running exporter (only the logs collector enabled, scraped every 15 s as
   Prometheus would) while its log grows at 100 lines/s, against the same exporter with
   no writes, over --seconds (30 by default).

    python benchmarks/bench_logs.py [--lines 200000] [--seconds 30] [--rate 100]

mtail is needed only here (apt-get install mtail); it is skipped with a note when absent.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from helpers import free_port  # noqa: E402

LANGS = ["en"] * 40 + ["zh"] * 15 + ["de"] * 8 + ["es"] * 8 + ["fr"] * 6 + ["ja"] * 5 + ["yue"] * 4 + \
    ["ko", "pt", "ru", "it", "nl", "ar", "hi", "tr", "pl", "sv", "uk", "vi", "th", "id"]
PATHS = ["/v1/audio/transcriptions"] * 18 + ["/v1/audio/translations", "/v1/audio/transcriptions?stream=false"]
STATUSES = [200] * 90 + [400, 400, 422, 429, 429, 500, 500, 503, 413, 408]
MODELS = ["large-v3", "large-v3", "large-v3", "medium", "small"]


def generate(path: Path, n: int, seed: int = 7) -> None:
    """A JSON request log: one object per line with a fixed key order, ~300 bytes a line."""
    rng = random.Random(seed)
    t = 1_760_000_000.0
    with open(path, "w") as f:
        for _ in range(n):
            audio = round(rng.lognormvariate(2.2, 0.9), 3)
            inference = round(audio * rng.uniform(0.03, 0.4) * 1000, 2)
            queue = round(rng.expovariate(1 / 40.0), 2)
            total = round(inference + queue + rng.uniform(5, 60), 2)
            t += rng.expovariate(50.0)
            f.write(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z",
                "level": "INFO", "msg": "request", "request_id": f"{rng.getrandbits(64):016x}",
                "method": "POST", "path": rng.choice(PATHS), "status": rng.choice(STATUSES),
                "language": rng.choice(LANGS), "duration_ms": total, "queue_ms": queue,
                "inference_ms": inference, "audio_seconds": audio, "model": rng.choice(MODELS),
            }, separators=(",", ":")) + "\n")


# The mtail program: the same metrics and buckets as collectors/logs.py, from one regex.
MTAIL_PROG = r"""
counter whisper_requests_total by endpoint, status_code, language
histogram whisper_request_duration_seconds by endpoint buckets {lat}
histogram whisper_queue_wait_seconds buckets {queue}
histogram whisper_inference_duration_seconds by language buckets {lat}
histogram whisper_audio_duration_seconds by language buckets {audio}
counter whisper_audio_processed_seconds_total by language
histogram whisper_realtime_factor by language buckets {rtf}

/"path":"(?P<path>[^"?]*)[^"]*","status":(?P<status>\d+),"language":"(?P<language>[^"]*)","duration_ms":(?P<duration>[0-9.eE+-]+),"queue_ms":(?P<queue>[0-9.eE+-]+),"inference_ms":(?P<inference>[0-9.eE+-]+),"audio_seconds":(?P<audio>[0-9.eE+-]+)/ {{
  whisper_requests_total[$path][$status][$language]++
  whisper_request_duration_seconds[$path] = float($duration) / 1000.0
  whisper_queue_wait_seconds = float($queue) / 1000.0
  whisper_inference_duration_seconds[$language] = float($inference) / 1000.0
  whisper_audio_duration_seconds[$language] = float($audio)
  whisper_audio_processed_seconds_total[$language] += float($audio)
  float($audio) > 0 {{
    whisper_realtime_factor[$language] = float($inference) / 1000.0 / float($audio)
  }}
}}
"""


def run_child(args: list[str]) -> dict:
    """Run a child, return its JSON answer plus its own CPU time and peak RSS (os.wait4)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:3]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1]) if args[0] == sys.executable else {}
    except (IndexError, ValueError):
        answer = {}
    answer.setdefault("cpu", usage.ru_utime + usage.ru_stime)
    answer["child_cpu"] = usage.ru_utime + usage.ru_stime
    answer["maxrss_mb"] = usage.ru_maxrss / 1024
    answer["stdout"] = out
    return answer


def worker(kind: str, path: str) -> None:
    """In a child: measure one contender, print JSON {lines, cpu}."""
    from whisper_exporter.logfiles import parse as logparse

    if kind in ("json", "orjson"):
        loads = json.loads if kind == "json" else __import__("orjson").loads
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
        start = time.process_time()
        for line in lines:
            loads(line)
        cpu = time.process_time() - start
        print(json.dumps({"lines": len(lines), "cpu": cpu}))
        return
    if kind == "ours-json":
        logparse._loads = json.loads
    from whisper_exporter.collectors.logs import LogsCollector
    from whisper_exporter.config import from_dict

    config = from_dict({"collectors": {"logs": {
        "enabled": True, "start_at": "beginning", "timeout": "1h",
        "files": [{"path": path, "format": "json-request"}]}}})
    start = time.process_time()
    collector = LogsCollector(config.collectors.logs)  # reads from the beginning: priming
    collector.update()
    families = list(collector.families())
    cpu = time.process_time() - start
    lines = collector.sources[0].follower.lines
    requests = sum(s.value for f in families if f.name == "whisper_requests" for s in f.samples)
    errors = sum(collector.sources[0].errors.values())
    print(json.dumps({"lines": lines, "cpu": cpu, "requests": requests, "errors": errors}))


def throughput(n: int, workdir: Path) -> None:
    log_path = workdir / "requests.jsonl"
    generate(log_path, n)
    size = log_path.stat().st_size
    print(f"## Throughput: {n} lines, {size / n:.0f} bytes a line ({size / 1e6:.1f} MB), "
          f"CPU = user + system of each child process\n")
    rows = []
    me = [sys.executable, __file__, "--worker"]
    for kind, label in (("ours", "whisper-exporter logs (follow+parse+aggregate, orjson)"),
                        ("ours-json", "whisper-exporter logs (same, stdlib json)")):
        r = run_child(me + [kind, str(log_path)])
        assert r["lines"] == n and r["requests"] == n and r["errors"] == 0, r
        rows.append((label, r["lines"] / r["cpu"], r["cpu"], r["maxrss_mb"], "process_time of the work"))
    mtail = shutil.which("mtail")
    if mtail:
        progs = workdir / "progs"
        progs.mkdir(exist_ok=True)
        from whisper_exporter.runtime.requests import AUDIO_BUCKETS, LATENCY_BUCKETS, QUEUE_BUCKETS, RTF_BUCKETS

        fmt = lambda b: ", ".join(repr(x) for x in b)  # noqa: E731
        (progs / "whisper.mtail").write_text(MTAIL_PROG.format(
            lat=fmt(LATENCY_BUCKETS), queue=fmt(QUEUE_BUCKETS), audio=fmt(AUDIO_BUCKETS), rtf=fmt(RTF_BUCKETS)))
        # An empty log first: mtail's own start-up (compiling the program) is subtracted.
        empty = workdir / "empty.jsonl"
        empty.write_text("")
        base = run_child([mtail, "--one_shot", "--one_shot_format", "prometheus", "--logtostderr",
                          "--progs", str(progs), "--logs", str(empty)])
        r = run_child([mtail, "--one_shot", "--one_shot_format", "prometheus", "--logtostderr",
                       "--progs", str(progs), "--logs", str(log_path)])
        counted = sum(float(line.rsplit(b" ", 1)[1]) for line in r["stdout"].splitlines()
                      if line.startswith(b"whisper_requests_total{"))
        assert counted == n, f"mtail counted {counted} requests of {n}"
        cpu = r["cpu"] - base["cpu"]
        rows.append(("mtail " + _mtail_version(mtail) + " --one_shot (equivalent program)", n / cpu, cpu,
                     r["maxrss_mb"], f"child CPU less start-up ({base['cpu']:.2f}s)"))
    else:
        print("mtail not installed (apt-get install mtail): its row is left out\n")
    for kind in ("json", "orjson"):
        r = run_child(me + [kind, str(log_path)])
        rows.append((f"{kind}.loads alone (ceiling)", r["lines"] / r["cpu"], r["cpu"], r["maxrss_mb"],
                     "process_time of the loop"))
    ours = rows[0][1]
    mtail_rate = next((r[1] for r in rows if r[0].startswith("mtail")), None)
    print(f"| {'contender':<60} | {'lines/CPU-s':>12} | {'CPU s':>6} | {'peak RSS MB':>11} | {'vs mtail':>8} | note")
    print(f"|{'-' * 62}|{'-' * 14}|{'-' * 8}|{'-' * 13}|{'-' * 10}|------")
    for label, rate, cpu, rss, note in rows:
        vs = f"{rate / mtail_rate:.2f}x" if mtail_rate else "-"
        print(f"| {label:<60} | {rate:>12,.0f} | {cpu:>6.2f} | {rss:>11.0f} | {vs:>8} | {note}")
    print()
    if mtail_rate:
        print(f"whisper-exporter (orjson) / mtail: {ours / mtail_rate:.2f}x lines per CPU-second (goal: >= 2x)")
    print(f"orjson vs stdlib json on our whole path: {rows[0][1] / rows[1][1]:.2f}x\n")


def _mtail_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[2] if out.startswith("mtail version") else ""
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return ""


def steady_cpu(seconds: float, rate: float, workdir: Path) -> None:
    import psutil
    import requests

    print(f"## CPU of the running exporter, logs collector only (poll interval 1s), {seconds:g}s each, "
          f"scraped every 15s\n")
    from whisper_exporter.runtime.collector import plugins

    others_off = {name: {"enabled": False} for name in plugins() if name != "logs"}
    results = []
    for label, lines_per_s in (("log growing at %g lines/s" % rate, rate), ("log not written (idle)", 0.0)):
        log_path = workdir / f"steady-{int(lines_per_s)}.jsonl"
        log_path.write_text("")
        port = free_port()
        config = workdir / f"steady-{int(lines_per_s)}.yml"
        config.write_text(json.dumps({
            "listen": f"127.0.0.1:{port}", "log_level": "warning",
            "collectors": {**others_off,
                           "logs": {"enabled": True, "files": [{"path": str(log_path), "format": "json-request"}]}},
        }))
        exe = Path(sys.executable).with_name("whisper-exporter")
        errors = open(workdir / f"steady-{int(lines_per_s)}.err", "w+")
        proc = subprocess.Popen([str(exe), "--config", str(config)], stdout=subprocess.DEVNULL, stderr=errors)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if requests.get(url, timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    errors.seek(0)
                    raise SystemExit("exporter did not come up: " + errors.read()[-2000:])
                time.sleep(0.1)
            time.sleep(2)  # let start-up settle
            ps = psutil.Process(proc.pid)
            c0 = ps.cpu_times()
            t0 = time.monotonic()
            written, next_scrape = 0, t0 + 15
            rng = random.Random(1)
            with open(log_path, "a", buffering=1) as f:
                while (now := time.monotonic()) - t0 < seconds:
                    if lines_per_s:
                        due = int((now - t0) * lines_per_s)
                        while written < due:
                            f.write(json.dumps({"path": "/v1/audio/transcriptions", "status": 200,
                                                "language": rng.choice(LANGS), "duration_ms": 900.5,
                                                "queue_ms": 12.0, "inference_ms": 700.1,
                                                "audio_seconds": 10.0, "model": "large-v3"}) + "\n")
                            written += 1
                    if now >= next_scrape:
                        requests.get(url, timeout=5)
                        next_scrape += 15
                    time.sleep(0.01)
            elapsed = time.monotonic() - t0
            c1 = ps.cpu_times()
            time.sleep(1.5)
            text = requests.get(url, timeout=5).text
            counted = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("whisper_requests_total{"))
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            results.append((label, cpu / elapsed * 100, cpu, written, counted, ps.memory_info().rss / 2**20))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"| {'case':<28} | {'CPU % of one core':>17} | {'CPU s':>6} | {'lines written':>13} | {'requests counted':>16} | {'RSS MB':>6}")
    print(f"|{'-' * 30}|{'-' * 19}|{'-' * 8}|{'-' * 15}|{'-' * 18}|{'-' * 8}")
    for label, pct, cpu, written, counted, rss in results:
        print(f"| {label:<28} | {pct:>16.3f}% | {cpu:>6.2f} | {written:>13} | {counted:>16.0f} | {rss:>6.1f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {os.uname().machine}\n")
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        throughput(args.lines, Path(tmp))
        if not args.skip_steady:
            steady_cpu(args.seconds, args.rate, Path(tmp))


if __name__ == "__main__":
    main()
