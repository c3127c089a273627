"""node_exporter's habit: the whole exposition of a deterministic setup, compared with a golden file.

The GPU collector on the fake NVML (H100 fixture, under load, XID 79 once, pid 424 watched)
behind the exporter's one custom Collector. A change to a metric name, label, HELP text or
unit shows up here as a diff. Regenerate on purpose with UPDATE_GOLDEN=1.
"""
import os
import time
from pathlib import Path

from fake_nvml import FakeNVML
from prometheus_client import CollectorRegistry, generate_latest

from whisper_exporter.collectors.gpu import GpuCollector, GpuConfig
from whisper_exporter.runtime.exporter import ExporterCollector
from whisper_exporter.runtime.scheduler import Scheduler

GOLDEN = Path(__file__).parent / "fixtures" / "gpu_exposition.prom"


def exposition() -> str:
    nvml = FakeNVML(state="under_load")
    collector = GpuCollector(GpuConfig(), nvml=nvml, watched_pids=lambda: {424})
    scheduler = Scheduler([(collector, 5.0, 3.0)])
    entry, state = scheduler.entries[0]
    scheduler.run_once(entry, state)
    nvml.inject_xid(0, 79)
    deadline = time.monotonic() + 30  # the event thread may start late on a loaded machine
    # XID 79 starts at 0 (gpu.TRACKED_XIDS): wait for the event's count, not for the key.
    while not any(key[3] == "79" and count for key, count in dict(collector._xids).items()) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(scheduler))
    text = generate_latest(registry).decode()
    collector.stop()
    # The run's timing varies; everything else is fixed.
    lines = [line for line in text.splitlines()
             if not line.startswith(("whisper_exporter_collector_duration_seconds{",
                                     "whisper_exporter_collector_last_run_timestamp_seconds{",
                                     "whisper_exporter_build_info{"))]
    return "\n".join(lines) + "\n"


def test_gpu_exposition_matches_golden_file():
    text = exposition()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
