"""Idle memory: the default start imports nothing that the default collectors do not need
(README, Benchmarks: idle RSS < 60 MB). Each module here is imported when its work first comes."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import free_port

from whisper_exporter.collectors import gpu

# The real start-up path (the CLI, the wiring, every collector's first run, one scrape), then the
# process's sys.modules. The server the probe calls is not there, as on a fresh install.
LAUNCH = """
import json, sys, time
import requests
from whisper_exporter import cli, wiring

started = wiring.start

def start(*args, **kwargs):
    running = started(*args, **kwargs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.runs for _, s in running.scheduler.entries):
        time.sleep(0.05)
    status = requests.get(running.url + "/metrics", timeout=10).status_code
    page = requests.get(running.url + "/", timeout=10).status_code
    runs = {s.name: s.runs for _, s in running.scheduler.entries}
    print(json.dumps({"modules": sorted(sys.modules), "runs": runs, "status": [status, page]}), flush=True)
    running.close()
    raise SystemExit(0)

wiring.start = start
cli.main(["--config", sys.argv[1], "--log-level", "error"])
"""

# Not needed until a transcript is scored, a non-WAV file is read, a GPU is there, a log is
# followed, a reference set or review queue is configured, or the tap is on.
LAZY = ("jiwer", "rapidfuzz", "mutagen.mp3", "mutagen.flac", "mutagen.mp4", "mutagen.oggvorbis", "mutagen.asf",
        "whisper_exporter.quality", "whisper_exporter.logfiles.follow", "whisper_exporter.tap.proxy",
        "whisper_exporter.tap.analysis")
# Import-free, so the runtime's review counters can name the flags: the (empty) package and its list.
IMPORT_FREE = ("whisper_exporter.quality", "whisper_exporter.quality.flags")


def test_the_default_start_leaves_unneeded_modules_unimported(tmp_path):
    config = tmp_path / "exporter.yml"
    config.write_text(f"listen: 127.0.0.1:0\nservice:\n  url: http://127.0.0.1:{free_port()}\n")
    result = subprocess.run([sys.executable, "-c", LAUNCH, str(config)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    modules = set(seen["modules"])
    assert seen["status"] == [200, 200]
    assert {"process", "probe"} <= set(seen["runs"]) and all(seen["runs"].values())  # each ran once at least
    assert "whisper_exporter.collectors.quality" in modules  # its section is read, its collector not built
    imported = sorted(m for m in modules - set(IMPORT_FREE)
                      if m in LAZY or m.startswith(tuple(f"{p}." for p in LAZY)))
    assert imported == []
    if not gpu.nvml_library_loads():  # a CPU-only host: nothing to import the NVML bindings for
        assert "pynvml" not in modules and "gpu" not in seen["runs"]
