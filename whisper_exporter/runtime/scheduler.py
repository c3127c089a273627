"""Runs each enabled collector in its own background thread, on its interval, with jitter.

A scrape never waits on this: it reads `CollectorState` and the collector's
latest state. A run that overruns its timeout cannot be killed (an NVML call
or a blocked read has no cancel), so the watchdog is a check at read time:
a run in progress for longer than the timeout marks the collector down, and
its thread simply carries on when (if) the call returns.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

from whisper_exporter.runtime.collector import Collector

if TYPE_CHECKING:
    from whisper_exporter.runtime.shared import Shared

log = logging.getLogger("whisper_exporter.runtime.scheduler")

JITTER = 0.1  # each wait is the interval +/- 10%, so collectors drift apart


@dataclass
class CollectorState:
    """What the exporter and the landing page know about one collector."""

    name: str
    interval: float
    timeout: float
    started: bool = False
    ok: bool = False  # the last finished run succeeded
    runs: int = 0
    errors_total: int = 0
    last_error: Optional[str] = None
    last_error_time: Optional[float] = None  # unix seconds
    last_run_time: Optional[float] = None  # unix seconds, when the last finished run began
    last_duration: Optional[float] = None  # seconds
    running_since: Optional[float] = None  # time.monotonic() of the run in progress
    overrun_counted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def overrun(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds the run in progress has taken, when that is past the timeout."""
        since = self.running_since
        if since is None:
            return None
        elapsed = (time.monotonic() if now is None else now) - since
        return elapsed if elapsed > self.timeout else None

    def up(self) -> bool:
        """Down while the last run failed, or a run in progress is past its timeout."""
        with self.lock:
            elapsed = self.overrun()
            if elapsed is not None and not self.overrun_counted:
                # Counted once per wedged run, the first time anyone looks.
                self.overrun_counted = True
                self.errors_total += 1
                self.last_error = f"run still in progress after {elapsed:.1f}s (timeout {self.timeout:g}s)"
                self.last_error_time = time.time()
            return self.ok and elapsed is None

    def record_error(self, message: str) -> None:
        with self.lock:
            self.errors_total += 1
            self.last_error = message
            self.last_error_time = time.time()


def describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Scheduler:
    def __init__(self, collectors: list[tuple[Collector, float, float]], shared: Optional["Shared"] = None):
        """`collectors` holds (collector, interval seconds, timeout seconds); `shared` is the state
        they share (runtime/shared.py), whose families the exporter renders once."""
        self.shared = shared
        self.entries = [
            (c, CollectorState(name=c.name, interval=interval, timeout=timeout))
            for c, interval, timeout in collectors
        ]
        # One stop event and thread per collector (by id), so a reload can hand a running
        # collector over to the next scheduler without stopping it.
        self._stops: dict[int, threading.Event] = {}
        self._threads: dict[int, threading.Thread] = {}

    def start(self) -> None:
        for collector, state in self.entries:
            if id(collector) in self._threads:
                continue  # adopted from the scheduler this one replaced: already running
            stop = threading.Event()
            thread = threading.Thread(
                target=self._loop, args=(collector, state, stop), name=f"collector-{state.name}", daemon=True
            )
            self._stops[id(collector)], self._threads[id(collector)] = stop, thread
            thread.start()

    def adopt(self, old: "Scheduler") -> list[Collector]:
        """On reload: carry on the collectors this scheduler shares with `old` (the same objects),
        with their state and running thread, so their counters keep counting. Returns them."""
        kept = []
        for i, (collector, _) in enumerate(self.entries):
            for old_collector, old_state in old.entries:
                if old_collector is collector and id(collector) in old._threads:
                    self.entries[i] = (collector, old_state)
                    self._stops[id(collector)] = old._stops[id(collector)]
                    self._threads[id(collector)] = old._threads[id(collector)]
                    kept.append(collector)
        return kept

    def stop(self, wait: float = 2.0, keep: Iterable[Collector] = (), reload: bool = False) -> None:
        """Stop every collector, except those in `keep` (handed over to another scheduler). On a
        `reload`, a collector's optional stop_for_reload() is called instead of stop()."""
        kept = {id(c) for c in keep}
        for key, stop in self._stops.items():
            if key not in kept:
                stop.set()
        deadline = time.monotonic() + wait
        for key, thread in self._threads.items():
            if key not in kept:
                thread.join(max(0.0, deadline - time.monotonic()))
        for collector, state in self.entries:
            if state.started and id(collector) not in kept:
                ending = getattr(collector, "stop_for_reload", None) if reload else None
                try:
                    (ending or collector.stop)()
                except Exception as err:  # stop() must not raise; if it does, say so and go on
                    log.warning("collector %s: stop failed: %s", state.name, describe(err))

    def start_now(self, collector: Collector) -> None:
        """Start one collector in the caller's thread, so that its failure raises there (a required
        collector cannot wait for its first scheduled run)."""
        for c, state in self.entries:
            if c is collector and not state.started:
                collector.start()
                state.started = True

    def halt(self, collector: Collector) -> None:
        """Stop one collector and its thread now (a reload frees what it holds for its successor)."""
        self.stop(keep=[c for c, _ in self.entries if c is not collector], reload=True)
        self._stops.pop(id(collector), None)
        self._threads.pop(id(collector), None)
        for c, state in self.entries:
            if c is collector:
                state.started = False  # stopped once: a later stop() leaves it alone

    def put(self, old: Collector, new: Collector) -> None:
        """Put `new` in `old`'s place, with its state (a refused reload restores what it halted);
        start() runs it."""
        for i, (c, state) in enumerate(self.entries):
            if c is old:
                self.entries[i] = (new, state)

    def ready(self) -> bool:
        """Every collector has finished at least one run (successful or not)."""
        return all(state.runs > 0 for _, state in self.entries)

    def run_once(self, collector: Collector, state: CollectorState) -> None:
        """One scheduled run: start the collector if it is not started yet, then update it."""
        started_wall, started = time.time(), time.monotonic()
        with state.lock:
            state.running_since, state.overrun_counted = started, False
        error: Optional[str] = None
        try:
            if not state.started:
                collector.start()
                state.started = True
            collector.update()
        except Exception as err:
            error = describe(err)
        duration = time.monotonic() - started
        with state.lock:
            was_ok, previous_error = state.ok, state.last_error
            state.running_since = None
            state.runs += 1
            state.last_run_time, state.last_duration = started_wall, duration
            state.ok = error is None
            if error is not None:
                # A run that overran was already counted by the watchdog.
                if not state.overrun_counted:
                    state.errors_total += 1
                state.last_error, state.last_error_time = error, time.time()
        # Log each kind of failure once, and the recovery, not every interval.
        if error is not None and (was_ok or error != previous_error or state.runs == 1):
            log.error("collector %s is down: %s", state.name, error)
        elif error is None and not was_ok and state.runs > 1:
            log.info("collector %s is up again", state.name)

    def _loop(self, collector: Collector, state: CollectorState, stop: threading.Event) -> None:
        # A small random delay first, so collectors started together do not fire together.
        if stop.wait(random.uniform(0, min(0.2, state.interval / 10))):
            return
        while True:
            began = time.monotonic()
            self.run_once(collector, state)
            wait = state.interval * random.uniform(1 - JITTER, 1 + JITTER) - (time.monotonic() - began)
            if stop.wait(max(0.0, wait)):
                return
