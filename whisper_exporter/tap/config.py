"""The tap's configuration section (`collectors.tap`), with its own checks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from whisper_exporter.config import Duration, KeyPath, parse_listen, positive

# 10111 is the exporter's metrics port; the tap takes the next one so the two are
# found together (firewall rules, Service ports). Loopback by default: the tap is in
# the request path, so exposing it to other hosts is a deliberate choice.
DEFAULT_TAP_PORT = 10112
DEFAULT_TAP_LISTEN = f"127.0.0.1:{DEFAULT_TAP_PORT}"


@dataclass
class TapConfig:
    enabled: bool = False
    listen: str = DEFAULT_TAP_LISTEN  # HOST:PORT the tap accepts clients on
    # The tap is in the request path: an address it cannot bind stops the exporter from starting
    # (exit 1), and a reload to one is refused. false: start without it, retried every interval.
    required: bool = True
    upstream: Optional[str] = None  # the Whisper server; null: service.url
    connect_timeout: Duration = Duration(10)  # to connect to the upstream
    # An upstream connection idle for less than this is reused; 0: one connection per request.
    # Keep it below the server's keep-alive timeout (uvicorn 5 s, gunicorn 2 s): docs/tap.md.
    upstream_keepalive: Duration = Duration(1)
    # No answer (or no next byte) from the upstream for this long ends the request with 504.
    # Long files take minutes to transcribe, so the default is generous.
    read_timeout: Duration = Duration(600)
    # A client that sends nothing for this long mid-upload is dropped.
    client_timeout: Duration = Duration(600)
    # Connections open at once; null: a quarter of the soft open-file limit, at most 512 (each
    # request also holds an upstream connection and may spool; the metrics port takes half).
    # At the limit the longest idle makes room; with every one busy new ones wait to be accepted.
    max_connections: Optional[int] = None
    head_timeout: Duration = Duration(10)  # to deliver the request line and headers, in total
    # Bytes of one request's line and headers together; beyond, 431 before it reaches the server.
    # aiohttp's own limits are per line and per header (8 KB, 128 of them): 100 unfinished heads
    # took 251 MB. 64 KiB holds large bearer tokens and cookies (nginx allows about 33 KiB).
    max_head_bytes: int = 65536
    # An upload slower than upload_min_rate bytes/s on average, once upload_rate_grace has passed,
    # or not complete after upload_timeout (null: none) is cut with 408. Generous: a phone on a
    # poor link sends tens of KB/s; 1 KiB/s stops a client that drips to hold a connection.
    upload_min_rate: int = 1024  # 0: no minimum
    upload_rate_grace: Duration = Duration(30)
    upload_timeout: Optional[Duration] = Duration(3600)
    max_in_memory: int = 1048576  # bytes of an uploaded file kept in memory; beyond, spooled to disk
    max_spool_bytes: int = 2147483648  # bytes of one upload copied for analysis; beyond, analysis gives up
    max_response_capture: int = 1048576  # bytes of an answer kept to read transcript and language
    max_transcript_chars: int = 10000  # of the transcript kept on the record
    # Bytes of uploads (and upgraded answers) held in memory by all requests together; beyond,
    # uploads are spooled to disk. Each request's max_in_memory alone let 200 uploads take 300+ MB.
    memory_budget: int = 16777216  # 16 MiB
    # Finished requests waiting for their analysis (one worker); beyond, a record is dropped and counted.
    record_queue: int = 256
    spool_dir: Optional[str] = None  # where uploads are spooled; null: the system's temp dir
    upgrade_response_format: bool = False  # ask json requests as verbose_json (docs/tap.md)
    # Production sampling from the tap (opt-in, docs/tap.md): with a folder here and the review queue
    # (collectors.quality.production.queue), production.fraction of real requests, stratified by
    # language and duration band, are kept with their transcript for review.
    sample_dir: Optional[str] = None  # a folder of the exporter's own (made 0700); null: no sampling
    sample_max_files: int = 1000
    sample_max_bytes: int = 1073741824  # 1 GiB
    sample_retention: Duration = Duration(7 * 86400)  # kept audio older than this is deleted
    # WebSocket sessions through the tap (docs/streaming.md): a message larger than this closes the
    # session with 1009 (both legs); no message either way for websocket_idle_timeout closes it with 1001.
    websocket_max_message: int = 16777216  # 16 MiB: OpenAI Realtime clients send audio in JSON, base64
    websocket_idle_timeout: Duration = Duration(300)
    interval: Duration = Duration(1)  # the collector's update interval (it only reads counters)
    timeout: Duration = Duration(5)

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def check(self, at: KeyPath) -> None:
        try:
            _ = self.listen_address
        except ValueError:
            raise at.error("listen", "an address HOST:PORT for the tap's clients", self.listen) from None
        if self.upstream is not None and not re.match(r"^https?://[^/\s]+", self.upstream):
            raise at.error("upstream", "an http:// or https:// URL", self.upstream)
        for name in ("connect_timeout", "read_timeout", "client_timeout"):
            positive(at, name, getattr(self, name))
        for name in ("head_timeout", "upload_rate_grace", "websocket_idle_timeout"):
            positive(at, name, getattr(self, name))
        if self.upload_timeout is not None:
            positive(at, "upload_timeout", self.upload_timeout)
        if self.max_connections is not None:
            positive(at, "max_connections", self.max_connections, "a number greater than 0, or null")
        if not self.upload_min_rate >= 0:
            raise at.error("upload_min_rate", "bytes per second, 0 or more", self.upload_min_rate)
        for name in ("max_in_memory", "max_spool_bytes", "max_response_capture", "max_transcript_chars",
                     "memory_budget", "record_queue", "websocket_max_message", "max_head_bytes"):
            positive(at, name, getattr(self, name), "a number greater than 0")
        positive(at, "sample_max_files", self.sample_max_files, "a number greater than 0")
        positive(at, "sample_max_bytes", self.sample_max_bytes, "a number greater than 0")
        positive(at, "sample_retention", self.sample_retention)
        if self.spool_dir is not None and not self.spool_dir.strip():
            raise at.error("spool_dir", "a directory path or null", self.spool_dir)
