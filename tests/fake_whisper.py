"""One fake Whisper server for the tests and benchmarks: an OpenAI-style
/v1/audio/transcriptions on loopback that misbehaves on purpose, as the test sets it.

It reads the whole request, records it, waits `delay` seconds, then answers by `mode`:

- ok: 200, verbose JSON of `text` (by default the bundled canary's reference, so the probe's
  default canary scores 0) with two segments (the probe reads their worst values);
  with `answers` set, the answer is per uploaded file name instead: a string is that file's
  transcript ({"text": ...}), an int an HTTP status with a JSON error body, a dict the whole
  JSON answer, except that a request naming a language gets that language back (as real
  servers answer; a dict's own `language` is what the fake "detects" for a request without one or
  with "auto");
- 500: 500 with a plain-text body;
- html: 200 with an HTML page (a proxy's or a default site's);
- malformed: 200, Content-Type JSON, a body that is not JSON;
- hang: no answer at all (30 s);
- stall: headers and the start of the body, then nothing more (30 s);
- drip: the whole answer, one byte every `drip_interval` seconds: each read is quick, the
  answer as a whole is slow.

The real server, for tests that need real transcripts, is tests/whisper_server.py.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Optional, Union

from whisper_exporter.collectors.probe import bundled_canary

MODES = ("ok", "500", "html", "malformed", "hang", "stall", "drip")


class Request(NamedTuple):
    """One request as received: `path, headers, body = request` unpacks it."""

    path: str
    headers: dict
    body: bytes

    @property
    def filename(self) -> Optional[str]:
        """The uploaded file's name, from the multipart body."""
        m = re.search(rb'filename="([^"]+)"', self.body)
        return m.group(1).decode() if m else None

    @property
    def language(self) -> Optional[str]:
        """The `language` form field, when sent."""
        m = re.search(rb'name="language"\r\n\r\n([^\r]+)', self.body)
        return m.group(1).decode() if m else None


def verbose_answer(text: str) -> dict:
    """What faster-whisper-server answers with response_format verbose_json (the fields the probe reads)."""
    return {"task": "transcribe", "language": "en", "duration": 4.0, "text": text,
            "segments": [{"text": text, "temperature": 0.2, "avg_logprob": -0.5,
                          "compression_ratio": 1.2, "no_speech_prob": 0.05},
                         {"text": "", "temperature": 0.0, "avg_logprob": -0.1,
                          "compression_ratio": 3.1, "no_speech_prob": 0.3}]}


class FakeWhisper:
    """The server; its attributes (mode, delay, text, answers) may be changed while it runs."""

    def __init__(self, mode: str = "ok", text: Optional[str] = None, delay: float = 0.0,
                 answers: Optional[dict[str, Union[str, int, dict]]] = None, drip_interval: float = 0.05):
        self.mode = mode
        self.text = bundled_canary().reference if text is None else text
        self.delay = delay
        self.answers = answers
        self.drip_interval = drip_interval
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop as a killed server does: no more connections, and the kept-alive ones closed too."""
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeWhisper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handler(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Request(self.path, dict(self.headers), body)
                fake.requests.append(request)
                if fake.delay:
                    time.sleep(fake.delay)
                mode = fake.mode
                if mode == "hang":
                    time.sleep(30)
                elif mode == "500":
                    self._send(500, b"Internal Server Error", "text/plain")
                elif mode == "html":
                    self._send(200, b"<!DOCTYPE html><html><body>It works!</body></html>", "text/html")
                elif mode == "malformed":
                    self._send(200, b'{"text": "cut off', "application/json")
                elif mode == "stall":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"text": "')
                    self.wfile.flush()
                    time.sleep(30)
                elif fake.answers is not None:
                    answer = fake.answers.get(request.filename or "", "")
                    if isinstance(answer, int):
                        self._send(answer, json.dumps({"detail": "boom"}).encode(), "application/json")
                    elif isinstance(answer, dict):
                        told = {"language": request.language} if request.language not in (None, "auto") else {}
                        self._send(200, json.dumps({**answer, **told}).encode(), "application/json")
                    else:
                        self._send(200, json.dumps({"text": answer}).encode(), "application/json")
                else:
                    data = json.dumps(verbose_answer(fake.text)).encode()
                    self._send(200, data, "application/json", drip=mode == "drip")

            def _send(self, status: int, body: bytes, content_type: str, drip: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not drip:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(fake.drip_interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the test wants

        return Handler
