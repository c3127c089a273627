"""Request metrics of real traffic, shared by every source that sees requests (logs, the tap).

One `RequestMetrics` per exporter, built in the wiring and rendered once by the
runtime, so `whisper_requests_total` and its histograms are one family however
many sources feed them. Sources hand over `Record`s (logfiles/parse.py); all
state sits under one lock and `families()` only copies it out.

Labels taken from input (endpoint, status code, language) have bounded value
sets (configured, or built in); anything else is counted under `other` and the
folding itself in whisper_exporter_log_label_folded_total{label}. Caches of
raw value -> label are capped, so a flood of random values keeps memory flat.

Real-time factor is processing time / audio duration (smaller is faster):
processing time is the record's `inference` duration when it has one, else its
end-to-end `duration`.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any, Iterable, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from whisper_exporter.logfiles import parse as logparse
from whisper_exporter.logfiles.parse import OTHER, UNKNOWN
from whisper_exporter.runtime.occupancy import Occupancy
from whisper_exporter.whisper import marker

CANARY_MARK = marker.QUERY + "="

# Buckets, in seconds: ASR latency runs from tens of milliseconds to minutes. 1.5 s and
# 3 s are the write-up's thresholds (10 s clip end to end; p95 alert).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # 200 ms threshold
AUDIO_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0)  # 0.8 threshold

CACHE_MAX = 4096  # raw value -> label entries kept per label; beyond, labels are computed each time


class _Hist:
    """Bucket counts (not cumulative; the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "_Hist":
        h = _Hist.__new__(_Hist)
        h.bounds, h.counts, h.sum = self.bounds, list(self.counts), self.sum
        return h

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class _Language:
    """Everything kept per language label."""

    __slots__ = ("inference", "audio", "rtf", "processed")

    def __init__(self) -> None:
        self.inference = _Hist(LATENCY_BUCKETS)
        self.audio = _Hist(AUDIO_BUCKETS)
        self.rtf = _Hist(RTF_BUCKETS)
        self.processed = 0.0

    def copy(self) -> "_Language":
        c = _Language.__new__(_Language)
        c.inference, c.audio, c.rtf, c.processed = (
            self.inference.copy(), self.audio.copy(), self.rtf.copy(), self.processed)
        return c


class Labels:
    """Raw values from log lines -> bounded label values, with the folding counted."""

    def __init__(self, endpoints: Optional[list[str]], status_codes: Optional[list[int]],
                 languages: Optional[list[str]]):
        eps = logparse.DEFAULT_ENDPOINTS if endpoints is None else endpoints
        self.endpoints = {logparse.normalize_endpoint(e): logparse.normalize_endpoint(e) for e in eps}
        codes = logparse.DEFAULT_STATUS_CODES if status_codes is None else status_codes
        self.status: dict[Any, str] = {}
        for code in codes:
            self.status[int(code)] = str(int(code))
            self.status[str(int(code))] = str(int(code))
        if languages is None:
            self.languages = set(logparse.WHISPER_LANGUAGES)
        else:
            self.languages = set()
            for name in languages:
                found = logparse.language_code(name)
                if found is None:
                    raise ValueError(f"not a Whisper language: {name!r}")
                self.languages.add(found)
        self.folded = {"endpoint": 0, "status_code": 0, "language": 0, "series": 0}
        self._endpoint_cache: dict[str, str] = {}
        self._language_cache: dict[str, str] = {}

    def endpoint(self, raw: Optional[str]) -> str:
        if raw is None:
            return UNKNOWN
        label = self._endpoint_cache.get(raw)
        if label is None:
            label = self.endpoints.get(logparse.normalize_endpoint(raw), OTHER)
            if len(self._endpoint_cache) < CACHE_MAX:
                self._endpoint_cache[raw] = label
        if label is OTHER:
            self.folded["endpoint"] += 1
        return label

    def status_code(self, raw: Any, error: Any) -> str:
        if raw is None:
            return "error" if error else UNKNOWN
        label = self.status.get(raw)
        if label is None:
            if type(raw) is str:  # "200 OK", " 200"
                head = raw.strip().split(" ", 1)[0]
                label = self.status.get(head)
            if label is None:
                self.folded["status_code"] += 1
                label = OTHER
        return label

    def language(self, raw: Optional[str]) -> str:
        if raw is None:
            return UNKNOWN
        label = self._language_cache.get(raw)
        if label is None:
            if raw.strip().lower() in logparse.NO_LANGUAGE:
                label = UNKNOWN
            else:
                code = logparse.language_code(raw)
                label = code if code is not None and code in self.languages else OTHER
            if len(self._language_cache) < CACHE_MAX:
                self._language_cache[raw] = label
        if label is OTHER:
            self.folded["language"] += 1
        return label


class RequestMetrics:
    """Counters and histograms of requests, by bounded labels."""

    def __init__(self, labels: Optional[Labels] = None, max_series: int = 5000):
        self.labels = labels or Labels(None, None, None)
        self.max_series = max_series
        self.lock = threading.Lock()
        self.in_use = False  # set by the wiring when a source feeds it; unused metrics are not rendered
        # With the tap on, it alone feeds counts, durations and audio (a request that passed it is in
        # the server's log too); the log still feeds what only the server knows: queue wait, inference.
        self.tap_on = False
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, _Hist] = {}  # by endpoint
        self.queue = _Hist(QUEUE_BUCKETS)
        self.by_language: dict[str, _Language] = {}
        self.seeded_languages: set[str] = set()  # audio families rendered at 0 before any request
        self.canaries: dict[str, int] = {}  # source -> the exporter's own requests seen
        self.canary_audio = 0.0  # audio seconds of the canaries the tap saw answered (docs/capacity.md)
        self.spoofed: dict[str, int] = {}  # source -> requests marked as canaries without the token
        # Busy time and requests in flight, fed by the tap (only it sees when a request starts);
        # here so that they carry on over a reload as the request counts do (docs/capacity.md).
        self.occupancy = Occupancy()
        self.max_concurrency: Optional[int] = None  # service.max_concurrency, exported when set
        # Without the tap, a log that records each request's inference time is the source of the
        # same counters (docs/capacity.md): set by the logs collector when one of its formats has it.
        self.log_timings = False
        self.log_busy = 0.0  # inference seconds logged: busy time of a one-at-a-time server
        self.log_in_flight = 0.0  # queue wait + inference seconds logged: request-seconds held

    def seed(self, endpoints: Iterable[str], status_codes: Iterable[int], languages: Iterable[str],
             audio: bool = False) -> None:
        """Export these series at 0 before their first request (runtime/seeds.py picks them)."""
        # Prometheus takes a new series' first sample as its baseline: the first 502 of a series
        # that appears with it is invisible to rate() and increase().
        labels = self.labels
        with self.lock:
            eps = [e for e in (labels.endpoints.get(logparse.normalize_endpoint(x)) for x in endpoints) if e]
            codes = [labels.status[int(c)] for c in status_codes if int(c) in labels.status]
            langs = [lang for lang in languages if lang == UNKNOWN or lang in labels.languages]
            for ep in eps:
                self.durations.setdefault(ep, _Hist(LATENCY_BUCKETS))
                for code in codes:
                    for lang in langs:
                        if len(self.requests) < self.max_series:
                            self.requests.setdefault((ep, code, lang), 0)
            if audio:
                for lang in langs:
                    self.by_language.setdefault(lang, _Language())
                    self.seeded_languages.add(lang)

    def observe_all(self, records: Sequence[logparse.Record]) -> None:
        """Count a batch of records under one lock."""
        if not records:
            return
        with self.lock:
            for record in records:
                self.observe_locked(record)

    def observe(self, record: logparse.Record) -> None:
        with self.lock:
            self.observe_locked(record)

    def canary_seen(self, source: str, n: int = 1, audio: Optional[float] = None) -> None:
        """The exporter's own (marked) requests seen by `source`: kept out of user traffic. `audio`:
        the seconds of one answered, which the capacity rules count as the server's work."""
        with self.lock:
            self.canaries[source] = self.canaries.get(source, 0) + n
            if audio is not None:
                self.canary_audio += audio

    def spoofed_seen(self, source: str) -> None:
        """A request marked as the exporter's own without its token (counted as user traffic too)."""
        with self.lock:
            self.spoofed[source] = self.spoofed.get(source, 0) + 1

    def observe_locked(self, record: logparse.Record, source: str = "log") -> Optional[str]:
        """Count one record; the caller holds `lock`. Returns the record's language label, or None
        for the exporter's own request.

        A record of the exporter's own marked request (its path carries the canary query marker,
        as uvicorn's access log prints it) is counted in whisper_canary_requests_seen_total only."""
        endpoint, status, language, duration, queue, inference, audio = record[:7]
        if endpoint is not None and CANARY_MARK in endpoint:
            # Only this process's token makes a request the exporter's own (whisper/marker.py);
            # a mark without it is a client's claim: user traffic, and counted as spoofed.
            if marker.classify_target(endpoint) == marker.GENUINE:
                self.canaries[source] = self.canaries.get(source, 0) + 1
                return None
            self.spoofed[source] = self.spoofed.get(source, 0) + 1
        if self.tap_on and source == "log":
            endpoint = status = duration = audio = None  # counted by the tap (docs/tap.md)
        elif source == "log" and inference is not None and inference >= 0:
            # Counted when the line is read, in one step (the tap counts as a request goes).
            self.log_busy += inference
            self.log_in_flight += inference + (queue if queue is not None and queue > 0 else 0.0)
        error = record.error
        labels = self.labels
        lang = labels.language(language)
        if endpoint is not None or status is not None:
            ep = labels.endpoint(endpoint)
            key = (ep, labels.status_code(status, error), lang)
            n = self.requests.get(key)
            if n is None:
                if len(self.requests) >= self.max_series:
                    labels.folded["series"] += 1
                    key = (OTHER, OTHER, OTHER)
                n = self.requests.get(key, 0)
            self.requests[key] = n + 1
        else:
            ep = None
        if duration is not None:
            if ep is None:
                ep = labels.endpoint(endpoint)
            hist = self.durations.get(ep)
            if hist is None:
                hist = self.durations[ep] = _Hist(LATENCY_BUCKETS)
            hist.observe(duration)
        if queue is not None:
            self.queue.observe(queue)
        if inference is not None or audio is not None:
            stats = self.by_language.get(lang)
            if stats is None:
                stats = self.by_language[lang] = _Language()
            if inference is not None:
                stats.inference.observe(inference)
            if audio is not None:
                stats.audio.observe(audio)
                stats.processed += audio
                processing = inference if inference is not None else duration
                if processing is not None and audio > 0:
                    stats.rtf.observe(processing / audio)

        return lang

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": dict(self.requests),
                "durations": {k: h.copy() for k, h in self.durations.items()},
                "queue": self.queue.copy(),
                "by_language": {k: v.copy() for k, v in self.by_language.items()},
                "folded": dict(self.labels.folded),
                "canaries": dict(self.canaries),
                "spoofed": dict(self.spoofed),
                "seeded_languages": set(self.seeded_languages),
            }

    def families(self) -> Iterable[Metric]:
        snap = self.snapshot()
        requests = CounterMetricFamily(
            "whisper_requests_total",
            "Requests the Whisper server logged, by endpoint, status code and language "
            "(unknown: the line did not say; other: a value outside the allowed set).",
            labels=["endpoint", "status_code", "language"])
        for key, n in sorted(snap["requests"].items()):
            requests.add_metric(list(key), n)
        yield requests

        duration = HistogramMetricFamily(
            "whisper_request_duration_seconds", "End-to-end request time, as the server logged it.",
            labels=["endpoint"])
        for ep, h in sorted(snap["durations"].items()):
            duration.add_metric([ep], h.buckets(), h.sum)
        yield duration

        queue = HistogramMetricFamily(
            "whisper_queue_wait_seconds", "Time requests waited for a worker, as the server logged it.")
        if sum(snap["queue"].counts):
            queue.add_metric([], snap["queue"].buckets(), snap["queue"].sum)
        yield queue

        inference = HistogramMetricFamily(
            "whisper_inference_duration_seconds", "Time spent transcribing, as the server logged it.",
            labels=["language"])
        audio = HistogramMetricFamily(
            "whisper_audio_duration_seconds", "Length of the audio of each request.", labels=["language"])
        rtf = HistogramMetricFamily(
            "whisper_realtime_factor",
            "Processing time divided by audio duration (inference time when logged, else end-to-end "
            "time); below 1 keeps up with real time.", labels=["language"])
        processed = CounterMetricFamily(
            "whisper_audio_processed_seconds_total", "Seconds of audio the server processed.",
            labels=["language"])
        seeded = snap["seeded_languages"]
        for lang, stats in sorted(snap["by_language"].items()):
            if sum(stats.inference.counts):
                inference.add_metric([lang], stats.inference.buckets(), stats.inference.sum)
            if sum(stats.audio.counts) or lang in seeded:
                audio.add_metric([lang], stats.audio.buckets(), stats.audio.sum)
                processed.add_metric([lang], stats.processed)
            if sum(stats.rtf.counts) or lang in seeded:
                rtf.add_metric([lang], stats.rtf.buckets(), stats.rtf.sum)
        yield from (inference, audio, processed, rtf)

        folded = CounterMetricFamily(
            "whisper_exporter_log_label_folded_total",
            "Values outside a label's allowed set, counted under 'other' (series: label combinations "
            "beyond max_series).", labels=["label"])
        for label, n in snap["folded"].items():
            folded.add_metric([label], n)
        yield folded
        canaries = CounterMetricFamily(
            "whisper_canary_requests_seen_total",
            "The exporter's own probe and quality requests seen in the server's log or by the tap, "
            "kept out of whisper_requests_total.", labels=["source"])
        for source, n in sorted(snap["canaries"].items()):
            canaries.add_metric([source], n)
        yield canaries
        spoofed = CounterMetricFamily(
            "whisper_canary_requests_spoofed_total",
            "Requests marked as the exporter's own without its token, seen in the server's log or by "
            "the tap: counted as user traffic too.", labels=["source"])
        for source, n in sorted(snap["spoofed"].items()):
            spoofed.add_metric([source], n)
        yield spoofed
        if self.tap_on or self.log_timings:
            yield from self.capacity_families()

    def capacity_families(self) -> Iterable[Metric]:
        """The busy and in-flight counters, from 0 while the tap runs (read up to this scrape), or
        else from a log with inference times (counted as each line is read)."""
        busy: Optional[float]
        if self.tap_on:
            busy, integral = self.occupancy.totals()
            source = "seen by the tap"
        else:
            with self.lock:
                busy, integral = self.log_busy, self.log_in_flight
            source = "from the inference times in the server's log"
            if self.max_concurrency is not None and self.max_concurrency > 1:
                busy = None  # requests processed together overlap: their sum is not the busy time
        with self.lock:
            canary_audio = self.canary_audio
        if busy is not None:
            yield CounterMetricFamily(
                "whisper_server_busy_seconds_total",
                f"Seconds during which the server held at least one whole transcription request (upload's last byte to answer's end), {source}.",
                value=busy)
        yield CounterMetricFamily(
            "whisper_requests_in_flight_seconds_total",
            f"The integral over time of transcription requests the server held, {source} (request-seconds).",
            value=integral)
        yield CounterMetricFamily(
            "whisper_canary_audio_processed_seconds_total",
            "Audio seconds of the exporter's own canaries answered through the tap: the server's work, kept "
            "out of whisper_audio_processed_seconds_total (user traffic); the capacity rules add it back.",
            value=canary_audio)
        if self.max_concurrency is not None:
            yield GaugeMetricFamily(
                "whisper_server_max_concurrency",
                "Requests the server processes together at full throughput (service.max_concurrency).",
                value=self.max_concurrency)
