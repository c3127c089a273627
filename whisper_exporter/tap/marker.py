"""How the exporter marks its own (canary) requests, so the tap and log parsers keep them apart.

Two marks on every probe and quality request: a header, which the tap reads, and a
query-string parameter, which servers' access logs print with the path (uvicorn does).
Plain constants, no imports: clients and log parsers import them cheaply.
"""
from __future__ import annotations

from typing import Mapping, Optional

HEADER = "X-Whisper-Exporter-Canary"
QUERY = "whisper_exporter_canary"
VALUE = "1"
QUERY_STRING = f"{QUERY}={VALUE}"  # appended to request URLs: ?whisper_exporter_canary=1


def marked_url(url: str) -> str:
    """`url` with the canary query marker added."""
    return url + ("&" if "?" in url else "?") + QUERY_STRING


def is_canary(headers: Optional[Mapping[str, str]] = None, query: Optional[Mapping[str, str]] = None) -> bool:
    """True when a request carries either mark (header lookup as the mapping does it)."""
    if headers is not None and headers.get(HEADER, "").strip() == VALUE:
        return True
    return query is not None and query.get(QUERY, "") == VALUE
