"""What the tap hands on per request (TapRecord) and its live counters (TapStats)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

# Upstream failures, by reason (the client got 502 or 504, or a cut answer).
UPSTREAM_REASONS = ("connect", "timeout", "closed", "protocol")
# The client's side: gone before the answer was complete, or silent mid-upload too long;
# bad_target: a request target not origin-form (CONNECT, http://host/, host:port, *), refused with 400;
# upload_too_slow: under upload_min_rate after the grace, or past upload_timeout (408).
CLIENT_REASONS = ("client_gone", "client_timeout", "bad_target", "upload_too_slow")
# The tap's own analysis failed or gave up; the request was proxied all the same.
# too_many_parts: over MAX_PARTS parts; audio_work: the audio header took more reads, bytes or CPU
# than one upload may; upgrade: a verbose_json answer too large to render, passed as it came.
ANALYSIS_REASONS = ("multipart", "too_large", "audio", "answer", "internal", "callback", "spool",
                    "too_many_parts", "audio_work", "upgrade")
# Records not handed on: the record queue was full, or the tap stopped with them still queued
# (a reload's drain ran out of time: docs/tap.md). stream_check_queue_full, stream_check_shutdown: no
# request record but a WebSocket stream's final transcript check, which shares the queue and found it
# full, or was left in it (or handed to it) as the tap stopped (docs/streaming.md).
DROP_REASONS = ("queue_full", "shutdown", "stream_check_queue_full", "stream_check_shutdown")


@dataclass
class TapRecord:
    """One request that passed through the tap."""

    endpoint: str  # the path, without the query string
    method: str
    status: Optional[int]  # the status the client got; None when it got none (client gone)
    duration: float  # seconds, request headers in to the last answer byte out
    ttfb: Optional[float] = None  # seconds to the answer's first body byte (its headers when empty)
    request_bytes: int = 0  # body bytes received from the client
    response_bytes: int = 0  # body bytes sent to the client
    error: Optional[str] = None  # an UPSTREAM_REASONS or CLIENT_REASONS value
    api: Optional[str] = None  # openai | asr-webservice | whispercpp; None: another path
    task: Optional[str] = None  # transcribe | translate
    audio_duration: Optional[float] = None  # seconds, from the uploaded file's header
    language: Optional[str] = None  # the request's language field, else the answer's (as written)
    detected_language: Optional[str] = None  # the answer's, when the request named none: the server identified it
    model: Optional[str] = None
    response_format: Optional[str] = None  # as asked by the client
    stream: bool = False
    canary: bool = False  # marked by the exporter's probe or quality collector
    canary_spoofed: bool = False  # marked as a canary without the exporter's token: user traffic
    transcript: Optional[str] = None  # from a json, verbose_json, text or streamed answer (bounded)
    segments: Optional[list[dict[str, Any]]] = None  # verbose_json segments (bounded)
    audio_path: Optional[str] = None  # the spooled upload, when wants_audio asked for it
    analysis_error: Optional[str] = None  # an ANALYSIS_REASONS value
    started: float = 0.0  # Unix time the request arrived
    upgraded: bool = False  # asked of the server as verbose_json (upgrade_response_format)


@dataclass
class TapStats:
    """Live counters, updated under `lock` (on the tap's loop and its worker) and read by the collector.
    A reload's new tap takes its predecessor's TapStats (Tap's `stats`), so the counters carry on and
    what the old tap counts while it drains is exported: two taps may update one object at once."""

    in_flight: int = 0
    requests: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # upstream and client reasons
    analysis_errors: dict[str, int] = field(default_factory=dict)
    duration_mismatches: int = 0  # WAV uploads whose header claimed more audio than their bytes hold
    dropped: dict[str, int] = field(default_factory=dict)  # records not analysed nor handed on, by DROP_REASONS
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, table: dict[str, int], reason: str) -> None:
        with self.lock:
            table[reason] = table.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "in_flight": self.in_flight, "requests": self.requests,
                "request_bytes": self.request_bytes, "response_bytes": self.response_bytes,
                "errors": dict(self.errors), "analysis_errors": dict(self.analysis_errors),
                "duration_mismatches": self.duration_mismatches, "dropped": dict(self.dropped),
            }
