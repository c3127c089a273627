"""The last few minutes of real traffic, read from the shared request metrics (runtime/requests.py).

The request metrics are counters since start-up; the status page wants what happened
lately (error ratio, p95). `RecentRequests` keeps a short ring of cumulative samples,
taken at most every SAMPLE_EVERY seconds whenever it is read (each scrape and each page
view), and answers the difference between now and the newest sample at least WINDOW
seconds old, as `rate()` and `histogram_quantile()` would over that span. Read-only:
it copies the metrics out under their lock and never changes them.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from whisper_exporter.runtime.requests import LATENCY_BUCKETS, RequestMetrics

WINDOW = 300.0  # seconds: the "last 5 minutes" of the rules' ratio_rate5m and p95_5m
SAMPLE_EVERY = 10.0  # seconds between kept samples: the window's edge is this precise
# Paths that are not the transcription API, left out as rules/recording.yml leaves them out.
NOT_API = frozenset({"/", "/docs", "/openapi.json", "/health", "/healthz", "/ready", "/metrics", "/v1/models"})


@dataclass(frozen=True)
class Counts:
    """Cumulative counts of API requests at one moment."""

    at: float  # the clock's time (monotonic seconds)
    total: int = 0
    ok: int = 0  # 2xx
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx, and requests the source marked failed without a status
    bad_gateway: int = 0  # 502: the tap's answer when the server is unreachable or hangs up
    latency: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last is +Inf


@dataclass(frozen=True)
class Window:
    """What happened between two samples."""

    seconds: float  # the span covered
    since_start: bool  # no sample is older than the window: the span is everything since start-up
    total: int
    ok: int
    client_errors: int
    server_errors: int
    bad_gateway: int
    p95: Optional[float]  # seconds, from the latency buckets; None without timed requests

    @property
    def error_ratio(self) -> Optional[float]:
        return self.server_errors / self.total if self.total else None

    @property
    def client_error_ratio(self) -> Optional[float]:
        return self.client_errors / self.total if self.total else None


def counts(requests: RequestMetrics, at: float) -> Counts:
    """The request metrics' API counts now, summed over languages and endpoints."""
    snap = requests.snapshot()
    total = ok = client = server = gateway = 0
    for (endpoint, status, _language), n in snap["requests"].items():
        if endpoint in NOT_API:
            continue
        total += n
        if status.startswith("2"):
            ok += n
        elif status.startswith("4"):
            client += n
        elif status.startswith("5") or status == "error":
            server += n
        if status == "502":
            gateway += n
    latency = [0] * (len(LATENCY_BUCKETS) + 1)
    for endpoint, hist in snap["durations"].items():
        if endpoint in NOT_API or hist.bounds != LATENCY_BUCKETS:
            continue
        for i, n in enumerate(hist.counts):
            latency[i] += n
    return Counts(at, total, ok, client, server, gateway, tuple(latency))


def quantile(q: float, buckets: tuple[int, ...], bounds: tuple[float, ...] = LATENCY_BUCKETS) -> Optional[float]:
    """histogram_quantile(): linear within the bucket; in the +Inf bucket, the highest bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if seen + n >= rank and n > 0:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


class RecentRequests:
    """A ring of cumulative samples of one RequestMetrics; `window()` is the last WINDOW seconds."""

    def __init__(self, requests: RequestMetrics, window: float = WINDOW, every: float = SAMPLE_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.requests, self.span, self.every, self.clock = requests, window, every, clock
        self._lock = threading.Lock()
        self._ring: deque[Counts] = deque([Counts(clock())])  # start-up: nothing counted yet
        self._started = self._ring[0].at

    def sample(self) -> Counts:
        """The counts now; kept in the ring when the last kept one is SAMPLE_EVERY old."""
        now = counts(self.requests, self.clock())
        with self._lock:
            if now.at - self._ring[-1].at >= self.every:
                self._ring.append(now)
            # Keep one sample at or before the window's start, and nothing older than it.
            while len(self._ring) > 1 and self._ring[1].at <= now.at - self.span:
                self._ring.popleft()
        return now

    def window(self) -> Window:
        """The last WINDOW seconds (or everything since start-up, when younger than that)."""
        now = self.sample()
        with self._lock:
            base = self._ring[0]
        since_start = base.at == self._started and now.at - base.at < self.span
        delta = [a - b for a, b in zip(now.latency, base.latency)]
        return Window(now.at - base.at, since_start, now.total - base.total, now.ok - base.ok,
                      now.client_errors - base.client_errors, now.server_errors - base.server_errors,
                      now.bad_gateway - base.bad_gateway, quantile(0.95, tuple(delta)))
