"""Hostile servers, files and configurations (issue 12): each case here took the exporter down,
wedged a collector, exhausted its memory or leaked a secret before its fix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LoopbackHTTP

from whisper_exporter import config
from whisper_exporter.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# -- configuration files (item 10) ---------------------------------------------------------------

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, in 344 bytes.
ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
listen: [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_exporter", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match="more than 100000 values once aliases are expanded"):
        config.read_yaml(str(path))


def test_an_alias_bomb_in_check_config_exits_2_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    done = check_config(path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.replace(str(path), "FILE")) < 300 and "lol" not in done.stderr  # the path's length aside


def test_an_alias_bomb_as_web_config_is_refused(tmp_path):
    from whisper_exporter.web.webconfig import load_web_config

    path = tmp_path / "web.yml"
    path.write_text(ALIAS_BOMB.replace("listen:", "basic_auth_users:"))
    with pytest.raises(ConfigError, match="once aliases are expanded"):
        load_web_config(str(path))


def test_aliases_within_bounds_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("service:\n  headers: &h {X-Team: asr}\ncollectors:\n  probe:\n    enabled: false\n"
                    "  logs: &off {enabled: false}\n  gpu: *off\n")
    loaded = config.load(str(path))
    assert loaded.service.headers == {"X-Team": "asr"} and not loaded.collectors.gpu.enabled


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("listen: &a [*a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        config.read_yaml(str(path))


def test_deep_nesting_exits_2_not_a_traceback(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("listen: " + "[" * 5000 + "]" * 5000 + "\n")
    done = check_config(path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "nesting deeper than 100" in done.stderr


def test_error_messages_render_a_bounded_value():
    huge = [[["x" * 1000] * 1000] * 1000] * 1000  # shared, like an expanded alias: 10**12 characters
    err = ConfigError("c.yaml", "listen", "a string", huge)
    assert len(str(err)) < 200


@pytest.mark.parametrize("path", ["/dev/zero", "fifo"])
def test_a_device_or_fifo_as_config_is_refused(tmp_path, path):
    if path == "fifo":
        path = str(tmp_path / "fifo.yaml")
        os.mkfifo(path)  # no writer: a blocking open would hang here
    with pytest.raises(ConfigError, match="a regular file"):
        config.read_yaml(path)


def test_an_oversized_config_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="at most 1048576 bytes"):
        config.read_yaml(str(path))


@pytest.mark.parametrize("url", ["ftp://asr:hunter2@whisper:8000", "asr:hunter2@whisper:8000",
                                 "https//asr:hunter2@whisper"])
def test_a_malformed_url_error_does_not_repeat_its_password(url):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"service": {"url": url}})
    assert "hunter2" not in str(err.value) and "service.url" in str(err.value)


def test_header_values_are_not_repeated_in_errors():
    with pytest.raises(ConfigError) as err:
        config.from_dict({"service": {"headers": {"X-Auth-Token": ["tok-hunter2"]}}})
    assert "hunter2" not in str(err.value)
    assert "service.headers.X-Auth-Token: expected a string" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config.from_dict({"service": {"headers": "X-Auth-Token: tok-hunter2"}})
    assert "hunter2" not in str(err.value) and "service.headers: expected a mapping" in str(err.value)


# -- masking (item 2) -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Authorization", "Proxy-Authorization", "X-Auth-Token", "X-Goog-Api-Key",
                                  "X-Api-Key", "Api-Key", "Cookie", "X-Session-Id", "X-Client-Secret",
                                  "X-Amz-Signature", "X-Password", "Token"])
def test_credential_like_headers_are_masked_everywhere(name):
    c = config.from_dict({"service": {"headers": {name: "hunter2-value", "X-Team": "asr"}}})
    assert config.masked(c)["service"]["headers"] == {name: "<masked>", "X-Team": "asr"}
    from whisper_exporter.whisper.clients import OpenAIClient

    client = OpenAIClient("http://whisper.test", headers={name: "hunter2-value"})
    assert client.redact("echo hunter2-value") == "echo <masked>"


@pytest.mark.parametrize("url, shown", [
    ("http://TOKEN123@whisper:8000/x", "http://<masked>@whisper:8000/x"),
    ("http://u:p@ss@whisper:8000", "http://u:<masked>@whisper:8000"),
    ("https://asr:hunter2@whisper.internal:8443/base", "https://asr:<masked>@whisper.internal:8443/base"),
    ("http://:pw@whisper", "http://<masked>@whisper"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
])
def test_masked_url(url, shown):
    assert config.masked_url(url) == shown


# -- a Whisper server that drips its answer (item 3) ------------------------------------------------

class DripServer:
    """A loopback HTTP server that reads the request, then sends its answer a few bytes at a time:
    `headers` drips the header lines, `body` sends headers at once and drips the body. `cut_off`
    tells whether the client hung up before the drip was done."""

    def __init__(self, mode: str, drips: int = 80, every: float = 0.25):
        import socket
        import threading

        self.mode, self.drips, self.every = mode, drips, every
        self.cut_off = False
        self.finished = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import time

        conn, _ = self.sock.accept()
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")][0])
            while len(body) < length:
                body += conn.recv(65536)
            answer = b'{"text": "' + b"x" * self.drips + b'"}'
            if self.mode == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for i in range(self.drips):
                    conn.sendall(b"X-Drip-%d: 1\r\n" % i)
                    time.sleep(self.every)
                conn.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(answer))
                for i in range(len(answer)):
                    conn.sendall(answer[i:i + 1])
                    time.sleep(self.every * self.drips / len(answer))
        except OSError:  # the client gave up: what the fix is about
            self.cut_off = True
        finally:
            conn.close()
            self.sock.close()
            self.finished.set()


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_the_timeout_is_a_total_deadline_against_a_dripping_server(mode):
    from whisper_exporter.whisper.clients import OpenAIClient

    server = DripServer(mode)  # drips for 20 s; the client's timeout is 1.5 s
    result = OpenAIClient(server.url, timeout=1.5).transcribe(b"RIFF" + b"\0" * 100_000)
    assert result.outcome == "timeout", result
    assert server.finished.wait(30)
    assert server.cut_off, "the client waited for the whole drip"


# -- malicious answers under the 8 MiB cap (item 4) ---------------------------------------------------

class AnswerServer(LoopbackHTTP):
    """A loopback Whisper server that answers every request with one fixed body."""

    def __init__(self, body: bytes, content_type: str = "application/json"):
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


@pytest.fixture
def answering():
    servers = []

    def start(body: bytes, content_type: str = "application/json") -> AnswerServer:
        servers.append(AnswerServer(body, content_type))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


EMPTY_SEGMENTS = b'{"text": "hi", "segments": [' + b",".join([b"{}"] * 2_790_000) + b"]}"  # 8.37 MB
DEEP = b'{"text": "hi", "segments": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
HUGE_TEXT = b'{"text": "' + b"hello " * 1_300_000 + b'"}'  # 7.8 MB


def test_millions_of_empty_segments_are_a_bad_response(answering):
    from whisper_exporter.whisper.clients import OpenAIClient

    assert len(EMPTY_SEGMENTS) <= 8 * 1024 * 1024  # under the body cap
    server = answering(EMPTY_SEGMENTS)
    result = OpenAIClient(server.url, timeout=30).transcribe(b"RIFF")
    assert result.outcome == "bad_response" and "JSON objects and arrays" in result.reason


def test_json_nested_200k_deep_is_a_bad_response_not_a_crash(answering):
    from whisper_exporter.whisper import clients

    server = answering(DEEP)
    result = clients.OpenAIClient(server.url, timeout=30).transcribe(b"RIFF")
    assert result.outcome == "bad_response"
    # Under the container bound, Python's recursion limit is what stops it: still a bad response.
    nested = b'{"text": "hi", "segments": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(clients._BadResponse, match="nested too deep"):
        clients.OpenAIClient(server.url)._parse(nested, "application/json")


def test_a_huge_transcript_is_clipped_before_scoring(answering):
    from whisper_exporter.whisper.clients import MAX_TEXT_CHARS, OpenAIClient

    server = answering(HUGE_TEXT)
    result = OpenAIClient(server.url, timeout=30).transcribe(b"RIFF")
    assert result.outcome == "success" and len(result.transcription.text) == MAX_TEXT_CHARS


def test_a_lone_surrogate_is_made_safe_to_render(answering):
    from whisper_exporter.whisper.clients import OpenAIClient

    server = answering(b'{"text": "bad \\ud800 text", "segments": [{"text": "\\udfff"}]}')
    result = OpenAIClient(server.url, timeout=30).transcribe(b"RIFF")
    assert result.outcome == "success"
    result.transcription.text.encode("utf-8")  # raised UnicodeEncodeError: the status page's 500
    result.transcription.segments[0].text.encode("utf-8")
    assert result.transcription.text == "bad ? text"


def test_probe_of_a_deeply_nested_answer_counts_bad_response(answering):
    from whisper_exporter.collectors.probe import ProbeCollector, ProbeConfig

    server = answering(DEEP)
    collector = ProbeCollector(ProbeConfig(timeout=30), config.Config(), url=server.url)
    collector.update()  # raised RecursionError, taking the collector down
    assert collector._runs["en-short"]["bad_response"] == 1


def test_user_info_and_an_api_key_are_refused_not_silently_replaced(monkeypatch):
    from whisper_exporter.whisper.clients import ClientSetupError, make_client

    monkeypatch.setenv("HOSTILE_KEY", "sk-hunter2")
    service = config.ServiceConfig(url="http://asr:pw@whisper.test:8000", api_key_env="HOSTILE_KEY")
    with pytest.raises(ClientSetupError, match="both would be sent as the Authorization header") as err:
        make_client(service)
    assert "pw" not in str(err.value).replace("password", "") and "sk-hunter2" not in str(err.value)
    with pytest.raises(ClientSetupError):
        make_client(config.ServiceConfig(url="http://tok@whisper.test", headers={"Authorization": "Bearer x"}))
    assert make_client(config.ServiceConfig(url="http://asr:pw@whisper.test:8000")).url == \
        "http://asr:<masked>@whisper.test:8000"


def test_production_transcripts_stay_off_a_page_without_auth():
    from types import SimpleNamespace

    from whisper_exporter.runtime.scheduler import Scheduler
    from whisper_exporter.runtime.shared import Shared
    from whisper_exporter.web import status as landing

    said = SimpleNamespace(id="p1", language="en", unit="word", error_rate=0.5, score=object(), result="scored",
                           outcome="success", reference="my card number is 4111", transcript="my card number is 4111",
                           started=0.0, reason="")
    canary = SimpleNamespace(**{**vars(said), "id": "r1", "reference": "the quick fox", "transcript": "the quick fax"})
    view = SimpleNamespace(worst_items=lambda: {"production": [said], "reference": [canary]})
    shared = Shared.build(config.Config())
    shared.quality_view = view
    scheduler = Scheduler([], shared=shared)
    page = landing.render(config.Config(), scheduler)
    assert "4111" not in page and "p1" in page and "quick fax" in page
    shared.page_authenticated = True
    assert "4111" in landing.render(config.Config(), scheduler)


# -- log files: FIFOs and links (items 5 and 6) ------------------------------------------------------

def _follower(path, **options):
    from whisper_exporter.logfiles.follow import Follower

    lines: list[bytes] = []
    return Follower(str(path), on_lines=lines.extend, **options), lines


def test_a_fifo_next_to_the_log_does_not_wedge_copytruncate_recovery(tmp_path):
    import threading

    log = tmp_path / "app.log"
    log.write_text("")
    f, lines = _follower(log)
    f.poll()
    log.write_text("one\ntwo\n")
    f.poll()
    fifo = tmp_path / "app.log.pipe"
    os.mkfifo(fifo)
    log.write_text("")  # truncated: the recovery looks for copytruncate's copy next to it
    done = threading.Event()
    threading.Thread(target=lambda: (f.poll(), done.set()), daemon=True).start()
    wedged = not done.wait(10)
    if wedged:  # let the blocked open() go, so the test ends
        os.close(os.open(fifo, os.O_WRONLY))
    assert not wedged, "the follower blocked opening a FIFO"
    assert lines == [b"one", b"two"]


def _secret_and_link(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    secret = tmp_path / "shadow"
    secret.write_text("API_KEY=sk-hunter2-secret\n")
    (logs / "app.log").write_text("")
    (logs / "evil.log").symlink_to(secret)
    return logs


def test_a_symlink_is_refused_when_links_are_not_followed(tmp_path):
    logs = _secret_and_link(tmp_path)
    f, lines = _follower(logs / "*.log", start_at_end=False, follow_symlinks=False)
    f.poll()
    assert lines == [] and f.read_errors == {"symlink_refused": 1} and f.open_files == 1


def test_files_outside_the_allowed_dirs_are_refused(tmp_path):
    logs = _secret_and_link(tmp_path)
    f, lines = _follower(logs / "*.log", start_at_end=False, allowed_dirs=[str(logs)])
    f.poll()
    assert lines == [] and f.read_errors == {"outside_allowed_dirs": 1}
    # a link that stays inside is fine
    (logs / "evil.log").unlink()
    (logs / "alias.log").symlink_to(logs / "app.log")
    (logs / "app.log").write_text("inside\n")
    f.poll()
    assert lines == [b"inside"]


def test_a_bad_line_of_a_file_that_is_not_a_log_is_never_quoted(tmp_path, caplog):
    import logging

    from whisper_exporter.collectors.logs import LogsCollector

    logs = _secret_and_link(tmp_path)
    section = config.from_dict({"collectors": {"logs": {"enabled": True, "start_at": "beginning", "files": [
        {"path": str(logs / "*.log"), "format": "json"}]}}}).collectors.logs
    with caplog.at_level(logging.WARNING):
        LogsCollector(section).update()
    assert "invalid_json" in caplog.text and "sk-hunter2" not in caplog.text


def test_logs_allowed_dirs_are_checked(tmp_path):
    def load(**logs):
        return config.from_dict({"collectors": {"logs": {"enabled": True, **logs}}})

    with pytest.raises(ConfigError, match="allowed_dirs\\[0\\]: expected an absolute directory path"):
        load(allowed_dirs=["logs"], files=[{"path": "/var/log/app.log"}])
    with pytest.raises(ConfigError, match="files\\[0\\].path: expected a path inside one of allowed_dirs"):
        load(allowed_dirs=[str(tmp_path / "logs")], files=[{"path": str(tmp_path / "other" / "*.log")}])
    assert load(allowed_dirs=[str(tmp_path)], files=[{"path": str(tmp_path / "*.log")}]).collectors.logs.allowed_dirs


# -- the review queue (item 9) -------------------------------------------------------------------------

def _queue_item(n: int, text: str = "a transcript"):
    from whisper_exporter.quality.sampling import QueueItem

    return QueueItem(id=f"id-{n}", audio=f"/srv/{n}.wav", transcript=text, language="en", duration=3.0,
                     duration_band="0-5s", sampled_at=0.0)


def test_a_full_disk_leaves_no_partial_record_in_the_review_queue(tmp_path):
    import resource
    import signal

    from whisper_exporter.quality.sampling import ReviewQueue

    path = tmp_path / "queue.jsonl"
    queue = ReviewQueue(str(path), max_items=100)
    assert queue.add(_queue_item(1))
    size = path.stat().st_size
    # The file-size limit stands in for a full disk: a write across it is cut short, then fails.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, old_limit[1]))
    try:
        assert not queue.add(_queue_item(2, "x" * 500))  # the disk fills up in the middle of it
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert queue.add(_queue_item(3))
    lines = path.read_text().splitlines()
    import json

    assert [json.loads(line)["id"] for line in lines] == ["id-1", "id-3"]
    assert queue.stats() == (2, 2, {"full": 0, "duplicate": 0, "write_error": 1})


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path):
    from whisper_exporter.quality.sampling import ReviewQueue

    path = tmp_path / "queue.jsonl"
    path.write_text('{"id": "torn", "aud')  # a crash in the middle of a write
    queue = ReviewQueue(str(path), max_items=100)
    assert queue.add(_queue_item(1))
    assert [i.id for i in queue.items()] == ["id-1"]


def test_the_review_queue_stays_0600_when_rewritten(tmp_path):
    import stat as stat_mod

    from whisper_exporter.quality.sampling import ReviewQueue

    path = tmp_path / "queue.jsonl"
    queue = ReviewQueue(str(path), max_items=100)
    queue.add(_queue_item(1))
    queue.add(_queue_item(2))
    # It holds what users said: 0600 from its creation on (issue 21.3; reviewers use the review
    # pages, or read it as the exporter's user), and a rewrite keeps it so.
    assert stat_mod.S_IMODE(path.stat().st_mode) == 0o600
    assert queue.remove(["id-1"]) == 1
    assert stat_mod.S_IMODE(path.stat().st_mode) == 0o600
    assert [i.id for i in queue.items()] == ["id-2"]


# -- audio and manifest files (item 11) ---------------------------------------------------------------

def test_dev_zero_as_audio_is_refused_not_read():
    from whisper_exporter.whisper import audio

    with pytest.raises(audio.AudioError, match="not a regular file"):
        audio.read_audio("/dev/zero")  # read until MemoryError at 2.4 GB
    with pytest.raises(audio.AudioError, match="not a regular file"):
        audio.duration_seconds("/dev/zero")


def test_a_fifo_as_audio_does_not_hang_evaluate(tmp_path):
    import threading

    from whisper_exporter.quality.evaluate import evaluate_item
    from whisper_exporter.quality.manifest import Item
    from whisper_exporter.whisper.clients import OpenAIClient

    fifo = tmp_path / "a.wav"
    os.mkfifo(fifo)
    item = Item(id="f", line=1, audio=str(fifo), reference="hello", language="en", duration=1.0)
    results = []
    thread = threading.Thread(target=lambda: results.append(
        evaluate_item(OpenAIClient("http://127.0.0.1:9"), item)), daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # let the blocked open() go, so the test ends
        os.close(os.open(fifo, os.O_WRONLY))
    assert results and results[0].outcome == "audio_error" and "not a regular file" in results[0].reason


def test_a_3_gb_sparse_wav_is_not_read_whole(tmp_path):
    from helpers import wav

    from whisper_exporter.whisper import audio

    path = tmp_path / "big.wav"
    wav(path, seconds=1.0)
    with open(path, "r+b") as f:
        f.truncate(3 * 1024 ** 3)  # sparse: no disk used
    with pytest.raises(audio.AudioError, match="larger than 256 MiB"):
        audio.read_audio(path)


def test_a_deeply_nested_manifest_line_is_skipped(tmp_path):
    from helpers import wav

    from whisper_exporter.quality import manifest

    wav(tmp_path / "a.wav", seconds=1.0)
    good = '{"id": "a", "audio": "a.wav", "reference": "hello there", "language": "en"}'
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    loaded = manifest.load(path)
    assert [i.id for i in loaded.items] == ["a"]
    assert [str(p) for p in loaded.problems] == ["line 2: JSON nested too deep"]


def test_manifest_errors_do_not_quote_a_file_that_is_no_manifest(tmp_path):
    from whisper_exporter.quality import manifest

    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$saltsalt$hashhashhash:19000:0:99999:7:::\n")
    with pytest.raises(manifest.ManifestError) as err:
        manifest.load(shadow)
    assert "hashhash" not in str(err.value) and "unknown column" in str(err.value)
    with pytest.raises(manifest.ManifestError, match="not a regular file"):
        manifest.load("/dev/zero")
    csv = tmp_path / "m.csv"
    csv.write_text("audio,reference,language,speaker\n")
    with pytest.raises(manifest.ManifestError, match="unknown column 'speaker'"):  # a real header still says
        manifest.load(csv)


def test_probe_debug_output_masks_credential_headers(answering, monkeypatch):
    from whisper_exporter.collectors.probe import ProbeCollector, ProbeConfig, debug_text

    monkeypatch.setenv("HOSTILE_KEY", "sk-hunter2-key")
    server = answering(b'{"text": "hi"}')
    service = {"url": server.url, "api_key_env": "HOSTILE_KEY",
               "headers": {"X-Goog-Api-Key": "goog-hunter2", "Proxy-Authorization": "Basic aHVudGVyMg==",
                           "X-Team": "asr"}}
    c = config.from_dict({"service": service})
    collector = ProbeCollector(ProbeConfig(timeout=30), c)
    collector.update()
    text = debug_text(collector._latest["en-short"])
    assert "X-Goog-Api-Key: <masked>" in text and "X-Team: asr" in text and "Authorization: <masked>" in text
    assert "hunter2" not in text and "aHVudGVyMg" not in text


def test_masked_url_never_shows_a_password_fuzz():
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st

    # Secrets long enough not to occur by chance in the rest of the URL.
    secret = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789@:%!$&'()*+,;=-._~", min_size=8, max_size=30)

    @settings(max_examples=300, deadline=None)
    @given(user=st.text(alphabet="abcdefghij", max_size=8), password=secret,
           host=st.sampled_from(["whisper", "10.0.0.1", "[::1]", "whisper:8000"]),
           path=st.sampled_from(["", "/v1", "/a@b", "?q=1"]))
    def check(user, password, host, path):
        assume(password not in user + host + path)
        url = f"http://{user}:{password}@{host}{path}"
        shown = config.masked_url(url)
        assert password not in shown and shown.endswith(f"@{host}{path}"), (url, shown)

    check()
