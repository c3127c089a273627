"""Streaming recognition seen through the tap: a copy of each WebSocket message, read for timings.

Two protocols are recognised from their messages (any path): the OpenAI Realtime API
(speaches' /v1/realtime: `session.update`, `input_audio_buffer.append`/`commit`,
`conversation.item.input_audio_transcription.delta`/`completed`) and collabora/WhisperLive
(an options JSON with `uid`, float32/int16/uint8 16 kHz binary frames, `SERVER_READY`, `WAIT`,
`segments` marked `completed`, `DISCONNECT`). Anything else counts as `other`: sessions and
close codes only. Messages are never changed; a text message is parsed as JSON only up to
JSON_MAX bytes (an audio append beyond it is measured by a scan of its base64 length), so
no message blocks the loop for long. No prometheus_client here (collectors/tap.py renders).
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import orjson

OPENAI, WHISPERLIVE, OTHER = "openai-realtime", "whisperlive", "other"
PROTOCOLS = (OPENAI, WHISPERLIVE, OTHER)
JSON_MAX = 262144  # bytes of a text message parsed as JSON (orjson: well under a millisecond)
MAX_TURNS = 32  # turns of one session awaiting their transcript; beyond, the oldest is forgotten
MAX_TRANSCRIPT = 10000  # characters of a session's or turn's final transcript kept for the detector
# Close codes kept as label values; any other is folded into "other". 1006: closed without a close frame.
CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
CLOSED_BY = ("client", "server", "tap")
# OpenAI Realtime error types (its API reference), plus the failures of a transcription or response.
ERROR_TYPES = ("invalid_request_error", "server_error", "authentication_error", "rate_limit_error",
               "transcription_failed", "response_failed", "other")
UPGRADE_RESULTS = ("accepted", "refused", "upstream_error", "bad_request")
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
SESSION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
COUNT_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
# Input audio formats: bytes per second. OpenAI: pcm16 is 24 kHz mono 16-bit; G.711 is 8 kHz, 1 byte.
OPENAI_RATES = {"pcm16": 48000, "g711_ulaw": 8000, "g711_alaw": 8000, "audio/pcmu": 8000, "audio/pcma": 8000}
WHISPERLIVE_RATES = {"float32": 64000, "int16": 32000, "uint8": 16000}  # 16 kHz mono
END_OF_AUDIO = b"END_OF_AUDIO"
APPEND = b'"input_audio_buffer.append"'


class Hist:
    """Bucket counts (the last one is +Inf) and the sum; rendered cumulative by the collector."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "Hist":
        h = Hist(self.bounds)
        h.counts, h.sum = list(self.counts), self.sum
        return h


HISTOGRAMS = {  # name -> buckets; the same buckets for every protocol
    "duration": SESSION_BUCKETS, "ready": LAG_BUCKETS, "first_partial": LAG_BUCKETS,
    "finalisation": LAG_BUCKETS, "transcript_lag": LAG_BUCKETS, "partials": COUNT_BUCKETS,
}
COUNTERS = ("audio_seconds", "turns", "disconnects", "unparsed")


@dataclass
class StreamStats:
    """Live streaming figures, updated on the tap's loop, read by the collector under `lock`."""

    in_flight: dict[str, int] = field(default_factory=dict)
    sessions: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (protocol, close_code, closed_by)
    hists: dict[tuple[str, str], Hist] = field(default_factory=dict)  # (name, protocol)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # (name, protocol)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (protocol, type)
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)  # (protocol, reason)
    upgrades: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # by direction: upstream | downstream
    message_bytes: dict[str, int] = field(default_factory=dict)
    # Set by the collector: a final transcript (text, language, audio seconds), and a canary session seen.
    on_final: Optional[Callable[[str, Optional[str], Optional[float]], None]] = None
    on_canary: Optional[Callable[[], None]] = None
    on_spoofed: Optional[Callable[[], None]] = None  # an upgrade marked as a canary without the token
    # How on_final runs: the tap sets its worker thread's submit, so the detector never runs on the loop.
    submit: Optional[Callable[..., Any]] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, name: str, protocol: str, value: float) -> None:
        with self.lock:
            hist = self.hists.get((name, protocol))
            if hist is None:
                hist = self.hists[(name, protocol)] = Hist(HISTOGRAMS[name])
            hist.observe(max(0.0, value))

    def add(self, name: str, protocol: str, value: float = 1.0) -> None:
        with self.lock:
            self.counters[(name, protocol)] = self.counters.get((name, protocol), 0.0) + value

    def bump(self, table: dict, key: Any, n: int = 1) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + n

    def final(self, text: str, language: Optional[str], audio: Optional[float]) -> None:
        """A final transcript, handed to on_final (through `submit` when set)."""
        if self.on_final is None:
            return
        if self.submit is None:
            self.on_final(text, language, audio)
            return
        try:
            self.submit(self.on_final, text, language, audio)
        except RuntimeError:  # the tap is stopping, or its queue is full (counted there)
            pass

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"in_flight": dict(self.in_flight), "sessions": dict(self.sessions),
                    "hists": {k: h.copy() for k, h in self.hists.items()}, "counters": dict(self.counters),
                    "errors": dict(self.errors), "rejections": dict(self.rejections),
                    "upgrades": dict(self.upgrades), "messages": dict(self.messages),
                    "message_bytes": dict(self.message_bytes)}


@dataclass
class _Turn:
    """One OpenAI Realtime turn: from its first appended audio to its completed transcript."""

    first_audio: Optional[float] = None
    end: Optional[float] = None  # the client's commit, or the server's speech_stopped
    audio: float = 0.0  # seconds appended
    deltas: int = 0
    first_partial: bool = False


def close_label(code: Optional[int]) -> str:
    """A close code as a bounded label value."""
    if code is None:
        return "1006"
    return str(code) if code in CLOSE_CODES else "other"


def base64_bytes(message: bytes) -> Optional[int]:
    """Decoded size of an append event's `audio` field, by a scan (no JSON parse, no decode)."""
    at = message.find(b'"audio"')
    if at < 0:
        return None
    start = message.find(b'"', message.find(b":", at + 7) + 1)
    end = message.find(b'"', start + 1)
    if start < 0 or end < 0:
        return None
    size = end - start - 1
    padding = (message[end - 1:end] == b"=") + (message[end - 2:end] == b"==")
    return max(0, size * 3 // 4 - padding)


class Session:
    """One WebSocket session's reading of its messages; every method is cheap and never raises."""

    def __init__(self, stats: StreamStats, path: str, now: float, canary: bool = False):
        self.stats, self.canary, self.opened = stats, canary, now
        self.protocol = OTHER
        self.ended = False
        self.language: Optional[str] = None
        # OpenAI Realtime
        self.rate = OPENAI_RATES["pcm16"]
        self.turn = _Turn()
        self.turns: "OrderedDict[str, _Turn]" = OrderedDict()
        # WhisperLive
        self.options_at: Optional[float] = None
        self.first_audio: Optional[float] = None
        self.audio = 0.0
        self.partials = 0
        self.first_partial = False
        self.completed: "OrderedDict[str, str]" = OrderedDict()  # segment start -> text
        self.completed_end = 0.0
        self.last_partial = ""  # the newest message's segment not yet completed
        if not canary:
            stats.bump(stats.in_flight, OTHER)
        if path.rstrip("/").endswith("/realtime"):  # OpenAI's and speaches' path
            self._detected(OPENAI)

    # -- messages -------------------------------------------------------------

    def client_message(self, data: Any, now: float) -> None:
        """A message from the client (str: text, bytes: binary), before it goes upstream."""
        self._count("upstream", data)
        if self.canary:
            return
        try:
            if isinstance(data, str):
                self._client_text(data.encode(), now)
            elif self.protocol == WHISPERLIVE:
                self._whisperlive_audio(data, now)
        except Exception:  # a message we cannot read is the client's business, not a failure
            self.stats.add("unparsed", self.protocol)

    def server_message(self, data: Any, now: float) -> None:
        """A message from the server, before it goes to the client."""
        self._count("downstream", data)
        if self.canary or not isinstance(data, str):
            return
        if len(data) > JSON_MAX:
            self.stats.add("unparsed", self.protocol)
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        try:
            if self.protocol == OTHER:
                self._detect(event, server=True)
            if self.protocol == OPENAI:
                self._openai_server(event, now)
            elif self.protocol == WHISPERLIVE:
                self._whisperlive_server(event, now)
        except Exception:
            self.stats.add("unparsed", self.protocol)

    def closed(self, code: Optional[int], by: str, now: float) -> None:
        """The session ended: `code` as the closing side sent it (None: no close frame). Once."""
        if self.ended:
            return
        self.ended = True
        stats = self.stats
        if self.canary:
            if stats.on_canary is not None:
                stats.on_canary()
            return
        stats.bump(stats.in_flight, self.protocol, -1)
        stats.bump(stats.sessions, (self.protocol, close_label(code), by))
        stats.observe("duration", self.protocol, now - self.opened)
        if self.protocol == WHISPERLIVE and self.options_at is not None:
            stats.observe("partials", WHISPERLIVE, self.partials)
            # The completed segments and the last partial after them, as the canary reads a session
            # (whisper/streaming_clients.py): the real server closes after END_OF_AUDIO without
            # completing its last segment, so completed segments alone lost the tail, or everything.
            texts = [t.strip() for t in self.completed.values()]
            tail = self.last_partial.strip()
            if tail and (not texts or texts[-1] != tail):
                texts.append(tail)
            text = " ".join(t for t in texts if t)
            if text:
                self._final(text, self.audio)

    # -- detection ------------------------------------------------------------

    def _detect(self, event: dict, server: bool) -> None:
        kind = event.get("type")
        if isinstance(kind, str) and "." in kind:
            self._detected(OPENAI)
        elif "uid" in event and kind is None:
            self._detected(WHISPERLIVE)

    def _detected(self, protocol: str) -> None:
        if self.protocol == protocol:
            return
        if not self.canary:
            self.stats.bump(self.stats.in_flight, self.protocol, -1)
            self.stats.bump(self.stats.in_flight, protocol)
        self.protocol = protocol

    def _count(self, direction: str, data: Any) -> None:
        stats = self.stats
        with stats.lock:
            stats.messages[direction] = stats.messages.get(direction, 0) + 1
            stats.message_bytes[direction] = stats.message_bytes.get(direction, 0) + len(data)

    # -- client side ----------------------------------------------------------

    def _client_text(self, raw: bytes, now: float) -> None:
        if len(raw) > JSON_MAX:
            head = raw[:512]
            if APPEND in head or (self.protocol == OPENAI and APPEND in raw):
                self._detected(OPENAI)
                size = base64_bytes(raw)
                if size is not None:
                    self._append(size, now)
                    return
            self.stats.add("unparsed", self.protocol)
            return
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        if self.protocol == OTHER:
            self._detect(event, server=False)
        if self.protocol == OPENAI:
            self._openai_client(event, now)
        elif self.protocol == WHISPERLIVE and self.options_at is None:
            self.options_at = now
            fmt = event.get("audio_format")
            self.rate = WHISPERLIVE_RATES.get(fmt, WHISPERLIVE_RATES["float32"]) if isinstance(fmt, str) \
                else WHISPERLIVE_RATES["float32"]
            lang = event.get("language")
            self.language = lang if isinstance(lang, str) and lang else None

    def _openai_client(self, event: dict, now: float) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            audio = event.get("audio")
            if isinstance(audio, str):
                self._append(len(audio) * 3 // 4 - audio[-2:].count("="), now)
        elif kind == "input_audio_buffer.commit":
            if self.turn.end is None:
                self.turn.end = now
        elif kind == "input_audio_buffer.clear":
            self.turn = _Turn()
        elif kind in ("session.update", "transcription_session.update"):
            session = event.get("session")
            if isinstance(session, dict):
                self._session_settings(session)

    def _session_settings(self, session: dict) -> None:
        """Input format and transcription language, from the beta (flat) or GA (audio.input) shape."""
        fmt = session.get("input_audio_format")
        transcription = session.get("input_audio_transcription")
        audio = session.get("audio")
        if isinstance(audio, dict) and isinstance(audio.get("input"), dict):
            given = audio["input"].get("format")
            if isinstance(given, dict):
                fmt = given.get("type")
                if fmt == "audio/pcm" and isinstance(given.get("rate"), int) and given["rate"] > 0:
                    self.rate = given["rate"] * 2
                    fmt = None
            transcription = audio["input"].get("transcription", transcription)
        if isinstance(fmt, str) and fmt in OPENAI_RATES:
            self.rate = OPENAI_RATES[fmt]
        if isinstance(transcription, dict) and isinstance(transcription.get("language"), str):
            self.language = transcription["language"] or None

    def _append(self, size: int, now: float) -> None:
        seconds = size / self.rate
        if self.turn.first_audio is None:
            self.turn.first_audio = now
        self.turn.audio += seconds
        self.stats.add("audio_seconds", OPENAI, seconds)

    def _whisperlive_audio(self, data: bytes, now: float) -> None:
        if data == END_OF_AUDIO:
            return
        if self.first_audio is None:
            self.first_audio = now
        seconds = len(data) / self.rate
        self.audio += seconds
        self.stats.add("audio_seconds", WHISPERLIVE, seconds)

    # -- server side ----------------------------------------------------------

    def _openai_server(self, event: dict, now: float) -> None:
        kind = event.get("type")
        stats = self.stats
        item = event.get("item_id")
        if kind in ("session.created", "transcription_session.created"):
            stats.observe("ready", OPENAI, now - self.opened)
            session = event.get("session")
            if isinstance(session, dict) and self.language is None:
                self._session_settings(session)
        elif kind == "input_audio_buffer.speech_stopped":
            if self.turn.end is None:
                self.turn.end = now
        elif kind == "input_audio_buffer.committed" and isinstance(item, str):
            stats.add("turns", OPENAI)
            done, self.turn = self.turn, _Turn()
            if done.end is None:
                done.end = now
            self.turns[item] = done
            while len(self.turns) > MAX_TURNS:
                self.turns.popitem(last=False)
        elif kind == "conversation.item.input_audio_transcription.delta" and isinstance(item, str):
            partial = self.turns.get(item)
            if partial is not None:
                partial.deltas += 1
                self._first_partial(partial, now)
        elif kind == "conversation.item.input_audio_transcription.completed" and isinstance(item, str):
            turn: Optional[_Turn] = self.turns.pop(item, None)
            if turn is None:
                return
            self._first_partial(turn, now)  # a server that sends no delta (speaches): its completed
            if turn.end is not None:
                stats.observe("finalisation", OPENAI, now - turn.end)
            stats.observe("partials", OPENAI, turn.deltas)
            text = event.get("transcript")
            if isinstance(text, str):
                self._final(text, turn.audio)
        elif kind == "conversation.item.input_audio_transcription.failed":
            stats.bump(stats.errors, (OPENAI, "transcription_failed"))
            if isinstance(item, str):
                self.turns.pop(item, None)
        elif kind == "error":
            error = event.get("error")
            given = error.get("type") if isinstance(error, dict) else None
            stats.bump(stats.errors, (OPENAI, given if given in ERROR_TYPES else "other"))
        elif kind == "response.done":
            response = event.get("response")
            if isinstance(response, dict) and response.get("status") == "failed":
                stats.bump(stats.errors, (OPENAI, "response_failed"))

    def _first_partial(self, turn: _Turn, now: float) -> None:
        if not turn.first_partial and turn.first_audio is not None:
            turn.first_partial = True
            self.stats.observe("first_partial", OPENAI, now - turn.first_audio)

    def _whisperlive_server(self, event: dict, now: float) -> None:
        stats = self.stats
        status, message = event.get("status"), event.get("message")
        if status == "WAIT":
            stats.bump(stats.rejections, (WHISPERLIVE, "wait"))
        elif status == "ERROR":
            stats.bump(stats.errors, (WHISPERLIVE, "server_error"))
        if message == "SERVER_READY":
            stats.observe("ready", WHISPERLIVE, now - (self.options_at or self.opened))
        elif message == "DISCONNECT":
            stats.add("disconnects", WHISPERLIVE)
        if isinstance(event.get("language"), str) and self.language is None:
            self.language = event["language"]
        segments = event.get("segments")
        if not isinstance(segments, list) or not segments:
            return
        self.partials += 1
        if not self.first_partial and self.first_audio is not None:
            self.first_partial = True
            stats.observe("first_partial", WHISPERLIVE, now - self.first_audio)
        partial = ""
        for seg in segments:
            if isinstance(seg, dict) and seg.get("completed") is not True and isinstance(seg.get("text"), str):
                partial = seg["text"][:MAX_TRANSCRIPT]
            if isinstance(seg, dict) and seg.get("completed") is True:
                start, text = str(seg.get("start"))[:32], seg.get("text")
                try:
                    self.completed_end = max(self.completed_end, float(seg.get("end")))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    continue
                if isinstance(text, str) and start not in self.completed and \
                        sum(len(t) for t in self.completed.values()) < MAX_TRANSCRIPT:
                    self.completed[start] = text
        self.last_partial = partial
        # The streaming number that matters: audio sent minus the end of the last completed segment.
        stats.observe("transcript_lag", WHISPERLIVE, self.audio - self.completed_end)

    def _final(self, text: str, audio: float) -> None:
        self.stats.final(text[:MAX_TRANSCRIPT], self.language, audio or None)
