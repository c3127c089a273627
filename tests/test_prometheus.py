"""A real Prometheus scrapes a running exporter: the exposition parses, and the contract's names arrive."""
import json
import subprocess
import sys
import uuid

import pytest

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict

pytestmark = pytest.mark.integration


@pytest.fixture
def server_process():
    """A stand-in for the Whisper server's process: a real process with a unique command line."""
    marker = f"fake-whisper-server-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker])
    yield proc, marker
    proc.kill()
    proc.wait()


def test_prometheus_scrapes_the_exporter(prometheus, server_process):
    proc, marker = server_process
    config = from_dict({
        "listen": "127.0.0.1:0",
        "collectors": {
            "gpu": {"enabled": True, "interval": "1s"},  # no GPU here: it must show as down, not break
            "process": {"interval": "1s", "match": marker},
        },
    })
    running = daemon.start(config)
    try:
        prom = prometheus([running.url.removeprefix("http://")])
        up = prom.wait_for('up{job="whisper"} == 1')
        assert len(up) == 1
        found = prom.wait_for("whisper_process_up == 1")
        assert found[0]["metric"]["job"] == "whisper"
        count = prom.query("whisper_process_processes")
        assert float(count[0]["value"][1]) == 1
        collectors = {r["metric"]["collector"]: float(r["value"][1]) for r in prom.query("whisper_exporter_collector_up")}
        assert collectors["process"] == 1
        assert "gpu" in collectors
        assert prom.query("whisper_exporter_build_info")[0]["metric"]["version"] == "0.1.0"
        # Prometheus negotiated OpenMetrics with us and stored no scrape errors.
        target = prom.targets()[0]
        assert target["health"] == "up" and target["lastError"] == ""
    finally:
        running.close()


def test_one_verified_production_batch_gives_its_exact_wer_in_the_recording_rule(prometheus, tmp_path):
    """Issue 21, defect 1: the first batch of a set is visible to rate(). Its series are exported at 0
    while the items wait for review, so the shipped rule reads that batch's corpus WER exactly."""
    from pathlib import Path

    from whisper_exporter.quality.sampling import QueueItem, ReviewQueue, item_id

    batch = [  # (transcript the server gave, verified reference): 3 errors in 11 reference words
        ("the cat sat on a mat", "the cat sat on the mat"),  # 1 substitution of 6
        ("hello word", "hello world"),  # 1 substitution of 2
        ("good morning", "good morning everyone"),  # 1 deletion of 3
    ]
    folder = tmp_path / "review"
    folder.mkdir(mode=0o700)
    queue_path, refs_path = folder / "queue.jsonl", folder / "verified.jsonl"
    queue = ReviewQueue(str(queue_path), 100)
    ids = []
    for n, (transcript, _) in enumerate(batch):
        audio = f"/srv/samples/{n}.wav"
        ids.append(item_id(audio, transcript))
        assert queue.add(QueueItem(id=ids[-1], audio=audio, transcript=transcript, language="en", duration=3.0,
                                   duration_band="0-5s", sampled_at=1.0))
    config = from_dict({
        "listen": "127.0.0.1:0",
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                       "quality": {"enabled": True, "interval": "1s",
                                   "production": {"queue": str(queue_path), "references": str(refs_path)}}},
    })
    running = daemon.start(config)
    try:
        rules = Path(__file__).resolve().parent.parent / "rules" / "recording.yml"
        prom = prometheus([running.url.removeprefix("http://")], rule_files=[str(rules)])
        # Prometheus has seen the production series at 0 before the batch is verified
        zero = prom.wait_for('whisper_quality_reference_units_total{set="production",language="en"} == 0')
        assert len(zero) == 1
        refs_path.write_text("".join(json.dumps({"id": i, "reference": ref}) + "\n"
                                     for i, (_, ref) in zip(ids, batch)))
        rule = 'language:whisper_quality_error_rate:ratio_rate1h{set="production",language="en"}'
        found = prom.wait_for(rule)
        assert float(found[0]["value"][1]) == pytest.approx(3 / 11, rel=1e-9)
        units = prom.query('whisper_quality_reference_units_total{set="production",language="en"}')
        assert float(units[0]["value"][1]) == 11
    finally:
        running.close()


def test_the_first_502_through_the_tap_is_seen_by_increase(prometheus):
    """Issue 21, defect 1: the series of the first 502 is exported at 0 before it, so increase() sees it."""
    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]  # nothing listens here once closed
    config = from_dict({
        "listen": "127.0.0.1:0", "service": {"url": f"http://127.0.0.1:{down}"},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                       "tap": {"enabled": True, "listen": "127.0.0.1:0"},
                       "logs": {"languages": ["en", "de"]}},  # the traffic's languages: seeded
    })
    running = daemon.start(config)
    try:
        prom = prometheus([running.url.removeprefix("http://")])
        series = 'whisper_requests_total{endpoint="/v1/audio/transcriptions",status_code="502",language="de"}'
        assert prom.wait_for(series + " == 0")
        tap = next(c for c, _ in running.scheduler.entries if c.name == "tap")
        r = requests.post(f"http://127.0.0.1:{tap.tap.port}/v1/audio/transcriptions",
                          files={"file": ("a.wav", b"x")}, data={"language": "de"})
        assert r.status_code == 502
        assert prom.wait_for(series + " == 1")
        found = prom.query(f"increase({series}[1m])")
        assert float(found[0]["value"][1]) > 0  # before: the series appeared at 1, and increase() saw 0
    finally:
        running.close()
