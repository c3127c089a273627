"""The tap's upstream connections: reused while fresh, never where reuse would turn a POST into a 502."""
from __future__ import annotations

import socketserver
import threading
import time
from typing import Iterator

import pytest
import requests
from tap_helpers import Records, start_tap

from whisper_exporter.config import ConfigError, from_dict


class _KeepAlive(socketserver.StreamRequestHandler):
    """An HTTP/1.1 server with keep-alive that counts its connections. Like uvicorn, it closes a
    connection idle past its keep-alive, and after a 500 (which it answers without `Connection:
    close`). Each close is held back until the next request arrives on that connection, which is
    then never answered: the race a pooled connection loses, made certain."""

    keepalive = 60.0  # seconds, set per server
    server: "_Server"

    def handle(self) -> None:
        self.server.connections += 1
        idle_since, closing = time.monotonic(), False
        while True:
            head = self.rfile.readline()
            if not head:
                return
            if closing or time.monotonic() - idle_since > self.keepalive:
                return  # closed with the request unanswered
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.rfile.read(length)
            if b" /fail-slow" in head:  # the head first, the body a moment later
                self.wfile.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\n")
                self.wfile.flush()
                time.sleep(0.2)
                self.wfile.write(b"oops")
                closing = True
            elif b" /fail" in head:
                self.wfile.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")
                closing = True
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.wfile.flush()
            idle_since = time.monotonic()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    connections = 0


def _serve(keepalive: float) -> Iterator[_Server]:
    handler = type("Handler", (_KeepAlive,), {"keepalive": keepalive})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    yield from _serve(60.0)


@pytest.fixture
def quick_server() -> Iterator[_Server]:
    """A server whose keep-alive (0.3 s) is shorter than the tap's default reuse window (1 s)."""
    yield from _serve(0.3)


def _post(tap, path: str) -> int:
    return requests.post(f"http://127.0.0.1:{tap.port}{path}", data=b"x" * 1000, timeout=10).status_code


def test_back_to_back_requests_share_one_upstream_connection(server):
    """Reuse saves a connect per request (benchmarks/bench_tap.py); one connection per request before."""
    tap = start_tap(f"http://127.0.0.1:{server.server_address[1]}", Records())
    try:
        assert [_post(tap, "/ok") for _ in range(5)] == [200] * 5
    finally:
        tap.stop()
    assert server.connections == 1


def test_upstream_keepalive_0_opens_one_connection_per_request(server):
    tap = start_tap(f"http://127.0.0.1:{server.server_address[1]}", Records(), upstream_keepalive=0)
    try:
        assert [_post(tap, "/ok") for _ in range(3)] == [200] * 3
    finally:
        tap.stop()
    assert server.connections == 3


def test_a_connection_idle_past_upstream_keepalive_is_not_reused(quick_server):
    """Below the server's keep-alive, the server never closes a connection the tap would reuse."""
    records = Records()
    tap = start_tap(f"http://127.0.0.1:{quick_server.server_address[1]}", records, upstream_keepalive=0.1)
    try:
        assert _post(tap, "/ok") == 200
        time.sleep(0.5)  # past both keep-alives: a reused connection would meet the server's close
        assert _post(tap, "/ok") == 200
        assert _post(tap, "/ok") == 200  # back to back: reused
        done = records.wait(3)  # before the stop, which drops what is still queued (as an exit does)
    finally:
        tap.stop()
    assert quick_server.connections == 2
    assert all(r.error is None for r in done)


@pytest.mark.parametrize("path", ["/fail", "/fail-slow"])
def test_a_connection_is_not_reused_after_a_5xx(server, path):
    """Whether the 500's body came with its head (the connection already released) or after it."""
    records = Records()
    tap = start_tap(f"http://127.0.0.1:{server.server_address[1]}", records)
    try:
        assert _post(tap, path) == 500
        assert _post(tap, "/ok") == 200
        assert _post(tap, "/ok") == 200
        done = records.wait(3)  # before the stop, which drops what is still queued (as an exit does)
    finally:
        tap.stop()
    assert server.connections == 2
    assert [r.status for r in done] == [500, 200, 200]


def test_upstream_keepalive_config():
    assert from_dict({"collectors": {"tap": {}}}).collectors.tap.upstream_keepalive == 1.0
    assert from_dict({"collectors": {"tap": {"upstream_keepalive": "500ms"}}}).collectors.tap.upstream_keepalive == 0.5
    assert from_dict({"collectors": {"tap": {"upstream_keepalive": 0}}}).collectors.tap.upstream_keepalive == 0
    for bad in ("-1s", "soon"):
        with pytest.raises(ConfigError) as err:
            from_dict({"collectors": {"tap": {"upstream_keepalive": bad}}})
        assert err.value.key == "collectors.tap.upstream_keepalive"


def test_a_chunked_upload_passes_whole_and_is_analysed():
    """The upload is read HTTP chunk by HTTP chunk (readchunk): an end of chunk is not the end of the body."""
    import socket

    from aiohttp import web
    from tap_helpers import Upstream, multipart, wav_bytes

    got: list[bytes] = []

    async def sink(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.json_response({"text": "hi"})

    upstream = Upstream({"/v1/audio/transcriptions": sink})
    records = Records()
    tap = start_tap(upstream.url, records)
    body = multipart("b0undary", {"language": "de"}, "file", "a.wav", wav_bytes(3.0))  # 96 KB
    pieces = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    try:
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=b0undary\r\nConnection: close\r\n\r\n")
            for piece in pieces:  # each HTTP chunk on its own, some split across two sends
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece[:3000])
                time.sleep(0.002)
                sock.sendall(piece[3000:] + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        (record,) = records.wait(1)
    finally:
        tap.stop()
        upstream.stop()
    assert got == [body]
    assert (record.request_bytes, record.language, record.analysis_error) == (len(body), "de", None)
    assert record.audio_duration == pytest.approx(3.0)
