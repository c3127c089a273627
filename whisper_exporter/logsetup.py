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
