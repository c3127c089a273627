"""Issue 22, items 2 and 4: connection limits and head deadlines on the tap and the metrics port.

The tap had no connection limit and no deadline for a request head (1,100 idle sockets took the
exporter to its 1,024 descriptors: scrapes timed out), and no deadline for an upload's progress
(520 uploads at 1 byte/s did the same). The metrics port kept up to 100 headers of 8 KB per
request head (500 such heads: RSS from 54 to 829 MB). Real sockets on loopback throughout; the
exporter runs as a subprocess under `ulimit -n 1024` where descriptors or memory are the point.
"""
from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml
from aiohttp import web
from helpers import sample, samples, wait_for
from slowloris import (
    FD_LIMIT,
    ROOT,
    Slowloris,
    cpu_while_starved,
    exporter_under_fd_limit,
    raise_own_fd_limit,
    scrape_like_prometheus,
)
from tap_helpers import Records, Upstream, multipart, start_tap, wav_bytes

TRANSCRIPTIONS = "/v1/audio/transcriptions"
BOUNDARY = "b0undary"


async def _transcribe(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"text": "hello"})


@pytest.fixture
def upstream():
    server = Upstream({TRANSCRIPTIONS: _transcribe})
    yield server
    server.stop()


def _upload_head(length: int) -> bytes:
    return (f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()


def _body(seconds: float = 0.5) -> bytes:
    return multipart(BOUNDARY, {"model": "whisper-1"}, "file", "a.wav", wav_bytes(seconds))


def _closed(s: socket.socket, within: float) -> bool:
    """Whether the peer closed `s` (EOF or reset) within `within` seconds; what it sent is read and dropped."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


def _answer(s: socket.socket, timeout: float = 30.0) -> bytes:
    """What the server sent before closing (or `timeout`, a guard against a hang)."""
    s.settimeout(timeout)
    out = b""
    try:
        while piece := s.recv(65536):
            out += piece
    except OSError:
        pass
    return out


def _tap_metrics(tap) -> dict:
    return samples(list(tap.connections.collect()))


def test_at_the_tap_limit_idle_connections_make_room_and_busy_ones_make_the_next_wait(upstream):
    records = Records()
    tap = start_tap(upstream.url, records, max_connections=4)
    busy, idle = [], []
    try:
        body = _body()
        for _ in range(4):  # four uploads in progress: heads complete, bodies not
            s = socket.create_connection(("127.0.0.1", tap.port), timeout=10)
            s.sendall(_upload_head(len(body)) + body[:100])
            busy.append(s)
        assert wait_for(lambda: tap.stats.in_flight == 4, timeout=10)
        # A fifth, whole request: with every connection busy it waits in the listen backlog
        # (connected by the kernel, not accepted), neither refused nor taking a descriptor.
        fifth = socket.create_connection(("127.0.0.1", tap.port), timeout=10)
        fifth.sendall(_upload_head(len(body)) + body)
        assert not wait_for(lambda: tap.connections.open > 4 or tap.stats.in_flight > 4, timeout=1.0)
        busy[0].sendall(body[100:])  # one upload ends: the fifth is accepted and answered
        assert b" 200 OK" in busy[0].recv(65536)
        assert b" 200 OK" in fifth.recv(65536)
        fifth.close()
        for s in busy[1:]:
            s.sendall(body[100:])
            assert b" 200 OK" in s.recv(65536)
        for _ in range(10):  # silent connections beyond the limit: the longest idle make room
            idle.append(socket.create_connection(("127.0.0.1", tap.port), timeout=10))
        answer = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=body, timeout=10,
                               headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert answer.status_code == 200 and answer.json() == {"text": "hello"}
        metrics = _tap_metrics(tap)
        assert metrics[("whisper_tap_connections_limit", ())] == 4
        assert metrics[("whisper_tap_connections", ())] <= 4
        assert metrics[("whisper_tap_connections_closed_total", (("reason", "evicted"),))] >= 7
        assert len(records.wait(6)) == 6
    finally:
        for s in busy + idle:
            s.close()
        tap.stop()


def test_a_tap_request_head_that_never_finishes_is_closed_at_head_timeout(upstream):
    """A byte every 0.2 s keeps a connection busy sending, but the head has head_timeout in all."""
    records = Records()
    tap = start_tap(upstream.url, records, head_timeout=1)
    try:
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
            s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sent, closed = 0, False
            for _ in range(150):  # 30 s: a guard, far past the deadline
                try:
                    s.sendall(b"a")
                    sent += 1
                except OSError:
                    closed = True
                    break
                if _closed(s, 0.2):
                    closed = True
                    break
            assert closed, "the tap never closed a connection whose head never ends"
        assert tap.connections.closed["head_timeout"] == 1
        assert tap.stats.requests == 0 and records.items == []  # it never became a request
    finally:
        tap.stop()


def test_tap_refuses_a_request_head_over_max_head_bytes_before_it_reaches_the_server(upstream):
    """Issue 22, item 3: 100 unfinished heads of 120 x 8 KB headers took the tap to 251 MB; aiohttp's
    limits are per line and per header, so a head's total is the tap's to bound."""
    records = Records()
    tap = start_tap(upstream.url, records)  # max_head_bytes: 64 KiB by default
    try:
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
            head = _upload_head(10)[:-2] + b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 8000) for i in range(120))
            try:
                s.sendall(head)  # not a complete head: the refusal must not wait for its end
            except OSError:
                pass
            answer = _answer(s)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert tap.connections.closed["head_too_large"] == 1
        assert _tap_metrics(tap)[("whisper_tap_connections_closed_total", (("reason", "head_too_large"),))] == 1
        assert tap.stats.requests == 0 and records.items == []  # it never became a request
        # A head under the limit goes through: 21 KB of token and cookies (each line under aiohttp's 8 KB),
        # with a 2 MB upload sent in the same write (its body is not part of the head).
        body = _body(60)
        extra = b"Authorization: Bearer %s\r\nCookie: %s\r\nX-Trace: %s\r\n" % (b"t" * 7000, b"c" * 7000, b"x" * 7000)
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
            s.sendall(_upload_head(len(body))[:-2] + extra + b"\r\n" + body)
            assert _answer_head(s).startswith(b"HTTP/1.1 200 ")
    finally:
        tap.stop()


def _answer_head(s: socket.socket) -> bytes:
    s.settimeout(30)
    out = b""
    while b"\r\n\r\n" not in out and (piece := s.recv(65536)):
        out += piece
    return out


@pytest.mark.parametrize("limits, chunk, every", [
    ({"upload_min_rate": 1024, "upload_rate_grace": 1}, 1, 0.1),  # 10 bytes/s
    ({"upload_min_rate": 0, "upload_timeout": 1}, 4096, 0.05),  # 80 KB/s, but a 1 s deadline in all
])
def test_a_slow_upload_is_cut_by_the_upload_deadline_and_counted(upstream, limits, chunk, every):
    records = Records()
    tap = start_tap(upstream.url, records, **limits)
    try:
        body = _body(30)  # ~1 MB: far more than either client sends before its deadline
        with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
            s.sendall(_upload_head(len(body)))
            answer, sent = b"", 0
            for _ in range(600):  # 60 s at most: a guard
                try:
                    s.sendall(body[sent:sent + chunk])
                except OSError:
                    break
                sent += chunk
                s.settimeout(every)
                try:
                    piece = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                answer += piece
                if not piece or b"\r\n\r\n" in answer:
                    break
            assert sent < len(body)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        record = records.wait(1)[0]
        assert record.error == "upload_too_slow" and record.status == 408
        assert tap.stats.errors.get("upload_too_slow") == 1
        # An upload at full speed under the same limits goes through.
        answer = requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", data=_body(), timeout=10,
                               headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert answer.status_code == 200
    finally:
        tap.stop()


def test_upload_due():
    from whisper_exporter.tap.proxy import upload_due

    # The grace first; then an average of min_rate bytes/s since the start; never past the total.
    assert upload_due(100.0, 0, 1024, 30.0, None) == 130.0
    assert upload_due(100.0, 1024 * 60, 1024, 30.0, None) == 160.0
    assert upload_due(100.0, 1024 * 60, 1024, 30.0, 45.0) == 145.0
    assert upload_due(100.0, 10, 0, 30.0, None) == float("inf")


def test_bad_tap_connection_settings_exit_2_naming_the_key(tmp_path):
    from whisper_exporter.config import ConfigError, from_dict

    for bad, name in (({"max_connections": 0}, "max_connections"), ({"max_connections": "many"}, "max_connections"),
                      ({"head_timeout": 0}, "head_timeout"), ({"upload_min_rate": -1}, "upload_min_rate"),
                      ({"upload_rate_grace": "soon"}, "upload_rate_grace"), ({"upload_timeout": 0}, "upload_timeout"),
                      ({"max_head_bytes": 0}, "max_head_bytes")):
        with pytest.raises(ConfigError) as err:
            from_dict({"collectors": {"tap": bad}})
        assert err.value.key == f"collectors.tap.{name}"
    tap = from_dict({"collectors": {"tap": {"upload_timeout": None, "max_connections": 64}}}).collectors.tap
    assert tap.upload_timeout is None and tap.max_connections == 64
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"collectors": {"tap": {"enabled": True, "head_timeout": "never"}}}))
    done = subprocess.run([sys.executable, "-m", "whisper_exporter", "check-config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "collectors.tap.head_timeout" in done.stderr + done.stdout


def test_metrics_port_refuses_a_head_over_16_kib_and_counts_it():
    from whisper_exporter.web import connections

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    server = connections.serve("127.0.0.1", 0, app)
    port = server.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(
                b"X-Big-%d: %s\r\n" % (i, b"a" * 4000) for i in range(10))  # 40 KB, each line under 8 KB
            try:
                s.sendall(head)
            except OSError:
                pass
            answer = _answer(s)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert server.stats.closed["head_too_large"] == 1
        # A scrape's head (Prometheus sends well under 1 KiB; 12 KB here) is still answered.
        headers = {f"X-Ok-{i}": "b" * 1000 for i in range(12)}
        assert requests.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10).text == "ok\n"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_1100_idle_sockets_on_the_tap_leave_scrapes_and_uploads_working(tmp_path, upstream):
    raise_own_fd_limit(4096)
    with exporter_under_fd_limit(tmp_path, tap_upstream=upstream.url) as exporter:
        assert wait_for(lambda: _connects(exporter.tap_port), timeout=10)
        attack = Slowloris(exporter.tap_port, count=1100).start()
        peak = {"fds": 0}
        stop = threading.Event()

        def watch():
            while not stop.wait(0.3):
                peak["fds"] = max(peak["fds"], exporter.ps.num_fds())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        uploads: list[int] = []

        def upload():
            for _ in range(3):
                time.sleep(2)
                try:
                    uploads.append(requests.post(
                        f"http://127.0.0.1:{exporter.tap_port}{TRANSCRIPTIONS}", data=_body(), timeout=10,
                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}).status_code)
                except requests.RequestException as err:
                    uploads.append(type(err).__name__)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        try:
            scrapes = scrape_like_prometheus(exporter.url, seconds=10)
        finally:
            uploader.join(40)
            stop.set()
            watcher.join()
            attack.stop()
        print(f"\n{len(scrapes.latencies)} scrapes answered, failures {scrapes.failures}; uploads {uploads}; "
              f"attacker opened {attack.opened}; peak fds {peak['fds']}")
        assert scrapes.failures == [] and len(scrapes.latencies) >= 5
        assert uploads == [200, 200, 200]
        assert attack.opened >= 1100
        assert peak["fds"] < FD_LIMIT - 100, peak
        text = requests.get(exporter.url + "/metrics", timeout=10).text
        assert sample(text, "whisper_tap_connections_limit") == FD_LIMIT // 4
        closed = sum(sample(text, "whisper_tap_connections_closed_total", reason=r) or 0
                     for r in ("evicted", "head_timeout"))
        assert closed >= 1100 - FD_LIMIT // 4
        assert sample(text, "whisper_exporter_collector_errors_total", collector="process") == 0


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _send_head(port: int, size: int) -> None:
    """One request head of about `size` bytes: 100 headers (aiohttp's count limit here) under 8 KB each."""
    line = b"X-H-%03d: " + b"a" * (size // 100 - 12) + b"\r\n"
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(line % i for i in range(99))
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return
    try:
        s.sendall(head)  # never finished with the blank line: the connection is held
        time.sleep(3)
    except OSError:
        pass
    finally:
        s.close()


@pytest.mark.integration
def test_500_heads_of_785_kb_on_the_metrics_port_keep_rss_bounded(tmp_path):
    raise_own_fd_limit(4096)
    with exporter_under_fd_limit(tmp_path) as exporter:
        before = exporter.ps.memory_info().rss
        peak = [before]
        stop = threading.Event()

        def watch():
            while not stop.wait(0.1):
                peak[0] = max(peak[0], exporter.ps.memory_info().rss)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(500) as pool:  # all held at once
                list(pool.map(lambda _: _send_head(exporter.port, 785_000), range(500)))
            time.sleep(0.5)
        finally:
            stop.set()
            watcher.join()
        text = requests.get(exporter.url + "/metrics", timeout=10).text
        grown = (peak[0] - before) / 2**20
        print(f"\nRSS {before / 2**20:.0f} MB -> peak {peak[0] / 2**20:.0f} MB (+{grown:.0f} MB)")
        assert grown < 100, f"RSS grew {grown:.0f} MB"
        assert sample(text, "whisper_exporter_http_connections_closed_total", reason="head_too_large") >= 400


def test_a_heads_size_stops_at_its_blank_line_however_the_reads_split_it():
    """What follows the blank line is a body, not head, even when the blank line spans two reads."""
    from types import SimpleNamespace

    from whisper_exporter.web.connections import _head_part

    head, body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n", b"b" * 100000
    for cut in range(len(head) - 5, len(head) + 1):  # every split around the blank line
        conn = SimpleNamespace(head_done=False, head_tail=b"")
        counted = _head_part(conn, head[:cut])
        if not conn.head_done:
            counted += _head_part(conn, head[cut:] + body)
        assert conn.head_done and counted == len(head), cut


TAP_EMFILE = r"""
import os, resource, sys, time
sys.path.insert(0, "tests")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from aiohttp import web
from tap_helpers import Records, Upstream, start_tap

async def hello(request):
    return web.Response(text="hello")

upstream = Upstream({"/health": hello})
tap = start_tap(upstream.url, Records())
# Hold descriptors as busy collectors would, leaving 6 free: accept() meets EMFILE long before
# the tap's connection limit (64 // 4 = 16 here).
hold = [open(os.devnull) for _ in range(64 - len(os.listdir("/proc/self/fd")) - 6)]
print(tap.port, flush=True)
for line in sys.stdin:  # "free": let go of the held descriptors; "errors": print accept_errors
    if line.strip() == "free":
        for f in hold:
            f.close()
    print(tap.connections.accept_errors, flush=True)
"""


def test_the_tap_backs_off_when_descriptors_run_out(tmp_path):
    """The tap's listener on EMFILE (issue 22 item 2: 98,340 'accept() out of system resource'
    tracebacks in 25 s): 4 s of descriptor starvation cost a small fraction of a core, the
    failures are counted and logged once, and the tap serves again once descriptors are free."""
    stderr = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-c", TAP_EMFILE], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    attackers: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        cpu, attackers = cpu_while_starved(proc.pid, port)
        proc.stdin.write("errors\n")
        proc.stdin.flush()
        errors = int(proc.stdout.readline())
        for s in attackers:
            s.close()
        proc.stdin.write("free\n")
        proc.stdin.flush()
        proc.stdout.readline()
        answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert answer.status_code == 200 and answer.text == "hello"
        assert errors >= 1  # accept() did run out of descriptors
        assert cpu < 1.0, f"{cpu:.2f} CPU-seconds in 4 s: accept() is spinning"
    finally:
        for s in attackers:
            s.close()
        proc.kill()
        proc.wait()
    stderr.seek(0)
    logged = [line for line in stderr.read().splitlines() if "Too many open files" in line]
    assert len(logged) == 1, logged  # one line per 10 s, however many attempts
    assert "tap: accept()" in logged[0] and "Traceback" not in (tmp_path / "stderr").read_text()
