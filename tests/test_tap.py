"""The request tap against aiohttp upstreams of our own: bytes untouched, streaming, records, faults.

Real sockets on loopback throughout: a client (requests, curl or a raw socket), the tap,
and an upstream that reports what it received. The real Whisper server is in
tests/test_tap_real_server.py."""
import asyncio
import hashlib
import json
import os
import socket
import socketserver
import stat
import subprocess
import threading

import psutil
import pytest
import requests
from aiohttp import web
from helpers import wait_for
from prometheus_client.core import Metric
from tap_helpers import Records, Upstream, multipart, start_tap, wav_bytes, write_wav

from whisper_exporter.tap import TapConfig
from whisper_exporter.whisper import marker

TRANSCRIPTIONS = "/v1/audio/transcriptions"


ASKED = []  # response formats the FastAPI-like upstream was asked for


async def fastapi_like(request):
    """Answers as faster-whisper-server does: compact JSON, UTF-8 as is; text for text."""
    form = await request.post()
    fmt = form.get("response_format", "json")
    ASKED.append(fmt)
    if fmt == "verbose_json":
        body = {"task": "transcribe", "language": "en", "duration": 1.5, "text": " Hé \"there\"",
                "segments": [{"id": 0, "text": " Hé \"there\"", "avg_logprob": -0.2, "no_speech_prob": 0.01}]}
    elif fmt == "json":
        body = {"text": " Hé \"there\""}
    else:
        return web.Response(text=" Hé \"there\"\n")
    return web.Response(body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                        content_type="application/json")


class Seen:
    """What the upstream received, filled in by its handlers."""

    def __init__(self):
        self.bodies = []
        self.headers = []
        self.aborted = threading.Event()
        self.started = threading.Event()  # the sink has the first bytes of a body
        self.release = None  # an asyncio.Event, created on the upstream's loop


@pytest.fixture
def seen():
    return Seen()


@pytest.fixture
def upstream(seen):
    async def echo(request):
        body = await request.read()
        seen.bodies.append(body)
        seen.headers.append(request.headers.copy())
        resp = web.StreamResponse(status=201, reason="Made")
        resp.headers["X-Upstream"] = "yes"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.content_type = "application/json"
        await resp.prepare(request)  # no Content-Length: chunked
        await resp.write(b'{"text": "hello ')
        await resp.write(b'there", "language": "english"}')
        await resp.write_eof()
        return resp

    async def sse(request):
        await request.read()
        # Made before the first event leaves: the client may read it, and set this, before
        # this coroutine runs again (a loaded run saw release still None).
        seen.release = asyncio.Event()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b'data: {"type": "transcript.text.delta", "delta": "Hello"}\n\n')
        await asyncio.wait_for(seen.release.wait(), 30)  # until the client has read the first event
        await resp.write(b'data: {"type": "transcript.text.delta", "delta": " world"}\n\n')
        await resp.write(b'data: {"type": "transcript.text.done", "text": "Hello world"}\n\n')
        await resp.write_eof()
        return resp

    async def sink(request):
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                seen.started.set()
                digest.update(chunk)
                size += len(chunk)
        except Exception:
            seen.aborted.set()
            raise
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def cut(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"text": "' + b"x" * 90)
        await asyncio.sleep(0.05)
        request.transport.abort()  # the server dies mid-answer
        return resp

    async def die(request):
        await request.read()
        request.transport.abort()  # the server dies before answering
        return web.Response()

    server = Upstream({TRANSCRIPTIONS: echo, "/sse": sse, "/v1/audio/translations": sink, "/asr": sink,
                       "/cut": cut, "/die": die, "/health": echo})
    server.routes_seen = seen
    yield server
    server.stop()


@pytest.fixture
def records():
    return Records()


@pytest.fixture
def tap(upstream, records, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    t = start_tap(upstream.url, records, spool_dir=str(spool), max_in_memory=65536)
    t.spool_path = spool
    yield t
    t.stop()


def url(tap, path):
    return f"http://127.0.0.1:{tap.port}{path}"


def test_bytes_untouched_both_ways_and_the_record(tap, seen, records):
    audio = wav_bytes(1.5)
    body = multipart("XyZ123", {"model": "whisper-1", "language": "de", "response_format": "json"},
                     "file", "a.wav", audio)
    r = requests.post(url(tap, TRANSCRIPTIONS + "?x=1"), data=body,
                      headers={"Content-Type": "multipart/form-data; boundary=XyZ123", "X-Client": "c1"})
    assert r.status_code == 201 and r.reason == "Made"
    assert r.content == b'{"text": "hello there", "language": "english"}'
    assert r.headers["X-Upstream"] == "yes"
    assert r.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert seen.bodies == [body]
    assert seen.headers[0]["X-Client"] == "c1"
    assert seen.headers[0]["Host"] == f"127.0.0.1:{tap.port}"  # as the client sent it
    assert "X-Forwarded-For" not in seen.headers[0]
    assert seen.headers[0]["Content-Length"] == str(len(body))
    (rec,) = records.wait(1)
    assert (rec.endpoint, rec.method, rec.status, rec.api, rec.task) == (TRANSCRIPTIONS, "POST", 201, "openai",
                                                                          "transcribe")
    assert rec.request_bytes == len(body) and rec.response_bytes == len(r.content)
    assert rec.audio_duration == pytest.approx(1.5)
    assert (rec.language, rec.model, rec.response_format, rec.stream) == ("de", "whisper-1", "json", False)
    assert rec.transcript == "hello there" and rec.canary is False and rec.error is None
    assert 0 < rec.ttfb <= rec.duration
    tap.stop()  # waits for the record worker, which removes the spool after the callback
    assert list(tap.spool_path.iterdir()) == []  # 96 KB of audio went to disk and was removed


def test_compressed_bodies_pass_as_they_are():
    import gzip

    answer = gzip.compress(b'{"text": "squeezed"}')
    got = []

    async def zipped(request):
        got.append((await request.read(), request.headers.get("Content-Encoding")))
        return web.Response(body=answer, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    server = Upstream({TRANSCRIPTIONS: zipped})
    records = Records()
    tap = start_tap(server.url, records)
    try:
        upload = gzip.compress(b"--B\r\n...")
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=upload, stream=True,
                          headers={"Content-Encoding": "gzip", "Content-Type": "multipart/form-data; boundary=B"})
        raw = r.raw.read(decode_content=False)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert got == [(upload, "gzip")]
    assert raw == answer and r.headers["Content-Encoding"] == "gzip"
    assert rec.transcript is None and rec.analysis_error is None  # compressed: not analysed


def test_language_from_the_answer_when_the_request_has_none(tap, records):
    r = requests.post(url(tap, TRANSCRIPTIONS), files={"file": ("a.wav", wav_bytes(0.5))})
    assert r.status_code == 201
    (rec,) = records.wait(1)
    assert rec.language == "english" and rec.audio_duration == pytest.approx(0.5)


def test_asr_webservice_query_options(tap, records):
    r = requests.post(url(tap, "/asr?language=fr&output=json&task=translate"),
                      files={"audio_file": ("a.wav", wav_bytes(2.0))})
    assert r.status_code == 200
    (rec,) = records.wait(1)
    assert (rec.api, rec.language, rec.response_format, rec.task) == ("asr-webservice", "fr", "json", "translate")
    assert rec.audio_duration == pytest.approx(2.0)


def test_other_paths_pass_through(tap, records, seen):
    r = requests.get(url(tap, "/health"))
    assert r.status_code == 201 and r.content.startswith(b'{"text"')
    r = requests.get(url(tap, "/nowhere"))
    assert r.status_code == 404
    recs = records.wait(2)
    assert sorted((x.endpoint, x.status, x.api) for x in recs) == [("/health", 201, None), ("/nowhere", 404, None)]


def test_server_sent_events_reach_the_client_event_by_event(tap, upstream, seen, records):
    with requests.post(url(tap, "/sse"), data=b"x", stream=True, timeout=30) as r:
        lines = r.iter_lines()
        first = next(lines)
        # The upstream holds its second event back until now: the first came through alone.
        assert first == b'data: {"type": "transcript.text.delta", "delta": "Hello"}'
        upstream.loop.call_soon_threadsafe(seen.release.set)
        rest = [line for line in lines if line]
    assert rest[-1] == b'data: {"type": "transcript.text.done", "text": "Hello world"}'
    (rec,) = records.wait(1)
    assert rec.status == 200


def test_streamed_transcript_and_stream_flag():
    """An OpenAI-style event stream on the transcription path: the record has the stream flag,
    the done event's text, and a first byte before the last."""
    async def events(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delta in ("Hello", " world"):
            await resp.write(b'data: {"type": "transcript.text.delta", "delta": "%s"}\n\n' % delta.encode())
            await asyncio.sleep(0.05)
        await resp.write(b'data: {"type": "transcript.text.done", "text": "Hello world"}\n\n')
        return resp

    server = Upstream({TRANSCRIPTIONS: events})
    records = Records()
    tap = start_tap(server.url, records)
    try:
        body = multipart("b0", {"stream": "true", "language": "en"}, "file", "a.wav", wav_bytes(1.0))
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b0"})
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert r.status_code == 200 and r.content.endswith(b'"text": "Hello world"}\n\n')
    assert (rec.stream, rec.transcript, rec.language, rec.audio_duration) == (True, "Hello world", "en", 1.0)
    assert rec.ttfb < rec.duration


def test_canary_marks(tap, records):
    requests.post(url(tap, TRANSCRIPTIONS), files={"file": ("a.wav", wav_bytes(0.5))},
                  headers={marker.HEADER: marker.VALUE})
    requests.post(marker.marked_url(url(tap, TRANSCRIPTIONS)), files={"file": ("a.wav", wav_bytes(0.5))})
    requests.post(url(tap, TRANSCRIPTIONS), files={"file": ("a.wav", wav_bytes(0.5))})
    recs = records.wait(3)
    assert sorted(r.canary for r in recs) == [False, True, True]


def test_collector_keeps_canaries_apart(upstream):
    from whisper_exporter.collectors.tap import TapCollector

    col = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), upstream.url)
    done = Records()
    observe = col.observe
    col.tap.on_record = lambda rec: (observe(rec), done(rec))
    col.start()
    try:
        base = f"http://127.0.0.1:{col.tap.port}{TRANSCRIPTIONS}"
        requests.post(marker.marked_url(base), files={"file": ("a.wav", wav_bytes(0.5))})
        for _ in range(2):
            requests.post(base, files={"file": ("a.wav", wav_bytes(2.0))}, data={"language": "de"})
        done.wait(3)
        fams = {f.name: f for f in col.families()}
    finally:
        col.stop()
    requests_total = [(s.labels, s.value) for s in fams["whisper_requests"].samples if s.name.endswith("_total")]
    assert requests_total == [({"endpoint": TRANSCRIPTIONS, "status_code": "201", "language": "de"}, 2.0)]
    assert fams["whisper_canary_requests_seen"].samples[0].value == 1
    processed = fams["whisper_audio_processed_seconds"].samples
    assert [(s.labels["language"], s.value) for s in processed] == [("de", 4.0)]
    ttfb_count = [s.value for s in fams["whisper_tap_time_to_first_byte_seconds"].samples
                  if s.name.endswith("_count")]
    assert ttfb_count == [2.0]
    assert all(isinstance(f, Metric) for f in fams.values())


def test_upstream_down_gives_502_and_the_tap_keeps_serving(records):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    tap = start_tap(f"http://127.0.0.1:{port}", records)
    try:
        for _ in range(2):
            r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", b"x")})
            assert r.status_code == 502 and r.text == "upstream unreachable\n"
        assert tap.stats.snapshot()["errors"] == {"connect": 2}
        assert [x.error for x in records.wait(2)] == ["connect", "connect"]
    finally:
        tap.stop()


def test_a_502_keeps_the_language_the_request_sent(records):
    """Issue 21, 9a: upstream down, the upload's form fields still label the request (as a 400's do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    tap = start_tap(f"http://127.0.0.1:{port}", records, max_in_memory=65536)
    try:
        # The language field after a file bigger than max_in_memory: the whole upload is read.
        body = multipart("B", {}, "file", "a.wav", wav_bytes(3.0)).replace(
            b"--B--", b'--B\r\nContent-Disposition: form-data; name="language"\r\n\r\nde\r\n--B--')
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert r.status_code == 502
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", b"x")},
                          data={"language": "fr", "model": "tiny"})
        assert r.status_code == 502
        recs = records.wait(2)
        assert [(x.status, x.error, x.language) for x in recs] == [(502, "connect", "de"), (502, "connect", "fr")]
        assert recs[1].model == "tiny"
    finally:
        tap.stop()


def test_server_killed_mid_answer(tap, records):
    with pytest.raises(requests.exceptions.RequestException):
        r = requests.post(url(tap, "/cut"), data=b"x")
        r.content  # noqa: B018 (reading the rest must fail: the answer was cut)
    r = requests.post(url(tap, "/die"), data=b"x")
    assert r.status_code == 502 and r.text == "upstream closed the connection\n"
    r = requests.get(url(tap, "/health"))  # still serving
    assert r.status_code == 201
    recs = records.wait(3)
    assert sorted(filter(None, (x.error for x in recs))) == ["closed", "closed"]
    assert tap.stats.snapshot()["errors"] == {"closed": 2}


def _raw_upload(port, path, declared, send):
    s = socket.create_connection(("127.0.0.1", port))
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    s.sendall(head + send)
    return s


def test_client_gone_mid_upload_cancels_the_upstream_request(tap, seen, records):
    start = multipart("B", {}, "file", "a.wav", wav_bytes(10.0))[:100000]
    s = _raw_upload(tap.port, "/v1/audio/translations", 10 ** 6, start)
    assert seen.started.wait(30)  # the upload is on its way to the upstream
    s.close()
    assert seen.aborted.wait(30), "the upstream request was not cut"
    (rec,) = records.wait(1)
    assert rec.error == "client_gone" and rec.status is None
    assert rec.analysis_error is None and rec.audio_duration is None  # an incomplete upload is not read
    assert tap.stats.snapshot()["errors"] == {"client_gone": 1}
    r = requests.post(url(tap, "/v1/audio/translations"), data=b"abc")
    assert r.json()["size"] == 3  # still serving


def test_a_silent_client_gets_408_and_the_upstream_request_is_cut(upstream, seen):
    records = Records()
    tap = start_tap(upstream.url, records, client_timeout=0.5)
    try:
        s = _raw_upload(tap.port, "/v1/audio/translations", 10 ** 6, b"--B\r\n" + b"x" * 70000)
        s.settimeout(30)
        answer = s.recv(65536)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert seen.aborted.wait(30)
        (rec,) = records.wait(1)
        assert (rec.status, rec.error) == (408, "client_timeout")
    finally:
        tap.stop()


def test_leftover_spool_files_are_removed_at_start(upstream, tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / "whisper-tap-old.wav").write_bytes(b"RIFF")
    (folder / "keep.txt").write_text("not ours")
    tap = start_tap(upstream.url, Records(), spool_dir=str(folder))
    tap.stop()
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    fresh = tmp_path / "new" / "spool"
    tap = start_tap(upstream.url, Records(), spool_dir=str(fresh))
    tap.stop()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_a_slow_client_does_not_stall_others(tap, records):
    slow = _raw_upload(tap.port, "/v1/audio/translations", 10 ** 6, b"--B\r\n")
    try:
        for _ in range(3):  # other requests complete while the slow upload is open
            assert requests.post(url(tap, "/v1/audio/translations"), data=b"abc").json()["size"] == 3
        # A request leaves in_flight just after its last byte is sent: wait for the three to leave.
        assert wait_for(lambda: tap.stats.snapshot()["in_flight"] == 1)
        assert tap.stats.snapshot()["in_flight"] == 1
    finally:
        slow.close()
    records.wait(4)


def test_a_slow_server_answer_does_not_stall_others(tap, upstream, seen, records):
    with requests.post(url(tap, "/sse"), data=b"x", stream=True, timeout=30) as slow:
        lines = slow.iter_lines()
        next(lines)  # the upstream now holds this answer open
        for _ in range(3):
            assert requests.get(url(tap, "/health")).status_code == 201
        # the quick ones' own in-flight count falls just after their answers went out
        assert wait_for(lambda: tap.stats.snapshot()["in_flight"] == 1, timeout=10)
        upstream.loop.call_soon_threadsafe(seen.release.set)
        assert [line for line in lines if line][-1].startswith(b'data: {"type": "transcript.text.done"')
    records.wait(4)


def rss():
    return psutil.Process().memory_info().rss


def test_100mb_upload_is_streamed_with_flat_memory(tap, records, tmp_path):
    big = write_wav(tmp_path / "big.wav", 100e6 / 32000)  # 100 MB, 3125 s of 16 kHz audio
    small = write_wav(tmp_path / "small.wav", 1.0)

    def curl(path):
        out = subprocess.run(["curl", "-sS", "-F", f"file=@{path}", "-w", "\n%{http_code} %{size_upload}",
                              url(tap, "/v1/audio/translations")], capture_output=True, check=True)
        body, _, tail = out.stdout.rpartition(b"\n")
        code, size = tail.split()
        return int(code), json.loads(body), int(float(size))

    curl(small)  # warm up
    before = rss()
    code, answer, sent = curl(big)
    growth = rss() - before
    assert code == 200 and answer["size"] == sent > 100e6
    assert growth < 40e6, f"RSS grew by {growth / 1e6:.0f} MB for a 100 MB upload"
    recs = records.wait(2)
    assert recs[-1].audio_duration == pytest.approx(3125, rel=1e-6)
    assert recs[-1].request_bytes == sent
    tap.stop()
    assert list(tap.spool_path.iterdir()) == []


def test_malformed_multipart_is_proxied_and_counted(tap, seen, records):
    body = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF" + b"\0" * 500
    r = requests.post(url(tap, TRANSCRIPTIONS), data=body,
                      headers={"Content-Type": "multipart/form-data; boundary=B"})  # no closing boundary
    assert r.status_code == 201
    assert seen.bodies == [body]
    garbage = b"this is not multipart at all\r\n--Q\r\n\r\n\r\n"
    r = requests.post(url(tap, TRANSCRIPTIONS), data=garbage,
                      headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 201 and seen.bodies[-1] == garbage
    recs = records.wait(2)
    assert [x.analysis_error for x in recs] == ["multipart", "multipart"]
    assert tap.stats.snapshot()["analysis_errors"] == {"multipart": 2}


def test_non_audio_file_is_proxied_and_counted(tap, seen, records):
    r = requests.post(url(tap, TRANSCRIPTIONS), files={"file": ("notes.txt", b"just some text\n" * 100)})
    assert r.status_code == 201
    (rec,) = records.wait(1)
    assert rec.analysis_error == "audio" and rec.audio_duration is None
    assert tap.stats.snapshot()["analysis_errors"] == {"audio": 1}


def test_a_failing_callback_loses_nothing_but_its_own_work(upstream):
    def boom(record):
        raise RuntimeError("sampler broke")

    tap = start_tap(upstream.url, boom)
    try:
        for _ in range(2):
            r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", b"RIFF")})
            assert r.status_code == 201
        # both records reach the callback before the stop: a stop drops what is still queued, as an
        # exit does (run alone, the worker's first record is slow and the second was still queued)
        assert wait_for(lambda: tap.stats.snapshot()["analysis_errors"].get("callback") == 2, timeout=10)
        assert tap.stats.snapshot()["dropped"].get("shutdown", 0) == 0  # nothing was lost
    finally:
        tap.stop()


def test_wants_audio_keeps_the_upload_until_the_callback_returns(upstream, tmp_path):
    audio = wav_bytes(0.75)
    seen_files = []

    def on_record(record):
        path = record.audio_path
        mode = stat.S_IMODE(os.stat(path).st_mode)
        seen_files.append((path, open(path, "rb").read() == audio, mode))

    tap = start_tap(upstream.url, on_record, wants_audio=lambda rec: rec.language == "de",
                    spool_dir=str(tmp_path))
    try:
        for language in ("de", "de"):
            requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", audio)},
                          data={"language": language})
    finally:
        tap.stop()  # waits for the records' worker
    assert [(same, mode) for _, same, mode in seen_files] == [(True, 0o600), (True, 0o600)]
    assert not any(os.path.exists(p) for p, _, _ in seen_files)


@pytest.mark.parametrize("fields", [{}, {"response_format": "json"}, {"language": "en", "response_format": "json"}])
def test_response_format_upgrade(upstream, seen, fields):
    records = Records()
    tap = start_tap(upstream.url, records, upgrade_response_format=True)
    try:
        body = multipart("Bnd", fields, "file", "a.wav", wav_bytes(1.5))
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body,
            headers={"Content-Type": "multipart/form-data; boundary=Bnd"})
    finally:
        tap.stop()
    assert r.status_code == 201
    assert seen.bodies[0] != body  # the server was asked for verbose_json
    assert b'name="response_format"\r\n\r\nverbose_json\r\n' in seen.bodies[0]
    assert seen.bodies[0].count(b"response_format") == 1
    assert seen.bodies[0].endswith(body[body.index(b"--Bnd\r\nContent-Disposition: form-data; name=\"file\""):])


def test_upgraded_answer_is_rendered_back_to_the_json_shape():
    """A FastAPI-like upstream answers json or verbose_json; through an upgrading tap, a json
    request gets exactly the json answer, and the record the verbose one's segments."""
    server = Upstream({TRANSCRIPTIONS: fastapi_like})
    records = Records()
    tap = start_tap(server.url, records, upgrade_response_format=True)
    ASKED.clear()
    try:
        direct = requests.post(server.url + TRANSCRIPTIONS, files={"file": ("a.wav", wav_bytes(1.5))})
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", wav_bytes(1.5))})
        text = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", wav_bytes(1.5))},
                             data={"response_format": "text"})
        upgraded, plain = records.wait(2)
    finally:
        tap.stop()
        server.stop()
    assert ASKED == ["json", "verbose_json", "text"]
    assert r.content == direct.content == '{"text":" Hé \\"there\\""}'.encode()
    assert r.headers["Content-Length"] == str(len(r.content))
    assert text.text == ' Hé "there"\n'
    assert upgraded.upgraded and upgraded.response_format == "json" and upgraded.language == "en"
    assert upgraded.segments[0]["avg_logprob"] == -0.2 and upgraded.transcript == ' Hé "there"'
    assert not plain.upgraded and plain.response_format == "text"


def test_config_check_names_the_field():
    from whisper_exporter.config import ConfigError, from_dict

    for bad, name in (({"listen": "nope"}, "listen"), ({"read_timeout": 0}, "read_timeout"),
                      ({"max_in_memory": 0}, "max_in_memory"), ({"upstream": "ftp://x"}, "upstream"),
                      ({"read_timeout": "soon"}, "read_timeout")):
        with pytest.raises(ConfigError) as err:
            from_dict({"collectors": {"tap": bad}})
        assert err.value.key == f"collectors.tap.{name}"
    assert from_dict({"collectors": {"tap": {"read_timeout": "10m"}}}).collectors.tap.read_timeout == 600
    with pytest.raises(ConfigError) as err:  # samples need the review queue they are listed in
        from_dict({"collectors": {"tap": {"sample_dir": "/tmp/x"}}})
    assert err.value.key == "collectors.quality.production.queue"
    assert TapConfig().enabled is False and TapConfig().upgrade_response_format is False


def test_marker_helpers():
    token = marker.VALUE
    assert len(token) >= 32 and token != "1"  # random per process (secrets.token_urlsafe)
    assert marker.marked_url("http://h/v1/audio/transcriptions") == \
        f"http://h/v1/audio/transcriptions?whisper_exporter_canary={token}"
    assert marker.marked_url("http://h/asr?output=json") == f"http://h/asr?output=json&whisper_exporter_canary={token}"
    assert marker.is_canary({marker.HEADER: token}) and marker.is_canary(None, {marker.QUERY: token})
    assert not marker.is_canary({}, {}) and not marker.is_canary({marker.HEADER: "0"}, {marker.QUERY: "yes"})
    # The old constant marker, and a token with one character changed, are spoofs.
    assert marker.classify({marker.HEADER: "1"}) == marker.classify(None, {marker.QUERY: "1"}) == marker.SPOOFED
    assert marker.classify({marker.HEADER: token[:-1] + ("A" if token[-1] != "A" else "B")}) == marker.SPOOFED
    assert marker.classify({marker.HEADER: token}, {marker.QUERY: "1"}) == marker.SPOOFED  # one bad mark is enough
    assert marker.classify({"X-Other": token}, {}) is None
    assert marker.classify_target(f"/asr?task=transcribe&{marker.QUERY_STRING}") == marker.GENUINE
    assert marker.classify_target("/asr?whisper_exporter_canary=1") == marker.SPOOFED
    assert marker.classify_target("/asr?task=transcribe") is None and marker.classify_target("/asr") is None
    source = open(marker.__file__).read()
    assert "import aiohttp" not in source and "prometheus_client" not in source


def test_read_answer_formats():
    from whisper_exporter.tap.analysis import read_answer

    verbose = read_answer(b'{"task":"transcribe","language":"german","duration":2.5,"text":" Hallo",'
                          b'"segments":[{"id":0,"text":" Hallo","no_speech_prob":0.1}]}', "application/json")
    assert (verbose.text, verbose.language, verbose.duration) == (" Hallo", "german", 2.5)
    assert verbose.segments == [{"id": 0, "text": " Hallo", "no_speech_prob": 0.1}]
    assert read_answer(b"Hallo\n", "text/plain; charset=utf-8").text == "Hallo\n"
    assert read_answer(b"1\n00:00:00,000 --> 00:00:01,000\nHallo\n", "application/x-subrip").text is None
    # A stream of JSON segments (speaches), with its language.
    stream = read_answer(b'data: {"text":" One.","language":"en"}\n\ndata: {"text":" Two."}\n\n', "text/event-stream")
    assert (stream.text, stream.language) == (" One. Two.", "en")
    with pytest.raises(ValueError):
        read_answer(b"{not json", "application/json")


def test_the_upload_analyzer_never_raises_on_any_bytes():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from whisper_exporter.tap.analysis import UploadAnalyzer

    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=10), st.booleans())
    def check(data, cuts, prefixed):
        body = (head if prefixed else b"") + data
        analyzer = UploadAnalyzer(b"B", 100, 1000, None)
        pos = 0
        for cut in cuts + [len(body)]:
            analyzer.feed(body[pos:pos + cut])
            pos += cut
        analyzer.finish()
        assert analyzer.error in (None, "multipart", "too_large")
        if analyzer.spool is not None:
            analyzer.spool.discard()
            assert analyzer.spool.path is None

    check()


def test_a_taken_port_fails_start_with_oserror(upstream):
    first = start_tap(upstream.url, Records())
    try:
        from whisper_exporter.tap.proxy import Tap

        second = Tap(TapConfig(enabled=True, listen=f"127.0.0.1:{first.port}"), upstream.url, Records())
        with pytest.raises(OSError):
            second.start()
        assert requests.get(url(first, "/health")).status_code == 201  # the first one serves on
    finally:
        first.stop()


def test_repeated_faults_keep_memory_flat(tap, seen, records):
    audio = wav_bytes(5.0)  # 160 KB: spooled to disk at this tap's 64 KB threshold
    bad = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + audio

    def faults():
        try:
            _ = requests.post(url(tap, "/cut"), data=audio).content
        except requests.exceptions.RequestException:
            pass
        assert requests.post(url(tap, "/die"), data=audio).status_code == 502
        s = _raw_upload(tap.port, "/v1/audio/translations", 10 ** 6, bad[:100000])
        s.close()
        assert requests.post(url(tap, TRANSCRIPTIONS), data=bad,
                             headers={"Content-Type": "multipart/form-data; boundary=B"}).status_code == 201
        assert requests.post(url(tap, TRANSCRIPTIONS), files={"file": ("a.txt", b"text" * 40000)}).status_code == 201
        # The test's upstream keeps every body it received (160 KB each): not the tap's memory.
        del seen.bodies[:], seen.headers[:]

    for _ in range(5):  # warm up
        faults()
    before = rss()
    for _ in range(40):
        faults()
    records.wait(45 * 4)  # (a client-gone upload may end before the tap's handler starts)
    growth = rss() - before
    assert growth < 20e6, f"RSS grew by {growth / 1e6:.0f} MB over 200 faulty requests"
    errors = tap.stats.snapshot()["errors"]
    assert errors["closed"] == 90 and errors["client_gone"] >= 1
    assert requests.get(url(tap, "/health")).status_code == 201
    tap.stop()
    assert list(tap.spool_path.iterdir()) == []


class _ClosesAfterEachAnswer(socketserver.StreamRequestHandler):
    """A server closing a kept-alive connection: uvicorn after a 500 from an exception (the
    answer, no `Connection: close`, then the close), or any server whose keep-alive ran out. A
    request that comes on it meanwhile is never answered. Here the close is held back, so a
    reused connection always meets it (under load, it raced the tap's next request)."""

    def handle(self) -> None:
        head = self.rfile.readline()
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.rfile.read(length)
        status = b"500 Internal Server Error" if b" /fail" in head else b"200 OK"
        self.wfile.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
        self.wfile.flush()
        self.rfile.readline()  # a second request on this connection: closed unanswered


def test_a_connection_the_server_closes_after_answering_is_never_reused(records):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ClosesAfterEachAnswer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tap = start_tap(f"http://127.0.0.1:{server.server_address[1]}", records)
    try:
        assert requests.post(url(tap, "/fail"), data=b"x", timeout=10).status_code == 500
        assert requests.post(url(tap, "/ok"), data=b"x", timeout=10).status_code == 200
    finally:
        tap.stop()
        server.shutdown()
        server.server_close()
