"""A hostile client gets nothing more from the tap than from the server (issue 22, round three).

Real sockets on loopback: raw clients (a socket, curl), the tap, an aiohttp upstream of our
own that reports what it received, and a second listener (a plain socket server) standing
for every other service on the host: no request form may reach it."""
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

import pytest
import requests
import yaml
from aiohttp import web
from helpers import free_port, require_tool, wait_for
from tap_helpers import Records, Upstream, multipart, start_tap, wav_bytes

from whisper_exporter import config as configuration
from whisper_exporter.tap import TapConfig
from whisper_exporter.whisper import marker

TRANSCRIPTIONS = "/v1/audio/transcriptions"
PASSWORD = "S3cretPw"
ROOT = Path(__file__).resolve().parent.parent


class Listener:
    """A plain TCP server on loopback that records every connection and the bytes it got;
    it answers like a web server would, so a tap that reached it would pass the answer on."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0  # counted at accept, before anything is read
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
            except OSError:
                pass
            self.received.append(data)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nOTHER SERVICE")
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send one raw request and read the whole answer (the tap closes after a refusal)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        try:
            while True:
                piece = s.recv(65536)
                if not piece:
                    break
                out += piece
        except socket.timeout:
            pass
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


@pytest.fixture
def reporter():
    """An upstream that answers with the raw request target and Authorization it received."""
    seen = []

    async def report(request):
        await request.read()
        seen.append((request.method, request.raw_path, request.headers.get("Authorization")))
        return web.json_response({"text": "ok", "target": request.raw_path})

    server = Upstream({"/{tail:.*}": report})
    server.seen = seen
    yield server
    server.stop()


@pytest.fixture
def other():
    listener = Listener()
    yield listener
    listener.close()


# -- item 1: only the configured upstream -------------------------------------

REFUSED = [
    "CONNECT @127.0.0.1:{other} HTTP/1.1",  # the report's repro
    "CONNECT 127.0.0.1:{other} HTTP/1.1",  # authority-form
    "GET @127.0.0.1:{other} HTTP/1.1",
    "POST @127.0.0.1:{other}/v1/audio/transcriptions HTTP/1.1",
    "GET http://127.0.0.1:{other}/ HTTP/1.1",  # absolute-form
    "POST http://127.0.0.1:{other}/v1/audio/transcriptions HTTP/1.1",
    "GET 127.0.0.1:{other} HTTP/1.1",
    "OPTIONS * HTTP/1.1",  # asterisk-form
]
# Origin-form targets that name a host in their path: forwarded, to the configured upstream only.
FORWARDED = ["GET //127.0.0.1:{other}/x HTTP/1.1", "GET /@127.0.0.1:{other} HTTP/1.1",
             "GET /x/..//127.0.0.1:{other}/ HTTP/1.1", "GET /?@127.0.0.1:{other} HTTP/1.1"]


@pytest.mark.parametrize("line", REFUSED + FORWARDED)
def test_no_request_form_reaches_another_host(reporter, other, line):
    upstream = f"http://admin:{PASSWORD}@127.0.0.1:{reporter.port}"
    records = Records()
    tap = start_tap(upstream, records)
    try:
        request_line = line.format(other=other.port)
        answer = exchange(tap.port, f"{request_line}\r\nHost: 127.0.0.1:{other.port}\r\n"
                                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        # The answer came, so the tap is done with the request; a connection it made to the other
        # service was accepted before that, and is given a moment to be counted.
        time.sleep(0.2)
    finally:
        tap.stop()
    assert other.connections == 0 and other.received == [], \
        f"{request_line!r} reached the other service: {other.received}"
    assert b"OTHER SERVICE" not in answer
    if line in REFUSED:
        assert status_of(answer) == 400, answer
        assert reporter.seen == []  # refused before any upstream connection
    else:
        assert status_of(answer) == 200, answer
        target = request_line.split(" ")[1]
        # To the configured upstream, with its credentials, the target as sent.
        assert [(m, t) for m, t, _ in reporter.seen] == [("GET", target)]
        assert reporter.seen[0][2] is not None and reporter.seen[0][2].startswith("Basic ")
    assert PASSWORD.encode() not in answer


def test_refused_targets_are_counted(reporter):
    tap = start_tap(reporter.url, Records())
    try:
        for line in (b"CONNECT @127.0.0.1:1 HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET http://127.0.0.1:1/ HTTP/1.1"):
            assert status_of(exchange(tap.port, line + b"\r\nHost: x\r\n\r\n")) == 400
        assert wait_for(lambda: tap.stats.snapshot()["errors"].get("bad_target") == 3)
    finally:
        tap.stop()


@pytest.mark.parametrize("target", ["/v1/audio/transcriptions?x=%20y&z=%2f&w=a+b", "/a%2Fb/%41%7e~/c;p=1?",
                                    "/%E2%82%AC/x?q=%E2%82%AC", "/v1/audio/transcriptions"])
def test_the_path_reaches_the_server_as_sent(reporter, target):
    tap = start_tap(reporter.url + "/base/", Records())
    try:
        answer = exchange(tap.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    finally:
        tap.stop()
    assert status_of(answer) == 200
    sent = target[:-1] if target.endswith("?") else target  # an empty query has nothing to keep
    assert [t for _, t, _ in reporter.seen] == ["/base" + sent]


def test_the_upstream_url_keeps_the_configured_authority():
    from yarl import URL

    from whisper_exporter.tap.proxy import upstream_url

    for base in ("http://[::1]:8000", f"https://admin:{PASSWORD}@asr.internal:8443/base", "http://127.0.0.1:18000"):
        configured = URL(base)
        for target in ("/@127.0.0.1:18001", "//127.0.0.1:18001/x", "/v1/x?next=http://127.0.0.1:18001/@a"):
            url = upstream_url(configured, target)
            assert (url.scheme, url.raw_authority) == (configured.scheme, configured.raw_authority), (base, target)
            assert url.raw_path_qs == configured.raw_path.rstrip("/") + target


# -- item 10: Expect: 100-continue ---------------------------------------------

def test_expect_100_continue_is_answered_before_the_body(reporter):
    tap = start_tap(reporter.url, Records())
    body = multipart("b0undary", {"model": "m"}, "file", "a.wav", wav_bytes(1.0))
    try:
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
            s.sendall(f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                      f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {len(body)}\r\n"
                      "Connection: close\r\n\r\n".encode())
            interim = b""
            while b"\r\n\r\n" not in interim:  # the tap must answer before it gets the body
                piece = s.recv(4096)
                assert piece, "the tap closed the connection"
                interim += piece
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(body)
            rest = b""
            while piece := s.recv(65536):
                rest += piece
    finally:
        tap.stop()
    final = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):] + rest
    assert status_of(final) == 200 and json.loads(final.split(b"\r\n\r\n", 1)[1])["text"] == "ok"
    assert [m for m, _, _ in reporter.seen] == ["POST"]


def test_curl_upload_over_a_megabyte_gets_100_continue(reporter, tmp_path):
    curl = require_tool("curl")
    audio = tmp_path / "big.wav"
    audio.write_bytes(wav_bytes(40.0))  # 1.28 MB: curl sends Expect: 100-continue above 1 MB
    tap = start_tap(reporter.url, Records())
    try:
        done = subprocess.run([curl, "-sS", "-v", "-F", f"file=@{audio}", "-F", "model=m",
                               f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}"],
                              capture_output=True, text=True, timeout=60)
    finally:
        tap.stop()
    assert done.returncode == 0, done.stderr
    assert "> Expect: 100-continue" in done.stderr
    assert "< HTTP/1.1 100 Continue" in done.stderr  # curl did not have to give up waiting
    assert json.loads(done.stdout)["text"] == "ok"


# -- item 11: a long boundary ---------------------------------------------------

def test_a_boundary_over_256_bytes_is_proxied_and_counted():
    got = []

    async def keep(request):
        got.append(await request.read())
        return web.json_response({"text": "fine"})

    server = Upstream({TRANSCRIPTIONS: keep})
    records = Records()
    tap = start_tap(server.url, records)
    boundary = "b" * 300
    body = multipart(boundary, {"model": "m"}, "file", "a.wav", wav_bytes(0.5))
    try:
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert r.status_code == 200 and r.json() == {"text": "fine"}
    assert got == [body]
    assert rec.analysis_error == "multipart" and rec.audio_duration is None
    assert tap.stats.snapshot()["analysis_errors"] == {"multipart": 1}


# -- item 12: the upgrade past 64 parts ------------------------------------------

def test_upgrade_with_more_than_64_parts_before_response_format_is_proxied():
    got = []

    async def keep(request):
        got.append(await request.read())
        return web.json_response({"text": "fine"})

    server = Upstream({TRANSCRIPTIONS: keep})
    records = Records()
    tap = start_tap(server.url, records, upgrade_response_format=True)
    boundary = "xyz"
    fields = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n{i}\r\n" for i in range(70))
    body = fields.encode() + multipart(boundary, {"response_format": "json"}, "file", "a.wav", wav_bytes(0.5))
    try:
        r = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.stop()
    assert r.status_code == 200 and r.json() == {"text": "fine"}
    assert got == [body]  # not upgraded: sent as it came
    assert rec.error is None and rec.upgraded is False and rec.transcript == "fine"


# -- item 13: the audio duration a header claims ----------------------------------

def lying_wav(seconds: float, claimed: float, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV holding `seconds` of audio whose header says `claimed`."""
    data = b"\0\0" * int(seconds * rate)
    size = int(claimed * rate) * 2
    return b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", size) + data


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_wav_header_claiming_more_audio_than_sent_counts_the_bytes(reporter, in_memory, tmp_path):
    records = Records()
    tap = start_tap(reporter.url, records, max_in_memory=1 << 20 if in_memory else 1024, spool_dir=str(tmp_path))
    url = f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}"
    try:
        requests.post(url, files={"file": ("a.wav", lying_wav(4.0, 3600.0))}, timeout=30)
        requests.post(url, files={"file": ("b.wav", wav_bytes(4.0))}, timeout=30)
        lied, honest = records.wait(2)
    finally:
        tap.stop()
    assert lied.analysis_error is None and lied.audio_duration == pytest.approx(4.0)
    assert honest.audio_duration == pytest.approx(4.0)
    assert tap.stats.snapshot()["duration_mismatches"] == 1


def test_wav_received_seconds():
    from whisper_exporter.tap.analysis import wav_received_seconds

    def seconds(data: bytes):
        return wav_received_seconds(io.BytesIO(data), len(data))

    assert seconds(lying_wav(2.0, 3600.0)) == pytest.approx(2.0)
    honest = wav_bytes(3.0)
    assert seconds(honest) == pytest.approx(3.0)
    assert seconds(honest + b"LIST" + struct.pack("<I", 4) + b"INFO") == pytest.approx(3.0)  # a chunk after the data
    # A big chunk before the data does not hide a lie.
    junk = b"JUNK" + struct.pack("<I", 200_001) + b"\0" * 200_002
    lie = lying_wav(1.0, 3600.0)
    assert seconds(lie[:36] + junk + lie[36:]) == pytest.approx(1.0)
    mp3_in_wav = bytearray(honest)
    mp3_in_wav[20:22] = struct.pack("<H", 0x0055)  # MPEG layer 3: the bytes say nothing exact
    assert seconds(bytes(mp3_in_wav)) is None
    assert seconds(b"fLaC" + b"\0" * 40) is None
    assert seconds(honest[:30]) is None  # a cut fmt chunk


# -- item 18: status lines, log flood -----------------------------------------------

class RawUpstream:
    """An upstream that answers every request with the given raw bytes, then closes."""

    def __init__(self, answer: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                conn.sendall(self.answer)
                time.sleep(0.2)
            except OSError:
                pass
            finally:
                conn.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw bytes",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi",
])
def test_an_upstream_status_outside_2xx_to_5xx_gives_502(answer):
    server = RawUpstream(answer)
    records = Records()
    tap = start_tap(f"http://127.0.0.1:{server.port}", records)
    try:
        got = exchange(tap.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        (rec,) = records.wait(1)
    finally:
        tap.stop()
        server.sock.close()
    assert status_of(got) == 502, got
    assert (rec.status, rec.error) == (502, "protocol")


MALFORMED = [b"GET /\x01x HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
             b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/9.9\r\n\r\n"]


def test_malformed_requests_on_the_tap_log_one_line_without_traceback(reporter, caplog):
    tap = start_tap(reporter.url, Records())
    for quiet in logging.getLogger("aiohttp.server").filters:  # an earlier test's line does not count
        if hasattr(quiet, "last"):
            quiet.last = float("-inf")
    try:
        with caplog.at_level(logging.DEBUG, logger="aiohttp"):
            for _ in range(5):
                for raw in MALFORMED:
                    assert status_of(exchange(tap.port, raw)) in (0, 400)
    finally:
        tap.stop()
    lines = [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.INFO]
    assert all(r.exc_info is None and "Traceback" not in r.getMessage() for r in lines), \
        [r.getMessage() for r in lines]
    assert len(lines) == 1  # one line a minute, for both servers together
    assert all(len(r.getMessage()) < 200 and r.getMessage().startswith("malformed request from") for r in lines)


def test_malformed_requests_on_both_ports_of_the_exporter_log_no_traceback(reporter, tmp_path):
    metrics_port, tap_port = free_port(), free_port()
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{metrics_port}", "collectors": {
        "gpu": {"enabled": False}, "quality": {"enabled": False}, "probe": {"enabled": False},
        "logs": {"enabled": False}, "process": {"enabled": False},
        "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}", "upstream": reporter.url}}}))
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(config)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            def up() -> bool:
                assert proc.poll() is None, stderr_path.read_text()
                try:
                    return requests.get(f"http://127.0.0.1:{metrics_port}/-/ready", timeout=2).status_code == 200 \
                        and requests.get(f"http://127.0.0.1:{tap_port}/v1/models", timeout=2).status_code == 200
                except requests.RequestException:
                    return False
            assert wait_for(up, timeout=60)
            for port in (metrics_port, tap_port):
                for _ in range(5):
                    for raw in MALFORMED:
                        exchange(port, raw)
            assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(20)
    text = stderr_path.read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[:3000]
    malformed = [line for line in text.splitlines() if "malformed request" in line]
    assert len(malformed) == 1, text[:3000]
    assert len(malformed[0]) < 300


# -- item 8: the canary mark -------------------------------------------------------

def test_a_spoofed_canary_mark_is_user_traffic_and_counted(reporter):
    from whisper_exporter.collectors.tap import TapCollector

    col = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), reporter.url)
    done = Records()
    observe = col.observe
    col.tap.on_record = lambda rec: (observe(rec), done(rec))
    col.start()
    base = f"http://127.0.0.1:{col.tap.port}{TRANSCRIPTIONS}"
    audio = {"file": ("a.wav", wav_bytes(1.0))}
    try:
        requests.post(base, files=audio, headers={marker.HEADER: "1"})  # the old constant
        requests.post(base + "?whisper_exporter_canary=1", files=audio)
        requests.post(base, files=audio, headers={marker.HEADER: "guessed-" + "x" * 30})
        requests.post(marker.marked_url(base), files=audio, headers={marker.HEADER: marker.VALUE})  # the exporter
        recs = done.wait(4)
        fams = {f.name: f for f in col.families()}
    finally:
        col.stop()
    assert [r.canary for r in recs] == [False, False, False, True]
    assert [r.canary_spoofed for r in recs] == [True, True, True, False]
    total = sum(s.value for s in fams["whisper_requests"].samples if s.name.endswith("_total"))
    assert total == 3
    assert [(s.labels, s.value) for s in fams["whisper_canary_requests_seen"].samples] == [({"source": "tap"}, 1)]
    assert [(s.labels, s.value) for s in fams["whisper_canary_requests_spoofed"].samples] == [({"source": "tap"}, 3)]
    processed = sum(s.value for s in fams["whisper_audio_processed_seconds"].samples)
    assert processed == pytest.approx(3.0)  # the spoofers' audio is counted as users'
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(type("C", (), {"collect": lambda self: col.families()})())
    assert marker.VALUE.encode() not in generate_latest(registry)


def test_the_exporters_own_client_through_the_tap_is_a_canary(reporter):
    from whisper_exporter.whisper.clients import OpenAIClient

    records = Records()
    tap = start_tap(reporter.url, records)
    try:
        client = OpenAIClient(f"http://127.0.0.1:{tap.port}", model="m", timeout=30)
        result = client.transcribe(wav_bytes(0.5), "a.wav")
        (rec,) = records.wait(1)
    finally:
        tap.stop()
    assert (rec.canary, rec.canary_spoofed) == (True, False)
    # The token is the exporter's secret: the debug output shows it masked.
    shown = repr(result.exchange) + repr(client)
    assert marker.VALUE not in shown and "<masked>" in shown


def test_a_spoofed_mark_in_an_access_log_is_user_traffic():
    from whisper_exporter.logfiles.parse import Record
    from whisper_exporter.runtime.requests import Labels, RequestMetrics

    metrics = RequestMetrics(Labels(None, None, None))
    for target in (f"{TRANSCRIPTIONS}?whisper_exporter_canary=1", f"/asr?task=transcribe&{marker.QUERY_STRING}",
                   f"{TRANSCRIPTIONS}?{marker.QUERY_STRING}&whisper_exporter_canary=1", TRANSCRIPTIONS):
        metrics.observe(Record(target, "200", "en", 0.5, None, None, 1.0, None, None, None, None))
    fams = {f.name: f for f in metrics.families()}
    assert sum(s.value for s in fams["whisper_requests"].samples if s.name.endswith("_total")) == 3
    assert [(s.labels, s.value) for s in fams["whisper_canary_requests_seen"].samples] == [({"source": "log"}, 1)]
    assert [(s.labels, s.value) for s in fams["whisper_canary_requests_spoofed"].samples] == [({"source": "log"}, 2)]


def test_a_token_in_the_environment_is_shared(tmp_path):
    token = "shared-token-" + "a" * 20
    code = "from whisper_exporter.whisper import marker; print(marker.VALUE)"
    env = {**os.environ, marker.ENV: token}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() == token
    env[marker.ENV] = "short"  # guessable: ignored, a random one is used
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert other.stdout.strip() not in ("short", "") and len(other.stdout.strip()) >= 32


# -- item 7: the upstream's credentials ----------------------------------------------

def test_tap_upstream_user_info_is_masked_where_shown(reporter):
    from whisper_exporter.collectors.tap import TapCollector

    upstream = f"http://admin:{PASSWORD}@127.0.0.1:{reporter.port}"
    c = configuration.from_dict({"collectors": {"tap": {"enabled": True, "upstream": upstream}}})
    shown = configuration.masked(c)
    assert shown["collectors"]["tap"]["upstream"] == f"http://admin:<masked>@127.0.0.1:{reporter.port}"
    assert PASSWORD not in yaml.safe_dump(shown)
    col = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0", upstream=upstream), upstream)
    assert PASSWORD not in col.status and "admin:<masked>@" in col.status


def test_status_page_masks_the_tap_upstream(reporter):
    from whisper_exporter import wiring as daemon

    upstream = f"http://admin:{PASSWORD}@127.0.0.1:{reporter.port}"
    c = configuration.from_dict({"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "quality": {"enabled": False}, "probe": {"enabled": False},
        "logs": {"enabled": False}, "process": {"enabled": False},
        "tap": {"enabled": True, "listen": "127.0.0.1:0", "upstream": upstream}}})
    running = daemon.start(c)
    try:
        page = requests.get(running.url + "/", timeout=10).text
    finally:
        running.close()
    assert "proxying 127.0.0.1:0 -&gt; http://admin:&lt;masked&gt;@" in page  # the collector's status
    assert "upstream: http://admin:&lt;masked&gt;@" in page  # the effective configuration
    assert PASSWORD not in page
