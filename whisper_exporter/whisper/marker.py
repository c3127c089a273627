"""How the exporter marks its own (canary) requests, so the tap and log parsers keep them apart.

Two marks on every probe and quality request (whisper/clients.py): a header, which
the tap reads, and a query-string parameter, which servers' access logs print with the
path (uvicorn does), so the log collector sees it too (runtime/requests.py). Both carry
this process's token: random per process (or WHISPER_EXPORTER_CANARY_TOKEN, to share it
with a `whisper-exporter evaluate` run), compared in constant time. A mark with another
value is spoofed: a client claiming to be the canary is counted as user traffic, and
in a counter of its own. The token is a secret: clients.py masks it in debug output.
"""
from __future__ import annotations

import hmac
import os
import secrets
from typing import Mapping, Optional

HEADER = "X-Whisper-Exporter-Canary"
QUERY = "whisper_exporter_canary"
ENV = "WHISPER_EXPORTER_CANARY_TOKEN"
MIN_TOKEN = 16  # characters of a token given in ENV; shorter ones are ignored (guessable)


def _token() -> str:
    given = os.environ.get(ENV, "").strip()
    # URL-safe characters only: the token travels in a query string and a header unencoded.
    if len(given) >= MIN_TOKEN and all(c.isascii() and (c.isalnum() or c in "-_") for c in given):
        return given
    return secrets.token_urlsafe(24)


VALUE = _token()  # this process's token: what its own clients send
QUERY_STRING = f"{QUERY}={VALUE}"  # appended to request URLs: ?whisper_exporter_canary=TOKEN

GENUINE = "genuine"  # the exporter's own request
SPOOFED = "spoofed"  # a mark without this process's token: user traffic


def marked_url(url: str) -> str:
    """`url` with the canary query marker added."""
    return url + ("&" if "?" in url else "?") + QUERY_STRING


def genuine(value: Optional[str]) -> bool:
    """Whether a mark's value is this process's token (constant time)."""
    return value is not None and hmac.compare_digest(value.strip().encode("utf-8", "replace"), VALUE.encode())


def classify(headers: Optional[Mapping[str, str]] = None, query: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """GENUINE when a mark carries the token, SPOOFED when a mark is there without it, else None.
    A request with one genuine mark and another spoofed one is spoofed."""
    values = []
    if headers is not None and headers.get(HEADER) is not None:
        values.append(headers.get(HEADER))
    if query is not None and query.get(QUERY) is not None:
        values.append(query.get(QUERY))
    if not values:
        return None
    return GENUINE if all(genuine(v) for v in values) else SPOOFED


def is_canary(headers: Optional[Mapping[str, str]] = None, query: Optional[Mapping[str, str]] = None) -> bool:
    """True when the request's marks carry this process's token."""
    return classify(headers, query) == GENUINE


def classify_target(target: str) -> Optional[str]:
    """classify() for a request target as an access log prints it (path?query): every
    `whisper_exporter_canary=` parameter must carry the token."""
    _, question, query = target.partition("?")
    if not question:
        return None
    values = [v for k, _, v in (p.partition("=") for p in query.split("&")) if k == QUERY]
    if not values:
        return None
    return GENUINE if all(genuine(v) for v in values) else SPOOFED
