"""WebSocket through the tap: an upgrade on any path is relayed message by message.

The upstream's handshake comes first, with the client's headers (Authorization, Origin,
cookies), query string and offered subprotocols; the subprotocol the upstream chose goes
back to the client, and an upstream that refuses the handshake gives the client its status
and (bounded) body. Then one reader per leg: the handler task reads the client (aiohttp: only
the request's own task may read a server-side WebSocket) and a task of its own reads the
upstream; each awaits the other leg's send, so a slow reader slows its sender through TCP,
with no queue between the legs. Messages keep their type, bytes and boundaries (a fragmented
message arrives whole: its meaning is unchanged); close codes are passed on (1005 as 1000; a
leg that vanished without a close frame is 1006, never sent: the other leg gets 1011 or
1001). Pings and pongs are passed on as they came (each end's heartbeat is answered by the
other end); each leg also has the tap's own heartbeat. The upstream's 101 headers reach the
client, less hop-by-hop and handshake ones. permessage-deflate is not negotiated on either leg.
A copy of every message goes to streaming.Session for the realtime metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from typing import TYPE_CHECKING, Any, Optional

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from multidict import CIMultiDict
from yarl import URL

from whisper_exporter.tap.headers import forward_headers
from whisper_exporter.tap.streaming import Session
from whisper_exporter.whisper import marker

if TYPE_CHECKING:
    from whisper_exporter.tap.proxy import Tap

HEARTBEAT = 20.0  # seconds between pings on each leg (websockets' default); no pong in half of it closes
CLOSE_TIMEOUT = 10.0  # seconds to wait for a leg's answer to our close frame
REFUSAL_MAX = 65536  # bytes of a refused handshake's body passed to the client
# Set by aiohttp from our own arguments on the upstream leg, or per connection.
HANDSHAKE_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                               "sec-websocket-protocol", "sec-websocket-accept"})
# Codes that must not be sent in a close frame (RFC 6455 7.4.1), and what is sent instead.
UNSENDABLE = {0: 1000, 1005: 1000, 1004: 1011, 1006: 1011, 1015: 1011}
# Where _Refused leaves a refused handshake's body: set by relay() in the handler's own context.
_REFUSAL: contextvars.ContextVar[list[bytes]] = contextvars.ContextVar("whisper_exporter_ws_refusal")


def is_upgrade(request: web.BaseRequest) -> bool:
    """A WebSocket handshake: GET with `Upgrade: websocket` and `Connection: upgrade`."""
    if request.method != "GET" or request.headers.get("Upgrade", "").strip().lower() != "websocket":
        return False
    tokens = {t.strip().lower() for v in request.headers.getall("Connection", ()) for t in v.split(",")}
    return "upgrade" in tokens


def wire_code(code: Optional[int]) -> int:
    """A close code that may be sent on the wire."""
    if code is None:
        return 1011
    if code in UNSENDABLE:
        return UNSENDABLE[code]
    return code if 1000 <= code <= 1014 or 3000 <= code <= 4999 else 1011


def offered_protocols(headers: Any) -> list[str]:
    """The subprotocols the client offered, in its order."""
    return [p.strip() for v in headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",") if p.strip()]


class _Refused(aiohttp.ClientResponse):
    """The upstream's handshake answer; when it is not 101, up to REFUSAL_MAX bytes of its body are
    read here, before aiohttp raises WSServerHandshakeError and releases it."""

    refusal: Optional[bytes] = None

    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        await super().start(connection)
        if self.status != 101:
            chunks, size = [], 0
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                while size < REFUSAL_MAX and (chunk := await self.content.read(REFUSAL_MAX - size)):
                    chunks.append(chunk)
                    size += len(chunk)
            holder = _REFUSAL.get(None)
            if holder is not None:
                holder.append(b"".join(chunks))
        return self



def _session(tap: "Tap") -> aiohttp.ClientSession:
    """The tap's client session for upstream WebSockets (not pooled: an upgraded connection is the session's)."""
    if tap.ws_session is None:
        cfg = tap.config
        timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
        tap.ws_session = aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                               connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                               response_class=_Refused, auto_decompress=False)
    return tap.ws_session


async def relay(tap: "Tap", request: web.BaseRequest, forward: CIMultiDict, url: URL,
                canary: bool) -> web.StreamResponse:
    """Answer one upgrade request: the upstream's refusal, a 502/504, or the relayed session.
    `forward`: the request's headers less hop-by-hop ones; `url`: the upstream's URL for it."""
    stats = tap.streams
    offered = offered_protocols(request.headers)
    probe = web.WebSocketResponse(protocols=offered)
    if not probe.can_prepare(request).ok:  # not a valid WebSocket handshake (key, version)
        stats.bump(stats.upgrades, "bad_request")
        return web.Response(status=400, text="invalid WebSocket handshake\n")
    if marker.classify(request.headers, request.query) == marker.SPOOFED and stats.on_spoofed is not None:
        stats.on_spoofed()  # a client's claim to be the canary: user traffic, and counted (as HTTP ones are)
    headers = CIMultiDict((k, v) for k, v in forward.items() if k.lower() not in HANDSHAKE_HEADERS)
    cfg = tap.config
    most = cfg.websocket_max_message + 1  # aiohttp refuses a message of max_msg_size bytes: the limit passes
    refusal: list[bytes] = []
    token = _REFUSAL.set(refusal)
    try:
        upstream = await _session(tap).ws_connect(
            url, protocols=offered, headers=headers, autoclose=False, autoping=False, heartbeat=HEARTBEAT, compress=0,
            max_msg_size=most, timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT))
    except aiohttp.WSServerHandshakeError as err:
        stats.bump(stats.upgrades, "refused" if err.status != 101 else "upstream_error")
        if err.status == 101 or not 200 <= err.status <= 599:  # a broken 101 (bad accept key, no upgrade)
            return web.Response(status=502, text="upstream's WebSocket handshake was invalid\n")
        answer = CIMultiDict((k, v) for k, v in (err.headers or {}).items()
                             if k.lower() in ("content-type", "www-authenticate", "retry-after"))
        return web.Response(status=err.status, headers=answer, body=refusal[0] if refusal else b"")
    except asyncio.TimeoutError:
        stats.bump(stats.upgrades, "upstream_error")
        return web.Response(status=504, text="upstream timed out\n")
    except aiohttp.ClientError as err:
        stats.bump(stats.upgrades, "upstream_error")
        return web.Response(status=502, text=f"upstream unreachable ({type(err).__name__})\n")
    finally:
        _REFUSAL.reset(token)
    stats.bump(stats.upgrades, "accepted")
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                   autoclose=False, autoping=False, heartbeat=HEARTBEAT, compress=False,
                                   max_msg_size=most, timeout=CLOSE_TIMEOUT)
    client.headers.extend(answer_headers(upstream))
    gate = tap._listener.gate(request) if tap._listener is not None else None
    if gate is not None:
        gate.started()  # a session in progress: counted, never evicted as idle
    bridge = _Bridge(client, upstream, Session(stats, request.path, time.monotonic(), canary),
                     cfg.websocket_idle_timeout)
    tap.relays.add(bridge)
    try:
        await client.prepare(request)
        await bridge.run()
    finally:
        if bridge.reader is None:  # the client went before its 101 was sent: the upstream leg goes too
            with contextlib.suppress(Exception):
                await asyncio.shield(upstream.close(code=1001, message=b"client gone"))
            bridge.session.closed(None, "client", time.monotonic())
        tap.relays.discard(bridge)
        if gate is not None:
            gate.finished()
    return client


def answer_headers(upstream: Any) -> CIMultiDict:
    """The upstream's 101 headers a client gets, as nginx passes them: end-to-end ones only (not
    hop-by-hop, nor those the Connection header names), none of the handshake's own (the tap's
    leg computes its accept key), and the subprotocol the upstream chose, set here because aiohttp
    matches only the first of repeated Sec-WebSocket-Protocol headers against it."""
    out = CIMultiDict((k, v) for k, v in forward_headers(upstream._response.headers).items()
                      if k.lower() not in HANDSHAKE_HEADERS and k.lower() != "content-length")
    if upstream.protocol:
        out["Sec-WebSocket-Protocol"] = upstream.protocol
    return out


async def pass_on(msg: aiohttp.WSMessage, to: Any) -> None:
    """Send a frame on to the other leg as it came (text, binary, ping or pong)."""
    try:
        if msg.type is WSMsgType.TEXT:
            await to.send_str(msg.data)
        elif msg.type is WSMsgType.PING:
            await to.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await to.pong(msg.data)
        else:
            await to.send_bytes(msg.data)
    except (ConnectionError, RuntimeError):
        pass  # that leg went away: its own reader ends the session


async def shutdown(tap: "Tap") -> None:
    """The tap is stopping: every session is closed with 1001 (going away) on both legs."""
    await asyncio.gather(*(b.end(1001, "tap shutting down", "tap", 1001) for b in list(tap.relays)),
                         return_exceptions=True)
    if tap.ws_session is not None:
        await tap.ws_session.close()


class _Bridge:
    """One relayed session: two legs, one reader each, and who ended it with which code."""

    def __init__(self, client: web.WebSocketResponse, upstream: "aiohttp.ClientWebSocketResponse[Any]",
                 session: Session, idle: float):
        self.client, self.upstream, self.session, self.idle = client, upstream, session, idle
        self.last = time.monotonic()
        self.ending = False
        self.reader: Optional[asyncio.Task] = None
        self.closing: Optional[asyncio.Future] = None  # the closing handshake, once begun

    async def run(self) -> None:
        self.reader = asyncio.ensure_future(self._from_upstream())
        try:
            await self._from_client()
        except asyncio.CancelledError:  # the client's connection was lost (handler cancellation)
            await self.end(1001, "client gone", "client", None)
            raise
        finally:
            # Shielded: the handler's own cancellation (the client's connection closing after the
            # close handshake) must not cut the upstream reader's last steps.
            for task in (self.reader, self.closing):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)

    async def _from_client(self) -> None:
        """Client to upstream, in the handler task (the only task that may read this leg)."""
        client, session = self.client, self.session
        while True:
            try:
                msg = await client.receive(timeout=max(0.001, self.last + self.idle - time.monotonic()))
            except asyncio.TimeoutError:
                if time.monotonic() - self.last < self.idle:
                    continue  # the other direction was active
                await self.end(1001, "idle timeout", "tap", 1001)
                return
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self.last = time.monotonic()
                session.client_message(msg.data, self.last)
                await pass_on(msg, self.upstream)
                continue
            if msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                await pass_on(msg, self.upstream)  # the upstream answers the client's pings (as through nginx)
                continue
            if msg.type is WSMsgType.CLOSE:
                await self._client_closed(msg.data, msg.extra or "")
            elif msg.type is WSMsgType.ERROR or msg.type is WSMsgType.CLOSED:
                await self._leg_lost(msg, 1001, "client gone", "client")
            return  # CLOSING: the session is being ended from the other reader

    async def _client_closed(self, code: int, reason: str) -> None:
        """The client closed: the upstream gets its code; the client gets the upstream's answer."""
        if self.ending:
            return
        self.ending = True
        await self._finish(self._pass_client_close(code, reason))

    async def _pass_client_close(self, code: int, reason: str) -> None:
        # The upstream reader is not cancelled: it gets CLOSING and stops, and close() reads the
        # answer here (a cancelled receive() would mark the leg 1006 and lose the upstream's answer).
        try:
            with contextlib.suppress(Exception):
                await self.upstream.close(code=wire_code(code), message=reason.encode()[:123])
            answer = self.upstream.close_code
            with contextlib.suppress(Exception):
                await self.client.close(code=wire_code(answer if answer and answer != 1006 else code))
        finally:
            self.session.closed(code, "client", time.monotonic())

    async def _finish(self, closing: Any) -> None:
        """Run the closing handshake in a task of its own, shielded: the client's connection ending
        cancels the handler task, and a cancelled close() would cut the other leg without its frame."""
        self.closing = asyncio.ensure_future(closing)
        await asyncio.shield(self.closing)

    async def _from_upstream(self) -> None:
        """Upstream to client, in its own task."""
        upstream, session = self.upstream, self.session
        while True:
            msg = await upstream.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self.last = time.monotonic()
                session.server_message(msg.data, self.last)
                await pass_on(msg, self.client)
                continue
            if msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                await pass_on(msg, self.client)
                continue
            if msg.type is WSMsgType.CLOSE:
                code, reason = msg.data, msg.extra or ""
                await self.end(wire_code(code), reason, "server", code)
            elif msg.type is WSMsgType.ERROR or msg.type is WSMsgType.CLOSED:
                await self._leg_lost(msg, 1011, "upstream gone", "server")
            return

    async def _leg_lost(self, msg: aiohttp.WSMessage, default: int, reason: str, by: str) -> None:
        """A leg failed or closed without a frame: end the session (a too-big message is the tap's doing)."""
        code = msg.data.code if isinstance(msg.data, WebSocketError) else None
        too_big = code == 1009
        await self.end(code or default, "message too big" if too_big else reason, "tap" if too_big else by, code)

    async def end(self, send: int, reason: str, by: str, code: Optional[int]) -> None:
        """End the session from this side: both legs get close frame `send`; counted as closed by
        `by` with `code` (the code that side sent; None: it vanished without one)."""
        if self.ending:
            return
        self.ending = True
        await self._finish(self._close_both(send, reason.encode()[:123], by, code))

    async def _close_both(self, send: int, message: bytes, by: str, code: Optional[int]) -> None:
        try:
            await asyncio.gather(self.client.close(code=wire_code(send), message=message),
                                 self.upstream.close(code=wire_code(send), message=message),
                                 return_exceptions=True)
        finally:
            self.session.closed(code, by, time.monotonic())
