"""The tap's configuration section (`collectors.tap`), with its own checks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

# 10111 is the exporter's metrics port; the tap takes the next one so the two are
# found together (firewall rules, Service ports). Loopback by default: the tap is in
# the request path, so exposing it to other hosts is a deliberate choice.
DEFAULT_TAP_PORT = 10112
DEFAULT_TAP_LISTEN = f"127.0.0.1:{DEFAULT_TAP_PORT}"


@dataclass
class TapConfig:
    enabled: bool = False
    listen: str = DEFAULT_TAP_LISTEN  # HOST:PORT the tap accepts clients on
    upstream: Optional[str] = None  # the Whisper server; null: service.url
    connect_timeout: float = 10.0  # seconds to connect to the upstream
    # No answer (or no next byte) from the upstream for this long ends the request with 504.
    # Long files take minutes to transcribe, so the default is generous.
    read_timeout: float = 600.0
    # A client that sends nothing for this long mid-upload is dropped.
    client_timeout: float = 600.0
    max_in_memory: int = 1048576  # bytes of an uploaded file kept in memory; beyond, spooled to disk
    max_spool_bytes: int = 2147483648  # bytes of one upload copied for analysis; beyond, analysis gives up
    max_response_capture: int = 1048576  # bytes of an answer kept to read transcript and language
    max_transcript_chars: int = 10000  # of the transcript kept on the record
    spool_dir: Optional[str] = None  # where uploads are spooled; null: the system's temp dir
    upgrade_response_format: bool = False  # ask json requests as verbose_json (docs/tap.md)
    interval: float = 1.0  # the collector's update interval (it only reads counters)
    timeout: float = 5.0

    @property
    def listen_address(self) -> tuple[str, int]:
        from whisper_exporter.config import parse_listen

        return parse_listen(self.listen)

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        try:
            self.listen_address
        except ValueError:
            raise ValueError(f"listen: expected HOST:PORT, got {self.listen!r}") from None
        if self.upstream is not None and not re.match(r"^https?://[^/\s]+", self.upstream):
            raise ValueError(f"upstream: expected an http:// or https:// URL, got {self.upstream!r}")
        for name in ("connect_timeout", "read_timeout", "client_timeout", "interval", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a duration greater than 0, got {getattr(self, name)!r}")
        for name in ("max_in_memory", "max_spool_bytes", "max_response_capture", "max_transcript_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a number greater than 0, got {value!r}")
        if self.spool_dir is not None and not self.spool_dir.strip():
            raise ValueError("spool_dir: expected a directory path or null")
