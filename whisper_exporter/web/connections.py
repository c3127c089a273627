"""The HTTP server: aiohttp's parser and keep-alive handling on an asyncio loop in one thread,
with the connection policy aiohttp does not have.

- A bounded number of connections (half the soft open-file limit, at most 512). At the
  limit a new connection takes the place of the one idle longest (no request in progress):
  a slowloris attacker's half-open connections make room for Prometheus, which sends its
  request as soon as it connects, instead of Prometheus waiting behind them.
- A total deadline for a request's head: 10 s from connecting (TLS handshake included) or
  from the first byte of a request on a kept-alive connection, however slowly it drips.
  Idle kept-alive connections close after 75 s, longer than common scrape intervals.
- With every connection busy, nothing more is accepted until one ends or goes idle: new
  connections wait in the kernel's listen backlog, holding none of our descriptors.
- accept() backs off for a second on EMFILE/ENFILE instead of spinning, with one log line
  per 10 s; the limit keeps connections from using more than half the descriptors.
- TLS handshakes run on the loop (loop.start_tls), so a silent client stalls nobody.
- A request head is at most MAX_HEAD_BYTES (16 KiB, plenty for a scrape): beyond, 431 and
  the connection closes, so 500 heads of 785 KB cannot hold 400 MB (aiohttp's own limits are
  per line and per header: 100 headers of 8 KB each passed them).
- The WSGI app runs in a pool of 8 threads: rendering and bcrypt never block the loop.

The policy (Policy, Listener) is shared with the request tap (tap/proxy.py), which has its own
limit, deadlines and metric names.

- A POST's body (at most MAX_BODY) reaches the app as wsgi.input; a file the app answers with
  (`FileBody`, the review page's audio) is streamed by aiohttp, with Range and HEAD.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import io
import logging
import resource
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
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
MAX_HEAD_BYTES = 16384  # a whole request head; Prometheus sends well under 1 KiB
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


def connection_limit(share: int = 2, most: Optional[int] = None) -> int:
    """1/share of the soft open-file limit (the rest is the collectors'), at most `most`
    (MAX_CONNECTIONS by default)."""
    most = MAX_CONNECTIONS if most is None else most
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return most
    return max(4, min(most, soft // share))


@dataclass(frozen=True)
class Policy:
    """What one listener allows: connections, and how long each phase of one may take."""

    limit: int
    head_timeout: float = HEAD_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    busy_timeout: Optional[float] = BUSY_TIMEOUT  # None: the app has its own deadlines (the tap)
    max_head_bytes: Optional[int] = None  # None: aiohttp's per-line and per-header limits only


HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 26\r\nConnection: close\r\n\r\nrequest head is too large\n")


class ConnectionStats:
    """The connection metrics of one listener, named `{prefix}_connections...`."""

    def __init__(self, limit: int, prefix: str = "whisper_exporter_http", what: str = "the exporter's HTTP server",
                 reasons: Iterable[str] = ("head_timeout", "head_too_large", "idle_timeout", "busy_timeout",
                                           "evicted", "tls_failed"),
                 limit_help: str = "half the soft open-file limit, at most 512"):
        self.limit = limit
        self.prefix, self.what, self.limit_help = prefix, what, limit_help
        self.open = 0
        self.closed: dict[str, int] = {reason: 0 for reason in reasons}
        self.accept_errors = 0

    def collect(self) -> Iterable[Metric]:
        prefix, what = self.prefix, self.what
        yield GaugeMetricFamily(f"{prefix}_connections", f"Connections open to {what}.", value=self.open)
        yield GaugeMetricFamily(f"{prefix}_connections_limit",
                                f"Most connections {what} keeps open ({self.limit_help}).", value=self.limit)
        closed = CounterMetricFamily(
            f"{prefix}_connections_closed_total",
            f"Connections {what} closed itself: head_timeout (request head not complete in time), "
            "head_too_large (431), idle_timeout, busy_timeout, evicted (idle, to make room at the limit), "
            "tls_failed. At the limit with every connection busy, new ones wait to be accepted.", labels=["reason"])
        for reason, count in self.closed.items():
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily(f"{prefix}_accept_errors_total",
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
        self.deadline = time.monotonic() + pool.policy.head_timeout
        self.reason = "head_timeout"
        self.head_bytes = 0  # of the request head now arriving (counted until its blank line)
        self.head_done = False  # its blank line arrived: what follows is a body, not counted
        self.head_tail = b""  # the last bytes seen, for a blank line split across two reads
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
                                       ssl_handshake_timeout=self.pool.policy.head_timeout)
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
        if self.closing:
            return
        if not self.busy:
            if self.reason == "idle_timeout":
                # The first byte of the next request: its head is due within head_timeout.
                self.deadline = min(self.deadline, time.monotonic() + self.pool.policy.head_timeout)
                self.reason = "head_timeout"
            most = self.pool.policy.max_head_bytes
            if most is not None and not self.head_done:
                self.head_bytes += _head_part(self, data)
            if most is not None and self.head_bytes > most:
                # Refused before aiohttp buffers it: its limits are per line and per header.
                self.close("head_too_large", HEAD_TOO_LARGE)
                self.pool.discard(self)
                return
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
        busy = self.pool.policy.busy_timeout
        self.busy, self.reason = True, "busy_timeout"
        self.deadline = time.monotonic() + busy if busy is not None else float("inf")
        self.head_bytes, self.head_done, self.head_tail = 0, False, b""
        self.pool.touch(self)

    def finished(self) -> None:
        """The app answered; sending it and waiting for the next request share the idle deadline."""
        self.busy, self.deadline, self.reason = False, time.monotonic() + self.pool.policy.idle_timeout, "idle_timeout"
        self.head_bytes, self.head_done, self.head_tail = 0, False, b""
        self.pool.touch(self)

    def close(self, reason: str, farewell: bytes = b"") -> None:
        """Close now, counted under `reason`; `farewell` (an HTTP answer) is sent first on plain HTTP."""
        if self.closing or self.raw is None:
            return
        self.closing = True
        self.pool.stats.closed[reason] = self.pool.stats.closed.get(reason, 0) + 1
        if farewell and self.pool.ssl_context is None and not self.raw.is_closing():
            self.raw.write(farewell)
            self.raw.close()  # stops reading, flushes the few bytes, then frees the descriptor
            return
        self.raw.abort()  # no lingering: the point is to free the descriptor now


class _Pool:
    """The open connections, oldest activity first, under one limit."""

    def __init__(self, stats: ConnectionStats, web_server: Callable[[], Any], ssl_context: Optional[ssl.SSLContext],
                 policy: Optional[Policy] = None):
        self.policy = policy or Policy(stats.limit)
        self.limit = self.policy.limit
        self.stats = stats
        self.web_server = web_server
        self.ssl_context = ssl_context
        self.gates: "OrderedDict[_Gate, None]" = OrderedDict()
        self.by_handler: dict[Any, _Gate] = {}
        self.room: Optional[asyncio.Event] = None  # set when a connection ends or goes idle (made on the loop)

    def has_room(self) -> bool:
        """Fewer connections than the limit, or an idle one to make room."""
        return len(self.gates) < self.limit or any(not g.busy for g in self.gates)

    async def wait_for_room(self) -> None:
        assert self.room is not None  # made by Listener.start()
        self.room.clear()
        await self.room.wait()

    def _changed(self) -> None:
        if self.room is not None:
            self.room.set()

    def admit(self, gate: _Gate) -> bool:
        if len(self.gates) >= self.limit:
            victim = next((g for g in self.gates if not g.busy), None)
            if victim is None:
                gate.close("refused")  # not reached through Listener, which accepts only when there is room
                return False
            victim.close("evicted")
            self.discard(victim)
        self.gates[gate] = None
        self.stats.open = len(self.gates)
        return True

    def touch(self, gate: _Gate) -> None:
        if gate in self.gates:
            self.gates.move_to_end(gate)
        if not gate.busy:
            self._changed()

    def discard(self, gate: _Gate) -> None:
        self.gates.pop(gate, None)
        self.stats.open = len(self.gates)
        self._changed()

    def sweep(self) -> None:
        now = time.monotonic()
        for gate in [g for g in self.gates if g.deadline < now]:
            gate.close(gate.reason)
            self.discard(gate)


class AcceptBackoff:
    """accept() out of descriptors (or kernel memory): counted, and logged once per ACCEPT_LOG_EVERY
    however many attempts; the caller pauses accepting for a second."""

    ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

    def __init__(self, stats: ConnectionStats, name: str, logger: logging.Logger = log):
        self.stats, self.name, self.log = stats, name, logger
        self._logged = -ACCEPT_LOG_EVERY

    def note(self, err: OSError) -> None:
        self.stats.accept_errors += 1
        now = time.monotonic()
        if now - self._logged >= ACCEPT_LOG_EVERY:
            self._logged = now
            self.log.warning("%saccept(): %s (%d times so far); accepting pauses for 1 s each time",
                             self.name, err, self.stats.accept_errors)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Listener:
    """A listening socket served by an aiohttp web.Server through the connection policy, on the
    running loop: start() it, gate(request) from the handler, stop_accepting() and close_all() at the end.

    It accepts only while there is room (fewer than the limit, or an idle connection to evict),
    checked before each accept(): with every connection busy, new ones wait in the kernel's listen
    backlog, holding no descriptor of ours, until a request ends (nginx does the same when its
    worker_connections are used up), rather than being accepted only to be refused."""

    def __init__(self, sock: socket.socket, web_server: Callable[[], Any], policy: Policy, stats: ConnectionStats,
                 ssl_context: Optional[ssl.SSLContext] = None, name: str = "", logger: logging.Logger = log):
        self.socket = sock
        self.pool = _Pool(stats, web_server, ssl_context, policy)
        self.backoff = AcceptBackoff(stats, name, logger)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.pool.room = asyncio.Event()
        self.socket.setblocking(False)
        self._tasks = [asyncio.ensure_future(self._accept()), asyncio.ensure_future(self._sweep())]

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self.pool
        fd = self.socket.fileno()
        while True:
            while not pool.has_room():
                await pool.wait_for_room()
            # Wait for a connection without taking it: room is checked again once one is there.
            ready = loop.create_future()
            loop.add_reader(fd, _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            for _ in range(BACKLOG):  # a batch per wake-up, as asyncio's own accept loop does
                if not pool.has_room():
                    break
                try:
                    conn, _ = self.socket.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                except OSError as err:
                    if err.errno in AcceptBackoff.ERRNOS:
                        self.backoff.note(err)
                        await asyncio.sleep(1.0)  # the connection waits in the backlog meanwhile
                    else:
                        self.backoff.log.warning("%saccept(): %s", self.backoff.name, err)
                        await asyncio.sleep(0.1)
                    break
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(lambda: _Gate(pool), conn)
                except OSError:
                    conn.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.pool.sweep()

    def gate(self, request: web.BaseRequest) -> Optional[_Gate]:
        """The connection a request came on (to mark it busy while the app works on it)."""
        return self.pool.by_handler.get(request.protocol)

    def stop_accepting(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        try:
            self.socket.close()
        except OSError:
            pass

    def close_all(self) -> None:
        for gate in list(self.pool.gates):
            gate.close("idle_timeout")
            self.pool.discard(gate)


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
        # Module constants read now, so tests can lower them before starting a server.
        self.policy = Policy(self.limit, HEAD_TIMEOUT, IDLE_TIMEOUT, BUSY_TIMEOUT, MAX_HEAD_BYTES)
        self.pool: Optional[_Pool] = None
        self.stats = ConnectionStats(self.limit)
        self.executor = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="http-worker")
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
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

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
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
        listener = Listener(self.socket, web_server, self.policy, self.stats, self.ssl_context)
        self.pool = listener.pool
        await listener.start()
        self._stopped = asyncio.Event()
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            listener.stop_accepting()
            listener.close_all()
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


def _head_part(conn: _Gate, data: bytes) -> int:
    """How many bytes of `data` belong to the request head; marks the head done at its blank line.

    A body sent in the same read as its head (an upload) is not head: counted, a 2 MB upload
    written at once got 431.
    """
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        conn.head_done = True
        return end + 4
    joined = conn.head_tail + data[:3]  # the blank line split across reads
    end = joined.find(b"\r\n\r\n")
    if end >= 0:
        conn.head_done = True
        return end + 4 - len(conn.head_tail)
    conn.head_tail = (conn.head_tail + data[-3:])[-3:]
    return len(data)
