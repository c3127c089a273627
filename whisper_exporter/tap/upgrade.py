"""Optional response-format upgrade: a `json` request asked of the server as `verbose_json`.

The upload is held back only until its audio part begins (its form fields come first
from the OpenAI clients and most others; at most `limit` bytes). By then python-multipart
has read the fields before the file. The `response_format` part, when there and `json`,
is replaced; when not there, a `verbose_json` one is put in front (a json one after the
file then wins on last-value servers such as FastAPI: the answer is json and goes back as is). Every other byte is
forwarded as sent. The body's length changes, so it goes upstream chunked. The answer
(JSON with segments) is rendered back to the `json` shape: {"text": ...} as FastAPI
servers write it. Anything unexpected: the request goes on as sent, unchanged.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import orjson

from whisper_exporter.tap.analysis import MAX_FIELDS, UploadAnalyzer
from whisper_exporter.tap.budget import MemoryBudget

FIELD = "response_format"


class Upgrade:
    """One request's upgrade: holds the upload's start until the fields are known."""

    def __init__(self, boundary: bytes, limit: int, budget: Optional[MemoryBudget] = None):
        self.delimiter = b"--" + boundary
        self.limit = limit
        self.budget = budget  # the held bytes are taken from it; without room, the request goes as sent
        self.held: list[bytes] = []
        self.size = 0
        self.taken = 0
        self.decided = False
        self.active = False  # the request went upstream asking verbose_json

    def headers(self, headers: Any) -> Any:
        headers.popall("Content-Length", None)  # the length changes; aiohttp sends it chunked
        return headers

    def feed(self, chunk: bytes, analyzer: Optional[UploadAnalyzer]) -> list[bytes]:
        if self.decided:
            return [chunk]
        self.held.append(chunk)
        self.size += len(chunk)
        if self.budget is not None and self.size <= self.limit:
            if not self.budget.take(len(chunk)):
                return self._release(None)
            self.taken += len(chunk)
        if analyzer is None or analyzer.error is not None or self.size > self.limit:
            return self._release(None)
        if analyzer.spool is not None:  # the audio part has begun: the fields before it are known
            return self._release(analyzer)
        return []

    def flush(self, analyzer: Optional[UploadAnalyzer]) -> list[bytes]:
        """The body ended before a decision (no file part): send what is held, unchanged."""
        return [] if self.decided else self._release(None)

    def close(self) -> None:
        """The request ended: bytes still held go back to the budget."""
        self.held = []
        if self.budget is not None:
            self.budget.give(self.taken)
        self.taken = 0

    def _release(self, analyzer: Optional[UploadAnalyzer]) -> list[bytes]:
        self.decided = True
        held = b"".join(self.held)
        self.held = []
        if self.budget is not None:
            self.budget.give(self.taken)
        self.taken = 0
        rewritten = self._rewrite(held, analyzer) if analyzer is not None else None
        if rewritten is None:
            return [held]
        self.active = True
        return [rewritten]

    def _rewrite(self, held: bytes, analyzer: UploadAnalyzer) -> Optional[bytes]:
        fields = analyzer.fields
        if fields.get("stream", "").strip().lower() in ("true", "1"):
            return None
        asked = fields.get(FIELD)
        if asked is not None and asked.strip() != "json":
            return None
        if not held.startswith(self.delimiter):
            return None  # a preamble: leave the request alone
        replacement = b'\r\nContent-Disposition: form-data; name="' + FIELD.encode() + b'"\r\n\r\nverbose_json'
        if asked is None:
            return self.delimiter + replacement + b"\r\n" + held
        # Split at the delimiters (which never occur in content; python-multipart has checked
        # the structure): part i of the held bytes is analyzer.order[i].
        if FIELD not in analyzer.order or len(analyzer.order) >= MAX_FIELDS:
            return None  # past the parts the analyzer names (MAX_FIELDS): the part is not found
        parts = held[len(self.delimiter):].split(b"\r\n" + self.delimiter)
        index = analyzer.order.index(FIELD)
        if index >= len(parts) - 1 or analyzer.order.count(FIELD) != 1:
            return None
        parts[index] = replacement
        return self.delimiter + (b"\r\n" + self.delimiter).join(parts)


def plan_upgrade(boundary: bytes, headers: Any, limit: int,
                 budget: Optional[MemoryBudget] = None) -> Optional[Upgrade]:
    """An Upgrade for this upload, or None when it cannot be one (a compressed body)."""
    if "Content-Encoding" in headers:
        return None
    return Upgrade(boundary, limit, budget)


def render_json(body: bytes) -> Optional[bytes]:
    """A verbose_json answer as the json answer the server would have sent, or None when
    the body is not a verbose_json answer (then it goes to the client as it came)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "segments" not in obj:
        return None
    # FastAPI (faster-whisper-server, speaches) writes compact JSON with UTF-8 as is.
    return json.dumps({"text": obj["text"]}, ensure_ascii=False, separators=(",", ":")).encode()
