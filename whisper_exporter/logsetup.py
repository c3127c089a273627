"""The exporter's log lines as Prometheus' own programs write them: logfmt (the default) or JSON.

Both formatters are a few lines over the standard library's logging, so no dependency is added
for them. Keys, in this order: ts (RFC 3339, UTC, milliseconds), level, logger, msg, and exc when
an exception is attached.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

FORMATS = ("logfmt", "json")
_BARE = re.compile(r"^[^\s=\"\\]+$")  # a logfmt value that needs no quotes


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
    out = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
    if record.exc_info:
        out["exc"] = formatter.formatException(record.exc_info)
    return out


def _logfmt_value(value: str) -> str:
    if _BARE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """ts=... level=info logger=whisper_exporter msg="listening on ..."."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record, self).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self), ensure_ascii=False)


def configure(level: str, fmt: str = "logfmt") -> None:
    """Root logging to stderr at `level` (debug, info, warning, error) in `fmt` (logfmt, json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_server_errors()


SERVER_ERROR_EVERY = 60.0  # seconds between two lines about malformed requests (both ports together)


class QuietServerErrors(logging.Filter):
    """aiohttp's "Error handling request" for a malformed request (a bad request line or header:
    any client can send one) as one line without its traceback, at most one per SERVER_ERROR_EVERY
    seconds. Other errors (a bug in a handler) keep their traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -SERVER_ERROR_EVERY
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not str(record.msg).startswith("Error handling request") or not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self.last < SERVER_ERROR_EVERY:
            self.dropped += 1
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        skipped = f"; {self.dropped} more since the last line" if self.dropped else ""
        # The exception's class only: its text quotes the client's bytes back.
        record.msg = "malformed request from %s (%s)%s"
        record.args = (remote, type(exc).__name__, skipped)
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:  # the client's fault, not the exporter's
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.last, self.dropped = now, 0
        return True


def quiet_server_errors() -> None:
    """Install QuietServerErrors on aiohttp's server logger (the tap's and the metrics port's), once."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietServerErrors) for f in logger.filters):
        logger.addFilter(QuietServerErrors())
