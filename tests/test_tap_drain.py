"""A reload that rebuilds the tap: the old tap's queued records are analysed (a bounded drain),
so the request metrics that carry on count them; the exporter's final exit still drops them.

The exporter runs in-process (wiring.start, Running.reload) in front of an aiohttp upstream of
our own; the old tap's record callback is held to build a backlog behind it."""
from __future__ import annotations

import logging
import threading

import pytest
import requests
from aiohttp import web
from helpers import free_port, sample, wait_for
from tap_helpers import Upstream, wav_bytes

import whisper_exporter.tap.proxy as proxy
from whisper_exporter import wiring
from whisper_exporter.config import from_dict

TRANSCRIPTIONS = "/v1/audio/transcriptions"
QUEUED = 3  # records queued behind the one held in analysis


@pytest.fixture
def upstream():
    async def transcribe(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"text": "the meeting moved to thursday"})

    server = Upstream({TRANSCRIPTIONS: transcribe})
    yield server
    server.stop()


class Held:
    """Wraps a tap's record callback: the first record waits in it until released."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, record) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(60)
        self.inner(record)


def config(upstream_url: str, transcript_chars: int, listen: str = "127.0.0.1:0", **tap):
    return from_dict({"listen": "127.0.0.1:0", "service": {"url": upstream_url}, "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "quality": {"enabled": False},
        "tap": {"enabled": True, "listen": listen, "max_transcript_chars": transcript_chars, **tap}}})


def the_tap(running):
    (tap,) = [c for c, _ in running.scheduler.entries if c.name == "tap"]
    return tap


def requests_counted(running) -> float:
    text = requests.get(running.url + "/metrics", timeout=10).text
    return sample(text, "whisper_requests_total", endpoint=TRANSCRIPTIONS, status_code="200") or 0.0


def backlog(upstream_url: str, moved: bool = False, **tap):
    """A running exporter whose tap holds one record in analysis and QUEUED more behind it; the
    configuration a reload reads changes a setting (port 0 both times: the old tap is halted for
    the new one), or `moved`, the address (the new tap starts first, then the old one stops)."""
    listen = f"127.0.0.1:{free_port()}" if moved else "127.0.0.1:0"
    configs = [config(upstream_url, 1000, **tap), config(upstream_url, 2000, listen, **tap)]
    running = wiring.start(configs[0], load_config=lambda: configs[1])
    old = the_tap(running)
    held = old.tap.on_record = Held(old.tap.on_record)
    hold_backlog(old, held, 2.0)
    return running, old, held


def hold_backlog(old, held, seconds: float) -> None:
    """Uploads of `seconds` through the tap until one record is held in analysis and QUEUED wait."""
    url = f"http://127.0.0.1:{old.tap.port}{TRANSCRIPTIONS}"
    for _ in range(1 + QUEUED):
        answer = requests.post(url, files={"file": ("a.wav", wav_bytes(seconds), "audio/wav")},
                               data={"language": "en"}, timeout=30)
        assert answer.status_code == 200
    assert held.entered.wait(30)
    # a record is queued just after its answer went out
    assert wait_for(lambda: old.tap._queue.qsize() == QUEUED, timeout=30), old.tap._queue.qsize()


def reload_in_thread(running) -> threading.Thread:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(running.reload()))
    thread.result = result  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.parametrize("where,moved", [("memory", False), ("memory", True), ("spool_dir", True)])
def test_a_reload_that_rebuilds_the_tap_analyses_the_records_it_had_queued(upstream, monkeypatch, tmp_path, where,
                                                                          moved):
    """Uploads held in memory, or spooled to disk in a spool_dir the new tap shares (its start
    must not take the old tap's files for a crashed run's); the tap's settings or its address changed."""
    monkeypatch.setattr(proxy, "RELOAD_DRAIN", 60.0)  # ample on a loaded machine: the bound is the next test's
    spool = {"spool_dir": str(tmp_path / "spool"), "max_in_memory": 1024} if where == "spool_dir" else {}
    running, old, held = backlog(upstream.url, moved, **spool)
    try:
        reloading = reload_in_thread(running)
        assert wait_for(lambda: old.tap.stopping.is_set(), timeout=30)
        held.release.set()  # the record in analysis finishes while the old tap is being stopped
        reloading.join(60)
        assert not reloading.is_alive() and reloading.result == [None]
        assert the_tap(running) is not old  # rebuilt
        assert wait_for(lambda: requests_counted(running) == 1 + QUEUED, timeout=30), requests_counted(running)
        assert old.tap.stats.snapshot()["dropped"].get("shutdown", 0) == 0
        assert old.tap.stats.snapshot()["analysis_errors"] == {}
        audio = sample(requests.get(running.url + "/metrics", timeout=10).text,
                       "whisper_audio_processed_seconds_total", language="en")
        assert audio == pytest.approx(2.0 * (1 + QUEUED))
    finally:
        held.release.set()
        running.close()


def test_the_drain_is_bounded_a_wedged_analysis_does_not_hold_the_reload(upstream, monkeypatch, caplog):
    monkeypatch.setattr(proxy, "RELOAD_DRAIN", 0.5)
    caplog.set_level(logging.WARNING, logger="whisper_exporter.tap")
    running, old, held = backlog(upstream.url)
    try:
        reloading = reload_in_thread(running)
        reloading.join(60)  # the analysis stays wedged throughout
        assert not reloading.is_alive() and reloading.result == [None]
        assert not held.release.is_set()
        # past the limit, what is still queued is dropped and counted as shutdown
        assert wait_for(lambda: old.tap.stats.snapshot()["dropped"].get("shutdown", 0) == QUEUED, timeout=30), \
            old.tap.stats.snapshot()
        assert requests_counted(running) == 0
        assert wait_for(lambda: any(f"{QUEUED} request record(s) not analysed" in r.getMessage()
                                    for r in caplog.records), timeout=10)
    finally:
        held.release.set()
        running.close()


def test_the_final_exit_drops_the_queue_at_once(upstream):
    """SIGTERM's stop (Running.close) does not drain: nothing scrapes the counters after it."""
    running, old, held = backlog(upstream.url)
    closing = threading.Thread(target=running.close)
    closing.start()
    try:
        assert wait_for(lambda: old.tap.stopping.is_set(), timeout=30)
        held.release.set()
        closing.join(60)
        assert not closing.is_alive()
        assert old.tap.stats.snapshot()["dropped"] == {"shutdown": QUEUED}
    finally:
        held.release.set()


def tap_counters(running) -> dict:
    """Every whisper_tap_* counter and histogram sample of a scrape: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(running.url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("whisper_tap_") and family.type in ("counter", "histogram"):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_no_tap_counter_goes_down_across_a_reload_and_the_old_taps_drops_are_exported(upstream, monkeypatch):
    """Traffic of several kinds through the old tap, then a reload that rebuilds it while its drain
    is wedged: every whisper_tap_* counter carries on (Prometheus reads a drop as a reset), and the
    records the old tap drops after the hand-over show in the exported shutdown count."""
    import socket

    monkeypatch.setattr(proxy, "RELOAD_DRAIN", 0.5)
    configs = [config(upstream.url, 1000, memory_budget=4096), config(upstream.url, 2000, memory_budget=4096)]
    running = wiring.start(configs[0], load_config=lambda: configs[1])
    old = the_tap(running)
    url = f"http://127.0.0.1:{old.tap.port}{TRANSCRIPTIONS}"
    held = Held(old.tap.on_record)
    try:
        for size in (0.1, 2.0):  # 2 s of audio is over the memory budget: refused, spooled
            answer = requests.post(url, files={"file": ("a.wav", wav_bytes(size), "audio/wav")},
                                   data={"language": "en"}, timeout=30)
            assert answer.status_code == 200
        answer = requests.post(url, data=b"--B\r\nnot a part", timeout=30,
                               headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert answer.status_code == 200
        with socket.create_connection(("127.0.0.1", old.tap.port), timeout=30) as conn:  # bad_target
            conn.sendall(b"GET http://example.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 400")
        assert wait_for(lambda: requests_counted(running) == 2, timeout=30), requests_counted(running)
        assert wait_for(lambda: old.tap.stats.snapshot()["analysis_errors"].get("multipart") == 1, timeout=30)
        old.tap.on_record = held
        hold_backlog(old, held, 0.1)
        before = tap_counters(running)
        assert before[("whisper_tap_request_bytes_total", ())] > 0
        assert before[("whisper_tap_memory_budget_refused_total", ())] >= 1
        assert before[("whisper_tap_analysis_errors_total", (("reason", "multipart"),))] == 1
        assert before[("whisper_tap_client_errors_total", (("reason", "bad_target"),))] == 1
        assert before[("whisper_tap_records_dropped_total", (("reason", "shutdown"),))] == 0

        assert running.reload() is None  # the old tap's analysis stays wedged throughout
        assert the_tap(running) is not old  # rebuilt
        shutdown = ("whisper_tap_records_dropped_total", (("reason", "shutdown"),))
        assert wait_for(lambda: tap_counters(running)[shutdown] == QUEUED, timeout=30), tap_counters(running)
        after = tap_counters(running)
        lower = {key: (value, after.get(key)) for key, value in before.items()
                 if after.get(key) is None or after[key] < value}
        assert lower == {}
    finally:
        held.release.set()
        running.close()
