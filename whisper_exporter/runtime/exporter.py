"""The one prometheus_client custom Collector: collector state -> metric families, at scrape time.

prometheus_client does not isolate collectors (one raising `collect()` turns
the scrape into HTTP 500), so each collector's families are materialised here
inside its own try/except, and a failure shows in
`whisper_exporter_collector_up`, never as a failed scrape.
"""
from __future__ import annotations

import logging
import platform
import threading
import time
from typing import Iterable, Optional, Union

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter import __version__
from whisper_exporter.runtime.scheduler import Scheduler, describe

log = logging.getLogger("whisper_exporter.runtime.exporter")


class ReloadStatus:
    """The outcome of the last configuration reload (SIGHUP, POST /-/reload), as Prometheus exports its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.successful = True  # the configuration loaded at start-up counts as a success
        self.success_time = time.time()

    def record(self, ok: bool) -> None:
        with self._lock:
            self.successful = ok
            if ok:
                self.success_time = time.time()

    def families(self) -> Iterable[Metric]:
        with self._lock:
            ok, when = self.successful, self.success_time
        yield GaugeMetricFamily(
            "whisper_exporter_config_last_reload_successful",
            "1 when the last configuration reload succeeded (or none was tried), 0 when it was refused.",
            value=1.0 if ok else 0.0,
        )
        yield GaugeMetricFamily(
            "whisper_exporter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start-up or reload).",
            value=when,
        )


class ExporterCollector:
    def __init__(self, scheduler: Scheduler, reloads: Optional[ReloadStatus] = None):
        self.scheduler = scheduler  # replaced on reload
        self.reloads = reloads

    def collect(self) -> Iterable[Metric]:
        scheduler = self.scheduler  # one scheduler per scrape, whatever a reload does meanwhile
        up = GaugeMetricFamily(
            "whisper_exporter_collector_up",
            "1 when the collector's last run succeeded and no run is overdue, else 0.",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            "whisper_exporter_collector_duration_seconds",
            "How long the collector's last finished run took.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "whisper_exporter_collector_errors_total",
            "Failed runs of the collector (errors, timeouts, and failures to render its metrics).",
            labels=["collector"],
        )
        last_run = GaugeMetricFamily(
            "whisper_exporter_collector_last_run_timestamp_seconds",
            "Unix time at which the collector's last finished run began.",
            labels=["collector"],
        )
        for collector, state in scheduler.entries:
            is_up = state.up()
            # A wedged run would leave stale readings behind: show none until it returns.
            if state.started and state.overrun() is None:
                try:
                    yield from list(collector.families())
                except Exception as err:
                    is_up = False
                    state.record_error(f"rendering metrics failed: {describe(err)}")
                    log.exception("collector %s: rendering metrics failed", state.name)
            up.add_metric([state.name], 1.0 if is_up else 0.0)
            if state.last_duration is not None:
                duration.add_metric([state.name], state.last_duration)
            if state.last_run_time is not None:
                last_run.add_metric([state.name], state.last_run_time)
            errors.add_metric([state.name], float(state.errors_total))
        if scheduler.shared is not None:
            # Fed by several collectors, rendered once here, whatever state each feeder is in.
            try:
                yield from list(scheduler.shared.families())
            except Exception:
                log.exception("rendering the shared metrics failed")
        build = GaugeMetricFamily(
            "whisper_exporter_build_info",
            "Always 1; the labels say which whisper-exporter build is running.",
            labels=["version", "python_version"],
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield from (up, duration, errors, last_run, build)
        if self.reloads is not None:
            yield from self.reloads.families()


def make_registry(scheduler: Union[Scheduler, ExporterCollector]) -> CollectorRegistry:
    """A fresh registry (the default one calls collect() at registration) with the
    exporter's collector and prometheus_client's own process_* and python_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(scheduler if isinstance(scheduler, ExporterCollector) else ExporterCollector(scheduler))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
