"""The tap: a streaming reverse proxy (aiohttp server + client) in front of a Whisper server.

Bytes pass untouched both ways: the request body is forwarded chunk by chunk as it
arrives, the answer likewise (server-sent events reach the client event by event);
only hop-by-hop headers (and Expect, which the tap answers itself) are dropped. A copy
of the upload goes to UploadAnalyzer, a bounded copy of the answer to Capture. When
the answer is complete, a worker thread reads the audio duration and the transcript,
builds a TapRecord and hands it to `on_record`. The tap runs its own event loop in a
background thread, so nothing it does waits on, or delays, the exporter's scrapes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, Union

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from multidict import CIMultiDict
from yarl import URL

import whisper_exporter.tap.spool as spool_folder
import whisper_exporter.tap.websocket as websocket
from whisper_exporter import logsetup
from whisper_exporter.config import KeyPath
from whisper_exporter.runtime.occupancy import Occupancy
from whisper_exporter.tap.analysis import (
    Capture,
    UploadAnalyzer,
    boundary_of,
    read_answer,
    wav_received_seconds,
)
from whisper_exporter.tap.budget import MemoryBudget
from whisper_exporter.tap.config import TapConfig
from whisper_exporter.tap.duration import TooMuchWork, upload_seconds
from whisper_exporter.tap.headers import forward_headers as _forward_headers
from whisper_exporter.tap.record import TapRecord, TapStats
from whisper_exporter.tap.streaming import StreamStats
from whisper_exporter.tap.upgrade import Upgrade, plan_upgrade, render_json
from whisper_exporter.web.connections import BACKLOG, ConnectionStats, Listener, Policy, connection_limit
from whisper_exporter.whisper import marker

log = logging.getLogger("whisper_exporter.tap")

# Path -> (api, task). Anything else is passed through and counted by path and status.
API_PATHS = {
    "/v1/audio/transcriptions": ("openai", "transcribe"),
    "/v1/audio/translations": ("openai", "translate"),
    "/asr": ("asr-webservice", None),
    "/inference": ("whispercpp", "transcribe"),
}
TRUE = frozenset({"true", "1", "yes", "on"})
LOG_EVERY = 60.0  # seconds between two warnings of one kind
GRACE = 10.0  # seconds requests in flight may take to finish when the tap stops
CLOSE_REASONS = ("head_timeout", "head_too_large", "idle_timeout", "evicted")  # connections the tap closes itself
WORKER_GRACE = 2.0  # seconds the record in analysis may take to finish after that (its work is bounded)
# Seconds a tap replaced by a reload goes on analysing the records it had queued, in the background
# (the reload and the new tap never wait on it); what is left then is dropped as shutdown.
RELOAD_DRAIN = 5.0
# What each connection buffers: asyncio reads up to 256 KiB at a time and aiohttp pauses a body's
# reader past twice its buffer, so 200 uploads held 75+ MB in buffers alone (issue 22, item 3).
# Smaller reads cost CPU per MB: 32 KiB ones doubled a 25 MB upload's (benchmarks/bench_tap.py).
RECV_BYTES = 65536  # per read from a client's socket (asyncio's default: 262144)
READ_BUFFER = 32768  # aiohttp's body buffer: reading pauses past twice this (its default: 65536)
# A verbose_json answer is rendered as json only within these bounds (and the memory budget);
# beyond, it goes to the client as it came, counted: 20 M `{}` segments in 60 MB took RSS to
# 1.8 GB and blocked the loop for 1.85 s (issue 22, item 6). An hour of speech with word
# timestamps is about 1 MB and 10,000 objects.
UPGRADE_MAX = 8 << 20  # bytes
UPGRADE_MAX_OBJECTS = 50000  # `{` in the answer: an upper bound on the objects parsing would make


class _Flight:
    """One request's state while it passes through."""

    __slots__ = ("record", "analyzer", "capture", "answer_type", "answer_encoded", "t0", "upgrade",
                 "occupancy", "held")

    def __init__(self, record: TapRecord, t0: float, occupancy: Optional[Occupancy] = None):
        self.record = record
        self.analyzer: Optional[UploadAnalyzer] = None
        self.capture: Optional[Capture] = None
        self.answer_type = ""
        self.answer_encoded = False
        self.t0 = t0
        self.upgrade: Optional[Upgrade] = None
        self.occupancy = occupancy  # None: not work (a health check), busy time is not counted
        self.held: Optional[bool] = None  # None: not yet the server's; True: the server's; False: done

    def occupy(self) -> None:
        """The server has the whole request: busy from now until release() (docs/capacity.md)."""
        if self.occupancy is not None and self.held is None:
            self.held = True
            self.occupancy.begin()

    def release(self) -> None:
        """The server is done with the request (answered, failed or abandoned); once only."""
        if self.held and self.occupancy is not None:
            self.occupancy.end()
        self.held = False


class Tap:
    """The reverse proxy. start() binds and serves in a background thread; stop() ends it."""

    def __init__(self, config: TapConfig, upstream: str, on_record: Callable[[TapRecord], None],
                 wants_audio: Optional[Callable[[TapRecord], bool]] = None,
                 occupancy: Optional[Occupancy] = None, stats: Optional[TapStats] = None):
        config.check(KeyPath("<tap>", "whisper_exporter.collectors.tap"))  # raises ConfigError naming the field
        self.config = config
        self.upstream = upstream.rstrip("/")
        self._base = URL(self.upstream)  # parsed once; each request's URL is built from its parts
        self.on_record = on_record
        self.wants_audio = wants_audio  # sampling's hook: keep the upload on disk for this record?
        self.occupancy = occupancy or Occupancy()  # busy time of transcription requests (docs/capacity.md)
        # A reload's new tap is given the old one's stats: the counters carry on (docs/tap.md).
        self.stats = stats if stats is not None else TapStats()
        self._shutdown_drops = 0  # this tap's own, for its log line (the stats may be its predecessors' too)
        self.streams = StreamStats()  # WebSocket sessions (tap/websocket.py, tap/streaming.py)
        self.relays: set[Any] = set()  # the sessions in progress, closed with 1001 when the tap stops
        self.ws_session: Optional[aiohttp.ClientSession] = None  # made on the first upgrade
        limit = config.max_connections or connection_limit(share=4, most=512)
        self.connections = ConnectionStats(limit, prefix="whisper_tap", what="the tap", reasons=CLOSE_REASONS,
                                           limit_help="collectors.tap.max_connections")
        self.port: Optional[int] = None  # the bound port, once started (listen may say 0)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[web.Server] = None
        self._listener: Optional[Listener] = None
        self._session: Optional[aiohttp.ClientSession] = None
        # Reading audio headers and answers, and the callback, run off the loop; one thread,
        # so records come in the order their requests ended. The queue is bounded (record_queue):
        # beyond it a record is dropped and counted, and on stop what is left is dropped.
        self.budget = MemoryBudget(config.memory_budget)
        # Records, and streams' final transcripts to check (callables): one bounded queue, one worker.
        self._queue: queue.Queue[Union[None, _Flight, Callable[[], Any]]] = queue.Queue(config.record_queue)
        self._worker = threading.Thread(target=self._work, name="tap-record", daemon=True)
        self.stopping = threading.Event()
        # Set once queued work is no longer done: at stop, or when a reload's drain runs out.
        self._cut_off = threading.Event()
        self._drain_timer: Optional[threading.Timer] = None
        # Upgraded answers are parsed here, off the loop; one at a time bounds the memory parsing takes.
        self._render = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tap-render")
        self._logged: dict[str, float] = {}
        self.streams.submit = self._submit  # final transcripts are checked in the worker thread
        self.spool_problem: Optional[str] = None  # set at start when the spool cannot be written

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Bind the listening socket and serve in a background thread. Raises OSError when
        the address cannot be bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as err:  # reported to start()'s caller
                failure.append(err)
                loop.run_until_complete(self._close())
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        self._thread = threading.Thread(target=run, name="tap", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        self._worker.start()

    def stop(self, drain: float = 0.0) -> None:
        """Stop accepting, close connections and the loop (requests in flight get GRACE seconds).
        Then, with `drain` 0 (the exporter's exit), drop the records still queued: the stop never
        waits on a queue's worth of analysis. With `drain` seconds (a reload, retire()), the worker
        goes on analysing them in the background, the stop returning at once, and what is still
        queued after `drain` seconds is dropped. Does not raise."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
        draining = drain > 0 and self._worker.is_alive()
        timer = None
        if draining:  # made before `stopping`, so the worker that drains the queue early can cancel it
            timer = self._drain_timer = threading.Timer(drain, self._end_drain, args=(drain,))
            timer.daemon = True
        else:
            self._cut_off.set()
        self.stopping.set()  # no record is queued from now on (_finish, _submit)
        if timer is not None:
            timer.start()
        else:
            self._drop_queued()
        try:
            self._queue.put_nowait(None)  # wakes the worker, which ends once the queue is empty
        except queue.Full:  # not waiting on get(): the worker ends when it finds the queue empty
            pass
        self._render.shutdown(wait=False, cancel_futures=True)
        if draining:
            return
        if self._worker.is_alive():
            self._worker.join(timeout=WORKER_GRACE)
        self._log_dropped("stopped")

    def retire(self) -> None:
        """Stop for a reload that replaces this tap: its queued records are analysed for up to
        RELOAD_DRAIN seconds, in the background (they feed request metrics that carry on)."""
        self.stop(drain=RELOAD_DRAIN)

    def _end_drain(self, drain: float) -> None:
        """A reload's drain ran out: what is still queued is dropped (the record in analysis finishes)."""
        self._cut_off.set()
        self._drop_queued()
        self._log_dropped(f"replaced by a reload; after its {drain:g} s drain,")

    def _drop_queued(self) -> None:
        while True:
            try:
                flight = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(flight, _Flight):
                self._drop(flight, "shutdown")
            elif flight is not None:  # a stream's final transcript, left unchecked
                self.stats.count(self.stats.dropped, "stream_check_shutdown")

    def _log_dropped(self, when: str) -> None:
        with self.stats.lock:
            dropped = self._shutdown_drops
        if dropped:
            log.warning("tap: %s %d request record(s) not analysed, counted in "
                        "whisper_tap_records_dropped_total{reason=\"shutdown\"}", when, dropped)

    async def _open(self) -> None:
        cfg = self.config
        logsetup.quiet_server_errors()  # a malformed request is one rate-limited line, not a traceback
        # A 0700 folder of its own, tried with a file; a problem is logged and the tap serves on.
        self.spool_problem = spool_folder.check(cfg.spool_dir)
        if cfg.spool_dir is not None and self.spool_problem is None:
            _clean_spool(cfg.spool_dir)
        timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        self._session = aiohttp.ClientSession(
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            connector=_connector(cfg.upstream_keepalive), response_class=_Answer)
        # auto_decompress=False: a compressed upload is forwarded as sent (and not analysed);
        # handler_cancellation: a client that goes away cancels its upstream request.
        server = self._server = web.Server(self._handle, auto_decompress=False, handler_cancellation=True,
                                           read_bufsize=READ_BUFFER, access_log=None)
        host, port = cfg.listen_address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # SO_REUSEADDR, as TCPSite's reuse_address
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        sock.setblocking(False)
        # The metrics port's connection policy (web/connections.py): a limit, a deadline for the
        # request head, idle keep-alive closed; no deadline on a request itself (its own timeouts).
        policy = Policy(self.connections.limit, head_timeout=cfg.head_timeout, busy_timeout=None,
                        max_head_bytes=cfg.max_head_bytes)
        self._listener = Listener(sock, server, policy, self.connections, name="tap: ", logger=log)
        await self._listener.start()
        self.port = sock.getsockname()[1]

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.stop_accepting()
        await websocket.shutdown(self)
        if self._server is not None:
            await asyncio.sleep(0)  # requests that arrived before the close start to be handled
            self._server.pre_shutdown()  # idle kept-alive connections close now (as ServerRunner does)
            await self._server.shutdown(GRACE)  # requests in flight get GRACE seconds, then are cut
        if self._listener is not None:
            self._listener.close_all()
        if self._session is not None:
            await self._session.close()

    # -- one request ----------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        transport = request.transport
        if transport is not None and getattr(transport, "max_size", 0) > RECV_BYTES:
            transport.max_size = RECV_BYTES  # type: ignore[attr-defined]  # asyncio's selector transport
        if not origin_form(request.method, request.raw_path):
            # CONNECT, absolute-form (http://host/), authority-form (host:port, @host:port) and
            # asterisk-form (*): refused before any upstream connection, so no client can make the
            # tap connect anywhere but the configured upstream, or send its credentials elsewhere.
            self.stats.count(self.stats.errors, "bad_target")
            self._warn("bad_target", f"tap: refused a {request.method[:16]!r} request whose target is "
                                     "not origin-form (/path?query)")
            refused = web.Response(status=400, text="only origin-form request targets (/path?query) are proxied\n")
            refused.force_close()
            return refused
        if request.version >= (1, 1) and request.headers.get("Expect", "").strip().lower() == "100-continue":
            # Expect is not forwarded (HOP_BY_HOP): the tap answers it itself, as aiohttp's router
            # does (low-level web.Server does not), so the client sends its body at once.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the interim answer is not the answer
        path = request.path
        api, task = API_PATHS.get(path.rstrip("/") or "/", (None, None))
        mark = marker.classify(request.headers, request.query)
        if websocket.is_upgrade(request):  # relayed message by message; its own metrics, no TapRecord
            return await websocket.relay(self, request, _forward_headers(request.headers),
                                         upstream_url(self._base, request.raw_path), canary=mark == marker.GENUINE)
        record = TapRecord(endpoint=path, method=request.method, status=None, duration=0.0, api=api,
                           task=task, started=time.time(), canary=mark == marker.GENUINE,
                           canary_spoofed=mark == marker.SPOOFED)
        if api == "asr-webservice":  # whisper-asr-webservice takes its options in the query
            query = request.query
            record.language = query.get("language") or None
            record.task = query.get("task") or "transcribe"
            record.response_format = query.get("output") or "txt"
        # Only transcription requests occupy the server: a health check or model list is not work.
        flight = _Flight(record, t0, self.occupancy if api is not None else None)
        stats = self.stats
        with stats.lock:  # a reload's old and new taps may share the stats: their loops run at once
            stats.in_flight += 1
        gate = self._listener.gate(request) if self._listener is not None else None
        if gate is not None:
            gate.started()  # the head deadline no longer applies; the upload's own do
        try:
            return await self._proxy(request, flight)
        except asyncio.CancelledError:
            # handler_cancellation: the client went away while we waited on the upstream.
            if record.error is None:
                record.error = "client_gone"
            raise
        finally:
            if gate is not None:
                gate.finished()
            with stats.lock:
                stats.in_flight -= 1
            flight.release()
            record.duration = time.perf_counter() - t0
            self._finish(flight)

    async def _proxy(self, request: web.BaseRequest, flight: _Flight) -> web.StreamResponse:
        record = flight.record
        headers = _forward_headers(request.headers)
        body = None
        if request.body_exists:
            if record.api is not None:
                self._start_analysis(request, flight)
            if flight.upgrade is not None:
                headers = flight.upgrade.headers(headers)
            body = self._upload(request, flight)
        else:
            flight.occupy()  # nothing to upload: the server has it all once asked
        assert self._session is not None  # made in start(), before the first request
        try:
            upstream = await self._session.request(
                request.method, upstream_url(self._base, request.raw_path), headers=headers, data=body,
                allow_redirects=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                                          "Content-Type"))
        except asyncio.TimeoutError:
            await _read_rest(body, flight)
            return self._fail(record, "timeout", 504, "upstream timed out")
        except aiohttp.ClientConnectorError:
            await _read_rest(body, flight)
            return self._fail(record, "connect", 502, "upstream unreachable")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if record.error is not None:  # the client's side failed first
                return _client_gone_response(record)
            await _read_rest(body, flight)
            return self._fail(record, "closed", 502, "upstream closed the connection")
        except aiohttp.ClientError as err:
            if record.error is not None:
                return _client_gone_response(record)
            await _read_rest(body, flight)
            return self._fail(record, "protocol", 502, f"upstream error ({type(err).__name__})")
        async with upstream:
            if not 200 <= upstream.status <= 599:
                # A final status outside 2xx-5xx (099; 101 without a switch the tap never asked
                # for, since Upgrade is not forwarded) means nothing to the client: a bad gateway.
                return self._fail(record, "protocol", 502, f"upstream answered with status {upstream.status}")
            return await self._answer(request, upstream, flight)

    def _start_analysis(self, request: web.BaseRequest, flight: _Flight) -> None:
        cfg = self.config
        boundary = boundary_of(request.headers.get("Content-Type", ""))
        if boundary is None or "Content-Encoding" in request.headers:
            return
        flight.analyzer = UploadAnalyzer(boundary, cfg.max_in_memory, cfg.max_spool_bytes, cfg.spool_dir,
                                         budget=self.budget)
        if cfg.upgrade_response_format and flight.record.api == "openai":
            flight.upgrade = plan_upgrade(boundary, request.headers, cfg.max_in_memory, self.budget)

    async def _upload(self, request: web.BaseRequest, flight: _Flight):
        """The request body, chunk by chunk as it arrives; a copy to the analyzer."""
        record, analyzer, upgrade = flight.record, flight.analyzer, flight.upgrade
        content = request.content
        cfg = self.config
        began = time.monotonic()
        while True:
            # The next chunk is due within client_timeout, and before the upload falls below its
            # minimum average rate (after the grace) or passes its total deadline.
            due = upload_due(began, record.request_bytes, cfg.upload_min_rate, cfg.upload_rate_grace,
                             cfg.upload_timeout)
            wait = min(float(cfg.client_timeout), due - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                # readchunk, not readany: readany joins what is buffered into a new bytes (a copy of
                # the upload: about 1 ms of CPU per 1 MB upload, benchmarks/bench_tap.py)
                chunk, end_of_chunk = await _within(content.readchunk(), wait)
            except asyncio.TimeoutError:
                record.error = "upload_too_slow" if time.monotonic() >= due else "client_timeout"
                if record.error == "upload_too_slow":
                    self._warn("upload_too_slow", f"tap: cut an upload at {record.request_bytes} bytes after "
                                                  f"{time.monotonic() - began:.0f} s: slower than upload_min_rate "
                                                  "or past upload_timeout")
                raise _ClientGone() from None
            except (ConnectionError, aiohttp.ClientPayloadError, aiohttp.web.HTTPException):
                record.error = "client_gone"
                raise _ClientGone() from None
            if not chunk:
                if end_of_chunk:  # an HTTP chunk of a chunked upload ended here, not the body
                    continue
                break
            record.request_bytes += len(chunk)
            if analyzer is not None:
                analyzer.feed(chunk)
            pieces = upgrade.feed(chunk, analyzer) if upgrade is not None else [chunk]
            # With a Content-Length, the last chunk is known before it goes: the server's work starts
            # as it is sent, not when this generator is next resumed (a loaded loop: milliseconds later).
            last = request.content_length is not None and record.request_bytes >= request.content_length
            if last and upgrade is not None:
                pieces = pieces + upgrade.flush(analyzer)  # flush() is then empty after the loop
            for i, piece in enumerate(pieces):
                if last and i == len(pieces) - 1:
                    flight.occupy()
                yield piece
        if upgrade is None and content.exception() is None:
            flight.occupy()  # the last chunk went as it came, so the server has it all
        if analyzer is not None:
            analyzer.finish()
        if upgrade is not None:
            for piece in upgrade.flush(analyzer):
                yield piece
        if content.exception() is not None:
            record.error = "client_gone"
            raise _ClientGone()
        # The last byte is the server's: its work starts. The upload before (as slow as the client)
        # and the tap's own work are not the server's busy time.
        flight.occupy()  # after an upgrade's last piece; without one, done above

    async def _answer(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                      flight: _Flight) -> web.StreamResponse:
        record = flight.record
        headers = _forward_headers(upstream.headers)
        if record.api is not None and 200 <= upstream.status < 300:
            flight.answer_type = upstream.headers.get("Content-Type", "")
            flight.answer_encoded = "Content-Encoding" in upstream.headers
            if not flight.answer_encoded:
                flight.capture = Capture(self.config.max_response_capture)
        if flight.upgrade is not None and flight.upgrade.active and 200 <= upstream.status < 300 \
                and flight.answer_type.startswith("application/json"):
            return await self._answer_upgraded(request, upstream, flight, headers)
        return await self._stream(request, upstream, flight, headers, [])

    async def _stream(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, flight: _Flight,
                      headers: CIMultiDict, held: list[bytes]) -> web.StreamResponse:
        """The answer to the client chunk by chunk as it comes, after the `held` chunks read before."""
        record = flight.record
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        record.status = upstream.status
        content = upstream.content
        capture = flight.capture
        first = True
        try:
            await response.prepare(request)
            for chunk in held:
                if first:
                    record.ttfb = time.perf_counter() - flight.t0
                    first = False
                record.response_bytes += len(chunk)
                if capture is not None:
                    capture.add(chunk)
                await response.write(chunk)
            held.clear()  # the caller's list too: these bytes are the client's now
            while True:
                chunk = await content.readany()
                if first:
                    record.ttfb = time.perf_counter() - flight.t0
                    first = False
                if not chunk:
                    break
                record.response_bytes += len(chunk)
                if capture is not None:
                    capture.add(chunk)
                await response.write(chunk)
            flight.release()  # the server's answer is read to its end: it is done, the client may not be
        except asyncio.TimeoutError:
            return self._cut(request, record, "timeout")
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return self._cut(request, record, "closed")
        except ConnectionError:
            record.error = "client_gone"
            raise
        await response.write_eof()
        return response

    async def _answer_upgraded(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                               flight: _Flight, headers: CIMultiDict) -> web.StreamResponse:
        """A json request asked as verbose_json: read the whole answer, render it as json (off the
        loop). One over UPGRADE_MAX bytes, UPGRADE_MAX_OBJECTS objects or the memory budget goes to
        the client as it came (verbose_json), counted as analysis error `upgrade`."""
        record = flight.record
        record.upgraded = True
        chunks: list[bytes] = []
        size = taken = 0
        try:
            over = False
            try:
                while chunk := await upstream.content.readany():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > UPGRADE_MAX or not self.budget.take(len(chunk)):
                        over = True
                        break
                    taken += len(chunk)
            except asyncio.TimeoutError:
                return self._fail(record, "timeout", 504, "upstream timed out")
            except aiohttp.ClientError:
                return self._fail(record, "closed", 502, "upstream closed the connection")
            if over:  # the rest is streamed, and released at its end
                self._upgrade_refused(record, f"over {UPGRADE_MAX} bytes or the memory budget")
                return await self._stream(request, upstream, flight, headers, chunks)
            flight.release()  # the answer is read whole: rendering it is the tap's work
            body = b"".join(chunks)
            chunks.clear()
            record.ttfb = time.perf_counter() - flight.t0
            rendered = None
            if body.count(b"{") > UPGRADE_MAX_OBJECTS:
                self._upgrade_refused(record, f"over {UPGRADE_MAX_OBJECTS} objects")
            else:
                rendered = await asyncio.get_running_loop().run_in_executor(self._render, render_json, body)
            if flight.capture is not None:
                flight.capture.add(body)
            out = body if rendered is None else rendered
            if rendered is not None:
                headers.popall("Content-Length", None)
            record.status = upstream.status
            record.response_bytes = len(out)
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=out)
        finally:
            self.budget.give(taken)

    def _upgrade_refused(self, record: TapRecord, why: str) -> None:
        """A verbose_json answer passed as it came instead of rendered: counted, logged a minute apart."""
        self.stats.count(self.stats.analysis_errors, "upgrade")
        self._warn("upgrade", f"tap: {record.method} {record.endpoint}: verbose_json answer {why}: passed to the "
                              "client as it came, not rendered as json")

    def _fail(self, record: TapRecord, reason: str, status: int, text: str) -> web.Response:
        record.error = reason
        record.status = status
        self._warn(reason, f"tap: {record.method} {record.endpoint}: {text}")
        body = (text + "\n").encode()
        record.response_bytes = len(body)
        return web.Response(status=status, body=body, content_type="text/plain")

    def _cut(self, request: web.BaseRequest, record: TapRecord, reason: str) -> web.StreamResponse:
        """The upstream failed mid-answer after the status went out: cut the client's connection
        too, so it sees a broken answer rather than a short one that looks whole."""
        record.error = reason
        self._warn(reason, f"tap: {record.method} {record.endpoint}: upstream failed mid-answer ({reason})")
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the record worker, in turn with the records; RuntimeError when the
        tap is stopping or the queue is full: the caller drops the work (a full queue counted as
        stream_check_queue_full, for it is no request record)."""
        if self.stopping.is_set():
            self.stats.count(self.stats.dropped, "stream_check_shutdown")
            raise RuntimeError("the tap is stopping")
        try:
            self._queue.put_nowait(functools.partial(fn, *args))
        except queue.Full:
            self.stats.count(self.stats.dropped, "stream_check_queue_full")
            self._warn("stream_check_queue_full", "tap: the record queue is full (record_queue: "
                       f"{self.config.record_queue}); a stream's transcript goes unchecked, counted in "
                       "whisper_tap_records_dropped_total{reason=\"stream_check_queue_full\"}")
            raise RuntimeError("the record queue is full") from None

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._logged[kind] = now
            log.warning("%s", message)

    # -- after the request ----------------------------------------------------

    def _finish(self, flight: _Flight) -> None:
        record = flight.record
        stats = self.stats
        with stats.lock:
            stats.requests += 1
            stats.request_bytes += record.request_bytes
            stats.response_bytes += record.response_bytes
            if record.error is not None:
                stats.errors[record.error] = stats.errors.get(record.error, 0) + 1
        if flight.upgrade is not None:
            flight.upgrade.close()  # a request that ended mid-hold still gives its bytes back
        if self.stopping.is_set():
            self._drop(flight, "shutdown")
            return
        try:
            self._queue.put_nowait(flight)
        except queue.Full:
            self._drop(flight, "queue_full")
            self._warn("queue_full", f"tap: the record queue is full (record_queue: {self.config.record_queue}); "
                                     "records are dropped, counted in whisper_tap_records_dropped_total")

    def _drop(self, flight: _Flight, reason: str) -> None:
        """A record not analysed nor handed on: its spool goes now, and it is counted."""
        analyzer = flight.analyzer
        if analyzer is not None and analyzer.spool is not None:
            analyzer.spool.discard()
        with self.stats.lock:
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
            if reason == "shutdown":
                self._shutdown_drops += 1

    def _work(self) -> None:
        """The record worker: one record at a time; once the tap stops, until the queue is empty."""
        while True:
            if self.stopping.is_set():
                try:
                    flight = self._queue.get_nowait()
                except queue.Empty:  # drained (or dropped): a reload's drain ends here
                    if self._drain_timer is not None:
                        self._drain_timer.cancel()
                    return
            else:
                flight = self._queue.get()
            if flight is None:  # stop()'s wake-up: what is still queued is drained or dropped
                continue
            if not isinstance(flight, _Flight):  # a stream's final transcript to check
                if self._cut_off.is_set():
                    self.stats.count(self.stats.dropped, "stream_check_shutdown")
                    continue
                try:
                    flight()
                except Exception:  # noqa: BLE001 - a check's failure must not end the worker
                    log.exception("tap: checking a stream's transcript failed")
                continue
            if self._cut_off.is_set():
                self._drop(flight, "shutdown")
                continue
            self._complete(flight)

    def _complete(self, flight: _Flight) -> None:
        """In a worker thread: audio duration, transcript; then the callback; then the spool goes."""
        from whisper_exporter.whisper.audio import AudioError

        record, analyzer = flight.record, flight.analyzer
        spool = analyzer.spool if analyzer is not None else None
        try:
            if analyzer is not None:
                _fields_to_record(record, analyzer.fields)
                if analyzer.error is not None:
                    record.analysis_error = analyzer.error
                elif spool is not None and analyzer.complete:
                    try:
                        with spool.reader() as handle:
                            record.audio_duration = upload_seconds(handle, spool.size)
                            # A WAV header may claim any length: the bytes received decide (the smaller).
                            handle.seek(0)
                            received = wav_received_seconds(handle, spool.size)
                        if received is not None and received < record.audio_duration - 0.001:
                            record.audio_duration = received
                            with self.stats.lock:
                                self.stats.duration_mismatches += 1
                    except TooMuchWork:
                        record.analysis_error = "audio_work"
                    except AudioError:
                        record.analysis_error = "audio"
            if flight.capture is not None and record.status is not None and 200 <= record.status < 300 \
                    and record.error is None:
                body = flight.capture.value()
                if body is not None:
                    try:
                        answer = read_answer(body, flight.answer_type)
                    except ValueError:
                        record.analysis_error = record.analysis_error or "answer"
                    else:
                        limit = self.config.max_transcript_chars
                        record.transcript = answer.text[:limit] if answer.text is not None else None
                        record.segments = answer.segments
                        if not record.language or record.language.strip().lower() in ("auto", ""):
                            record.language = answer.language
                            record.detected_language = answer.language
                        if record.audio_duration is None and answer.duration is not None \
                                and record.analysis_error is None:
                            record.audio_duration = answer.duration
            if record.analysis_error is None and spool is not None and self.wants_audio is not None \
                    and self.wants_audio(record):
                record.audio_path = spool.to_disk()
                if spool.failed:
                    record.analysis_error = spool_folder.REASON
        except Exception:  # a bug of ours must not lose the record
            log.exception("tap: analysing a request failed")
            record.analysis_error = "internal"
        if record.analysis_error is not None:
            self.stats.count(self.stats.analysis_errors, record.analysis_error)
        try:
            self.on_record(record)
        except Exception:
            log.exception("tap: the record callback failed")
            self.stats.count(self.stats.analysis_errors, "callback")
        finally:
            if spool is not None:
                spool.discard()  # after the callback: sampling may have moved the file away


def _connector(keepalive: float) -> aiohttp.TCPConnector:
    """The upstream connections: reused while idle for less than `keepalive` seconds (0: never).

    A kept-alive connection the server is closing fails the POST sent on it with a 502, and a
    POST cannot be retried: so a connection is reused only while well inside the server's own
    keep-alive (gunicorn's 2 s, uvicorn's 5 s) and never after a 5xx (uvicorn closes then without
    saying so); an answer with `Connection: close` or an unfinished exchange closes it too.
    Reuse saves a connect per request: 0.4-0.9 ms of CPU at 1 MB (benchmarks/bench_tap.py)."""
    if keepalive <= 0:  # one connection per request, as nginx's proxy_pass does by default
        return aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive)


class _Answer(aiohttp.ClientResponse):
    """An upstream answer; after a 5xx its connection is not reused (uvicorn closes after an
    unhandled error's 500 without saying so)."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        await super().start(connection)
        if self.status >= 500 and protocol is not None:
            if self.connection is None:  # the whole answer came with its head: already back in the pool
                protocol.close()
            else:
                protocol.force_close()  # closed, not pooled, once its body has been read
        return self


if sys.version_info >= (3, 11):
    async def _within(awaitable: Any, seconds: float) -> Any:
        """`awaitable`'s result, or TimeoutError after `seconds`; no task of its own, unlike wait_for."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # Python 3.10 (pyproject): wait_for runs each read in a task of its own
    _within = asyncio.wait_for


def origin_form(method: str, target: str) -> bool:
    """Whether a request may be forwarded: not CONNECT, and its target origin-form (/path?query)."""
    return method.upper() != "CONNECT" and target.startswith("/") and "#" not in target


def upstream_url(base: URL, target: str) -> URL:
    """The upstream's URL for an origin-form `target`: scheme, user info, host and port are the
    configured upstream's, its path is prefixed; built from parts (never by joining strings, which
    let `@host:port` name another host) and not re-encoded, so the path reaches the server as sent."""
    path, _, query = target.partition("?")
    return URL.build(scheme=base.scheme, authority=base.raw_authority, path=base.raw_path.rstrip("/") + path,
                     query_string=query, encoded=True)


# The spool folders cleaned by this process: only its first tap on a folder finds a previous run's
# files there; a later one (a reload's) would delete the uploads the tap it replaces still reads.
_CLEANED: set[str] = set()
_CLEANED_LOCK = threading.Lock()


def _clean_spool(folder: str) -> None:
    """Remove uploads a previous run left in its own spool directory (a crash, a kill); once per
    folder and process."""
    import glob

    with _CLEANED_LOCK:
        key = os.path.realpath(folder)
        if key in _CLEANED:
            return
        _CLEANED.add(key)
    for path in glob.glob(os.path.join(glob.escape(folder), "whisper-tap-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


class _ClientGone(Exception):
    """The client's upload stopped (connection lost, or silent for client_timeout)."""


async def _read_rest(body: Any, flight: _Flight) -> None:
    """The rest of an upload the upstream never took, through the analyzer: its form fields
    (language, model) label the failed request as they label a forwarded one."""
    flight.release()  # the server failed or refused it: the rest of the upload is not its work
    if body is None or flight.analyzer is None:
        return
    try:
        async for _ in body:  # the client timeout and the analyzer's bounds hold as when forwarding
            pass
    except (_ClientGone, RuntimeError):  # the client left, or the body was already consumed
        pass


def upload_due(began: float, received: int, min_rate: int, grace: float, total: Optional[float]) -> float:
    """The monotonic time by which an upload that began at `began` must have sent more than
    `received` bytes: the grace, then `received / min_rate` (an average of min_rate bytes/s), and
    never past the total deadline."""
    due = began + max(grace, received / min_rate) if min_rate > 0 else float("inf")
    return min(due, began + total) if total is not None else due


def _client_gone_response(record: TapRecord) -> web.Response:
    """The client's upload stopped: a silent or too slow one gets 408 and the connection closes
    (after aiohttp's lingering read of at most 10 s, while the connection counts as idle: the
    first to make room at the limit); a gone one nothing (no status)."""
    if record.error in ("client_timeout", "upload_too_slow"):
        record.status = 408
        answer = web.Response(status=408, text="request body timed out\n" if record.error == "client_timeout"
                              else "request body too slow\n")
        answer.force_close()
        return answer
    record.status = None
    return web.Response(status=499, text="client closed request\n")  # nobody reads it


def _fields_to_record(record: TapRecord, fields: dict[str, str]) -> None:
    """Language, model, response format and streaming from the upload's form fields."""
    def field(name: str) -> Optional[str]:
        value = fields.get(name)
        return value.strip() if value is not None and value.strip() else None

    if record.language is None:
        record.language = field("language")
    if record.model is None:
        record.model = field("model") or field("model_name")
    if record.response_format is None:
        record.response_format = field("response_format") or ("json" if record.api != "asr-webservice" else None)
    if not record.stream:
        record.stream = (field("stream") or "").lower() in TRUE
