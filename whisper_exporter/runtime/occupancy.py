"""How long the server had requests in flight: whisper_server_busy_seconds_total and its integral.

Two counters, not ratios (docs/capacity.md): the seconds with at least one request in
flight, and the integral of the number in flight over time (request-seconds). Each is
brought up to date on every request's start and end, and again when read, so a long
request in flight is counted as it goes rather than in one step when it ends. The
source (the tap) calls begin() when the server has a request's last byte and end() when its
answer has been read to the end; the runtime reads
totals() at scrape time. Ratios, throughput and headroom are recording rules.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Occupancy:
    """Busy seconds and request-seconds in flight, exact to the clock's resolution."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._since = clock()  # the moment busy and integral are counted up to
        self.in_flight = 0
        self.busy = 0.0
        self.integral = 0.0

    def _advance(self, now: float) -> None:
        """Count the time since the last change at the number in flight then; the caller holds the lock."""
        span = now - self._since
        if span > 0 and self.in_flight:
            self.busy += span
            self.integral += span * self.in_flight
        self._since = max(now, self._since)

    def begin(self) -> None:
        """A request arrived."""
        with self._lock:
            self._advance(self._clock())
            self.in_flight += 1

    def end(self) -> None:
        """A request ended (answered, failed or abandoned)."""
        with self._lock:
            self._advance(self._clock())
            if self.in_flight > 0:  # an end without its begin must not make the count negative
                self.in_flight -= 1

    def totals(self) -> tuple[float, float]:
        """(busy seconds, request-seconds in flight) up to now, requests still in flight included."""
        with self._lock:
            self._advance(self._clock())
            return self.busy, self.integral
