"""Service metrics from the Whisper server's own logs, for every request.

Each `logs.files[]` entry is a path or glob followed like `tail -F`
(logfiles/follow.py) and a parser (logfiles/parse.py: json, regex or a
preset). update() reads all new complete lines and folds each request record
into the exporter's shared request metrics (runtime/requests.py), which the
runtime renders; this collector renders only its own self-metrics. No I/O at
scrape. A new log format is a preset in logfiles/parse.py.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.config import Duration, KeyPath, one_of, positive, warning
from whisper_exporter.logfiles import parse as logparse
from whisper_exporter.logfiles.parse import LineError
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.runtime.requests import Labels, RequestMetrics
from whisper_exporter.runtime.seeds import seed_requests
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.whisper import hallucination
from whisper_exporter.whisper.languages import language_code

if TYPE_CHECKING:  # the follower (and bz2, gzip, lzma for rotated files) is imported when a log is followed
    from whisper_exporter.logfiles.follow import Follower

log = logging.getLogger("whisper_exporter.logs")


@dataclass
class LogField:
    """Where a record field is in a log line: a dotted JSON path or a regex group, and its unit."""

    field: str = ""
    unit: str = "s"  # s | ms | us, for durations

    def check(self, at: KeyPath) -> None:
        one_of(at, "unit", self.unit, tuple(logparse.UNITS))


@dataclass
class LogFile:
    path: str = ""  # a file or a glob; required
    format: str = "json"  # json | regex | a preset (see whisper_exporter/logfiles/parse.py PRESETS)
    pattern: Union[str, list[str], None] = None  # format regex: Python regular expression(s) with named groups
    # record field -> log field; overrides the format's defaults per field, null drops one
    fields: dict[str, Union[str, LogField, None]] = dataclass_field(default_factory=dict)

    def check(self, at: KeyPath) -> None:
        if not self.path:
            raise at.error("path", "a file or glob to follow")
        one_of(at, "format", self.format, tuple(logparse.FORMATS))
        if self.format == "regex" and not self.pattern:
            raise at.error("pattern", "a regular expression with named groups (format regex)")
        for name in self.fields:
            if name not in logparse.RECORD_FIELDS:
                raise at.error(f"fields.{name}", "a record field (one of " + ", ".join(logparse.RECORD_FIELDS) + ")")
        try:
            logparse.make_parser(self.format, self.pattern, self.fields)
        except ValueError as err:
            about_pattern = self.format == "regex" and any(w in str(err) for w in ("pattern", "regular", "group"))
            raise at.error("pattern" if about_pattern else "fields", f"a usable {self.format} setting, but: {err}") from None


@dataclass
class LogsConfig:
    enabled: bool = False
    interval: Duration = Duration(1)  # how often the files are polled
    timeout: Duration = Duration(10)
    start_at: str = "end"  # end | beginning: where files present at start-up are read from
    files: list[LogFile] = dataclass_field(default_factory=list)
    # Allowed label values; anything else is counted as "other". null: the built-in sets.
    endpoints: Optional[list[str]] = None
    status_codes: Optional[list[int]] = None
    languages: Optional[list[str]] = None
    max_series: int = 5000  # endpoint x status x language combinations of whisper_requests_total
    max_line_bytes: int = 1048576  # longer lines are skipped and counted
    # A file matched by a glob may be a link anywhere (/etc/shadow): refuse links, or confine the
    # files read (their real paths, links resolved) to these directories. Kubernetes'
    # /var/log/containers/*.log are links into /var/log/pods: allowed_dirs [/var/log/pods].
    follow_symlinks: bool = True
    allowed_dirs: Optional[list[str]] = None

    def warnings(self, at: KeyPath, config: Any) -> list[str]:
        """Settings that do nothing: no files, or paths where nothing is (yet)."""
        if not self.files:
            return [warning(at, "files", "the logs collector is enabled with no files: it does nothing "
                                         "(list files, or set enabled: false)")]
        return [warning(at, f"files[{i}].path", f"{f.path}: nothing there (yet): no request metrics from it "
                                                 "until it appears")
                for i, f in enumerate(self.files) if not glob.glob(os.path.expanduser(f.path))]

    def check(self, at: KeyPath) -> None:
        one_of(at, "start_at", self.start_at, ("end", "beginning"))
        for i, folder in enumerate(self.allowed_dirs or ()):
            if not os.path.isabs(os.path.expanduser(folder)):
                raise at.error(f"allowed_dirs[{i}]", "an absolute directory path", folder)
        if self.allowed_dirs is not None:
            roots = [os.path.join(os.path.realpath(os.path.expanduser(d)), "") for d in self.allowed_dirs]
            for i, entry in enumerate(self.files):
                where = os.path.realpath(os.path.dirname(os.path.abspath(os.path.expanduser(entry.path))))
                if not any(os.path.join(where, "").startswith(r) for r in roots):
                    raise at.error(f"files[{i}].path", "a path inside one of allowed_dirs", entry.path)
        positive(at, "max_series", self.max_series, "a number greater than 0")
        positive(at, "max_line_bytes", self.max_line_bytes, "a number greater than 0")
        for i, path in enumerate(self.endpoints or ()):
            if not path.startswith("/"):
                raise at.error(f"endpoints[{i}]", "a path starting with /", path)
        for i, code in enumerate(self.status_codes or ()):
            if not 100 <= code <= 599:
                raise at.error(f"status_codes[{i}]", "an HTTP status code from 100 to 599", code)
        for i, name in enumerate(self.languages or ()):
            if language_code(name) is None:
                raise at.error(f"languages[{i}]", "a Whisper language code or name (en, english, yue)", name)

LOG_EVERY = 60.0  # seconds between two warnings about bad lines of one kind in one file


class _Source:
    """One configured path: its follower, parser and per-path counters."""

    def __init__(self, label: str, parser: Any, follower: Follower, format: str = ""):
        self.label = label
        self.parser = parser
        self.format = format or parser.kind  # json, regex or a preset's name, for the status page
        self.follower = follower
        self.ignored = 0  # lines that parsed but are not about a request
        self.errors = {reason: 0 for reason in logparse.REASONS}
        self.logged_at: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}


class LogsCollector:
    name = "logs"

    def __init__(self, section: LogsConfig, requests: Optional[RequestMetrics] = None, sampler: Any = None,
                 hallucinations: Optional[HallucinationCounters] = None,
                 budget: Optional[hallucination.CpuBudget] = None):
        self.section = section
        self.sampler = sampler  # production sampling into the review queue (sampling.ProductionSampler)
        self.hallucinations = hallucinations  # transcripts in the log are checked for text nobody said
        self.budget = budget or hallucination.CpuBudget()
        if hallucinations is not None:
            hallucination.default_bag()  # built now, not charged to the first line's budget
        # The request metrics this collector feeds (shared with the tap); its lock guards them.
        self.requests = requests or RequestMetrics(
            Labels(section.endpoints, section.status_codes, section.languages), section.max_series)
        self.owns_requests = requests is None  # standalone (tests, benchmarks): render them here
        self._lock = self.requests.lock
        self.sources: list[_Source] = []
        start_at_end = section.start_at != "beginning"
        for entry in section.files:
            self.sources.append(self._follow(entry, start_at_end))
        # Files present now are "present at start": they begin at their end. Files that
        # appear later begin at 0. (The scheduler's first update may come a moment later.)
        for source in self.sources:
            source.follower.poll(deadline=time.monotonic())
        self.status = self._describe()

    def _follow(self, entry: LogFile, start_at_end: bool) -> _Source:
        """One configured path: its parser, and a follower that feeds its lines to this collector."""
        def on_lines(lines: list[bytes]) -> None:
            self.feed(source, lines)

        def on_error(reason: str, sample: bytes) -> None:
            self._bad_line(source, reason, sample, locked=False)

        from whisper_exporter.logfiles.follow import Follower

        parser = logparse.make_parser(entry.format, entry.pattern, entry.fields)
        follower = Follower(entry.path, on_lines=on_lines, on_error=on_error, start_at_end=start_at_end,
                            max_line_bytes=self.section.max_line_bytes,
                            follow_symlinks=self.section.follow_symlinks, allowed_dirs=self.section.allowed_dirs)
        source = _Source(entry.path, parser, follower, format=entry.format)
        return source

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
        # Called with the shared metrics' lock held (feed()).
        lang = self.requests.observe_locked(record)
        if lang is None:  # the exporter's own probe or quality request: not user traffic
            return
        if record.transcript is not None and self.hallucinations is not None and not record.error:
            # Within a CPU budget: a replayed backlog must not cost the log path 5x (docs/hallucination.md).
            reasons = self.budget.run(hallucination.suspect, record.transcript, lang, record.audio_duration)
            if reasons is not None:  # None: skipped over budget, and not counted as checked
                self.hallucinations.count(lang, "traffic", reasons, record.transcript)
        if record.transcript is not None and record.audio_path and self.sampler is not None and not record.error and (
                record.status_code is None or str(record.status_code).lstrip().startswith("2")):
            self.sampler.offer(record.audio_path, record.transcript, lang, record.audio_duration)

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
        # The line itself is never quoted: a glob can match a file that is not a log (a key file,
        # /etc/shadow), and its first bad line would be a secret copied into our own log.
        log.warning("log %s: skipped a bad line (%s, %d bytes)%s", source.label, reason, len(line), also)

    # -- exposition -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "errors": {s.label: dict(s.errors) for s in self.sources},
                "ignored": {s.label: s.ignored for s in self.sources},
            }

    def families(self) -> Iterable[Metric]:
        snap = self.snapshot()
        if self.owns_requests:
            yield from self.requests.families()
        yield from self._self_metrics(snap)

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
        yield from (lines, ignored, errors, read_bytes, rotations, read_errors, files, last, since)

    def _describe(self) -> str:
        parts = []
        for s in self.sources:
            f = s.follower
            state = f"{f.open_files} file(s)" if f.open_files else "no file yet"
            kind = s.format if s.format in ("json", "regex") else f"{s.format} preset"
            parts.append(f"{s.label} ({kind}): {state}, {f.lines} lines")
        return "; ".join(parts) or "no files configured"


def declares(entry: Any, name: str) -> bool:
    """Whether a logs.files[] entry says where record field `name` is: a preset's field, the
    entry's `fields` mapping, or a named group of its pattern (a plain json format only may)."""
    preset = logparse.PRESETS.get(entry.format)
    if preset is not None:
        return any(field == name for field, _ in preset.fields)
    if entry.fields and name in entry.fields:
        return True
    patterns = [entry.pattern] if isinstance(entry.pattern, str) else list(entry.pattern or [])
    return entry.format == "regex" and any(f"(?P<{name}>" in p for p in patterns)


def make(section: LogsConfig, shared: Shared) -> LogsCollector:
    requests = shared.use_requests()
    collector = LogsCollector(section, requests=requests, sampler=shared.production_sampler(),
                              hallucinations=shared.use_hallucinations())
    # A log whose format names inference times measures the server's busy time when no tap does
    # (docs/capacity.md): those counters, and the audio beside them, start at 0 (else the first
    # batch of audio was invisible to rate() beside a busy time counted from 0: capacity 1% low).
    # A log that only may carry them (plain json) says nothing of them: "not measured", not 0.
    timed = [entry for entry in section.files if declares(entry, "inference")]
    requests.log_timings = bool(timed)
    seed_requests(requests, shared.config, audio=any(declares(entry, "audio_duration") for entry in timed))
    return collector


PLUGIN = Plugin("logs", LogsConfig, make, "request metrics from the Whisper server's log files")
