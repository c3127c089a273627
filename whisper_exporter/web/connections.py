"""The HTTP server: aiohttp's parser and keep-alive handling on an asyncio loop in one thread,
with the connection policy aiohttp does not have.

- A bounded number of connections (half the soft open-file limit, at most 512). At the
  limit a new connection takes the place of the one idle longest (no request in progress):
  a slowloris attacker's half-open connections make room for Prometheus, which sends its
  request as soon as it connects, instead of Prometheus waiting behind them.
- A total deadline for a request's head: 10 s from connecting (TLS handshake included) or
  from the first byte of a request on a kept-alive connection, however slowly it drips.
  Idle kept-alive connections close after 75 s, longer than common scrape intervals.
- accept() backs off for a second on EMFILE/ENFILE (asyncio's own behaviour: one burst of
  at most BACKLOG attempts, then a pause) instead of spinning, with one log line per 10 s;
  the limit keeps connections from using more than half the descriptors.
- TLS handshakes run on the loop (loop.start_tls), so a silent client stalls nobody.
- The WSGI app runs in a pool of 8 threads: rendering and bcrypt never block the loop.
- A POST's body (at most MAX_BODY) reaches the app as wsgi.input; a file the app answers with
  (`FileBody`, the review page's audio) is streamed by aiohttp, with Range and HEAD.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import resource
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("whisper_exporter.web.connections")

MAX_CONNECTIONS = 512
HEAD_TIMEOUT = 10.0  # seconds to deliver a request line and headers, in total
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may wait for its next request
BUSY_TIMEOUT = 60.0  # seconds one request may take in the app (a render, a bcrypt check, a reload)
WORKERS = 8  # threads that run the WSGI app
BACKLOG = 128  # socketserver's 5 dropped connections from concurrent scrapers (SYN retries: 1, 3, 7 s)
MAX_HEAD_LINE = 8190  # request line and each header, aiohttp's defaults
MAX_HEADERS = 100
ACCEPT_LOG_EVERY = 10.0  # seconds between two log lines about accept() running out of descriptors
MAX_BODY = 256 * 1024  # bytes of a request body (the review page's form); more is 413
BODY_METHODS = ("POST", "PUT", "PATCH")


class FileBody:
    """A WSGI app's answer naming a file to send: aiohttp's FileResponse streams it and answers
    Range (206, 416), If-Range and HEAD itself, with the app's headers."""

    def __init__(self, path: str):
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        return iter(())


def connection_limit() -> int:
    """Half the soft open-file limit (the other half is the collectors'), at most MAX_CONNECTIONS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft // 2))


class _Stats:
    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self.closed: dict[str, int] = {"head_timeout": 0, "idle_timeout": 0, "busy_timeout": 0,
                                       "evicted": 0, "refused": 0, "tls_failed": 0}
        self.accept_errors = 0

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("whisper_exporter_http_connections",
                                "Connections open to the exporter's HTTP server.", value=self.open)
        yield GaugeMetricFamily("whisper_exporter_http_connections_limit",
                                "Most connections the HTTP server keeps open (half the soft open-file limit, "
                                "at most 512).", value=self.limit)
        closed = CounterMetricFamily(
            "whisper_exporter_http_connections_closed_total",
            "Connections the HTTP server closed itself: head_timeout (request head not complete in time), "
            "idle_timeout, busy_timeout, evicted (idle, to make room at the limit), refused (at the limit "
            "with every connection busy), tls_failed.", labels=["reason"])
        for reason, count in self.closed.items():
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily("whisper_exporter_http_accept_errors_total",
                                  "accept() failures for lack of file descriptors (EMFILE, ENFILE); accepting "
                                  "pauses for a second after them.", value=self.accept_errors)


class _Gate(asyncio.Protocol):
    """One connection: sits between the transport and aiohttp's handler, to time the request head."""

    def __init__(self, pool: "_Pool"):
        self.pool = pool
        self.raw: Optional[asyncio.Transport] = None
        self.handler: Optional[asyncio.Protocol] = None
        self.pending: list[bytes] = []  # plaintext that came before the handler was attached
        self.busy = False
        self.deadline = time.monotonic() + HEAD_TIMEOUT
        self.reason = "head_timeout"
        self.closing = False
        self.handshake: Optional[asyncio.Future] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = transport
        assert isinstance(raw, asyncio.Transport)  # a TCP server's transports are
        self.raw = raw
        if not self.pool.admit(self):
            return
        if self.pool.ssl_context is None:
            self._attach(raw)
        else:
            raw.pause_reading()
            self.handshake = asyncio.ensure_future(self._handshake())  # a reference keeps the task alive

    async def _handshake(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.raw is not None and self.pool.ssl_context is not None  # set before the handshake starts
        try:
            tls = await loop.start_tls(self.raw, self, self.pool.ssl_context, server_side=True,
                                       ssl_handshake_timeout=HEAD_TIMEOUT)
        except Exception as err:  # a bad hello, a timeout, a reset: the connection ends here
            log.debug("TLS handshake failed: %s", err)
            self.close("tls_failed")
            self.pool.discard(self)
            return
        if tls is None or self.closing:
            self.pool.discard(self)
            return
        self._attach(tls)

    def _attach(self, transport: asyncio.Transport) -> None:
        self.handler = self.pool.web_server()
        self.pool.by_handler[self.handler] = self
        self.handler.connection_made(transport)
        for data in self.pending:
            self.handler.data_received(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.reason == "idle_timeout":
            # The first byte of the next request: its head is due within HEAD_TIMEOUT.
            self.deadline, self.reason = min(self.deadline, time.monotonic() + HEAD_TIMEOUT), "head_timeout"
        if self.handler is None:
            self.pending.append(data)
        else:
            self.handler.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.pool.discard(self)
        if self.handler is not None:
            self.pool.by_handler.pop(self.handler, None)
            self.handler.connection_lost(exc if isinstance(exc, Exception) or exc is None else None)

    def started(self) -> None:
        """A complete request head arrived and the app is on it."""
        self.busy, self.deadline, self.reason = True, time.monotonic() + BUSY_TIMEOUT, "busy_timeout"
        self.pool.touch(self)

    def finished(self) -> None:
        """The app answered; sending it and waiting for the next request share the idle deadline."""
        self.busy, self.deadline, self.reason = False, time.monotonic() + IDLE_TIMEOUT, "idle_timeout"
        self.pool.touch(self)

    def close(self, reason: str) -> None:
        if self.closing or self.raw is None:
            return
        self.closing = True
        self.pool.stats.closed[reason] = self.pool.stats.closed.get(reason, 0) + 1
        self.raw.abort()  # no lingering: the point is to free the descriptor now


class _Pool:
    """The open connections, oldest activity first, under one limit."""

    def __init__(self, stats: _Stats, web_server: web.Server, ssl_context: Optional[ssl.SSLContext]):
        self.limit = stats.limit
        self.stats = stats
        self.web_server = web_server
        self.ssl_context = ssl_context
        self.gates: "OrderedDict[_Gate, None]" = OrderedDict()
        self.by_handler: dict[Any, _Gate] = {}

    def admit(self, gate: _Gate) -> bool:
        if len(self.gates) >= self.limit:
            victim = next((g for g in self.gates if not g.busy), None)
            if victim is None:
                gate.close("refused")
                return False
            victim.close("evicted")
            self.discard(victim)
        self.gates[gate] = None
        self.stats.open = len(self.gates)
        return True

    def touch(self, gate: _Gate) -> None:
        if gate in self.gates:
            self.gates.move_to_end(gate)

    def discard(self, gate: _Gate) -> None:
        self.gates.pop(gate, None)
        self.stats.open = len(self.gates)

    def sweep(self) -> None:
        now = time.monotonic()
        for gate in [g for g in self.gates if g.deadline < now]:
            gate.close(gate.reason)
            self.discard(gate)


def _client_cn(request: web.BaseRequest) -> Optional[str]:
    """The common name of a verified client certificate (mutual TLS), else None."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


def _environ(request: web.BaseRequest, scheme: str, body: bytes = b"") -> dict:
    host, port = (request.transport.get_extra_info("sockname") or ("", 0))[:2] if request.transport else ("", 0)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    environ = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": str(host),
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": peer[0] if peer else "",
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": request.headers.get("Content-Length", ""),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    cn = _client_cn(request) if scheme == "https" else None
    if cn is not None:
        environ["SSL_CLIENT_S_DN_CN"] = cn  # as mod_ssl names it: who the certificate says the client is
    for name, value in request.headers.items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


async def _body(request: web.BaseRequest) -> Optional[bytes]:
    """The request's body, or None when it is longer than MAX_BODY (read no further than that)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return None
    data = bytearray()
    while len(data) <= MAX_BODY:
        chunk = await request.content.read(MAX_BODY + 1 - len(data))
        if not chunk:
            return bytes(data)
        data += chunk
    return None


def _call_wsgi(app: Callable, environ: dict) -> tuple[int, str, list[tuple[str, str]], "bytes | FileBody"]:
    answer: dict = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
        answer.update(status=status, headers=headers)
        return lambda data: None

    chunks = app(environ, start_response)
    if isinstance(chunks, FileBody):
        code, _, reason = answer["status"].partition(" ")
        return int(code), reason, answer["headers"], chunks
    try:
        body = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    code, _, reason = answer["status"].partition(" ")
    return int(code), reason, answer["headers"], body


class HttpServer:
    """The running server: its address, its loop thread, and close()."""

    def __init__(self, sock: socket.socket, app: Callable, ssl_context: Optional[ssl.SSLContext]):
        self.socket = sock
        self.server_address = sock.getsockname()
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self.app = app
        self.limit = connection_limit()
        self.pool: Optional[_Pool] = None
        self.stats = _Stats(self.limit)
        self.executor = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="http-worker")
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._accept_logged = -ACCEPT_LOG_EVERY
        self._stopped: Optional[asyncio.Event] = None
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gate = self.pool.by_handler.get(request.protocol) if self.pool else None
        if gate is not None:
            gate.started()
        try:
            data = await _body(request) if request.method in BODY_METHODS else b""
            if data is None:
                return web.Response(status=413, text=f"A request body may have at most {MAX_BODY} bytes.\n")
            code, reason, headers, body = await self.loop.run_in_executor(
                self.executor, _call_wsgi, self.app, _environ(request, self.scheme, data))
        finally:
            if gate is not None:
                gate.finished()
        # aiohttp sets Content-Length from the body and leaves the body out for HEAD.
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if isinstance(body, FileBody):
            return web.FileResponse(body.path, headers=headers)
        return web.Response(status=code, reason=reason or None, headers=headers, body=body)

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            # asyncio stops accepting for a second after this (it tries its whole accept batch
            # first, so this comes in bursts): count each, log one line per ACCEPT_LOG_EVERY.
            self.stats.accept_errors += 1
            now = time.monotonic()
            if now - self._accept_logged >= ACCEPT_LOG_EVERY:
                self._accept_logged = now
                log.warning("accept(): %s (%d times so far); accepting pauses for 1 s each time",
                            context.get("exception"), self.stats.accept_errors)
            return
        loop.default_exception_handler(context)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._exception_handler)
        try:
            self.loop.run_until_complete(self._serve())
        except Exception:  # never silently: the exporter would run on without its port
            log.exception("the HTTP server stopped")
            raise
        finally:
            self._ready.set()
            self.loop.close()

    async def _serve(self) -> None:
        web_server = web.Server(self._handle, handler_cancellation=True, access_log=None,
                                keepalive_timeout=IDLE_TIMEOUT, max_line_size=MAX_HEAD_LINE,
                                max_field_size=MAX_HEAD_LINE, max_headers=MAX_HEADERS)
        pool = self.pool = _Pool(self.stats, web_server, self.ssl_context)
        server = await self.loop.create_server(lambda: _Gate(pool), sock=self.socket, backlog=BACKLOG)
        self._stopped = asyncio.Event()
        self._ready.set()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._stopped.wait(), 1.0)
                    break
                except asyncio.TimeoutError:
                    self.pool.sweep()
        finally:
            server.close()
            for gate in list(self.pool.gates):
                gate.close("idle_timeout")
            await web_server.shutdown(1.0)

    def start(self) -> None:
        self.thread.start()
        self._ready.wait(10)

    def set_ssl_context(self, context: ssl.SSLContext) -> None:
        """TLS settings for the connections that come next (a reload of --web.config.file)."""
        self.ssl_context = context
        if self.pool is not None:
            self.loop.call_soon_threadsafe(setattr, self.pool, "ssl_context", context)

    def collect(self) -> Iterable[Metric]:
        """The connection metrics, for the exporter's registry."""
        return self.stats.collect()

    def describe(self) -> list:
        return []

    def shutdown(self) -> None:
        if self._stopped is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
            self.thread.join(5)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass


def serve(host: str, port: int, app: Callable, ssl_context: Optional[ssl.SSLContext] = None) -> HttpServer:
    """Bind now (so a taken port fails at start-up with OSError) and serve in a background thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    server = HttpServer(sock, app, ssl_context)
    server.start()
    return server
