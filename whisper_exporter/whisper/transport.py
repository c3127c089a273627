"""The HTTP layer under the Whisper clients: a total deadline for a request, readable connection
errors, and text made safe to show. No Whisper and no metrics here."""
from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any, Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ReadTimeoutError


def connection_reason(err: BaseException) -> str:
    """The useful part of a requests/urllib3 connection error: 'connection refused', ..."""
    text = str(err)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip().rstrip(".").lower()
    for needle, reason in (
        ("Name or service not known", "name resolution failed"),
        ("nodename nor servname", "name resolution failed"),
        ("RemoteDisconnected", "the server closed the connection without answering"),
        ("Connection aborted", "connection aborted"),
        ("Connection reset", "connection reset by peer"),
        ("SSLError", "TLS handshake failed"),
        ("certificate verify failed", "TLS certificate verification failed"),
    ):
        if needle in text:
            return reason
    return type(err).__name__


def is_read_timeout(first: BaseException) -> bool:
    seen = set()
    err: Optional[BaseException] = first
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (requests.Timeout, ReadTimeoutError, TimeoutError)):
            return True
        if any(isinstance(a, (ReadTimeoutError, TimeoutError)) for a in getattr(err, "args", ())):
            return True
        err = err.__cause__ or err.__context__
    return False


def safe_text(text: str) -> str:
    """`text` encodable as UTF-8: a lone surrogate ("\\ud800" in JSON) becomes "?", so that no page
    or log that shows it can fail on it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


# -- the total deadline ------------------------------------------------------------------------
# requests' timeout bounds each recv(), not the request: a server that drips a byte of its headers
# or body every few seconds keeps it waiting for ever. The watchdog shuts the request's socket
# down at the deadline, which wakes any read blocked on it, whatever the phase.

_watching = threading.local()


class Watchdog:
    """Shuts down the sockets registered with it when the deadline (time.perf_counter()) passes."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(max(0.0, deadline - time.perf_counter()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "Watchdog":
        _watching.dog = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _watching.dog = None
        self._timer.cancel()
        with self._lock:
            self._done = True
            for sock in self._socks:
                sock.close()
            self._socks.clear()

    def watch(self, sock: socket.socket) -> None:
        # A duplicate: TLS wrapping detaches the original, and shutdown() acts on the connection.
        dup = sock.dup()
        with self._lock:
            if self._done:
                dup.close()
                return
            self._socks.append(dup)
            fire = self.expired
        if fire:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Watched:
    def _new_conn(self):
        sock = super()._new_conn()  # type: ignore[misc]
        dog = getattr(_watching, "dog", None)
        if dog is not None:
            dog.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connections register their sockets with the current Watchdog."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
