"""A Wyoming client: the canary spoken to a Wyoming speech-to-text server as Home Assistant does.

The Wyoming protocol (rhasspy/wyoming, wyoming/event.py) is a stream of events
over TCP, each one JSON header line, then `data_length` bytes of JSON merged
into its `data`, then `payload_length` bytes of binary payload:

    {"type": "audio-chunk", "data_length": 53, "payload_length": 2048}\\n{"rate": 16000, ...}<2048 bytes>

A transcription is `transcribe` {language}, `audio-start` {rate, width,
channels}, `audio-chunk`s with raw PCM, `audio-stop`; the server answers
`transcript` {text} (streaming servers send `transcript-start`,
`transcript-chunk`s and `transcript-stop` first). `describe` is answered with
`info`, listing the server's programs: wyoming-faster-whisper's Docker
HEALTHCHECK (health_check.py) asks for it and needs an ASR program back, since
an open port alone does not show that the event loop still answers.

The framing is written here, not taken from the `wyoming` package: that one is
asyncio (the probe runs in a thread), and it reads whatever `data_length` and
`payload_length` a server claims; this reader bounds every line, data and
payload, and the whole exchange by one total deadline.

`transcribe()` returns a clients.TranscribeResult like the HTTP clients (no
status code: there is none), with `stream` timings (whisper/streaming_clients.py).
"""
from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from whisper_exporter.whisper import clients, transport
from whisper_exporter.whisper.streaming_clients import StreamTimes, read_pcm, send_time

PROTOCOL_VERSION = "1.10.2"  # the wyoming package version whose events this follows
DEFAULT_PORT = 10300  # wyoming-faster-whisper's, and Home Assistant's default
SAMPLES_PER_CHUNK = 1024  # what Home Assistant's Wyoming client and wyoming's mic programs send
MAX_LINE_BYTES = 64 * 1024  # one header line; a real one is under 200 bytes
MAX_DATA_BYTES = 1024 * 1024  # an `info` of a server with many models is tens of KB
MAX_PAYLOAD_BYTES = 1024 * 1024  # nothing a speech-to-text server sends has a payload this big
MAX_RECEIVED_BYTES = clients.MAX_BODY_BYTES  # all of one exchange


class ProtocolError(Exception):
    """The server sent something that is not a Wyoming event, or one over the bounds."""


@dataclass
class Event:
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: Optional[bytes] = None


def encode(event_type: str, data: Optional[dict[str, Any]] = None, payload: Optional[bytes] = None) -> bytes:
    """One event on the wire, as wyoming's write_event lays it out."""
    header: dict[str, Any] = {"type": event_type, "version": PROTOCOL_VERSION}
    body = b""
    if data:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        header["data_length"] = len(body)
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n" + body + (payload or b"")


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{key} is not a length: {str(value)[:40]!r}")
    if value > limit:
        raise ProtocolError(f"{key} {value} is over the limit of {limit} bytes")
    return value


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"the event's {what} is not JSON: {clients._excerpt(raw)[:80]!r}") from None
    except RecursionError:
        raise ProtocolError(f"the event's {what} is nested too deep") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"the event's {what} is not a JSON object")
    return value


class Decoder:
    """Events from bytes as they arrive, each part bounded before it is buffered whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: Optional[dict[str, Any]] = None
        self._need = 0  # data + payload bytes the current header announced

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while True:
            if self._header is None:
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) > MAX_LINE_BYTES:
                        raise ProtocolError(f"a header line longer than {MAX_LINE_BYTES} bytes")
                    return events
                if end > MAX_LINE_BYTES:
                    raise ProtocolError(f"a header line longer than {MAX_LINE_BYTES} bytes")
                header = _json(bytes(self._buffer[:end]), "header")
                del self._buffer[:end + 1]
                if not isinstance(header.get("type"), str):
                    raise ProtocolError('an event header without a "type" string')
                self._need = (_length(header, "data_length", MAX_DATA_BYTES)
                              + _length(header, "payload_length", MAX_PAYLOAD_BYTES))
                self._header = header
            if len(self._buffer) < self._need:
                return events
            header, self._header = self._header, None
            data_length = _length(header, "data_length", MAX_DATA_BYTES)
            inline = header.get("data")
            data: dict[str, Any] = inline if isinstance(inline, dict) else {}
            if data_length:
                data = {**data, **_json(bytes(self._buffer[:data_length]), "data")}
            payload = bytes(self._buffer[data_length:self._need]) or None
            del self._buffer[:self._need]
            events.append(Event(header["type"], data, payload))


class _Deadline(Exception):
    pass


class _Closed(Exception):
    pass


class Connection:
    """One TCP connection to a Wyoming server, every operation bounded by one deadline."""

    def __init__(self, host: str, port: int, deadline: float):
        self.deadline = deadline
        self.received = 0
        self._decoder = Decoder()
        self._sock = socket.create_connection((host, port), timeout=max(0.001, deadline - time.perf_counter()))
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)

    def close(self) -> None:
        self._selector.close()
        self._sock.close()

    def send(self, data: bytes) -> None:
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise _Deadline()
        self._sock.settimeout(remaining)  # a server that stops reading blocks sendall: bounded too
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise _Deadline() from None

    def events_until(self, until: float) -> list[Event]:
        """Events that arrive before `until` (perf_counter): returns at the first batch, or at `until`.
        Raises _Deadline past the total deadline and _Closed when the server closed."""
        while True:
            now = time.perf_counter()
            if now >= self.deadline:
                raise _Deadline()
            wait = min(until, self.deadline) - now
            if wait <= 0:
                return []
            if not self._selector.select(wait):
                continue
            chunk = self._sock.recv(64 * 1024)
            if not chunk:
                raise _Closed()
            self.received += len(chunk)
            if self.received > MAX_RECEIVED_BYTES:
                raise ProtocolError(f"the server sent more than {MAX_RECEIVED_BYTES} bytes")
            events = self._decoder.feed(chunk)
            if events:
                return events


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of a tcp://host:port URL; ValueError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError("a tcp://host:port URL")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("a tcp://host:port URL with a port number") from None
    return parts.hostname, port


@dataclass
class Health:
    """The answer to `describe`: up when an `info` listing an ASR program came back."""

    up: bool
    elapsed: float
    reason: str = ""
    program: str = ""  # the first ASR program's name
    version: str = ""  # and its version
    models: tuple[str, ...] = ()
    streaming: Optional[bool] = None  # the program's supports_transcript_streaming


def _health(info: dict[str, Any], elapsed: float) -> Health:
    asr = [p for p in info.get("asr") or [] if isinstance(p, dict)]
    if not asr:
        return Health(False, elapsed, "the server's info lists no speech-to-text (asr) program")
    program = asr[0]
    models = tuple(str(m.get("name", ""))[:200] for m in program.get("models") or [] if isinstance(m, dict))
    streaming = program.get("supports_transcript_streaming")
    return Health(True, elapsed, "", transport.safe_text(str(program.get("name", ""))[:100]),
                  transport.safe_text(str(program.get("version", ""))[:40]), models[:20],
                  streaming if isinstance(streaming, bool) else None)


class WyomingClient(clients.WhisperClient):
    """Speaks the canary to a Wyoming server (service.url tcp://host:port), paced in real time."""

    api = "wyoming"

    def __init__(self, url: str, model: str = "whisper-1", timeout: float = 30.0,
                 headers: Optional[dict[str, str]] = None, api_key: Optional[clients.Secret] = None,
                 response_format: str = "verbose_json", pace: float = 1.0):
        super().__init__(url, model=model, timeout=timeout, headers=None, api_key=None,
                         response_format=response_format)  # no HTTP: headers and API keys have no place
        self.host, self.port = parse_url(url)
        self.pace = float(pace)

    def endpoint_url(self) -> str:
        return self.url

    def _connect(self, deadline: float) -> Connection:
        return Connection(self.host, self.port, deadline)

    def describe(self) -> Health:
        """Ask for the server's info, as wyoming-faster-whisper's HEALTHCHECK does."""
        started = time.perf_counter()
        conn: Optional[Connection] = None
        try:
            conn = self._connect(started + self.timeout)
            conn.send(encode("describe"))
            while True:
                for event in conn.events_until(conn.deadline):
                    if event.type == "info":
                        return _health(event.data, time.perf_counter() - started)
        except (_Deadline, socket.timeout):
            return Health(False, time.perf_counter() - started, f"no info within {self.timeout:g}s")
        except _Closed:
            return Health(False, time.perf_counter() - started, "the connection closed without info")
        except ProtocolError as err:
            return Health(False, time.perf_counter() - started, f"not a Wyoming answer: {err}")
        except OSError as err:
            return Health(False, time.perf_counter() - started, f"cannot connect: {transport.connection_reason(err)}")
        finally:
            if conn is not None:
                conn.close()

    def transcribe(self, audio: bytes, filename: str = "audio.wav",
                   language: Optional[str] = None) -> clients.TranscribeResult:
        pcm = read_pcm(audio, filename)  # audio.AudioError: the canary, not the server
        chunks = pcm.chunks(SAMPLES_PER_CHUNK)
        fmt = {"rate": pcm.rate, "width": pcm.width, "channels": pcm.channels}
        exchange = clients.Exchange(
            method="WYOMING", url=self.url,
            fields={"transcribe": f"language={language}" if language else "language not given",
                    "audio-start": f"rate={pcm.rate} width={pcm.width} channels={pcm.channels}",
                    "audio-chunk": f"{len(chunks)} x {SAMPLES_PER_CHUNK} samples, pace {self.pace:g}"},
            file_field="audio", file_name=filename, file_bytes=len(pcm.data))
        started = time.perf_counter()
        state = _Turn(started)
        conn: Optional[Connection] = None

        def result(outcome: str, reason: str = "", transcription: Optional[clients.Transcription] = None
                   ) -> clients.TranscribeResult:
            exchange.body_bytes = conn.received if conn is not None else 0
            return clients.TranscribeResult(outcome, time.perf_counter() - started, None, self.redact(reason),
                                            transcription, exchange, stream=state.times(self.pace, pcm.seconds))

        try:
            conn = self._connect(started + self.timeout)
            conn.send(encode("transcribe", {"language": language} if language else None)
                      + encode("audio-start", {**fmt, "timestamp": 0}))
            state.first_audio = time.perf_counter()
            per_second = float(pcm.rate * pcm.width * pcm.channels)
            for offset, chunk in chunks:
                # Due once it has been spoken, as a microphone client sends it: at its end.
                due = state.first_audio + send_time(offset + len(chunk) / per_second, self.pace)
                while time.perf_counter() < due and state.final is None:
                    state.take(conn.events_until(due))  # partials as they come, not after the audio
                if state.final is not None:
                    break  # the server ended the utterance itself (VAD endpointing)
                conn.send(encode("audio-chunk", {**fmt, "timestamp": int(offset * 1000)}, chunk))
            if state.final is None:
                conn.send(encode("audio-stop", {"timestamp": int(pcm.seconds * 1000)}))
            state.audio_end = time.perf_counter()
            while state.final is None:
                state.take(conn.events_until(conn.deadline))
        except (_Deadline, socket.timeout):
            where = "waiting for the transcript" if state.audio_end else "sending the audio"
            return result(clients.TIMEOUT, f"no transcript within {self.timeout:g}s (still {where})")
        except _Closed:
            return result(clients.CONNECTION_ERROR, "the server closed the connection before the transcript")
        except ProtocolError as err:
            return result(clients.BAD_RESPONSE, f"not a Wyoming answer: {err}")
        except _ServerError as err:
            return result(clients.BAD_RESPONSE, f"the server reported an error: {err}")
        except OSError as err:
            if conn is None:
                return result(clients.CONNECTION_ERROR, f"cannot connect: {transport.connection_reason(err)}")
            return result(clients.CONNECTION_ERROR, f"the connection broke: {transport.connection_reason(err)}")
        finally:
            if conn is not None:
                conn.close()
        final = state.final
        exchange.body_excerpt = self.redact(clients._excerpt(json.dumps(final.data, ensure_ascii=False).encode()))
        text = final.data.get("text")
        if not isinstance(text, str):
            return result(clients.BAD_RESPONSE, 'the transcript event has no "text" string')
        return result(clients.SUCCESS, "", clients.Transcription(
            text=transport.safe_text(text[:clients.MAX_TEXT_CHARS]),
            language=clients.language_code(final.data.get("language"))))


class _ServerError(Exception):
    pass


class _Turn:
    """What one utterance's events said, with the times they came."""

    def __init__(self, started: float):
        self.started = started
        self.first_audio = 0.0
        self.audio_end = 0.0  # when audio-stop went out (or the server finalised first)
        self.final: Optional[Event] = None
        self.final_at = 0.0
        self.first_partial_at = 0.0
        self.partials = 0

    def take(self, events: list[Event]) -> None:
        now = time.perf_counter()
        for event in events:
            if event.type == "transcript-chunk":
                self.partials += 1
                self.first_partial_at = self.first_partial_at or now
            elif event.type == "transcript" and self.final is None:
                self.final, self.final_at = event, now
            elif event.type == "error":
                text = event.data.get("text")
                code = event.data.get("code")
                raise _ServerError(transport.safe_text(f"{str(text)[:200]}" + (f" ({str(code)[:40]})" if code else "")))

    def times(self, pace: float, audio_seconds: float) -> StreamTimes:
        first = self.first_partial_at - self.first_audio if self.first_partial_at and self.first_audio else None
        lag = None
        if self.final is not None:
            lag = max(0.0, self.final_at - self.audio_end) if self.audio_end else 0.0
        return StreamTimes(pace=pace, audio_seconds=audio_seconds, first_partial=first,
                           finalisation_lag=lag, partials=self.partials)
