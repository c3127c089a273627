"""The tap inside the exporter: production samples to the review queue under privacy bounds,
hallucination checks of real traffic, and a request seen by the tap and the log counted once."""
from __future__ import annotations

import json
import os
import stat
import time

import requests
from aiohttp import web
from helpers import free_port, sample, wait_for
from prometheus_client import generate_latest
from tap_helpers import Upstream, wav_bytes

from whisper_exporter import wiring
from whisper_exporter.config import from_dict
from whisper_exporter.quality.sampling import AudioKeeper
from whisper_exporter.runtime.exporter import make_registry

TRANSCRIPTIONS = "/v1/audio/transcriptions"


def whisper_like() -> Upstream:
    """Answers like faster-whisper-server: JSON with the text; 'loop' files get a repetition loop."""

    async def transcribe(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        name = getattr(upload, "filename", "")
        text = "beep " * 30 if name.startswith("loop") else "the meeting moved to thursday"
        return web.json_response({"text": text})

    return Upstream({TRANSCRIPTIONS: transcribe})


def exporter(tmp_path, log_path=None, **tap):
    port = free_port()
    collectors = {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                  "tap": {"enabled": True, "listen": f"127.0.0.1:{port}", **tap}}
    if "sample_dir" in tap:
        collectors["quality"] = {"production": {"queue": str(tmp_path / "queue.jsonl"), "fraction": 0.5}}
    if log_path is not None:
        collectors["logs"] = {"enabled": True, "interval": "100ms", "start_at": "beginning", "files": [
            {"path": str(log_path), "format": "uvicorn-access"}]}
    config = from_dict({"listen": "127.0.0.1:0", "collectors": collectors}, source=str(tmp_path / "x.yml"))
    return config, wiring.build_scheduler(config), f"http://127.0.0.1:{port}{TRANSCRIPTIONS}"


def render(scheduler) -> str:
    """The whole exposition, as a scrape of the running exporter would see it."""
    for _, state in scheduler.entries:
        state.started = True  # started by hand here, not by the scheduler's threads
    return generate_latest(make_registry(scheduler)).decode()


def post(url: str, name: str, language: str = "en") -> requests.Response:
    return requests.post(url, files={"file": (name, wav_bytes(2.0), "audio/wav")}, data={"language": language},
                         timeout=30)


def test_samples_are_kept_privately_bounded_and_queued(tmp_path):
    upstream = whisper_like()
    samples_dir = tmp_path / "samples"
    config, scheduler, url = exporter(tmp_path, sample_dir=str(samples_dir), sample_max_files=2,
                                      upstream=upstream.url)
    (tap,) = [c for c, _ in scheduler.entries]
    tap.start()
    try:
        for n in range(8):  # fraction 0.5 of one (en, 0-5s) cell: every other request is drawn
            assert post(url, f"clip{n}.wav").status_code == 200
        assert wait_for(lambda: sample(render(scheduler), "whisper_requests_total", endpoint=TRANSCRIPTIONS,
                                       status_code="200", language="en") == 8, timeout=30)
        queued = [json.loads(line) for line in (tmp_path / "queue.jsonl").read_text().splitlines()]
        kept = sorted(os.listdir(samples_dir))
        assert len(kept) == 2 and len(queued) == 2  # bounded: 4 drawn, 2 kept, 2 dropped as full
        assert {q["audio"] for q in queued} == {str(samples_dir / k) for k in kept}
        assert all(q["transcript"] == "the meeting moved to thursday" and q["language"] == "en" for q in queued)
        assert stat.S_IMODE(os.stat(samples_dir).st_mode) == 0o700
        assert all(stat.S_IMODE(os.stat(samples_dir / k).st_mode) == 0o600 for k in kept)
        assert open(samples_dir / kept[0], "rb").read() == wav_bytes(2.0)  # the audio the client sent
        text = render(scheduler)
        assert sample(text, "whisper_tap_samples_kept_total") == 2
        assert sample(text, "whisper_tap_samples_dropped_total", reason="full") == 2
        assert sample(text, "whisper_quality_review_queue_items") == 2
    finally:
        tap.stop()
        upstream.stop()


def test_retention_deletes_old_samples(tmp_path):
    keeper = AudioKeeper(str(tmp_path / "s"), max_files=10, max_bytes=10**6, retention=3600)
    source = tmp_path / "upload.wav"
    source.write_bytes(b"x" * 100)
    kept = keeper.keep(str(source), ".wav")
    assert kept is not None and os.path.exists(kept) and kept.endswith(".wav")
    old = time.time() - 7200
    os.utime(kept, (old, old))
    assert keeper.expire() == 1 and not os.path.exists(kept)
    big = AudioKeeper(str(tmp_path / "b"), max_files=10, max_bytes=50, retention=3600)
    assert big.keep(str(source), ".wav") is None and big.dropped["full"] == 1  # over max_bytes


def test_traffic_transcripts_are_checked_and_counted_once_with_the_log(tmp_path):
    upstream = whisper_like()
    log = tmp_path / "server.log"
    log.write_text("")
    config, scheduler, url = exporter(tmp_path, log_path=log, upstream=upstream.url)
    by_name = {c.name: c for c, _ in scheduler.entries}
    by_name["tap"].start()
    try:
        assert post(url, "speech.wav").status_code == 200
        assert post(url, "loop.wav").status_code == 200
        assert wait_for(lambda: sample(render(scheduler), "whisper_hallucination_checked_total", language="en",
                                       source="traffic") == 2, timeout=30)
        # The server's own access log has the same two requests: they must not count twice.
        log.write_text(f'INFO:     127.0.0.1:1 - "POST {TRANSCRIPTIONS} HTTP/1.1" 200 OK\n' * 2)
        by_name["logs"].update()
        text = render(scheduler)
        assert sample(text, "whisper_requests_total", endpoint=TRANSCRIPTIONS, status_code="200",
                      language="en") == 2
        assert sample(text, "whisper_hallucination_checked_total", language="en", source="traffic") == 2
        assert sample(text, "whisper_hallucination_suspects_total", language="en", reason="repetition",
                      source="traffic") == 1
    finally:
        by_name["tap"].stop()
        by_name["logs"].stop()
        upstream.stop()


def test_a_queued_sample_keeps_the_language_the_server_identified_only_when_the_client_named_none(tmp_path):
    """Language identification on reviewed production items compares the reviewer's language with
    the one the server identified: a request that named its language was not identified."""
    async def transcribe(request: web.Request) -> web.Response:
        await request.post()
        return web.json_response({"text": "guten morgen", "language": "german"})

    upstream = Upstream({TRANSCRIPTIONS: transcribe})
    config, scheduler, url = exporter(tmp_path, sample_dir=str(tmp_path / "samples"), upstream=upstream.url)
    (tap,) = [c for c, _ in scheduler.entries]
    tap.start()
    try:
        for language in ("", "", "de", "de"):  # fraction 0.5: the first of each cell is drawn
            assert post(url, "clip.wav", language=language).status_code == 200
        assert wait_for(lambda: (tmp_path / "queue.jsonl").exists()
                        and len((tmp_path / "queue.jsonl").read_text().splitlines()) == 2, timeout=30)
    finally:
        tap.stop()
        upstream.stop()
    queued = [json.loads(line) for line in (tmp_path / "queue.jsonl").read_text().splitlines()]
    assert [q["language"] for q in queued] == ["de", "de"]
    assert [q.get("detected") for q in queued] == ["de", None]
