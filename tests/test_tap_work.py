"""Bounded memory and CPU work in the tap (issue 22, items 3, 5, 6 and 9).

Real sockets on loopback: clients (requests, raw sockets), the tap, and aiohttp upstreams
of our own. Each reproduction is scaled down where a config knob makes a limit small;
each test asserts the bound itself (the budget never exceeded, the work stopped at its
cap and counted, the answer passed byte-identical), never how fast something went."""
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from aiohttp import web
from helpers import wait_for
from tap_helpers import Records, Upstream, multipart, start_tap, wav_bytes

import whisper_exporter.tap.proxy as proxy
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.tap import analysis
from whisper_exporter.tap.analysis import UploadAnalyzer
from whisper_exporter.whisper.audio import AudioError

TRANSCRIPTIONS = "/v1/audio/transcriptions"
BOUNDARY = "tapwork"
ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def form(data: bytes, filename: str = "a.wav", **fields: str) -> tuple[bytes, dict]:
    body = multipart(BOUNDARY, {"model": "m", **fields}, "file", filename, data)
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def post(tap, body: bytes, headers: dict) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body, headers=headers, timeout=60)


@pytest.fixture
def held():
    """An upstream that reads each body (without keeping it), then holds its answer until
    released: a slow server, so every upload is in the tap at once."""
    state = {"arrived": 0, "release": None, "lock": threading.Lock()}

    async def slow(request):
        import asyncio

        if state["release"] is None:
            state["release"] = asyncio.Event()
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        with state["lock"]:
            state["arrived"] += 1
        await asyncio.wait_for(state["release"].wait(), 120)
        return web.json_response({"text": "ok", "size": size})

    server = Upstream({TRANSCRIPTIONS: slow})
    server.state = state

    def release():
        server.loop.call_soon_threadsafe(state["release"].set)

    server.release = release
    yield server
    if state["release"] is not None:
        release()
    server.stop()


def upload_raw(port: int, body: bytes, headers: dict, out: list) -> None:
    """One upload over a plain socket (no client-side copy of the body), its status kept."""
    head = (f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head)
        s.sendall(body)
        answer = b""
        while piece := s.recv(65536):
            answer += piece
    out.append(int(answer.split(b" ", 2)[1]))


# -- item 3: one memory budget for all uploads together --------------------------------

def test_concurrent_uploads_never_hold_more_than_the_budget_in_memory(held, tmp_path):
    """40 uploads of 512 KiB at once, each under max_in_memory (1 MiB), with a 2 MiB budget:
    at most 4 stay in memory, the rest are spooled, and every one is still analysed."""
    records = Records()
    spool = tmp_path / "spool"
    tap = start_tap(held.url, records, spool_dir=str(spool), memory_budget=2 * MB)
    body, headers = form(wav_bytes(16.0))  # 512,044 bytes of audio
    statuses: list[int] = []
    clients = [threading.Thread(target=upload_raw, args=(tap.port, body, headers, statuses)) for _ in range(40)]
    peak = 0
    try:
        for c in clients:
            c.start()

        def all_arrived():
            nonlocal peak
            peak = max(peak, tap.budget.in_use)
            return held.state["arrived"] == 40

        wait_for(all_arrived, timeout=120)
        on_disk = [p for p in os.listdir(spool) if p.startswith("whisper-tap-")]
        in_memory = tap.budget.in_use
        held.release()
        for c in clients:
            c.join(60)
        recs = records.wait(40)
    finally:
        tap.stop()
    assert statuses == [200] * 40
    assert peak <= 2 * MB and in_memory <= 2 * MB
    assert len(on_disk) >= 40 - 4  # over the budget: spooled to disk, as an upload over max_in_memory is
    assert tap.budget.refused >= 36
    assert all(r.analysis_error is None and r.audio_duration == pytest.approx(16.0) for r in recs)
    assert tap.budget.in_use == 0  # every byte given back
    assert not [p for p in os.listdir(spool) if p.startswith("whisper-tap-")]


def test_memory_gauges_are_exported(held):
    from collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    collector = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0", memory_budget=3 * MB), held.url)
    values = {m.name: [s.value for s in m.samples] for m in collector.families()}
    assert values["whisper_tap_memory_budget_bytes"] == [3 * MB]
    assert values["whisper_tap_memory_in_use_bytes"] == [0]
    assert values["whisper_tap_memory_budget_refused"] == [0]
    dropped = next(m for m in collector.families() if m.name == "whisper_tap_records_dropped")
    assert {s.labels["reason"]: s.value for s in dropped.samples} == {"queue_full": 0, "shutdown": 0,
                                                                      "stream_check_queue_full": 0,
                                                                      "stream_check_shutdown": 0}


def test_rss_stays_bounded_with_100_concurrent_1mb_uploads(held, tmp_path):
    """The report's repro in this process: 100 concurrent 1 MB uploads against a slow server
    took the tap from 54 to 301 MB. Now the in-memory copies share the 16 MiB budget."""
    records = Records()
    tap = start_tap(held.url, records, spool_dir=str(tmp_path))
    body, headers = form(b"\0" * 1_000_000, filename="a.bin")
    statuses: list[int] = []
    me = psutil.Process()
    before = me.memory_info().rss
    clients = [threading.Thread(target=upload_raw, args=(tap.port, body, headers, statuses)) for _ in range(100)]
    peak = before
    try:
        for c in clients:
            c.start()

        def all_arrived():
            nonlocal peak
            peak = max(peak, me.memory_info().rss)
            return held.state["arrived"] == 100

        wait_for(all_arrived, timeout=120)
        peak = max(peak, me.memory_info().rss)
        held.release()
        for c in clients:
            c.join(60)
        records.wait(100)
    finally:
        tap.stop()
    assert statuses == [200] * 100
    # Every copy in memory is 100 MB and more (156 MB before the budget); the budget (16 MiB) plus
    # the buffers of the tap and of the upstream in this process stay well under the uploads' total.
    assert peak - before < 100 * MB, f"RSS grew {(peak - before) / MB:.0f} MB"


# -- item 5: bounded work per upload, a bounded queue, a stop that does not drain ------------

class Counting(io.BytesIO):
    """A file that counts the reads and seeks made on it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.calls = 0

    def read(self, n=-1):
        self.calls += 1
        return super().read(n)

    def seek(self, *args):
        self.calls += 1
        return super().seek(*args)


def flac_bomb(size: int) -> bytes:
    """The report's repro: `fLaC` and empty metadata blocks (`01 00 00 00`) repeated."""
    return b"fLaC" + b"\x01\x00\x00\x00" * (size // 4)


def flac(seconds: float, rate: int = 16000, padding_blocks: int = 0) -> bytes:
    """A FLAC header: STREAMINFO, then empty padding blocks (what mutagen walks one by one)."""
    samples = int(seconds * rate)
    info = (rate << 44) | (0 << 41) | (15 << 36) | samples  # mono, 16-bit
    streaminfo = struct.pack(">HH", 4096, 4096) + b"\0" * 6 + info.to_bytes(8, "big") + b"\0" * 16
    blocks = b"\x01\x00\x00\x00" * padding_blocks
    return b"fLaC" + bytes([0x00]) + (34).to_bytes(3, "big") + streaminfo + blocks + b"\x81\x00\x00\x00"


def test_a_crafted_flac_is_read_from_streaminfo_without_walking_its_blocks():
    from whisper_exporter.tap import duration  # new here: imported in the test, so the others run on older code

    bomb = Counting(flac_bomb(4 * MB))
    with pytest.raises(AudioError):
        duration.upload_seconds(bomb, 4 * MB)
    assert bomb.calls <= 2  # its first 64 bytes, not a million blocks
    real = flac(3.5, padding_blocks=1 << 20)  # 4 MB of padding after a real STREAMINFO
    handle = Counting(real)
    assert duration.upload_seconds(handle, len(real)) == pytest.approx(3.5)
    assert handle.calls <= 2


def chunk_bomb() -> bytes:
    """A WAV of 131,072 empty chunks and no fmt: mutagen walks every one."""
    chunk = b"junk" + struct.pack("<I", 0)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk) * (1 << 17)) + b"WAVE" + chunk * (1 << 17)


def test_a_header_of_tiny_blocks_stops_at_the_read_cap():
    from whisper_exporter.tap import duration  # new here: imported in the test, so the others run on older code

    atoms = struct.pack(">I", 16) + b"ftypM4A \0\0\0\0" + (struct.pack(">I", 8) + b"free") * (1 << 17)
    for data in (chunk_bomb(), atoms):
        handle = Counting(data)
        with pytest.raises(duration.TooMuchWork):
            duration.upload_seconds(handle, len(data))
        assert handle.calls <= duration.MAX_READS + 2


def id3_frames(size: int) -> bytes:
    """An ID3v2.4 tag of tiny frames (mutagen parses every one: 1.5 s of CPU per MB)."""
    def syncsafe(n):
        return bytes([(n >> 21) & 127, (n >> 14) & 127, (n >> 7) & 127, n & 127])

    frame = b"TIT2" + syncsafe(2) + b"\0\0" + b"\x03a"
    frames = frame * (size // len(frame))
    return b"ID3\x04\x00\x00" + syncsafe(len(frames)) + frames


@pytest.fixture(scope="module")
def real_audio(tmp_path_factory):
    """WAV, FLAC, Ogg Vorbis (sox), MP3 and Ogg Opus (PyAV) of 2.5 s."""
    from test_audio import _pyav

    folder = tmp_path_factory.mktemp("audio")
    wav = folder / "t.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(wav), "synth", "2.5", "sine", "440"],
                   check=True)
    files = {"wav": wav}
    for ext in ("flac", "ogg"):
        files[ext] = folder / f"t.{ext}"
        subprocess.run(["sox", str(wav), str(files[ext])], check=True)
    files["mp3"] = _pyav(wav, folder / "t.mp3", "libmp3lame", "mp3", 16000)
    files["opus"] = _pyav(wav, folder / "t.opus", "libopus", "ogg", 48000)
    return {k: v.read_bytes() for k, v in files.items()}


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg", "mp3", "opus"])
def test_real_files_read_as_mutagen_reads_them(real_audio, kind):
    from whisper_exporter.tap import duration  # new here: imported in the test, so the others run on older code
    from whisper_exporter.whisper.audio import duration_seconds

    data = real_audio[kind]
    assert duration.upload_seconds(io.BytesIO(data), len(data)) == pytest.approx(duration_seconds(data), abs=1e-6)


def test_an_id3_tag_of_tiny_frames_is_skipped(real_audio):
    from whisper_exporter.tap import duration  # new here: imported in the test, so the others run on older code

    mp3 = real_audio["mp3"]
    data = id3_frames(2 * MB) + mp3
    handle = Counting(data)
    assert duration.upload_seconds(handle, len(data)) == pytest.approx(2.5, abs=0.12)
    assert handle.calls < 200  # the MP3 frames' headers, not the tag's 200,000 frames


def test_a_header_bomb_through_the_tap_is_counted_as_audio_work(tmp_path):
    records = Records()
    got = []

    async def keep(request):
        got.append(await request.read())
        return web.json_response({"text": "ok"})

    server = Upstream({TRANSCRIPTIONS: keep})
    tap = start_tap(server.url, records, spool_dir=str(tmp_path))
    body, headers = form(chunk_bomb())
    try:
        r = post(tap, body, headers)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert r.status_code == 200 and got == [body]
    assert rec.analysis_error == "audio_work" and rec.audio_duration is None
    assert tap.stats.snapshot()["analysis_errors"] == {"audio_work": 1}


@pytest.fixture
def answering():
    async def ok(request):
        await request.read()
        return web.json_response({"text": "ok"})

    server = Upstream({TRANSCRIPTIONS: ok})
    yield server
    server.stop()


class Blocking(Records):
    """A record callback that blocks on its first record until released."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, record):
        self.entered.set()
        self.release.wait(60)
        super().__call__(record)


def test_the_record_queue_is_bounded_and_drops_are_counted(answering, tmp_path):
    records = Blocking()
    tap = start_tap(answering.url, records, record_queue=3, max_in_memory=1024, spool_dir=str(tmp_path))
    body, headers = form(wav_bytes(0.5))
    try:
        assert post(tap, body, headers).status_code == 200
        assert records.entered.wait(30)  # the worker holds the first record
        for _ in range(7):
            assert post(tap, body, headers).status_code == 200  # proxied all the same
        # A request's record is queued after its answer went out: wait for the last one's turn.
        deadline = time.monotonic() + 30
        while sum(tap.stats.snapshot()["dropped"].values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # a fifth drop, were there one, would come in this time
        dropped = tap.stats.snapshot()["dropped"]
        spooled = [p for p in os.listdir(tmp_path) if p.startswith("whisper-tap-")]
        records.release.set()
        recs = records.wait(4)
    finally:
        records.release.set()
        tap.stop()
    assert dropped == {"queue_full": 4}  # 1 in the worker, 3 queued, 4 dropped
    assert len(spooled) == 4  # the dropped uploads' spool files went at once
    assert len(recs) == 4 and all(r.audio_duration == pytest.approx(0.5) for r in recs)


def test_a_stream_check_that_finds_the_queue_full_is_counted_as_its_own_reason(answering):
    """A WebSocket stream's final transcript check shares the record queue; when it finds the
    queue full it is no request record, so it is not counted as queue_full."""
    from collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    records = Blocking()
    tap = start_tap(answering.url, records, record_queue=1)
    checked: list[str] = []
    tap.streams.on_final = lambda text, language, audio: checked.append(text)
    body, headers = form(wav_bytes(0.5))
    try:
        assert post(tap, body, headers).status_code == 200
        assert records.entered.wait(30)  # the worker holds the first record
        assert post(tap, body, headers).status_code == 200
        assert wait_for(lambda: tap._queue.full(), timeout=30)  # the second record waits in it
        tap.streams.final("the meeting moved", "en", 2.0)  # as a session's completed transcript does
        dropped = tap.stats.snapshot()["dropped"]
        records.release.set()
        records.wait(2)
    finally:
        records.release.set()
        tap.stop()
    assert dropped == {"stream_check_queue_full": 1}
    assert checked == []
    collector = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), answering.url)
    family = next(m for m in collector.families() if m.name == "whisper_tap_records_dropped")
    assert {s.labels["reason"]: s.value for s in family.samples}["stream_check_queue_full"] == 0


def test_stream_checks_a_stopping_tap_skips_are_counted_as_their_own_reason(answering):
    """A stream's final transcript check queued when the tap stops, or handed to it while it stops,
    goes unchecked: counted as stream_check_shutdown (no request record, so not `shutdown`)."""
    from collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    records = Blocking()
    tap = start_tap(answering.url, records)
    checked: list[str] = []
    tap.streams.on_final = lambda text, language, audio: checked.append(text)
    body, headers = form(wav_bytes(0.5))
    try:
        assert post(tap, body, headers).status_code == 200
        assert records.entered.wait(30)  # the worker holds the record
        tap.streams.final("queued behind the record", "en", 2.0)
        assert tap._queue.qsize() == 1
        tap.stop()  # the exporter's exit: the queue is dropped (the held record is still in analysis)
        tap.streams.final("ended while the tap stops", "en", 1.0)
        dropped = tap.stats.snapshot()["dropped"]
        records.release.set()
        records.wait(1)
    finally:
        records.release.set()
        tap.stop()
    assert checked == []
    assert dropped == {"stream_check_shutdown": 2}
    collector = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), answering.url)
    family = next(m for m in collector.families() if m.name == "whisper_tap_records_dropped")
    assert {s.labels["reason"]: s.value for s in family.samples}["stream_check_shutdown"] == 0


def test_a_stopped_taps_own_counters_carry_into_its_successor_once(answering):
    """The memory budget's refusals (per tap, like its connection counters) are folded into the
    totals a reload's next collector shares when the tap stops: exported once, then and after."""
    from collectors.tap import TapCollector
    from whisper_exporter.tap import TapConfig

    def refused(collector) -> float:
        return next(m for m in collector.families() if m.name == "whisper_tap_memory_budget_refused").samples[0].value

    first = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0", memory_budget=4096), answering.url)
    first.start()
    try:
        body, headers = form(wav_bytes(2.0))  # 64 KB: over the budget, spooled
        assert post(first.tap, body, headers).status_code == 200
        assert refused(first) == 1
    finally:
        first.stop_for_reload()
    assert refused(first) == 1  # folded, not counted twice
    second = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), answering.url, totals=first.totals)
    assert refused(second) == 1
    second.start()
    second.stop()
    first.stop()  # a second stop folds nothing more
    assert refused(second) == 1 and refused(first) == 1


def test_stop_drops_the_queue_instead_of_draining_it(answering, caplog):
    records = Blocking()
    tap = start_tap(answering.url, records)
    body, headers = form(wav_bytes(0.5))
    assert post(tap, body, headers).status_code == 200
    assert records.entered.wait(30)
    for _ in range(5):
        assert post(tap, body, headers).status_code == 200
    stopper = threading.Thread(target=tap.stop)
    with caplog.at_level(logging.WARNING, logger="whisper_exporter.tap"):
        stopper.start()
        wait_for(lambda: tap.stopping.is_set(), timeout=30)
        records.release.set()  # the record in analysis finishes; the five queued do not start
        stopper.join(30)
    assert not stopper.is_alive()
    assert len(records.items) == 1
    assert tap.stats.snapshot()["dropped"] == {"shutdown": 5}
    assert any("5 request record(s) not analysed" in r.getMessage() for r in caplog.records)


# -- item 6: the upgrade's answer, bounded and parsed off the loop ---------------------------

def upgrading_server(answer: bytes) -> Upstream:
    async def verbose(request):
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    return Upstream({TRANSCRIPTIONS: verbose})


def upgraded(answer: bytes, **options):
    server = upgrading_server(answer)
    records = Records()
    tap = start_tap(server.url, records, upgrade_response_format=True, **options)
    body, headers = form(wav_bytes(0.5))
    try:
        r = post(tap, body, headers)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    return r, rec, tap


def test_a_segment_bomb_is_passed_as_it_came_and_counted():
    """The report's 20 M `{}` segments, scaled to 100,000 (over UPGRADE_MAX_OBJECTS)."""
    bomb = b'{"text":"hi","segments":[' + b",".join([b"{}"] * 100_000) + b"]}"
    r, rec, tap = upgraded(bomb)
    assert r.status_code == 200 and r.content == bomb  # byte-identical, not rendered
    assert rec.upgraded and rec.error is None
    assert tap.stats.snapshot()["analysis_errors"] == {"upgrade": 1}


@pytest.mark.parametrize("budget", [False, True])
def test_an_upgraded_answer_over_its_bounds_is_streamed_as_it_came(budget, monkeypatch):
    text = "word " * 60_000  # 300 KB of text: a long transcript
    answer = json.dumps({"text": text, "segments": [{"id": 0, "text": text}]}).encode()
    if budget:  # over the memory budget
        r, rec, tap = upgraded(answer, memory_budget=64 * 1024)
    else:  # over UPGRADE_MAX
        monkeypatch.setattr(proxy, "UPGRADE_MAX", 100_000)
        r, rec, tap = upgraded(answer)
    assert r.status_code == 200 and r.content == answer
    assert int(r.headers["Content-Length"]) == len(answer)
    assert rec.response_bytes == len(answer)
    assert tap.stats.snapshot()["analysis_errors"] == {"upgrade": 1}
    assert tap.budget.in_use == 0


def test_an_upgraded_answer_is_rendered_off_the_tap_loop(monkeypatch):
    threads = []
    real = proxy.render_json

    def render(body):
        threads.append(threading.current_thread().name)
        return real(body)

    monkeypatch.setattr(proxy, "render_json", render)
    answer = json.dumps({"text": " fine", "language": "en", "segments": [{"id": 0, "text": " fine"}]}).encode()
    r, rec, tap = upgraded(answer)
    assert r.status_code == 200 and r.json() == {"text": " fine"}
    assert len(threads) == 1 and threads[0].startswith("tap-render")  # not "tap", the loop's thread
    assert tap.stats.snapshot()["analysis_errors"] == {}


# -- item 9: a flood of tiny multipart parts -----------------------------------------------

def tiny_parts(n: int) -> bytes:
    return b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\n\r\n".encode()
                    for _ in range(n))


def test_the_analyzer_stops_at_the_parts_cap():
    analyzer = UploadAnalyzer(BOUNDARY.encode(), MB, 2 * MB, None)
    analyzer.feed(tiny_parts(100_000))  # 5 MB in one chunk: python-multipart stops mid-chunk
    analyzer.feed(tiny_parts(100_000))
    assert analyzer.error == "too_many_parts"
    assert analyzer.parts == analysis.MAX_PARTS + 1


def test_a_million_part_upload_is_proxied_and_counted(tmp_path):
    got = []

    async def keep(request):
        got.append(await request.read())
        return web.json_response({"text": "ok"})

    server = Upstream({TRANSCRIPTIONS: keep})
    records = Records()
    tap = start_tap(server.url, records, spool_dir=str(tmp_path))
    file_part, headers = form(wav_bytes(0.5))
    body = tiny_parts(1000) + file_part  # over MAX_PARTS (256)
    try:
        r = post(tap, body, headers)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert r.status_code == 200 and got == [body]  # every byte passed on
    assert rec.analysis_error == "too_many_parts" and rec.audio_duration is None
    assert tap.stats.snapshot()["analysis_errors"] == {"too_many_parts": 1}
    assert analysis.MAX_PARTS < 1000


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["memory_budget", "record_queue"])
@pytest.mark.parametrize("value", [0, -1, "lots", True])
def test_bad_limits_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        from_dict({"collectors": {"tap": {key: value}}})
    assert err.value.key == f"collectors.tap.{key}"


def test_check_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("collectors:\n  tap:\n    memory_budget: 0\n")
    result = subprocess.run([sys.executable, "-m", "whisper_exporter", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "collectors.tap.memory_budget" in result.stderr


def test_the_defaults():
    from whisper_exporter.tap import TapConfig

    assert TapConfig().memory_budget == 16 * MB and TapConfig().record_queue == 256
