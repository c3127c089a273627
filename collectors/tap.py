"""Request metrics from the tap (whisper_exporter/tap): real traffic through a reverse proxy.

The tap hands one TapRecord per request to `observe()`, which folds it into the
exporter's shared request metrics (runtime/requests.py: the names, labels and
buckets the log collector feeds) and renders the tap-only ones itself. Real-time
factor here is end-to-end time / audio duration. Canary requests (marked by the
probe and quality collectors) go only to whisper_canary_requests_seen_total{source="tap"}.
Every transcript is checked for hallucination (source="traffic"); with
`sample_dir` set, a fraction of requests is kept for review (docs/tap.md).

With the tap on, it is the one source of the request counts and durations: the
log collector then feeds only what the tap cannot see (queue wait, inference time).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from whisper_exporter.config import config_dir, masked_url, resolve_path
from whisper_exporter.logfiles.parse import Record
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.runtime.requests import LATENCY_BUCKETS, Labels, RequestMetrics, _Hist
from whisper_exporter.runtime.seeds import seed_requests
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.tap import TapConfig, TapRecord
from whisper_exporter.tap.record import ANALYSIS_REASONS, CLIENT_REASONS, DROP_REASONS, UPSTREAM_REASONS, TapStats
from whisper_exporter.tap.streaming import (
    ERROR_TYPES,
    HISTOGRAMS,
    OPENAI,
    PROTOCOLS,
    UPGRADE_RESULTS,
    WHISPERLIVE,
    Hist,
)
from whisper_exporter.web.connections import ConnectionStats
from whisper_exporter.whisper import hallucination, language_id

if TYPE_CHECKING:  # the sampling module is imported only for a tap that keeps samples
    from whisper_exporter.quality.sampling import AudioKeeper, ProductionSampler

log = logging.getLogger("whisper_exporter.tap")


def to_log_record(record: TapRecord) -> Record:
    """The tap's record in the shape the request metrics take. Audio counts (seconds processed,
    real-time factor) only for answered requests: a failed one processed none."""
    answered = record.status is not None and 200 <= record.status < 300 and record.error is None
    return Record(record.endpoint, record.status, record.language, record.duration, None, None,
                  record.audio_duration if answered else None, record.model, record.error,
                  record.audio_path, record.transcript)


def by_reason(name: str, documentation: str, reasons: Iterable[str], counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with a sample for every reason in `reasons` (0 where `counts` has none)."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason in reasons:
        family.add_metric([reason], counts.get(reason, 0))
    return family


@dataclass
class TapTotals:
    """The whisper_tap_* counters across the reloads that rebuild the tap (a new collector, a new Tap),
    kept in the shared state: none goes down, and what a replaced tap counts while it drains is exported."""

    stats: TapStats = field(default_factory=TapStats)  # every tap's, shared: a retired one's drain counts on
    ttfb: dict[str, _Hist] = field(default_factory=dict)  # by endpoint label, under `lock`
    # A tap's own parts (connections, memory budget) are per tap, for their gauges; their counters
    # are added in here once the tap has stopped (its loop has ended, so they no longer move).
    closed: dict[str, int] = field(default_factory=dict)
    accept_errors: int = 0
    refused: int = 0
    streams: dict[str, Any] = field(default_factory=dict)  # the stopped taps' StreamStats, summed (no in_flight)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TapCollector:
    name = "tap"

    def __init__(self, section: TapConfig, upstream: str, requests: Optional[RequestMetrics] = None,
                 hallucinations: Optional[HallucinationCounters] = None,
                 sampler: Optional[ProductionSampler] = None, keeper: Optional[AudioKeeper] = None,
                 totals: Optional[TapTotals] = None):
        from whisper_exporter.tap import Tap

        self.section = section
        # Shared with the log collector in the exporter; standalone (tests) it renders its own.
        self.owns_requests = requests is None
        self.requests = requests or RequestMetrics(Labels(None, None, None))
        self.hallucinations = hallucinations
        self.sampler, self.keeper = sampler, keeper
        self._lock = threading.Lock()
        # A reload's predecessor's totals (the shared state's), so its counters carry on.
        self.totals = totals if totals is not None else TapTotals()
        self.ttfb = self.totals.ttfb  # by endpoint label, under totals.lock
        self._folded = False  # this tap's connection and budget counters are in the totals now
        self._cells: dict[int, tuple[str, str]] = {}  # id(record) -> its sampling cell, drawn in wants_audio
        self.tap = Tap(section, upstream, on_record=self.observe,
                       wants_audio=self.wants_audio if sampler is not None and keeper is not None else None,
                       occupancy=self.requests.occupancy, stats=self.totals.stats)
        self.status = f"proxying {section.listen} -> {masked_url(upstream)}"
        streams = self.tap.streams
        streams.on_final = self.stream_final  # in the tap's worker thread
        streams.on_canary = lambda: self.requests.canary_seen("tap")  # a marked session: no user metric
        streams.on_spoofed = lambda: self.requests.spoofed_seen("tap")  # a false mark: user traffic, counted

    def start(self) -> None:
        try:
            self.tap.start()
        except OSError as err:  # aiohttp's text repeats the address; the key is what to fix
            why = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
            raise OSError(f"cannot listen on {self.section.listen} (collectors.tap.listen): {why}") from err
        host = self.section.listen_address[0]
        host = f"[{host}]" if ":" in host else host
        # Said once per start, as the metrics port's address is: where clients must now send requests.
        log.info("tap listening on http://%s:%s, proxying to %s", host, self.tap.port, masked_url(self.tap.upstream))
        if self.tap.spool_problem:  # logged by the tap; shown on the status page too
            self.status += f"; {self.tap.spool_problem}"

    def update(self) -> None:
        if self.keeper is not None:
            self.keeper.expire()  # the retention limit holds even while no sample is drawn

    def stop(self) -> None:
        self.tap.stop()  # the exporter's exit: records still queued are dropped (docs/tap.md)
        self._fold()

    def stop_for_reload(self) -> None:
        """Replaced by a reload: the tap's queued records are still analysed, for a bounded time
        (counted in the shared stats, which the next tap exports)."""
        self.tap.retire()
        self._fold()

    def _fold(self) -> None:
        """The stopped tap's connection and memory budget counters into the totals, once: the next
        tap's (which start at 0) are exported on top of them."""
        totals, connections = self.totals, self.tap.connections
        with totals.lock:
            if self._folded:
                return
            self._folded = True
            for reason, n in connections.closed.items():
                totals.closed[reason] = totals.closed.get(reason, 0) + n
            totals.accept_errors += connections.accept_errors
            totals.refused += self.tap.budget.refused
            totals.streams = _add_streams(totals.streams, self.tap.streams.snapshot())

    def _connections(self) -> tuple[ConnectionStats, int]:
        """The connection metrics with the stopped taps' counters added, and the budget's refusals."""
        totals, own = self.totals, self.tap.connections
        view = ConnectionStats(own.limit, own.prefix, own.what, (), own.limit_help)
        view.open = own.open
        with totals.lock:  # read with the flag: a tap folded is not counted twice
            mine = not self._folded
            reasons = dict.fromkeys([*own.closed, *totals.closed], 0)
            view.closed = {r: totals.closed.get(r, 0) + (own.closed.get(r, 0) if mine else 0) for r in reasons}
            view.accept_errors = totals.accept_errors + (own.accept_errors if mine else 0)
            refused = totals.refused + (self.tap.budget.refused if mine else 0)
        return view, refused

    @staticmethod
    def _eligible(record: TapRecord) -> bool:
        return (not record.canary and record.error is None and record.transcript is not None
                and record.status is not None and 200 <= record.status < 300)

    def wants_audio(self, record: TapRecord) -> bool:
        """The sampling draw, on the tap's loop before the spooled upload is discarded."""
        if self.sampler is None or not self._eligible(record):
            return False
        language = self.requests.labels.language(record.language)
        cell = self.sampler.draw(language, record.audio_duration)
        if cell is None:
            return False
        with self._lock:
            self._cells[id(record)] = cell
        return True

    def observe(self, record: TapRecord) -> None:
        if record.canary:
            # Kept out of user traffic; its audio is the server's work all the same (capacity).
            self.requests.canary_seen("tap", audio=to_log_record(record).audio_duration)
            return
        if record.canary_spoofed:  # a client's claim to be the canary: user traffic, and counted
            self.requests.spoofed_seen("tap")
        with self.requests.lock:
            lang = self.requests.observe_locked(to_log_record(record), "tap")
            endpoint = self.requests.labels.endpoint(record.endpoint)
        if record.ttfb is not None:
            with self.totals.lock:
                hist = self.ttfb.get(endpoint)
                if hist is None:
                    hist = self.ttfb[endpoint] = _Hist(LATENCY_BUCKETS)
                hist.observe(record.ttfb)
        if self.hallucinations is not None and self._eligible(record) and record.transcript is not None:
            reasons = hallucination.suspect(record.transcript, record.language, record.audio_duration,
                                            hallucination.segments_from_answer({"segments": record.segments}))
            self.hallucinations.count(lang or record.language, "traffic", reasons, record.transcript)
        with self._lock:
            cell = self._cells.pop(id(record), None)
        if cell is not None and record.audio_path and self.keeper is not None and self.sampler is not None:
            suffix = os.path.splitext(record.audio_path)[1] or ".audio"
            kept = self.keeper.keep(record.audio_path, suffix)  # the keeper names it (uniquely)
            if kept is not None and record.transcript is not None:
                detected = language_id.detected_label(record.detected_language) if record.detected_language else None
                self.sampler.queue_item(cell, kept, record.transcript, record.audio_duration, detected)

    def stream_final(self, text: str, language: Optional[str], audio: Optional[float]) -> None:
        """A streaming session's final transcript (a completed turn, a WhisperLive session's segments)."""
        if self.hallucinations is not None:
            reasons = hallucination.suspect(text, language, audio)
            self.hallucinations.count(self.requests.labels.language(language), "traffic", reasons, text)

    def _streams(self) -> dict[str, Any]:
        """This tap's streaming figures with the stopped taps' counts added (in flight: this tap's)."""
        own = self.tap.streams.snapshot()
        with self.totals.lock:  # read with the flag: a tap folded is not counted twice
            view = _add_streams(self.totals.streams, {} if self._folded else own)
        view["in_flight"] = own["in_flight"]
        return view

    def families(self) -> Iterable[Metric]:
        yield from stream_families(self._streams())
        if self.owns_requests:
            yield from self.requests.families()
        with self.totals.lock:
            ttfb = {k: h.copy() for k, h in self.ttfb.items()}
        stats = self.tap.stats.snapshot()
        connections, refused = self._connections()
        yield GaugeMetricFamily("whisper_tap_requests_in_flight", "Requests passing through the tap now.",
                                value=stats["in_flight"])
        hist = HistogramMetricFamily(
            "whisper_tap_time_to_first_byte_seconds",
            "Time from a request's arrival at the tap to the first byte of the server's answer body.",
            labels=["endpoint"])
        for endpoint, h in sorted(ttfb.items()):
            hist.add_metric([endpoint], h.buckets(), h.sum)
        yield hist
        yield by_reason(
            "whisper_tap_upstream_errors_total",
            "Requests the Whisper server failed at the transport level, by reason (connect, timeout, "
            "closed, protocol); the client got 502/504 or a cut answer.",
            UPSTREAM_REASONS, stats["errors"])
        yield by_reason(
            "whisper_tap_client_errors_total",
            "Requests the client abandoned (client_gone), stalled mid-upload (client_timeout), uploaded too slowly "
            "(upload_too_slow: under upload_min_rate after the grace, or past upload_timeout; 408), or sent with a "
            "target that is not origin-form (bad_target: CONNECT, http://host/, host:port, *; refused with 400).",
            CLIENT_REASONS, stats["errors"])
        yield by_reason(
            "whisper_tap_analysis_errors_total",
            "Requests the tap proxied but could not analyse, by reason (multipart: malformed upload, "
            "audio: no readable audio header, too_large, answer, internal, callback, spool: the upload could not be "
            "written to spool_dir, too_many_parts, audio_work: the audio header took too much work, upgrade: a "
            "verbose_json answer too large to render as json, passed as it came).",
            ANALYSIS_REASONS, stats["analysis_errors"])
        yield by_reason(
            "whisper_tap_records_dropped_total",
            "Requests proxied whose record was dropped unanalysed and is missing from the request metrics: the "
            "record queue was full (queue_full, collectors.tap.record_queue) or the tap stopped (shutdown: "
            "on exit, or a reload's drain ran out of time); stream_check_queue_full, stream_check_shutdown: no request "
            "but a WebSocket stream's final transcript left unchecked for hallucination, the queue being full or "
            "the tap stopping.",
            DROP_REASONS, stats["dropped"])
        budget = self.tap.budget
        yield GaugeMetricFamily("whisper_tap_memory_in_use_bytes",
                                "Bytes of uploads and upgraded answers the tap holds in memory now.",
                                value=budget.in_use)
        yield GaugeMetricFamily("whisper_tap_memory_budget_bytes",
                                "The most bytes of uploads and upgraded answers the tap holds in memory "
                                "(collectors.tap.memory_budget); beyond, uploads are spooled to disk.",
                                value=budget.limit)
        yield CounterMetricFamily("whisper_tap_memory_budget_refused_total",
                                  "Uploads spooled to disk (or upgraded answers passed as they came) because the "
                                  "memory budget was spent.", value=refused)
        yield CounterMetricFamily(
            "whisper_tap_audio_duration_mismatches_total",
            "WAV uploads whose header claimed more audio than the bytes received hold; the bytes' "
            "duration was counted.", value=stats["duration_mismatches"])
        yield from connections.collect()  # whisper_tap_connections*, whisper_tap_accept_errors_total
        yield CounterMetricFamily("whisper_tap_request_bytes_total", "Request body bytes passed to the server.",
                                  value=stats["request_bytes"])
        yield CounterMetricFamily("whisper_tap_response_bytes_total", "Answer body bytes passed to clients.",
                                  value=stats["response_bytes"])
        if self.keeper is not None:
            kept = CounterMetricFamily("whisper_tap_samples_kept_total",
                                       "Uploads kept for review (production sampling from the tap).")
            kept.add_metric([], self.keeper.kept_total)
            yield kept
            dropped = CounterMetricFamily(
                "whisper_tap_samples_dropped_total",
                "Drawn uploads not kept: full (sample_max_files or sample_max_bytes reached), write_error.",
                labels=["reason"])
            for reason, n in sorted(self.keeper.dropped.items()):
                dropped.add_metric([reason], n)
            yield dropped


STREAM_HISTOGRAMS = (  # StreamStats' name, metric, help
    ("duration", "whisper_stream_session_duration_seconds", "WebSocket sessions' length, handshake to close."),
    ("ready", "whisper_stream_ready_seconds",
     "Time to the server's ready: OpenAI Realtime session.created after the handshake, WhisperLive SERVER_READY "
     "after the client's options."),
    ("first_partial", "whisper_stream_first_partial_seconds",
     "Time from a turn's first audio (WhisperLive: the session's) to its first partial transcript (a delta; "
     "a completed transcript when the server sends no delta)."),
    ("finalisation", "whisper_stream_finalisation_lag_seconds",
     "Time from the end of a turn (the client's commit, or the server's speech_stopped) to its completed "
     "transcript."),
    ("transcript_lag", "whisper_stream_transcript_lag_seconds",
     "Audio sent minus the end of the last completed segment, at each transcript message (WhisperLive): it "
     "grows when the server falls behind."),
    ("partials", "whisper_stream_partials_per_turn",
     "Partial transcripts per turn (OpenAI Realtime deltas; WhisperLive segment messages per session)."),
)
# The protocols a figure is known for before any session (the rest appear with their first value):
# every session has a duration; ready, partials and lags are the recognised protocols'; transcript
# lag is WhisperLive's alone.
HISTOGRAM_PROTOCOLS = {
    "ready": (OPENAI, WHISPERLIVE), "first_partial": (OPENAI, WHISPERLIVE), "finalisation": (OPENAI, WHISPERLIVE),
    "partials": (OPENAI, WHISPERLIVE), "transcript_lag": (WHISPERLIVE,),
}
STREAM_COUNTERS = (
    ("audio_seconds", "whisper_stream_audio_seconds", "Seconds of audio the clients sent (appended or streamed)."),
    ("turns", "whisper_stream_turns", "Turns committed (OpenAI Realtime input_audio_buffer.committed)."),
    ("disconnects", "whisper_stream_server_disconnects", "Sessions the server ended with DISCONNECT (WhisperLive)."),
    ("unparsed", "whisper_stream_messages_unparsed",
     "Messages too large to parse (over 256 KiB) or unreadable; passed on unchanged all the same."),
)


def _add_streams(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two StreamStats snapshots' counters and histograms, summed into a new one (in_flight left out)."""
    out: dict[str, Any] = {}
    for key in ("sessions", "counters", "errors", "rejections", "upgrades", "messages", "message_bytes"):
        x, y = a.get(key, {}), b.get(key, {})
        out[key] = {k: x.get(k, 0) + y.get(k, 0) for k in {*x, *y}}
    hists: dict[Any, Hist] = {k: h.copy() for k, h in a.get("hists", {}).items()}
    for k, h in b.get("hists", {}).items():
        if k not in hists:
            hists[k] = h.copy()
            continue
        mine = hists[k]
        mine.counts = [m + n for m, n in zip(mine.counts, h.counts)]
        mine.sum += h.sum
    out["hists"] = hists
    out["in_flight"] = {}
    return out


def _cumulative(h: Hist) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(h.bounds, h.counts):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + h.counts[-1]))
    return out


def stream_families(snap: dict) -> Iterable[Metric]:
    """The whisper_stream_* families: the same names, labels and buckets for every protocol, each
    protocol's series exported at 0 before its first session."""
    inflight = GaugeMetricFamily("whisper_stream_sessions_in_flight",
                                 "WebSocket sessions through the tap now, by protocol (other until recognised).",
                                 labels=["protocol"])
    for protocol in PROTOCOLS:
        inflight.add_metric([protocol], snap["in_flight"].get(protocol, 0))
    yield inflight
    sessions = CounterMetricFamily(
        "whisper_stream_sessions", "WebSocket sessions ended, by protocol, close code (as the closing side sent "
        "it; 1006: without a close frame, never sent on) and who closed (client, server, tap: idle, size, stop).",
        labels=["protocol", "close_code", "closed_by"])
    for (protocol, code, by), n in sorted(snap["sessions"].items()):
        sessions.add_metric([protocol, code, by], n)
    yield sessions
    for name, metric, text in STREAM_HISTOGRAMS:
        hist = HistogramMetricFamily(metric, text, labels=["protocol"])
        for protocol in PROTOCOLS:
            h = snap["hists"].get((name, protocol))
            if h is None and protocol in HISTOGRAM_PROTOCOLS.get(name, PROTOCOLS):
                h = Hist(HISTOGRAMS[name])  # at 0 before the first session: rate() then sees the first one
            if h is not None:
                hist.add_metric([protocol], _cumulative(h), h.sum)
        yield hist
    for name, metric, text in STREAM_COUNTERS:
        counter = CounterMetricFamily(metric, text, labels=["protocol"])
        for protocol in PROTOCOLS:
            counter.add_metric([protocol], snap["counters"].get((name, protocol), 0.0))
        yield counter
    errors = CounterMetricFamily(
        "whisper_stream_errors", "Error events by protocol and type (OpenAI Realtime error.type, "
        "transcription_failed, response_failed; WhisperLive server_error).", labels=["protocol", "type"])
    for key, n in sorted(snap["errors"].items()):
        errors.add_metric(list(key), n)
    for kind in ERROR_TYPES:
        if (PROTOCOLS[0], kind) not in snap["errors"]:
            errors.add_metric([PROTOCOLS[0], kind], 0)
    yield errors
    rejections = CounterMetricFamily("whisper_stream_rejections", "Sessions the server turned away (WhisperLive "
                                     "WAIT: all its clients busy).", labels=["protocol", "reason"])
    rejections.add_metric(["whisperlive", "wait"], snap["rejections"].get(("whisperlive", "wait"), 0))
    yield rejections
    upgrades = CounterMetricFamily(
        "whisper_stream_upgrades", "WebSocket handshakes at the tap: accepted, refused (the upstream's status "
        "went to the client), upstream_error (502/504), bad_request (400).", labels=["result"])
    for result in UPGRADE_RESULTS:
        upgrades.add_metric([result], snap["upgrades"].get(result, 0))
    yield upgrades
    messages = CounterMetricFamily("whisper_stream_messages", "WebSocket messages relayed, by direction "
                                   "(upstream: client to server).", labels=["direction"])
    size = CounterMetricFamily("whisper_stream_message_bytes", "Payload bytes of the WebSocket messages relayed.",
                               labels=["direction"])
    for direction in ("upstream", "downstream"):
        messages.add_metric([direction], snap["messages"].get(direction, 0))
        size.add_metric([direction], snap["message_bytes"].get(direction, 0))
    yield messages
    yield size


def make(section: TapConfig, shared: Shared) -> TapCollector:
    config = shared.config
    sampler, keeper = None, None
    folder = resolve_path(section.sample_dir, config_dir(config.source))
    if folder:
        from whisper_exporter.quality.sampling import AudioKeeper

        sampler = shared.production_sampler()  # TapConfig.check: the review queue is configured
        keeper = AudioKeeper(folder, section.sample_max_files, section.sample_max_bytes, section.sample_retention)
    requests = shared.use_requests()
    requests.tap_on = True  # the tap is the one source of request counts (docs/tap.md)
    seed_requests(requests, config, audio=True)  # the tap measures every request's audio
    # The totals carry on across reloads that build the tap anew (docs/tap.md, Reloads).
    totals = shared.carried.setdefault("tap", TapTotals())
    return TapCollector(section, section.upstream or config.service.url, requests=requests,
                        hallucinations=shared.use_hallucinations(), sampler=sampler, keeper=keeper,
                        totals=totals)


PLUGIN = Plugin("tap", TapConfig, make, "a reverse proxy in front of the server: real traffic's latency, RTF, language")
