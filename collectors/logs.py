"""Service metrics from the Whisper server's own logs, for every request.

Each `logs.files[]` entry is a path or glob followed like `tail -F`
(whisper_exporter/follow.py) and a parser (whisper_exporter/logparse.py: json,
regex or a preset). update() reads all new complete lines and folds each
request record into counters and histogram bucket arrays held under one lock;
families() only copies them out at scrape time. No I/O at scrape.

Labels taken from the log (endpoint, status code, language) have bounded value
sets (configured, or built in); anything else is counted under `other` and the
folding itself in whisper_exporter_log_label_folded_total{label}. Caches of
raw value -> label are capped, so a flood of random values keeps memory flat.

Real-time factor is processing time / audio duration (smaller is faster):
processing time is the line's `inference` duration when it has one, else its
end-to-end `duration`.
"""
from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from typing import Any, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from whisper_exporter import logparse
from whisper_exporter.collector import register
from whisper_exporter.config import Config, LogsConfig
from whisper_exporter.follow import Follower
from whisper_exporter.logparse import OTHER, UNKNOWN, LineError

log = logging.getLogger("whisper_exporter.logs")

# Buckets, in seconds: ASR latency runs from tens of milliseconds to minutes. 1.5 s and
# 3 s are the write-up's thresholds (10 s clip end to end; p95 alert).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # 200 ms threshold
AUDIO_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0)  # 0.8 threshold

CACHE_MAX = 4096  # raw value -> label entries kept per label; beyond, labels are computed each time
LOG_EVERY = 60.0  # seconds between two warnings about bad lines of one kind in one file
SAMPLE_CHARS = 120  # of a bad line, in the warning


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
        out, total = [], 0
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


class _Source:
    """One configured path: its follower, parser and per-path counters."""

    def __init__(self, label: str, parser: Any, follower: Optional[Follower] = None):
        self.label = label
        self.parser = parser
        self.follower = follower
        self.ignored = 0  # lines that parsed but are not about a request
        self.errors = {reason: 0 for reason in logparse.REASONS}
        self.logged_at: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}


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
                code = logparse.language_code(name)
                if code is None:
                    raise ValueError(f"not a Whisper language: {name!r}")
                self.languages.add(code)
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
            if raw.strip().lower() in logparse._NO_LANGUAGE:
                label = UNKNOWN
            else:
                code = logparse.language_code(raw)
                label = code if code is not None and code in self.languages else OTHER
            if len(self._language_cache) < CACHE_MAX:
                self._language_cache[raw] = label
        if label is OTHER:
            self.folded["language"] += 1
        return label


class LogsCollector:
    name = "logs"

    def __init__(self, section: LogsConfig, sampler: Any = None):
        self.section = section
        self.sampler = sampler  # production sampling into the review queue (sampling.ProductionSampler)
        self.labels = Labels(section.endpoints, section.status_codes, section.languages)
        self.max_series = section.max_series
        self._lock = threading.Lock()
        # Aggregated state, under _lock.
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, _Hist] = {}  # by endpoint
        self.queue = _Hist(QUEUE_BUCKETS)
        self.by_language: dict[str, _Language] = {}
        self.sources: list[_Source] = []
        start_at_end = section.start_at != "beginning"
        for entry in section.files:
            parser = logparse.make_parser(entry.format, entry.pattern, entry.fields)
            source = _Source(entry.path, parser)
            source.follower = Follower(
                entry.path,
                on_lines=lambda lines, s=source: self.feed(s, lines),
                on_error=lambda reason, sample, s=source: self._bad_line(s, reason, sample, locked=False),
                start_at_end=start_at_end,
                max_line_bytes=section.max_line_bytes,
            )
            self.sources.append(source)
        # Files present now are "present at start": they begin at their end. Files that
        # appear later begin at 0. (The scheduler's first update may come a moment later.)
        for source in self.sources:
            source.follower.poll(deadline=time.monotonic())
        self.status = self._describe()

    # -- the collector interface ---------------------------------------------

    def start(self) -> None:
        pass

    def update(self) -> None:
        deadline = time.monotonic() + max(0.2, self.section.timeout * 0.5)
        for source in self.sources:
            source.follower.poll(deadline)
        self.status = self._describe()

    def stop(self) -> None:
        for source in self.sources:
            source.follower.close()

    # -- parsing and aggregation --------------------------------------------

    def feed(self, source: _Source, lines: list[bytes]) -> None:
        """Parse and count a batch of complete lines from `source`."""
        parse = source.parser.parse
        observe = self._observe
        with self._lock:
            for line in lines:
                try:
                    record = parse(line)
                except LineError as err:
                    self._bad_line(source, err.reason, line, locked=True)
                    continue
                if record is None:
                    source.ignored += 1
                    continue
                observe(record)

    def _observe(self, record: logparse.Record) -> None:
        endpoint, status, language, duration, queue, inference, audio, _model, error, audio_path, text = record
        labels = self.labels
        lang = labels.language(language)
        if text is not None and audio_path and self.sampler is not None and not error and (
                status is None or str(status).lstrip().startswith("2")):
            self.sampler.offer(audio_path, text, lang, audio)
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

    def _bad_line(self, source: _Source, reason: str, line: bytes, locked: bool) -> None:
        if locked:
            source.errors[reason] = source.errors.get(reason, 0) + 1
        else:
            with self._lock:
                source.errors[reason] = source.errors.get(reason, 0) + 1
        now = time.monotonic()
        last = source.logged_at.get(reason)
        if last is not None and now - last < LOG_EVERY:
            source.unlogged[reason] = source.unlogged.get(reason, 0) + 1
            return
        source.logged_at[reason] = now
        more = source.unlogged.pop(reason, 0)
        also = f" ({more} more since the last report)" if more else ""
        sample = line[:SAMPLE_CHARS].decode("utf-8", "backslashreplace")
        log.warning("log %s: skipped a bad line (%s)%s, e.g. %r", source.label, reason, also, sample)

    # -- exposition -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "durations": {k: h.copy() for k, h in self.durations.items()},
                "queue": self.queue.copy(),
                "by_language": {k: v.copy() for k, v in self.by_language.items()},
                "folded": dict(self.labels.folded),
                "errors": {s.label: dict(s.errors) for s in self.sources},
                "ignored": {s.label: s.ignored for s in self.sources},
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
        for lang, stats in sorted(snap["by_language"].items()):
            if sum(stats.inference.counts):
                inference.add_metric([lang], stats.inference.buckets(), stats.inference.sum)
            if sum(stats.audio.counts):
                audio.add_metric([lang], stats.audio.buckets(), stats.audio.sum)
                processed.add_metric([lang], stats.processed)
            if sum(stats.rtf.counts):
                rtf.add_metric([lang], stats.rtf.buckets(), stats.rtf.sum)
        yield from (inference, audio, processed, rtf)

        yield from self._self_metrics(snap)
        if self.sampler is not None:
            yield from self.sampler.families()

    def _self_metrics(self, snap: dict[str, Any]) -> Iterable[Metric]:
        lines = CounterMetricFamily("whisper_exporter_log_lines_total",
                                    "Complete lines read from the log (good, ignored and bad).", labels=["path"])
        ignored = CounterMetricFamily("whisper_exporter_log_lines_ignored_total",
                                      "Lines read that are not about a request (startup messages, other "
                                      "log lines) and were skipped.", labels=["path"])
        errors = CounterMetricFamily("whisper_exporter_log_parse_errors_total",
                                     "Bad lines skipped, by reason.", labels=["path", "reason"])
        read_bytes = CounterMetricFamily("whisper_exporter_log_read_bytes_total",
                                         "Bytes read from the log.", labels=["path"])
        rotations = CounterMetricFamily("whisper_exporter_log_rotations_total",
                                        "Rotations seen: a new file at the path (rename and create, delete "
                                        "and re-create) or a truncation (copytruncate).", labels=["path"])
        read_errors = CounterMetricFamily("whisper_exporter_log_read_errors_total",
                                          "Errors reading the log (permission denied, ...), by errno; "
                                          "retried at every poll.", labels=["path", "reason"])
        files = GaugeMetricFamily("whisper_exporter_log_files",
                                  "Files open for the path (0: the file is not there).", labels=["path"])
        last = GaugeMetricFamily("whisper_exporter_log_last_line_timestamp_seconds",
                                 "Unix time of the last complete line read from the path.", labels=["path"])
        since = GaugeMetricFamily("whisper_exporter_log_seconds_since_last_line",
                                  "Seconds since the last complete line was read from the path (since "
                                  "following began, when none yet); a stalled log shows here.",
                                  labels=["path"])
        now = time.time()
        for source in self.sources:
            f = source.follower
            path = source.label
            lines.add_metric([path], f.lines)
            ignored.add_metric([path], snap["ignored"][path])
            errs = snap["errors"][path]
            for reason in logparse.REASONS:
                errors.add_metric([path, reason], errs.get(reason, 0))
            read_bytes.add_metric([path], f.bytes)
            rotations.add_metric([path], f.rotations)
            for reason, n in sorted(dict(f.read_errors).items()):  # a copy: the poller may add a key
                read_errors.add_metric([path, reason], n)
            files.add_metric([path], f.open_files)
            if f.last_line_wall is not None:
                last.add_metric([path], f.last_line_wall)
            since.add_metric([path], max(0.0, now - (f.last_line_wall or f.started_wall)))
        folded = CounterMetricFamily(
            "whisper_exporter_log_label_folded_total",
            "Values outside a label's allowed set, counted under 'other' (series: label combinations "
            "beyond max_series).", labels=["label"])
        for label, n in snap["folded"].items():
            folded.add_metric([label], n)
        yield from (lines, ignored, errors, read_bytes, rotations, read_errors, files, last, since, folded)

    def _describe(self) -> str:
        parts = []
        for s in self.sources:
            f = s.follower
            state = f"{f.open_files} file(s)" if f.open_files else "no file yet"
            parts.append(f"{s.label} ({s.parser.kind}): {state}, {f.lines} lines")
        return "; ".join(parts) or "no files configured"


@register("logs")
def make(section: LogsConfig, config: Config) -> LogsCollector:
    from whisper_exporter.sampling import production_sampler

    return LogsCollector(section, sampler=production_sampler(config))
