"""WebSocket through the tap: real aiohttp (and `websockets`) clients, a real aiohttp upstream.

Each transparency check runs the same client session directly against the upstream and through
the tap, and compares what the client saw: messages, subprotocol, close code and reason.
"""
from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from helpers import samples
from multidict import CIMultiDict
from tap_helpers import Records, Upstream, start_tap

from whisper_exporter.tap import TapConfig

BIG = 3 * 1024 * 1024  # a 3 MB message, under the default websocket_max_message (16 MiB)


class Seen:
    def __init__(self) -> None:
        self.handshakes: list[dict[str, Any]] = []
        self.closes: list[Any] = []
        self.go = asyncio.Event  # replaced per test with a threading.Event where needed


seen = Seen()


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Echoes every message; `close:CODE` closes with CODE; the first message says what it was asked."""
    ws = web.WebSocketResponse(protocols=("v2.speech", "v1.speech"), max_msg_size=1 << 25)
    await ws.prepare(request)
    seen.handshakes.append({"query": request.query_string, "auth": request.headers.get("Authorization"),
                            "protocol": ws.ws_protocol, "path": request.path})
    await ws.send_str(f"hello {request.query_string}")
    async for msg in ws:
        if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
            await ws.close(code=int(msg.data[6:]), message=b"as asked")
            break
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    seen.closes.append(ws.close_code)
    return ws


async def with_headers(request: web.Request) -> web.WebSocketResponse:
    """A 101 with headers of its own: two cookies, a server-specific one, a hop-by-hop one."""
    ws = web.WebSocketResponse(protocols=("v2.speech",))
    ws.headers.add("Set-Cookie", "session=abc; Path=/; HttpOnly")
    ws.headers.add("Set-Cookie", "region=eu; Path=/")
    ws.headers["X-Speech-Node"] = "gpu-3"
    ws.headers["Keep-Alive"] = "timeout=5"
    await ws.prepare(request)
    await ws.send_str("hello")
    await ws.receive()
    return ws


async def refuse(request: web.Request) -> web.Response:
    return web.json_response({"detail": "invalid api key"}, status=403)


@pytest.fixture(scope="module")
def upstream():
    server = Upstream({"/v1/realtime": echo, "/refuse": refuse, "/handshake-headers": with_headers,
                       "/{tail:.*}": echo})
    yield server
    server.stop()


@pytest.fixture
def tap(upstream):
    tap = start_tap(upstream.url, Records())
    yield tap
    tap.stop()


async def _session(base: str, path: str, steps: list[Any], protocols=("v1.speech", "v2.speech")) -> dict:
    """Run `steps` (messages to send, each answered; or ('close', code) from the client) and say what came."""
    out: dict[str, Any] = {"got": []}
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(base + path, protocols=protocols, max_msg_size=1 << 25,
                                     headers={"Authorization": "Bearer sk-test"}) as ws:
            out["protocol"] = ws.protocol
            out["got"].append((await ws.receive()).data)
            for step in steps:
                if isinstance(step, tuple):
                    await ws.close(code=step[1], message=b"client done")
                    break
                await (ws.send_str(step) if isinstance(step, str) else ws.send_bytes(step))
                msg = await ws.receive()
                if msg.type is WSMsgType.CLOSE:
                    out["close"] = (msg.data, msg.extra)
                    await ws.close()
                    break
                out["got"].append(msg.data)
            out["close_code"] = ws.close_code
    return out


def run(coro):
    return asyncio.run(coro)


def ended(tap, n: int = 1) -> dict:
    """The tap's ended-session counts, once `n` sessions have ended (the client may see its close first)."""
    deadline = time.monotonic() + 15
    while sum(tap.streams.snapshot()["sessions"].values()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return tap.streams.snapshot()["sessions"]


def test_a_session_through_the_tap_is_the_same_as_directly(upstream, tap):
    payload = os.urandom(BIG)
    text = "é" * (BIG // 2)
    steps = ["plain", payload, text, b"", "close:4001"]
    offered = ("v3.unknown", "v2.speech")  # the upstream knows only the second
    direct = run(_session(upstream.url, "/v1/realtime?model=x&intent=transcription", steps, offered))
    seen.handshakes.clear()
    tapped = run(_session(f"http://127.0.0.1:{tap.port}", "/v1/realtime?model=x&intent=transcription", steps,
                          offered))
    assert tapped == direct
    assert tapped["protocol"] == "v2.speech"  # the upstream's choice, not the client's first
    assert tapped["close"] == (4001, "as asked") and tapped["got"][2] == payload and tapped["got"][3] == text
    assert seen.handshakes == [{"query": "model=x&intent=transcription", "auth": "Bearer sk-test",
                                "protocol": "v2.speech", "path": "/v1/realtime"}]


def test_a_client_close_code_reaches_the_upstream_and_its_answer_the_client(upstream, tap):
    steps = ["x", ("close", 4002)]
    seen.closes.clear()
    direct = run(_session(upstream.url, "/any/path", steps))
    tapped = run(_session(f"http://127.0.0.1:{tap.port}", "/any/path", steps))
    assert tapped == direct and direct["close_code"] == 1000  # aiohttp's upstream answers 1000
    deadline = time.monotonic() + 10
    while len(seen.closes) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.closes == [4002, 4002]  # what the upstream got: directly, and through the tap


def test_no_subprotocol_when_the_upstream_chooses_none(upstream, tap):
    out = run(_session(f"http://127.0.0.1:{tap.port}", "/other", ["a"], protocols=("unknown",)))
    assert out["protocol"] is None and out["got"] == ["hello ", "a"]


def test_the_upstreams_101_headers_reach_the_client_less_hop_by_hop_ones(upstream, tap):
    async def go(base: str) -> tuple:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(base + "/handshake-headers", protocols=("v1.speech", "v2.speech")) as ws:
                hello = (await ws.receive()).data
                got = ws._response.headers
                return (hello, ws.protocol, got.getall("Set-Cookie", []), got.get("X-Speech-Node"),
                        got.get("Keep-Alive"))

    direct = run(go(upstream.url))
    tapped = run(go(f"http://127.0.0.1:{tap.port}"))
    assert direct == ("hello", "v2.speech", ["session=abc; Path=/; HttpOnly", "region=eu; Path=/"], "gpu-3",
                      "timeout=5")
    assert tapped == direct[:4] + (None,)  # Keep-Alive is hop-by-hop: never passed


def test_subprotocols_offered_in_several_headers_get_the_upstreams_choice(upstream, tap):
    """RFC 6455 11.3.4: repeated Sec-WebSocket-Protocol headers are one list. The tap offers the whole
    list upstream, so the client must be told what the upstream chose from it."""
    offers = CIMultiDict([("Sec-WebSocket-Protocol", "v3.unknown"), ("Sec-WebSocket-Protocol", "v2.speech")])

    async def go() -> tuple:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{tap.port}/multi", headers=offers) as ws:
                hello = (await ws.receive()).data
                return hello, ws._response.headers.getall("Sec-WebSocket-Protocol", [])

    seen.handshakes.clear()
    assert run(go()) == ("hello ", ["v2.speech"])
    assert [h["protocol"] for h in seen.handshakes] == ["v2.speech"]


def test_heartbeats_pass_both_ways_and_keep_an_idle_session_open():
    """Control frames pass as nginx passes them: the upstream's pings reach the client and the
    client's pongs go back; a client's ping reaches the upstream and its pong comes back. Both
    ends run aiohttp's heartbeat (2 s: no pong within 1 s closes; shorter ones failed on a loaded
    machine, the pong crossing three event loops in one process) for two intervals and more."""
    upstream_saw: list[tuple[str, bytes]] = []

    async def beating(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=2.0, autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                upstream_saw.append(("ping", msg.data))
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                upstream_saw.append(("pong", msg.data))
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    server = Upstream({"/beat": beating})
    tap = start_tap(server.url, Records())
    try:
        async def go() -> tuple:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/beat", heartbeat=2.0,
                                             autoping=False) as ws:
                    pings, answer = 0, None
                    await ws.ping(b"from the client")
                    deadline = time.monotonic() + 30
                    while pings < 2 or answer is None:  # two of the upstream's pings: four seconds
                        if time.monotonic() > deadline:
                            return "missing", pings, answer
                        msg = await ws.receive(timeout=10)
                        if msg.type is WSMsgType.PING:
                            pings += 1
                            await ws.pong(msg.data)
                        elif msg.type is WSMsgType.PONG and msg.data == b"from the client":
                            answer = msg.data
                        elif msg.type is not WSMsgType.PONG:
                            return "ended", msg.type, msg.data
                    await ws.send_str("still here")
                    while (msg := await ws.receive(timeout=10)).type in (WSMsgType.PING, WSMsgType.PONG):
                        if msg.type is WSMsgType.PING:
                            await ws.pong(msg.data)
                    return pings, answer, msg.data

        out = run(go())
        assert out[0] not in ("missing", "ended"), out  # the upstream's pings, or the client's pong, never came
        pings, answer, echoed = out
        assert pings >= 2 and answer == b"from the client" and echoed == "still here"
        assert ("ping", b"from the client") in upstream_saw  # the upstream answered it, not the tap
        assert any(kind == "pong" for kind, _ in upstream_saw)  # the client's answers to its pings
        assert ended(tap) == {("other", "1000", "client"): 1}  # ended by the client, never cut
    finally:
        tap.stop()
        server.stop()


def test_the_websockets_package_client_through_the_tap(upstream, tap):
    import websockets.asyncio.client as websockets

    async def go(base: str) -> tuple:
        async with websockets.connect(base + "/ws?a=1", subprotocols=["v1.speech"], max_size=1 << 25) as ws:
            hello = await ws.recv()
            await ws.send(b"\x00" * BIG)
            echoed = await ws.recv()
            await ws.send("close:1000")
            try:
                await ws.recv()
            except Exception:
                pass
            return hello, len(echoed), ws.subprotocol, ws.close_code, ws.close_reason

    direct = run(go(upstream.url.replace("http", "ws")))
    tapped = run(go(f"ws://127.0.0.1:{tap.port}"))
    assert tapped == direct == ("hello a=1", BIG, "v1.speech", 1000, "as asked")


def test_a_refused_handshake_gives_the_client_the_upstreams_status_and_body(tap):
    async def go() -> tuple:
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await client.ws_connect(f"http://127.0.0.1:{tap.port}/refuse")
            headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            async with client.get(f"http://127.0.0.1:{tap.port}/refuse", headers=headers) as answer:
                return err.value.status, answer.status, await answer.json()

    assert run(go()) == (403, 403, {"detail": "invalid api key"})
    assert tap.streams.snapshot()["upgrades"]["refused"] == 2


def test_an_upstream_that_is_down_gives_502_and_the_tap_keeps_serving(upstream):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    tap = start_tap(f"http://127.0.0.1:{dead}", Records())
    try:
        async def go() -> int:
            async with aiohttp.ClientSession() as client:
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await client.ws_connect(f"http://127.0.0.1:{tap.port}/v1/realtime")
                return err.value.status
        assert run(go()) == 502
        assert run(go()) == 502
        assert tap.streams.snapshot()["upgrades"]["upstream_error"] == 2
    finally:
        tap.stop()


def test_a_message_over_the_limit_closes_both_legs_with_1009(upstream):
    tap = start_tap(upstream.url, Records(), websocket_max_message=65536)
    seen.closes.clear()
    try:
        async def go() -> tuple:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws") as ws:
                    await ws.receive()
                    await ws.send_bytes(b"x" * 65536)  # at the limit: passes
                    ok = len((await ws.receive()).data)
                    await ws.send_bytes(b"x" * 65537)
                    msg = await ws.receive()
                    return ok, msg.type, msg.data
        assert run(go()) == (65536, WSMsgType.CLOSE, 1009)
        deadline = time.monotonic() + 10
        while not seen.closes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen.closes == [1009]
        assert ended(tap) == {("other", "1009", "tap"): 1}
    finally:
        tap.stop()


def test_an_idle_session_is_closed_with_1001(upstream):
    tap = start_tap(upstream.url, Records(), websocket_idle_timeout=0.5)
    try:
        async def go() -> tuple:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws") as ws:
                    await ws.receive()
                    msg = await ws.receive(timeout=30)
                    return msg.type, msg.data, msg.extra
        assert run(go()) == (WSMsgType.CLOSE, 1001, "idle timeout")
        assert ended(tap) == {("other", "1001", "tap"): 1}
    finally:
        tap.stop()


def test_the_upstream_vanishing_sends_1011_never_1006():
    async def vanish(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()  # no close frame
        return ws

    server = Upstream({"/ws": vanish})
    tap = start_tap(server.url, Records())
    try:
        async def go() -> tuple:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws") as ws:
                    await ws.send_str("x")
                    msg = await ws.receive(timeout=30)
                    return msg.type, msg.data
        assert run(go()) == (WSMsgType.CLOSE, 1011)
        assert ended(tap) == {("other", "1006", "server"): 1}
    finally:
        tap.stop()
        server.stop()


async def stalled(sent: list[int], finished: Callable[[], bool]) -> int:
    """How many messages a flooding sender got out once its count stopped advancing for a second
    (four looks 0.25 s apart), or once it finished: what backpressure let through."""
    last, still = -1, 0
    while still < 4 and not finished():
        await asyncio.sleep(0.25)
        still = still + 1 if sent[0] == last else 0
        last = sent[0]
    return sent[0]


def test_a_client_flooding_a_slow_upstream_is_held_back_not_buffered():
    """Backpressure: while the upstream reads nothing, the client can get only a few socket
    buffers ahead (no queue between the legs); once it reads, every message arrives in order."""
    import threading

    release = threading.Event()
    received: list[int] = []

    async def slow(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 21)
        await ws.prepare(request)
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                received.append(int.from_bytes(msg.data[:4], "big"))
                if len(received) == TOTAL:
                    await ws.send_str("all")
        return ws

    TOTAL, SIZE = 256, 1 << 20  # 256 MB offered
    server = Upstream({"/ws": slow})
    tap = start_tap(server.url, Records())
    sent = [0]
    try:
        async def go() -> str:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws", max_msg_size=1 << 21) as ws:
                    async def flood() -> None:
                        body = bytearray(SIZE)
                        for i in range(TOTAL):
                            body[:4] = i.to_bytes(4, "big")
                            await ws.send_bytes(bytes(body))
                            sent[0] = i + 1
                    task = asyncio.ensure_future(flood())
                    held = await stalled(sent, task.done)  # until the client's sends stop advancing
                    release.set()
                    await task
                    answer = await ws.receive(timeout=120)
                    return f"{held}:{answer.data}"
        held, answer = run(go()).split(":")
        assert int(held) < 64, f"the client got {held} MB ahead of an upstream that reads nothing"
        assert answer == "all" and received == list(range(TOTAL))
    finally:
        release.set()
        tap.stop()
        server.stop()


def test_websocket_settings_are_checked_naming_the_key():
    from whisper_exporter.config import ConfigError, from_dict

    for bad, name in (({"websocket_max_message": 0}, "websocket_max_message"),
                      ({"websocket_idle_timeout": 0}, "websocket_idle_timeout"),
                      ({"websocket_idle_timeout": "soon"}, "websocket_idle_timeout"),
                      ({"websocket_max_message": "big"}, "websocket_max_message")):
        with pytest.raises(ConfigError) as err:
            from_dict({"collectors": {"tap": bad}})
        assert err.value.key == f"collectors.tap.{name}"
    tap = from_dict({"collectors": {"tap": {"websocket_idle_timeout": "2m"}}}).collectors.tap
    assert tap.websocket_idle_timeout == 120 and TapConfig().websocket_max_message == 16 << 20


@pytest.mark.integration
def test_200_idle_websocket_sessions_under_1024_fds_leave_metrics_answering(tmp_path, upstream):
    """The exporter under `ulimit -n 1024`: 200 sessions through its tap hold 400 descriptors (both
    legs) of its 256-connection tap limit, and scrapes, and a new session, still work."""
    from helpers import sample
    from slowloris import FD_LIMIT, exporter_under_fd_limit, raise_own_fd_limit, scrape_like_prometheus

    raise_own_fd_limit(4096)
    with exporter_under_fd_limit(tmp_path, tap_upstream=upstream.url) as exporter:
        base = f"http://127.0.0.1:{exporter.tap_port}"
        opened: list[Any] = []
        peak = {"fds": 0}

        async def hold() -> tuple:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
                for _ in range(200):
                    ws = await client.ws_connect(base + "/idle")
                    await ws.receive()
                    opened.append(ws)
                peak["fds"] = exporter.ps.num_fds()
                loop = asyncio.get_running_loop()
                scrapes = await loop.run_in_executor(None, scrape_like_prometheus, exporter.url, 5.0)
                text = await loop.run_in_executor(None, lambda: requests.get(exporter.url + "/metrics", timeout=10).text)
                async with client.ws_connect(base + "/one-more") as ws:  # a 201st session is served
                    await ws.receive()
                    await ws.send_str("still here")
                    echoed = (await ws.receive()).data
                for ws in opened:
                    await ws.close()
                return scrapes, text, echoed

        import requests

        scrapes, text, echoed = asyncio.run(hold())
        print(f"\n{len(scrapes.latencies)} scrapes answered, failures {scrapes.failures}; exporter fds {peak['fds']}")
        assert scrapes.failures == [] and len(scrapes.latencies) >= 3
        assert echoed == "still here"
        assert sample(text, "whisper_stream_sessions_in_flight", protocol="other") == 200
        assert sample(text, "whisper_tap_connections") >= 200
        assert 400 <= peak["fds"] < FD_LIMIT - 100


def test_a_client_vanishing_closes_the_upstream_with_1001(upstream):
    tap = start_tap(upstream.url, Records())
    seen.closes.clear()
    try:
        async def go() -> None:
            async with aiohttp.ClientSession() as client:
                ws = await client.ws_connect(f"http://127.0.0.1:{tap.port}/ws")
                await ws.receive()
                ws._response.connection.transport.abort()  # no close frame: the connection just ends
        run(go())
        assert ended(tap) == {("other", "1006", "client"): 1}
        deadline = time.monotonic() + 10
        while not seen.closes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen.closes == [1001]
    finally:
        tap.stop()


def test_stopping_the_tap_closes_open_sessions_with_1001(upstream):
    tap = start_tap(upstream.url, Records())

    async def go() -> tuple:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws") as ws:
                await ws.receive()
                loop = asyncio.get_running_loop()
                stopping = loop.run_in_executor(None, tap.stop)
                msg = await ws.receive(timeout=30)
                await stopping
                return msg.type, msg.data

    assert run(go()) == (WSMsgType.CLOSE, 1001)
    assert tap.streams.snapshot()["sessions"] == {("other", "1001", "tap"): 1}


def test_stream_counters_carry_on_when_a_reload_builds_the_tap_anew(upstream):
    """A reload that rebuilds the tap (a new collector, a new Tap) keeps the whisper_stream_* counters
    and histograms: the new collector exports the stopped tap's on top of its own, once."""
    from collectors.tap import TapCollector

    def counts(collector) -> dict:
        got = samples(list(collector.families()))
        return {"sessions": sum(v for (name, _), v in got.items() if name == "whisper_stream_sessions_total"),
                "upstream": got[("whisper_stream_messages_total", (("direction", "upstream"),))],
                "durations": sum(v for (name, _), v in got.items()
                                 if name == "whisper_stream_session_duration_seconds_count")}

    def one_session(collector) -> None:
        run(_session(f"http://127.0.0.1:{collector.tap.port}", "/ws", ["a", "b", ("close", 1000)]))
        ended(collector.tap, 1)

    first = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), upstream.url)
    first.start()
    try:
        one_session(first)
        before = counts(first)
        assert before == {"sessions": 1, "upstream": 2, "durations": 1}
    finally:
        first.stop_for_reload()
    assert counts(first) == before  # folded, not counted twice
    second = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), upstream.url, totals=first.totals)
    assert counts(second) == before  # no reset: the stopped tap's counts go on
    second.start()
    try:
        one_session(second)
        assert counts(second) == {"sessions": 2, "upstream": 4, "durations": 2}
    finally:
        second.stop()
    first.stop()  # a second stop folds nothing more
    assert counts(second) == {"sessions": 2, "upstream": 4, "durations": 2}


def _handshake(port: int, path: str) -> socket.socket:
    """A raw client that completes the opening handshake, then never reads or answers again: a
    client whose machine hung, its TCP connection still open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_the_taps_heartbeat_ends_a_session_whose_client_stopped_answering(monkeypatch):
    """A client gone silent (no pong to the tap's pings) would hold the session and the upstream's
    slot until the idle timeout, or for ever while the server keeps talking; the tap's own heartbeat
    ends it in one interval and the upstream gets 1001."""
    from whisper_exporter.tap import websocket

    monkeypatch.setattr(websocket, "HEARTBEAT", 1.0)  # read per session; 20 s by default
    upstream_closed: list[int] = []

    async def talker(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        upstream_closed.append(ws.close_code)
        return ws

    server = Upstream({"/talk": talker})
    tap = start_tap(server.url, Records(), websocket_idle_timeout=300.0)
    try:
        started = time.monotonic()
        sock = _handshake(tap.port, "/talk")
        try:
            sessions = ended(tap)
            took = time.monotonic() - started
        finally:
            sock.close()
        deadline = time.monotonic() + 10
        while not upstream_closed and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        tap.stop()
        server.stop()
    assert sessions == {("other", "1006", "client"): 1}, sessions  # vanished: no close frame
    assert took < 5, took  # one heartbeat (1 s, a pong due in 0.5 s), not the 5-minute idle timeout
    assert upstream_closed == [1001]


def test_the_taps_heartbeat_ends_a_session_whose_server_stopped_answering(monkeypatch):
    """An upstream that stopped answering pings (a wedged server process) is cut by the tap's
    heartbeat: the client gets 1011 and the session counts as ended by the server with 1006 (no frame)."""
    from whisper_exporter.tap import websocket

    monkeypatch.setattr(websocket, "HEARTBEAT", 1.0)

    async def wedged(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)  # reads pings, never answers them
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    server = Upstream({"/wedged": wedged})
    tap = start_tap(server.url, Records(), websocket_idle_timeout=300.0)
    try:
        async def go() -> tuple:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/wedged") as ws:
                    started = time.monotonic()
                    while (msg := await ws.receive(timeout=30)).type is not WSMsgType.CLOSE:
                        pass
                    return msg.data, time.monotonic() - started

        code, took = run(go())
        sessions = ended(tap)
    finally:
        tap.stop()
        server.stop()
    assert code == 1011 and took < 5, (code, took)
    assert sessions == {("other", "1006", "server"): 1}, sessions


def _frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """One masked client frame (RFC 6455 5.2), short payloads only."""
    assert len(payload) < 126
    key = os.urandom(4)
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + key + \
        bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed"
            data += chunk
        return data
    b0, b1 = exactly(2)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(exactly(2), "big")
    elif size == 127:
        size = int.from_bytes(exactly(8), "big")
    return b0, exactly(size)


def _fragmented_session(port: int) -> list[tuple[int, bytes]]:
    """A raw client that sends a text and a binary message in three fragments each, a ping between
    two fragments (control frames may interleave, RFC 6455 5.4), and says what came back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /fragments HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        got = [_read_frame(sock)]  # the upstream's hello
        text = "fragménted".encode()  # split inside the é: b"m\xc3" | b"\xa9nted"
        sock.sendall(_frame(0x1, text[:4], fin=False) + _frame(0x9, b"still there?", fin=True)
                     + _frame(0x0, text[4:6], fin=False) + _frame(0x0, text[6:], fin=True))
        got += [_read_frame(sock), _read_frame(sock)]  # the pong and the echo, in the order they come
        sock.sendall(_frame(0x2, b"\x00\x01", fin=False) + _frame(0x0, b"\x02", fin=False)
                     + _frame(0x0, b"\x03\x04", fin=True))
        got.append(_read_frame(sock))
        sock.sendall(_frame(0x8, (1000).to_bytes(2, "big"), fin=True))
        got.append(_read_frame(sock))
        return got
    finally:
        sock.close()


def test_a_fragmented_message_arrives_as_the_same_one_message(upstream, tap):
    """Fragmentation does not change a message's meaning: a text message in three fragments (its
    UTF-8 split inside a character, a ping between fragments) and a binary one reach the server as
    one message each, and the client sees what it sees when talking to the server directly."""
    direct = _fragmented_session(int(upstream.url.rsplit(":", 1)[1]))
    tapped = _fragmented_session(tap.port)
    assert sorted(tapped[1:3]) == sorted(direct[1:3])
    assert tapped[0] == direct[0] and tapped[3:] == direct[3:]
    assert tapped[0] == (0x81, b"hello ")
    assert (0x81, "fragménted".encode()) in tapped[1:3]  # one whole text message, FIN set
    assert (0x8A, b"still there?") in tapped[1:3]  # the ping was answered, mid-message
    assert tapped[3] == (0x82, b"\x00\x01\x02\x03\x04")
    assert tapped[4][0] == 0x88 and tapped[4][1][:2] == (1000).to_bytes(2, "big")


def test_a_server_flooding_a_slow_client_is_held_back_not_buffered():
    """Backpressure the other way: while the client reads nothing, the server can get only a few
    socket buffers ahead through the tap; once the client reads, every message arrives in order."""
    import threading

    TOTAL, SIZE = 256, 1 << 20  # 256 MB offered
    sent = [0]
    done = threading.Event()

    async def flood(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 21)
        await ws.prepare(request)
        body = bytearray(SIZE)
        for i in range(TOTAL):
            body[:4] = i.to_bytes(4, "big")
            await ws.send_bytes(bytes(body))
            sent[0] = i + 1
        done.set()
        await ws.receive()
        return ws

    server = Upstream({"/ws": flood})
    tap = start_tap(server.url, Records())
    try:
        async def go() -> tuple[int, list[int]]:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{tap.port}/ws", max_msg_size=1 << 21) as ws:
                    held = await stalled(sent, done.is_set)  # until the server's sends stop advancing
                    got = []
                    while len(got) < TOTAL:
                        msg = await ws.receive(timeout=120)
                        assert msg.type is WSMsgType.BINARY, msg
                        got.append(int.from_bytes(msg.data[:4], "big"))
                    return held, got
        held, got = run(go())
        assert held < 64, f"the server got {held} MB ahead of a client that reads nothing"
        assert got == list(range(TOTAL))
    finally:
        tap.stop()
        server.stop()


def test_websocket_sessions_at_the_connection_limit_are_busy_never_evicted(upstream):
    """max_connections counts WebSocket sessions like uploads in progress: at the limit, silent
    connections do not evict an open session, a fifth session waits (in the listen backlog) until
    one ends, and then goes through."""
    tap = start_tap(upstream.url, Records(), max_connections=4)
    silent: list[socket.socket] = []
    try:
        async def go() -> tuple[list[str], bool, str]:
            async with aiohttp.ClientSession() as client:
                sessions = [await client.ws_connect(f"http://127.0.0.1:{tap.port}/ws/{i}") for i in range(4)]
                for ws in sessions:
                    await ws.receive(timeout=10)  # the upstream's hello
                for _ in range(6):
                    silent.append(socket.create_connection(("127.0.0.1", tap.port), timeout=10))
                fifth = asyncio.ensure_future(client.ws_connect(f"http://127.0.0.1:{tap.port}/ws/5"))
                await asyncio.sleep(1.5)
                waited = not fifth.done()
                echoes = []
                for i, ws in enumerate(sessions):  # every session still open and answering
                    await ws.send_str(f"still {i}")
                    echoes.append((await ws.receive(timeout=10)).data)
                await sessions[0].close()
                ws5 = await asyncio.wait_for(fifth, timeout=15)
                await ws5.receive(timeout=10)
                await ws5.send_str("fifth")
                answer = (await ws5.receive(timeout=10)).data
                for ws in sessions[1:] + [ws5]:
                    await ws.close()
                return echoes, waited, answer
        echoes, waited, answer = run(go())
        assert echoes == [f"still {i}" for i in range(4)]
        assert waited, "a fifth session was let in over max_connections=4"
        assert answer == "fifth"
        assert ended(tap, 5).get(("other", "1000", "client")) == 5
    finally:
        for s in silent:
            s.close()
        tap.stop()
