"""The canary probe: known audio sent to the Whisper server's real HTTP API, on a schedule.

Each scheduled run sends every canary once, one after another (so probes of
one target never pile up), and keeps, per canary, the latest result and a ring
of the last probes with their times. What a scrape sees is that latest result:

- `whisper_probe_success`, `whisper_probe_duration_seconds` (request sent to
  answer read; until the failure when it failed), `whisper_probe_http_status_code`
  (0 without an answer) and `whisper_probe_last_run_timestamp_seconds`: always,
  failures included (the blackbox_exporter habit);
- `whisper_probe_realtime_factor` (duration / the audio's duration from its
  header), `whisper_probe_word_error_rate` (WER, or CER for languages scored in
  characters): when a transcript came back;
- from verbose_json segments, the worst segment of the transcript:
  `whisper_probe_avg_logprob` (lowest), `whisper_probe_compression_ratio`
  (highest), `whisper_probe_no_speech_prob` (highest), and
  `whisper_probe_fallback_segments` (segments decoded at temperature > 0, i.e.
  after Whisper's own checks failed); each left out when the server does not
  report it (whisper.cpp has no compression ratio, vLLM no no_speech_prob);
- `whisper_probe_runs_total{result}`: success, http_error, timeout,
  connection_error, bad_response, wrong_transcript (error rate above
  `max_error_rate`).

Scores also count into the shared `whisper_quality_*` families with
set="canary". With `language: detect` or `both` the speech canaries also
count into `whisper_quality_language_identified_total{set="canary"}`: detect
sends them without a language (everything above from that answer), both sends
each once more without it, for the identification alone. A failed probe is a result, not a collector failure; the
collector is down only when it cannot probe at all (an unreadable canary file,
an API key that cannot be read).
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from dataclasses import field as dataclass_field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.config import (
    Config,
    Duration,
    KeyPath,
    config_dir,
    one_of,
    resolve_path,
)
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.runtime.language_id_counters import LanguageIdCounters
from whisper_exporter.runtime.quality_counters import QualityCounters
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.whisper import audio, clients, language_id, scoring, utterance
from whisper_exporter.whisper.punctuation import Punctuation

if TYPE_CHECKING:
    from whisper_exporter.whisper.streaming_clients import StreamTimes

log = logging.getLogger(__name__)


@dataclass
class Canary:
    """One canary: audio with a known transcript, sent to the service as a user would."""

    audio: str = ""  # path; relative paths are relative to the config file's folder; required
    reference: Optional[str] = None  # what is said in it; required; "" for non-speech (a negative canary)
    language: str = "en"  # a Whisper language code; also picks the normaliser and the unit
    name: Optional[str] = None  # the `probe` label; default: the audio file's name without suffix

    def check(self, at: KeyPath) -> None:
        if not self.audio:
            raise at.error("audio", "the path of an audio file (WAV, FLAC, MP3, OGG)")
        if self.reference is None:
            raise at.error("reference", 'the text spoken in the audio ("" for non-speech: a negative canary)')
        if not re.fullmatch(r"[a-z]{2,3}", self.language):
            raise at.error("language", "a Whisper language code such as en, de, zh or yue", self.language)
        path = Path(resolve_path(self.audio, config_dir(at.source)) or "")
        try:
            audio.duration_seconds(path)
        except audio.AudioError as err:
            problem = str(err).removeprefix(f"{path}: ")
            raise at.error("audio", f"a readable audio file ({problem})", self.audio) from None


def tap_url(config: Config) -> str:
    """The base URL of the exporter's own request tap, as a client on this host reaches it."""
    host, port = config.collectors.tap.listen_address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening on all: loopback is one of them
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def canary_name(canary: Canary) -> str:
    return canary.name or Path(canary.audio).stem


@dataclass
class ProbeConfig:
    enabled: bool = True
    interval: Duration = Duration(60)
    timeout: Duration = Duration(30)  # for one canary's request (connect, answer, body)
    response_format: str = "verbose_json"  # json | verbose_json (openai and whispercpp APIs)
    max_error_rate: float = 0.5  # a transcript with a higher WER/CER counts as wrong_transcript
    canaries: list[Canary] = dataclass_field(default_factory=list)  # empty: the bundled English canary
    # Send the scheduled canaries through the request tap (collectors.tap.listen) instead of straight
    # to service.url: the path users take, so the canary also tests the tap, and the tap's
    # whisper_canary_requests_seen_total{source="tap"} shows it carries traffic. Needs the tap on.
    via_tap: bool = False
    # given: canaries carry their language; detect: speech canaries go without it and the server's
    # detected language is counted (whisper_quality_language_identified_total{set="canary"});
    # both: sent with it, then once more without it for the identification alone (twice the requests).
    language: str = language_id.GIVEN
    # Streaming APIs (service.api wyoming): audio seconds sent per second, 1.0 as a live speaker
    # would; 2.0 twice as fast; 0 as fast as the connection takes. The timeout covers the sending.
    pace: float = 1.0

    @property
    def run_timeout(self) -> float:
        """The scheduler's watchdog for one run of every canary, one after another.

        A request ends by its timeout (a total deadline, clients.py); the watchdog keeps the
        margin of three, plus reading the audio and scoring, for a machine that is slow."""
        return max(1, len(self.canaries)) * (3 * self.timeout + 1.0) + 5.0

    def reads(self, config: Config) -> object:
        """What else of the configuration the probe is built from (a reload that changes it
        rebuilds the probe): the tap's address, when the canaries go through it."""
        return tap_url(config) if self.via_tap else None

    def check(self, at: KeyPath) -> None:
        one_of(at, "response_format", self.response_format, ("json", "verbose_json"))
        one_of(at, "language", self.language, language_id.MODES)
        if self.language != language_id.GIVEN and self.response_format != "verbose_json":
            raise at.error("language", "given, or response_format verbose_json (a json answer names no language)",
                           self.language)
        if self.pace < 0:
            raise at.error("pace", "0 (unpaced) or more: audio seconds sent per second, 1.0 = real time", self.pace)
        if self.max_error_rate < 0:
            raise at.error("max_error_rate", "an error rate of 0 or more (0.5 = one error in two words)",
                           self.max_error_rate)
        names: dict[str, int] = {}
        for i, canary in enumerate(self.canaries):
            name = canary_name(canary)
            if name in names:
                raise at.error(f"canaries[{i}].name",
                               f"a name no other canary has (canaries[{names[name]}] is also {name!r})", name)
            names[name] = i

WRONG_TRANSCRIPT = "wrong_transcript"
HALLUCINATION = "hallucination"  # a negative canary (non-speech, expected "") answered with text
RESULTS = (clients.SUCCESS, clients.HTTP_ERROR, clients.TIMEOUT, clients.CONNECTION_ERROR,
           clients.BAD_RESPONSE, WRONG_TRANSCRIPT, HALLUCINATION)
HISTORY = 10  # probes kept per canary for the status page
MAX_TRANSCRIPT_CHARS = 2000  # a hallucination loop can be long
BUNDLED_NAME = "en-short"
BUNDLED_NEGATIVE = "silence"  # 4 s of digital silence: a server that writes text on it hallucinates
QUALITY_SET = "canary"


def bundled_canary() -> Canary:
    """The canary shipped in the package: espeak-ng speech, 4 s, 16 kHz mono WAV, English."""
    folder = resources.files("whisper_exporter") / "canary"
    return Canary(
        name=BUNDLED_NAME,
        audio=str(folder / "en.wav"),
        reference=(folder / "en.txt").read_text(encoding="utf-8").strip(),
        language="en",
    )


def bundled_negative_canary(kind: str = BUNDLED_NEGATIVE) -> Canary:
    """A non-speech canary shipped in the package (silence, noise or tone), expected transcript ""."""
    folder = resources.files("whisper_exporter") / "canary"
    return Canary(name=kind, audio=str(folder / f"{kind}.wav"), reference="", language="en")


@dataclass(frozen=True)
class ResolvedCanary:
    """A canary as the probe runs it: named, its audio path absolute, its reference set."""

    name: str
    audio: str
    reference: str  # "" for a negative canary (non-speech)
    language: str


def resolve_canaries(section: ProbeConfig, config: Optional[Config]) -> list[ResolvedCanary]:
    """The configured canaries (the bundled English and silent ones when none is), audio paths
    made absolute: relative paths are relative to the config file's folder."""
    canaries = section.canaries or [bundled_canary(), bundled_negative_canary()]
    base = config_dir(getattr(config, "source", ""))
    return [ResolvedCanary(name=canary_name(c), audio=resolve_path(c.audio, base) or c.audio,
                           reference=c.reference or "", language=c.language) for c in canaries]


@dataclass
class ProbeRecord:
    """One probe of one canary: what was measured and, when it failed, why."""

    canary: str
    started: float  # unix seconds
    result: str  # one of RESULTS
    duration: float  # seconds
    status_code: Optional[int]
    reason: str  # "" on success
    language: str
    unit: str
    audio_path: str
    audio_duration: float
    target: str  # the base URL probed (user info masked)
    api: str
    transcript: Optional[str] = None
    reference: str = ""
    score: Optional[scoring.Score] = None
    punctuation: Optional[Punctuation] = None  # the raw texts' marks (whisper/punctuation.py)
    suspects: tuple[str, ...] = ()  # hallucination reasons (whisper/hallucination.py)
    max_error_rate: float = 0.5
    segments: int = 0
    avg_logprob: Optional[float] = None  # lowest of the segments
    compression_ratio: Optional[float] = None  # highest of the segments
    no_speech_prob: Optional[float] = None  # highest of the segments
    fallback_segments: Optional[int] = None  # segments with temperature > 0
    server_language: Optional[str] = None
    server_duration: Optional[float] = None
    exchange: clients.Exchange = field(default_factory=clients.Exchange)
    detected: Optional[str] = None  # the language detected (a label) when the canary went without one
    stream: Optional["StreamTimes"] = None  # first partial and finalisation lag (streaming APIs)

    @property
    def success(self) -> bool:
        return self.result == clients.SUCCESS

    @property
    def error_rate(self) -> Optional[float]:
        return None if self.score is None else self.score.error_rate

    @property
    def realtime_factor(self) -> Optional[float]:
        if self.transcript is None or self.audio_duration <= 0:
            return None
        return self.duration / self.audio_duration

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_rate"] = self.error_rate
        data["realtime_factor"] = self.realtime_factor
        if self.score is not None:
            data["score"]["errors"] = self.score.errors
        if self.punctuation is not None:  # its substitution pairs are tuple keys: JSON needs a list
            data["punctuation"] = self.punctuation.to_dict()
        return data


def probe_canary(client: clients.WhisperClient, canary: ResolvedCanary, max_error_rate: float,
                 mode: str = language_id.GIVEN) -> ProbeRecord:
    """Probe one canary now. Raises audio.AudioError when its audio cannot be read;
    everything the server does becomes the record's result."""
    reference = canary.reference
    speech = bool(reference.strip())  # non-speech has no language to identify: always sent with one
    u = utterance.run(client, canary.audio, reference, canary.language, detect=speech and mode == language_id.DETECT)
    detected = None
    if speech and mode != language_id.GIVEN:
        d = u if mode == language_id.DETECT else utterance.run(client, canary.audio, reference, canary.language,
                                                                detect=True)
        detected = language_id.detected_label(d.server_language) if d.transcript is not None else None
    record = ProbeRecord(
        canary=canary.name, started=u.started, result=u.outcome, duration=u.elapsed,
        status_code=u.status_code, reason=u.reason, language=canary.language, unit=u.unit,
        audio_path=canary.audio, audio_duration=u.audio_duration or 0.0, target=client.url, api=client.api,
        reference=reference, max_error_rate=max_error_rate, exchange=u.exchange, detected=detected,
        stream=u.stream,
    )
    if u.transcript is None or u.score is None:
        return record
    record.suspects = u.suspects
    if not reference.strip():  # a negative canary: any text is text nobody said
        record.transcript = u.transcript.strip()[:MAX_TRANSCRIPT_CHARS]
        record.server_language, record.server_duration = u.server_language, u.server_duration
        if record.transcript:
            record.result = HALLUCINATION
            why = ", ".join(u.suspects) or "text"
            record.reason = f"non-speech answered with text ({why}): {record.transcript[:80]!r}"
        return record
    record.transcript = u.transcript.strip()[:MAX_TRANSCRIPT_CHARS]
    record.server_language, record.server_duration = u.server_language, u.server_duration
    record.score, record.punctuation = u.score, u.punctuation
    s = u.signals
    record.segments, record.avg_logprob, record.compression_ratio = s.segments, s.avg_logprob, s.compression_ratio
    record.no_speech_prob, record.fallback_segments = s.no_speech_prob, s.fallback_segments
    if record.score.error_rate > max_error_rate:
        record.result = WRONG_TRANSCRIPT
        record.reason = (f"{record.unit} error rate {record.score.error_rate:.3f} is above "
                         f"max_error_rate {max_error_rate:g}")
    return record


class ProbeCollector:
    name = "probe"

    def __init__(self, section: ProbeConfig, config: Config, url: Optional[str] = None,
                 quality: Optional[QualityCounters] = None,
                 hallucinations: Optional[HallucinationCounters] = None,
                 identified: Optional[LanguageIdCounters] = None):
        self.section = section
        self.config = config
        self.url = url or (tap_url(config) if section.via_tap else config.service.url)
        self.canaries = resolve_canaries(section, config)
        self.identified = identified or LanguageIdCounters()
        if section.language != language_id.GIVEN:
            for canary in self.canaries:
                if canary.reference.strip():  # the speech canaries' correct answers, at 0 before the first
                    self.identified.seed(canary.language, QUALITY_SET)
        # Shared counters are rendered by the runtime; standalone (the probe command) renders its own.
        self.owns_quality = quality is None
        self.quality = quality or QualityCounters()
        self.hallucinations = hallucinations or HallucinationCounters()
        for canary in self.canaries:
            if canary.reference.strip():  # a negative canary has no words to count
                self.quality.seed(canary.language, QUALITY_SET)
        self.status = "no probe yet"
        self.problems: list[str] = []  # canaries that could not be probed in the last run
        self._lock = threading.Lock()  # one run at a time: probes never pile up
        self._state_lock = threading.Lock()  # guards what families() and the page read
        self._latest: dict[str, ProbeRecord] = {}
        self._history: dict[str, deque[ProbeRecord]] = {c.name: deque(maxlen=HISTORY) for c in self.canaries}
        self._last_failure: dict[str, ProbeRecord] = {}
        self._runs: dict[str, dict[str, int]] = {c.name: dict.fromkeys(RESULTS, 0) for c in self.canaries}
        self.health: Any = None  # the last `describe` answer (wyoming.Health) where the API has one

    def client(self) -> clients.WhisperClient:
        return clients.make_client(self.config.service, url=self.url, timeout=self.section.timeout,
                                   response_format=self.section.response_format, pace=self.section.pace)

    def start(self) -> None:
        pass

    def update(self) -> None:
        with self._lock:
            client = self.client()  # reads the API key: a missing one marks the collector down
            describe = getattr(client, "describe", None)
            if describe is not None:  # Wyoming: the server's own health check, before the canaries
                health = describe()
                if self.health is None or self.health.up != health.up:
                    log.log(logging.INFO if health.up else logging.WARNING, "wyoming describe: %s",
                            "up" if health.up else f"down: {health.reason}")
                with self._state_lock:
                    self.health = health
            problems = []
            records = []
            for canary in self.canaries:
                try:
                    record = probe_canary(client, canary, self.section.max_error_rate, self.section.language)
                except audio.AudioError as err:
                    problems.append(f"canary {canary.name}: {err}")
                    continue
                records.append(record)
                self._store(record)
            self.quality.end_round(QUALITY_SET)
            self.problems = problems
            self.status = self._describe(records, problems)
            if problems:
                raise RuntimeError("; ".join(problems))

    def _store(self, record: ProbeRecord) -> None:
        negative = not record.reference.strip()
        if negative:
            pass  # no words to score against: the hallucination counters say how it went
        elif record.score is not None:
            self.quality.record(record.score, QUALITY_SET)
            if record.punctuation is not None:
                self.quality.record_punctuation(record.language, QUALITY_SET, record.punctuation)
        else:
            self.quality.record_failure(record.language, QUALITY_SET)
        if record.transcript is not None:
            self.hallucinations.count(record.language, "canary", record.suspects, record.transcript)
        if record.detected is not None:
            self.identified.count(record.language, record.detected, QUALITY_SET)
        with self._state_lock:
            previous = self._latest.get(record.canary)
            self._latest[record.canary] = record
            self._history[record.canary].appendleft(record)
            self._runs[record.canary][record.result] += 1
            if not record.success:
                self._last_failure[record.canary] = record
        # Log changes of result, not every probe.
        if previous is None or previous.result != record.result:
            level = logging.INFO if record.success else logging.WARNING
            log.log(level, "probe %s: %s%s", record.canary, record.result,
                    f": {record.reason}" if record.reason else f" in {record.duration:.3f}s")

    @staticmethod
    def _describe(records: list[ProbeRecord], problems: list[str]) -> str:
        parts = [f"{r.canary}: {r.result} in {r.duration:.2f}s" for r in records]
        return "; ".join(parts + problems) or "no canary"

    def recent_probes(self) -> dict[str, list[ProbeRecord]]:
        """Per canary, the last probes, newest first."""
        with self._state_lock:
            return {name: list(ring) for name, ring in self._history.items()}

    def last_failures(self) -> dict[str, ProbeRecord]:
        with self._state_lock:
            return dict(self._last_failure)

    def families(self) -> Iterable[Metric]:
        with self._state_lock:
            latest = dict(self._latest)
            runs = {name: dict(counts) for name, counts in self._runs.items()}
        now = time.time()
        stale_after = float(self.section.interval) + self.section.run_timeout  # a run may take that long
        label = ["probe"]
        success = GaugeMetricFamily("whisper_probe_success",
                                    "1 when the last scheduled canary probe succeeded, else 0.", labels=label)
        duration = GaugeMetricFamily("whisper_probe_duration_seconds",
                                     "Time from sending the canary to its transcript read (or to the failure), "
                                     "last scheduled run.", labels=label)
        status = GaugeMetricFamily("whisper_probe_http_status_code",
                                   "HTTP status of the last scheduled probe's answer; 0 when none came.", labels=label)
        last = GaugeMetricFamily("whisper_probe_last_run_timestamp_seconds",
                                 "Unix time at which the last scheduled probe of the canary began.", labels=label)
        rtf = GaugeMetricFamily("whisper_probe_realtime_factor",
                                "Probe duration divided by the canary audio's duration (smaller is faster), "
                                "last scheduled run.", labels=label)
        audio_len = GaugeMetricFamily("whisper_probe_audio_duration_seconds",
                                      "Duration of the canary audio, from its file header.", labels=label)
        wer = GaugeMetricFamily("whisper_probe_word_error_rate",
                                "Word error rate of the canary transcript (character error rate for languages "
                                "scored in characters), Whisper-normalised, last scheduled run.", labels=label)
        logprob = GaugeMetricFamily("whisper_probe_avg_logprob",
                                    "Lowest avg_logprob of the transcript's segments (Whisper fails a segment "
                                    "below -1), last scheduled run.", labels=label)
        ratio = GaugeMetricFamily("whisper_probe_compression_ratio",
                                  "Highest compression_ratio of the transcript's segments (above 2.4 is "
                                  "repetitive), last scheduled run.", labels=label)
        silence = GaugeMetricFamily("whisper_probe_no_speech_prob",
                                    "Highest no_speech_prob of the transcript's segments, last scheduled run.",
                                    labels=label)
        fallback = GaugeMetricFamily("whisper_probe_fallback_segments",
                                     "Segments decoded at temperature > 0 (Whisper's fallback after failed checks), "
                                     "last scheduled run.", labels=label)
        first_partial = GaugeMetricFamily("whisper_probe_first_partial_seconds",
                                          "Streaming APIs: time from the first audio sent to the first partial "
                                          "transcript, last scheduled run (absent when the server sends none).",
                                          labels=label)
        final_lag = GaugeMetricFamily("whisper_probe_finalisation_lag_seconds",
                                      "Streaming APIs: time from the end of the audio (audio-stop) to the final "
                                      "transcript, last scheduled run.", labels=label)
        transcript_lag = GaugeMetricFamily("whisper_probe_transcript_lag_seconds",
                                           "WhisperLive: audio sent minus the end of the last completed segment "
                                           "when the canary's audio ended, last scheduled run.", labels=label)
        info = GaugeMetricFamily("whisper_probe_info", "Always 1; the canary's language, scoring unit and kind "
                                 "(speech, or negative: non-speech whose expected transcript is empty).",
                                 labels=["probe", "language", "unit", "kind"])
        total = CounterMetricFamily("whisper_probe_runs_total", "Canary probes by result.",
                                    labels=["probe", "result"])
        for canary in self.canaries:
            name = canary.name
            kind = "speech" if (canary.reference or "").strip() else "negative"
            info.add_metric([name, canary.language, scoring.unit_for(canary.language), kind], 1.0)
            for result, count in runs[name].items():
                total.add_metric([name, result], float(count))
            r = latest.get(name)
            if r is None:
                continue
            last.add_metric([name], r.started)
            if now - r.started > stale_after:
                # Not current: the collector stopped probing (an unreadable API key file, say).
                # The timestamp stays, so that WhisperProbeStale sees a canary with no result.
                continue
            success.add_metric([name], 1.0 if r.success else 0.0)
            duration.add_metric([name], r.duration)
            status.add_metric([name], float(r.status_code or 0))
            audio_len.add_metric([name], r.audio_duration)
            if r.realtime_factor is not None:
                rtf.add_metric([name], r.realtime_factor)
            if r.error_rate is not None:
                wer.add_metric([name], r.error_rate)
            stream = r.stream if r.transcript is not None else None
            for family, value in ((logprob, r.avg_logprob), (ratio, r.compression_ratio),
                                  (silence, r.no_speech_prob), (fallback, r.fallback_segments),
                                  (first_partial, stream.first_partial if stream else None),
                                  (final_lag, stream.finalisation_lag if stream else None),
                                  (transcript_lag, stream.transcript_lag if stream else None)):
                if value is not None:
                    family.add_metric([name], float(value))
        out: list[Metric] = [success, duration, status, last, rtf, audio_len, wer, logprob, ratio, silence,
                             fallback, first_partial, final_lag, transcript_lag, total, info]
        out.extend(health_families(self.health))  # declared always, samples only for api wyoming
        if self.owns_quality:
            out.extend(self.quality.families())
            out.extend(self.hallucinations.families())
            if self.section.language != language_id.GIVEN:
                out.extend(self.identified.families())
        return out

    def stop(self) -> None:
        pass


def health_families(health: Any) -> list[Metric]:
    """whisper_wyoming_*: the `describe` health check, as wyoming-faster-whisper's HEALTHCHECK does it."""
    up = GaugeMetricFamily("whisper_wyoming_up", "1 when the Wyoming server answered describe with an info "
                           "listing a speech-to-text program (its Docker HEALTHCHECK), else 0.")
    took = GaugeMetricFamily("whisper_wyoming_describe_duration_seconds",
                             "Time from connecting to the Wyoming server's info (or to the failure).")
    info = GaugeMetricFamily("whisper_wyoming_info", "Always 1; the speech-to-text program the Wyoming "
                             "server's info names first, and its version.", labels=["program", "version"])
    if health is not None:
        up.add_metric([], 1.0 if health.up else 0.0)
        took.add_metric([], health.elapsed)
        if health.up:
            info.add_metric([health.program, health.version], 1.0)
    return [up, took, info]


def make(section: ProbeConfig, shared: Shared) -> ProbeCollector:
    collector = ProbeCollector(section, shared.config, quality=shared.use_quality(),
                               hallucinations=shared.use_hallucinations(),
                               identified=shared.use_language_id() if section.language != language_id.GIVEN else None)
    shared.probe_view = collector
    return collector


PLUGIN = Plugin("probe", ProbeConfig, make, "canary audio sent to the Whisper server as a user would")


# -- the `whisper-exporter probe` command's report ------------------------------------------


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def debug_text(record: ProbeRecord) -> str:
    """A blackbox_exporter-style account of one probe: request, answer, scores, verdict."""
    ex = record.exchange
    lines = [
        f"Probing canary {record.canary!r} against {record.target} (api {record.api})",
        f"  audio: {record.audio_path} ({record.audio_duration:.2f} s, language {record.language})",
        f"Request: {ex.method} {ex.url}",
        "  headers: " + (", ".join(f"{k}: {v}" for k, v in ex.headers.items()) or "-"),
        "  form: " + ", ".join(f"{k}={v}" for k, v in ex.fields.items())
        + f"{', ' if ex.fields else ''}{ex.file_field}=@{ex.file_name} ({ex.file_bytes} bytes)",
    ]
    if record.stream is not None:  # a streaming API: events, not an HTTP answer
        st = record.stream
        got = "a transcript" if record.transcript is not None else "no transcript"
        lines.append(f"Answer: {got}, {ex.body_bytes} bytes of events in {record.duration:.3f} s "
                     f"({st.audio_seconds:.2f} s of audio sent at pace {st.pace:g})")
        lines.append(f"  first partial: {_fmt(st.first_partial)} s ({st.partials} partials); "
                     f"finalisation lag (audio-stop to transcript): {_fmt(st.finalisation_lag)} s")
        if st.ready is not None or st.transcript_lag is not None:
            lines.append(f"  server ready after {_fmt(st.ready)} s; transcript lag at the end of the audio "
                         f"{_fmt(st.transcript_lag)} s")
        if not record.success and ex.body_excerpt:
            lines.append(f"  last event: {ex.body_excerpt}")
    elif ex.status_code is None:
        lines.append(f"Answer: none after {record.duration:.3f} s")
    else:
        lines.append(f"Answer: HTTP {ex.status_code} {ex.content_type or '(no Content-Type)'}, "
                     f"{ex.body_bytes} bytes in {record.duration:.3f} s")
        if not record.success and ex.body_excerpt:
            lines.append(f"  body: {ex.body_excerpt}")
    if record.transcript is not None and record.score is None:  # a negative canary: no words expected
        lines.append(f"Transcript: {record.transcript!r}")
        lines.append("  expected: no text (a negative canary: non-speech audio)")
        if record.suspects:
            lines.append(f"  hallucination reasons: {', '.join(record.suspects)}")
    elif record.transcript is not None and record.score is not None:
        lines.append(f"Transcript: {record.transcript!r}")
        s = record.score
        lines.append(f"  reference (normalised):  {s.reference!r}")
        lines.append(f"  transcript (normalised): {s.hypothesis!r}")
        lines.append(f"  {record.unit} error rate {s.error_rate:.3f}: {s.substitutions} substitutions, "
                     f"{s.deletions} deletions, {s.insertions} insertions over {s.reference_units} "
                     f"reference {record.unit}s (max_error_rate {record.max_error_rate:g})")
        lines.append(f"  real-time factor {record.realtime_factor:.3f} "
                     f"({record.duration:.3f} s for {record.audio_duration:.2f} s of audio)")
        if record.segments:
            lines.append(f"  segments: {record.segments}; worst avg_logprob {_fmt(record.avg_logprob)}, "
                         f"compression_ratio {_fmt(record.compression_ratio)}, "
                         f"no_speech_prob {_fmt(record.no_speech_prob)}; "
                         f"fallback segments {'-' if record.fallback_segments is None else record.fallback_segments}")
        if record.server_language or record.server_duration:
            lines.append(f"  server says: language {record.server_language or '-'}, "
                         f"audio {_fmt(record.server_duration, '.2f')} s")
        if record.detected is not None:
            lines.append(f"  sent without a language, identified as: {record.detected}")
    verdict = f"Result: {record.result}"
    if record.reason:
        verdict += f" ({record.reason})"
    lines.append(verdict)
    return "\n".join(lines)


def finding_text(record: ProbeRecord) -> str:
    """What a negative canary answered with text says about the server, in one line."""
    return (f"negative canary {record.canary!r} was answered with text ({record.transcript or ''!r}): "
            "the server writes text on non-speech; voice activity detection (vad_filter) usually stops it")


class _OneShot:
    """A collector holding given records, to render them as the exporter would."""

    def __init__(self, collector: ProbeCollector):
        self.collector = collector

    def collect(self) -> Iterable[Metric]:
        return self.collector.families()


def metrics_text(collector: ProbeCollector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OneShot(collector))
    return generate_latest(registry).decode()


def probe_once(config: Config, url: Optional[str] = None,
               canaries: Optional[list[Canary]] = None) -> tuple[ProbeCollector, list[ProbeRecord], list[str]]:
    """Run every canary (or the given ones) once now: (collector, records, problems).

    Raises clients.ClientSetupError when the API key cannot be read."""
    section = config.collectors.probe
    if canaries is not None:
        section = dataclasses.replace(section, canaries=canaries)
    collector = ProbeCollector(section, config, url=url)
    try:
        collector.update()
    except RuntimeError:
        pass  # the problems are in the status; the records of the others stand
    records = [r for ring in collector.recent_probes().values() for r in ring]
    return collector, records, collector.problems
