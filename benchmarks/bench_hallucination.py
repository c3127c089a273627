"""Cost of the hallucination detector on the log collector's hot path, on lines that carry transcripts.

A generated JSON request log (the json-request preset's format plus a `transcript`
field: realistic lengths for the audio duration, 40% English, the rest in ten other
languages and scripts, 1% known hallucinations and loops) is read by the real log
collector (follow + parse + aggregate, collectors/logs.py), each contender in a fresh
child process, CPU = process_time of the work:

  baseline        the collector; each parsed record goes through a no-op hook
  detector        the hook calls suspect(transcript, language, audio_duration) on every record
  detector+budget the hook calls it through CpuBudget(share=0.02), as a hot path should
  parse / parse+detector   the same without follow and aggregation: parser alone

The hook is the same call in every run, so the difference is the detector alone.

    python benchmarks/bench_hallucination.py [--lines 200000]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LANGS = ["en"] * 40 + ["zh"] * 10 + ["de"] * 8 + ["es"] * 8 + ["fr"] * 6 + ["ja"] * 5 + ["ru"] * 5 + \
    ["ko"] * 4 + ["pt"] * 4 + ["it"] * 4 + ["ar"] * 3 + ["tr"] * 3
LATIN = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part over new sound take only little work know place year live me back give most very "
         "after thing our just name good sentence man think say great where help through much before line right "
         "too mean old any same tell boy follow came want show also around form three small set put end does "
         "another well large must big even such because turn here why ask went men read need land different home "
         "us move try kind hand picture again change off play spell air away animal house point page letter mother "
         "answer found study still learn should america world").split()
CYRILLIC = "абвгдеёжзийклмнопрстуфхцчшщыьэюя"
ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
HANGUL = "가나다라마바사아자차카타파하고는을를이에서의로도한다있습니"
HALLUCINATIONS = ["Thank you.", " you", "Thanks for watching!", "ご視聴ありがとうございました", "beep " * 30,
                  "Subtítulos realizados por la comunidad de Amara.org",
                  "I'm going to say that " * 12, ". . . . . ."]


def transcript(rng: random.Random, language: str, seconds: float) -> str:
    if rng.random() < 0.01:
        return rng.choice(HALLUCINATIONS)
    if language in ("zh", "ja", "ko"):
        pool = HANZI if language == "zh" else (KANA + HANZI[:40] if language == "ja" else HANGUL)
        chars = max(1, int(seconds * rng.uniform(3, 6)))
        text = "".join(rng.choice(pool) for _ in range(chars))
        return "。".join(text[i:i + 20] for i in range(0, len(text), 20)) + "。"
    count = max(1, int(seconds * rng.uniform(1.8, 3.0)))
    if language in ("ru", "ar"):  # made-up words from the alphabet: a large vocabulary, like real speech
        alphabet = CYRILLIC if language == "ru" else ARABIC
        out = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))) for _ in range(count)]
    else:
        out = [rng.choice(LATIN) for _ in range(count)]
    for i in range(0, count, rng.randint(8, 15)):
        out[i] = out[i].capitalize()
    return " ".join(out) + "."


def generate(path: Path, n: int, seed: int = 11) -> None:
    rng = random.Random(seed)
    t = 1_760_000_000.0
    with open(path, "w") as f:
        for _ in range(n):
            audio = min(round(rng.lognormvariate(2.0, 0.8), 3), 120.0)
            language = rng.choice(LANGS)
            inference = round(audio * rng.uniform(0.03, 0.4) * 1000, 2)
            queue = round(rng.expovariate(1 / 40.0), 2)
            t += rng.expovariate(50.0)
            f.write(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)), "level": "INFO", "msg": "request",
                "request_id": f"{rng.getrandbits(64):016x}", "method": "POST", "path": "/v1/audio/transcriptions",
                "status": 200, "language": language, "duration_ms": round(inference + queue + 12.5, 2),
                "queue_ms": queue, "inference_ms": inference, "audio_seconds": audio, "model": "large-v3",
                "transcript": transcript(rng, language, audio),
            }, ensure_ascii=False, separators=(",", ":")) + "\n")


class Hooked:
    """A parser whose records go through `hook` (the same call in every contender)."""

    def __init__(self, parser, hook):
        self.inner, self.hook, self.kind = parser, hook, parser.kind

    def parse(self, line):
        record = self.inner.parse(line)
        if record is not None and record.transcript:
            self.hook(record.transcript, record.language, record.audio_duration)
        return record


def worker(kind: str, path: str) -> None:
    """In a child: measure one contender, print JSON {lines, cpu, flagged}."""
    from whisper_exporter.logfiles import parse as logparse
    from whisper_exporter.whisper import hallucination

    hallucination.default_bag()  # loaded once at start-up, not per line
    flagged = [0]

    def noop(text, language, seconds):
        return ()

    def detect(text, language, seconds):
        if hallucination.suspect(text, language, seconds):
            flagged[0] += 1

    budget = hallucination.CpuBudget(share=0.02)
    checked = [0]

    def budgeted(text, language, seconds):
        reasons = budget.run(hallucination.suspect, text, language, seconds)
        if reasons is not None:
            checked[0] += 1
            flagged[0] += bool(reasons)

    hook = {"baseline": noop, "detector": detect, "budget": budgeted,
            "parse": noop, "parse+detector": detect}[kind]
    if kind.startswith("parse"):
        parser = Hooked(logparse.make_parser("json-request", None, {"transcript": "transcript"}), hook)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
        start = time.process_time()
        for line in lines:
            parser.parse(line)
        cpu = time.process_time() - start
        print(json.dumps({"lines": len(lines), "cpu": cpu, "flagged": flagged[0], "checked": len(lines)}))
        return
    from whisper_exporter.collectors.logs import LogsCollector
    from whisper_exporter.config import from_dict

    config = from_dict({"collectors": {"logs": {
        "enabled": True, "start_at": "beginning", "timeout": "1h",
        "files": [{"path": path, "format": "json-request", "fields": {"transcript": "transcript"}}]}}})
    start = time.process_time()
    collector = LogsCollector(config.collectors.logs)
    for source in collector.sources:
        source.parser = Hooked(source.parser, hook)
    collector.update()
    list(collector.families())
    cpu = time.process_time() - start
    lines = collector.sources[0].follower.lines
    print(json.dumps({"lines": lines, "cpu": cpu, "flagged": flagged[0],
                      "checked": checked[0] if kind == "budget" else lines}))


def run_child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.jsonl"
        generate(log, args.lines)
        size = log.stat().st_size
        print(f"## {args.lines} JSON lines with transcripts, {size / args.lines:.0f} bytes a line, "
              f"CPU = process_time in a fresh child each\n")
        results = {}
        for kind in ("baseline", "detector", "budget", "parse", "parse+detector"):
            results[kind] = r = run_child(kind, log)
            assert r["lines"] == args.lines, r
        print(f"| {'contender':<44} | {'lines/CPU-s':>12} | {'vs baseline':>11} | checked | flagged")
        print(f"|{'-' * 46}|{'-' * 14}|{'-' * 13}|---------|--------")
        labels = {"baseline": "log collector (follow+parse+aggregate)", "detector": "  + suspect() on every transcript",
                  "budget": "  + suspect() through CpuBudget(0.02)", "parse": "parser alone",
                  "parse+detector": "  + suspect() on every transcript"}
        for kind, r in results.items():
            base = results["parse" if kind.startswith("parse") else "baseline"]
            rate = r["lines"] / r["cpu"]
            ratio = rate / (base["lines"] / base["cpu"])
            print(f"| {labels[kind]:<44} | {rate:>12,.0f} | {ratio:>10.3f}x | {r['checked']:>7} | {r['flagged']}")
        full = results["detector"]["cpu"] - results["baseline"]["cpu"]
        print(f"\ndetector cost per transcript (collector run): {full / args.lines * 1e6:.1f} us")
        for kind in ("detector", "budget"):
            slower = 1 - (results[kind]["lines"] / results[kind]["cpu"]) / (
                results["baseline"]["lines"] / results["baseline"]["cpu"])
            print(f"{kind}: {slower * 100:.1f}% fewer lines per CPU-second than the collector without it (goal: < 5%)")


if __name__ == "__main__":
    main()
