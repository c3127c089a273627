"""Request metrics from the tap (whisper_exporter/tap): real traffic through a reverse proxy.

Thin: the tap hands one TapRecord per request to `observe()`, which folds it into
the same request metrics as the log collector (same names, labels, buckets: the
folding is the log collector's own, reused) plus the tap-only ones. Real-time factor
here is end-to-end time / audio duration. Canary requests (marked by the probe and
quality collectors) go only to whisper_canary_requests_seen_total{source="tap"}.
"""
from __future__ import annotations

import threading
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from collectors.logs import LATENCY_BUCKETS, LogsCollector, _Hist
from whisper_exporter.collector import register
from whisper_exporter.config import Config, LogsConfig
from whisper_exporter.logparse import Record
from whisper_exporter.tap import TapConfig, TapRecord
from whisper_exporter.tap.record import ANALYSIS_REASONS, CLIENT_REASONS, UPSTREAM_REASONS

# The request families the log collector renders, which the tap feeds too.
REQUEST_FAMILIES = ("whisper_requests_total", "whisper_request_duration_seconds", "whisper_audio_duration_seconds",
                    "whisper_audio_processed_seconds_total", "whisper_realtime_factor")


def to_log_record(record: TapRecord) -> Record:
    """The tap's record in the shape the request metrics take (logparse.Record). Audio counts
    (seconds processed, real-time factor) only for answered requests: a failed one processed none."""
    answered = record.status is not None and 200 <= record.status < 300 and record.error is None
    return Record(record.endpoint, record.status, record.language, record.duration, None, None,
                  record.audio_duration if answered else None, record.model, record.error,
                  record.audio_path, record.transcript)


class TapCollector:
    name = "tap"

    def __init__(self, section: TapConfig, upstream: str):
        from whisper_exporter.tap import Tap

        self.section = section
        # The log collector's folding (labels, caps, buckets), with no files of its own.
        self.requests = LogsCollector(LogsConfig())
        self._lock = threading.Lock()
        self.ttfb: dict[str, _Hist] = {}  # by endpoint label
        self.canaries = 0
        self.tap = Tap(section, upstream, on_record=self.observe)
        self.status = f"proxying {section.listen} -> {upstream}"

    def start(self) -> None:
        self.tap.start()

    def update(self) -> None:
        pass  # the tap pushes records; nothing to poll

    def stop(self) -> None:
        self.tap.stop()

    def observe(self, record: TapRecord) -> None:
        if record.canary:
            with self._lock:
                self.canaries += 1
            return
        agg = self.requests
        with agg._lock:
            agg._observe(to_log_record(record))
            endpoint = agg.labels.endpoint(record.endpoint)
        if record.ttfb is not None:
            with self._lock:
                hist = self.ttfb.get(endpoint)
                if hist is None:
                    hist = self.ttfb[endpoint] = _Hist(LATENCY_BUCKETS)
                hist.observe(record.ttfb)

    def families(self) -> Iterable[Metric]:
        for family in self.requests.families():
            if family.name in REQUEST_FAMILIES or family.name + "_total" in REQUEST_FAMILIES:
                yield family
        with self._lock:
            ttfb = {k: h.copy() for k, h in self.ttfb.items()}
            canaries = self.canaries
        stats = self.tap.stats.snapshot()
        yield GaugeMetricFamily("whisper_tap_requests_in_flight", "Requests passing through the tap now.",
                                value=stats["in_flight"])
        hist = HistogramMetricFamily(
            "whisper_tap_time_to_first_byte_seconds",
            "Time from a request's arrival at the tap to the first byte of the server's answer body.",
            labels=["endpoint"])
        for endpoint, h in sorted(ttfb.items()):
            hist.add_metric([endpoint], h.buckets(), h.sum)
        yield hist
        errors = CounterMetricFamily(
            "whisper_tap_upstream_errors_total",
            "Requests the Whisper server failed at the transport level, by reason (connect, timeout, "
            "closed, protocol); the client got 502/504 or a cut answer.", labels=["reason"])
        for reason in UPSTREAM_REASONS:
            errors.add_metric([reason], stats["errors"].get(reason, 0))
        yield errors
        client = CounterMetricFamily(
            "whisper_tap_client_errors_total",
            "Requests the client abandoned (client_gone) or stalled mid-upload (client_timeout).",
            labels=["reason"])
        for reason in CLIENT_REASONS:
            client.add_metric([reason], stats["errors"].get(reason, 0))
        yield client
        analysis = CounterMetricFamily(
            "whisper_tap_analysis_errors_total",
            "Requests the tap proxied but could not analyse, by reason (multipart: malformed upload, "
            "audio: no readable audio header, too_large, answer, internal, callback).", labels=["reason"])
        for reason in ANALYSIS_REASONS:
            analysis.add_metric([reason], stats["analysis_errors"].get(reason, 0))
        yield analysis
        yield CounterMetricFamily("whisper_tap_request_bytes_total", "Request body bytes passed to the server.",
                                  value=stats["request_bytes"])
        yield CounterMetricFamily("whisper_tap_response_bytes_total", "Answer body bytes passed to clients.",
                                  value=stats["response_bytes"])
        canary = CounterMetricFamily(
            "whisper_canary_requests_seen_total",
            "The exporter's own marked requests (probe, quality) seen in the traffic, kept out of "
            "the user-traffic metrics.", labels=["source"])
        canary.add_metric(["tap"], canaries)
        yield canary


@register("tap")
def make(section: TapConfig, config: Config) -> TapCollector:
    return TapCollector(section, section.upstream or config.service.url)
