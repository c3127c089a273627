"""Which headers the tap passes on: end-to-end ones, as a proxy must (RFC 9110 7.6.1)."""
from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

# RFC 9110 7.6.1 hop-by-hop headers, plus Expect: the tap's server side answers
# 100-continue itself, and the upstream request is sent without waiting for one.
# A WebSocket upgrade is relayed by tap/websocket.py, which passes the 101's headers through these too.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect",
})

def forward_headers(headers: Any) -> CIMultiDict:
    """Headers minus hop-by-hop ones and those the Connection header names; order and repeats kept."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(v.strip().lower() for v in value.split(","))
    out: CIMultiDict = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in named:
            out.add(name, value)
    return out
