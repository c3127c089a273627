"""Transcription quality per language: a labeled reference set, and verified production samples.

Each scheduled run (default hourly):

1. Reference set (`manifest`): the manifest is (re)loaded, lines that cannot be
   used are logged once each with their line number and skipped; a stratified
   sample of `per_run` items (whisper_exporter/quality/sampling.py: round-robin across
   language x strata cells, every item within ceil(items / per_run) runs) is
   sent to the server one after another (whisper/utterance.py, whisper/clients.py), and each
   transcript is scored with Whisper's normalisers + jiwer. Counts go to the
   shared `whisper_quality_*` families with set="reference"; the round's
   per-language error rates become `whisper_quality_error_rate`.
   Rate limit: after a request that took t seconds the collector waits
   t x (1 - share) / share, so at most `max_server_share` of the wall time has
   one of our requests in flight. A run stops sending after `run_budget`
   (0.9 x interval); the items it did not reach come first next run. Three
   connection errors or timeouts in a row end the run (the server is down; the
   canary probe says so).
2. Production (`production.references`): queue items (sampled by the log
   collector) that a reviewer has written a verified reference for are scored
   (the server's own transcript from the log against the reference), counted
   with set="production", and taken off the queue.

Both sets' raw texts are also scored for punctuation (whisper/punctuation.py,
PER) where the reference has a mark, into `whisper_quality_punctuation_*`.

The shared families (`whisper_quality_*` counters, fed by the probe too) are
rendered once by the runtime (runtime/shared.py). This collector exports the state of the set: usable items, skipped
manifest lines, the current pass's coverage, completed passes, and the
configured thresholds as `whisper_quality_max_error_rate{language}` (for
alert rules). The collector is down only when it cannot evaluate at all (the
manifest cannot be read, an API key cannot be read); failed requests are
counted as utterances with result="failed".
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.config import Config, Duration, KeyPath, config_dir, one_of, positive, resolve_path
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.runtime.language_id_counters import LanguageIdCounters
from whisper_exporter.runtime.quality_counters import QualityCounters, review_queue_families
from whisper_exporter.runtime.review_counters import ReviewCounters
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.whisper import clients, hallucination, language_id, punctuation, scoring
from whisper_exporter.whisper.languages import language_code

# The quality package (manifest, sampling, evaluation) is imported when a collector is built:
# an exporter with this collector off (the default) need not hold it.
if TYPE_CHECKING:
    from whisper_exporter.quality.evaluate import ItemResult
    from whisper_exporter.quality.sampling import ReviewQueue

log = logging.getLogger("whisper_exporter.quality")


@dataclass
class ProductionConfig:
    """Production sampling (docs/quality.md): the log collector queues, reviewers verify, we score."""

    queue: Optional[str] = None  # review queue (JSON lines) the log collector appends to; null: off
    references: Optional[str] = None  # verified references (JSON lines {"id", "reference"}) by reviewers
    fraction: float = 0.01  # of logged requests with audio path and transcript, per language x duration band
    max_queue: int = 1000  # items waiting; samples drawn while full are dropped and counted

    def check(self, at: KeyPath) -> None:
        if not 0 <= self.fraction <= 1:
            raise at.error("fraction", "a fraction from 0 to 1 (0.01 = 1% of requests)", self.fraction)
        positive(at, "max_queue", self.max_queue, "a number greater than 0")
        if self.references and not self.queue:
            raise at.error("queue", "the review queue whose ids the references file names")


@dataclass
class QualityConfig:
    enabled: bool = False
    interval: Duration = Duration(3600)
    timeout: Duration = Duration(60)  # for one utterance's request
    manifest: Optional[str] = None  # the labeled reference set (JSON lines or CSV)
    per_run: int = 50  # utterances per run, stratified by language and strata tags
    max_server_share: float = 0.1  # at most this share of wall time busy with our requests
    state_file: Optional[str] = None  # keeps the sampling cursor across restarts; null: in memory
    thresholds: dict[str, float] = dataclass_field(default_factory=dict)  # language (or "default") -> max error rate
    # given | detect | both (docs/quality.md, "Language identification"); null: both where the API
    # reports the detected language
    language: Optional[str] = None
    production: ProductionConfig = dataclass_field(default_factory=ProductionConfig)

    @property
    def run_budget(self) -> float:
        """A run stops sending new utterances after this long (the rest wait for the next run)."""
        return 0.9 * self.interval

    @property
    def run_timeout(self) -> float:
        """The scheduler's watchdog for one run: the budget, one request that began just before
        it ran out (up to three timeouts), and loading the manifest."""
        return self.run_budget + 3 * self.timeout + 60.0

    def check(self, at: KeyPath) -> None:
        if self.language is not None:
            one_of(at, "language", self.language, language_id.MODES)
        positive(at, "per_run", self.per_run, "a number greater than 0")
        if not 0 < self.max_server_share <= 1:
            raise at.error("max_server_share", "a share of the server's time above 0 and at most 1 (0.1 = 10%)",
                           self.max_server_share)
        for name, rate in self.thresholds.items():
            if name != "default" and language_code(name) != name:
                raise at.error(f"thresholds.{name}", "a Whisper language code (en, zh, yue ...) or default", name)
            if not 0 <= rate < float("inf"):
                raise at.error(f"thresholds.{name}", "an error rate of 0 or more (0.1 = 10%)", rate)
        if self.enabled:
            if not self.manifest and not self.production.references:
                raise at.error("manifest", "the labeled reference set to evaluate (or production.references to score)")
            if self.manifest:
                path = Path(resolve_path(self.manifest, config_dir(at.source)) or "")
                if not path.is_file():
                    raise at.error("manifest", f"a readable manifest file ({path} is not a file)", self.manifest)

REFERENCE, PRODUCTION = "reference", "production"
DOWN_OUTCOMES = (clients.CONNECTION_ERROR, clients.TIMEOUT)
MAX_CONSECUTIVE_DOWN = 3
WORST = 10  # items shown per set on the landing page
RECENT_PRODUCTION = 200  # scored production items kept for the page
MAX_LOGGED = 10000  # distinct problems remembered so each is logged once
MAX_SCORED_IDS = 100000  # production ids scored by this process (a failed queue rewrite never counts twice)


class QualityCollector:
    name = "quality"

    def __init__(self, section: QualityConfig, config: Config, url: Optional[str] = None,
                 quality: Optional[QualityCounters] = None, queue: Optional[ReviewQueue] = None,
                 hallucinations: Optional[HallucinationCounters] = None,
                 identified: Optional[LanguageIdCounters] = None, reviews: Optional[ReviewCounters] = None):
        self.section = section
        self.config = config
        self.url = url or config.service.url
        base = config_dir(config.source)
        from whisper_exporter.quality.sampling import ReviewQueue, StratifiedSampler

        self.manifest_path = resolve_path(section.manifest, base)
        self.sampler = StratifiedSampler(resolve_path(section.state_file, base))
        production = section.production
        self.references_path = resolve_path(production.references, base)
        queue_path = resolve_path(production.queue, base)
        # Shared state (runtime/shared.py) is rendered by the runtime; standalone, this renders its own.
        self.standalone = quality is None
        # "is not None": an empty queue is falsy (len 0), and a second object on the file would keep
        # the tap's in-memory ids after this one took items off (the queue looked full for ever).
        self.queue = queue if queue is not None else (
            ReviewQueue(queue_path, production.max_queue) if queue_path else None)
        self.quality = quality or QualityCounters()
        self.hallucinations = hallucinations or HallucinationCounters()
        self.language_mode = language_id.resolve_mode(section.language, config.service.api)
        self.identified = identified or LanguageIdCounters()
        self._seed_identified()
        self.reviews = reviews or ReviewCounters()
        self.status = "no run yet"
        self.problems: list[str] = []
        self._stop = threading.Event()
        self.wait = self._stop.wait  # the pause between requests; tests replace it
        self.clock = time.monotonic
        self._lock = threading.Lock()  # one run at a time
        self._state_lock = threading.Lock()  # what families() and the page read
        self._latest: dict[str, list[ItemResult]] = {}  # set -> the items of its last round
        self._recent_production: deque[ItemResult] = deque(maxlen=RECENT_PRODUCTION)
        self._items = 0
        self._manifest_problems = 0
        self._logged: set[str] = set()
        self._scored_ids: OrderedDict[str, None] = OrderedDict()
        self._seed_known()

    def _sets(self) -> list[str]:
        """The sets this collector feeds."""
        return ([REFERENCE] if self.manifest_path else []) + \
            ([PRODUCTION] if self.references_path and self.queue is not None else [])

    def _seed(self, languages: Iterable[str], sets: Iterable[str]) -> None:
        for set_ in sets:
            for language in languages:
                self.quality.seed(language, set_)

    def _seed_known(self) -> None:
        """Export the manifest's and the queue's languages at 0 before the first run counts."""
        from whisper_exporter.quality.manifest import ManifestError
        from whisper_exporter.quality.manifest import load as load_manifest

        if self.manifest_path:
            try:
                self._seed(load_manifest(self.manifest_path, check_audio=False).languages(), self._sets())
            except (ManifestError, OSError):
                pass  # the first run reports it
        if PRODUCTION in self._sets():
            assert self.queue is not None  # in _sets() only with a queue
            languages = {q.language for q in self.queue.items()}
            self._seed(languages, [PRODUCTION])
            for language in languages:
                self.reviews.seed(language)

    def client(self) -> clients.WhisperClient:
        return clients.make_client(self.config.service, url=self.url, timeout=self.section.timeout,
                                   response_format=language_id.response_format(self.language_mode,
                                                                               self.config.service.api))

    def _seed_identified(self, languages: Optional[Iterable[str]] = None) -> None:
        """Export each manifest language's correct-identification series at 0 before its first count."""
        if self.language_mode == language_id.GIVEN or not self.manifest_path:
            return
        if languages is None:
            from whisper_exporter.quality.manifest import ManifestError
            from whisper_exporter.quality.manifest import load as load_manifest

            try:
                languages = load_manifest(self.manifest_path, check_audio=False).languages()
            except (ManifestError, OSError):
                return  # the first run reports it
        for language in languages:
            self.identified.seed(language, REFERENCE)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._stop.set()

    # -- a run ------------------------------------------------------------------------------

    def update(self) -> None:
        from whisper_exporter.quality.manifest import ManifestError

        with self._lock:
            problems: list[str] = []
            parts: list[str] = []
            fatal: Optional[Exception] = None
            if self.manifest_path:
                try:
                    parts.append(self._reference_round(problems))
                except (ManifestError, clients.ClientSetupError) as err:
                    fatal = err
                    parts.append(f"reference set: {err}")
            if self.references_path and self.queue is not None:
                parts.append(self._production_round(problems))
            self.problems = problems
            self.status = "; ".join(parts) or "nothing configured"
            if fatal is not None:
                raise RuntimeError(str(fatal))

    def _once(self, message: str, level: int = logging.WARNING) -> None:
        if message in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED:
            self._logged.clear()
        self._logged.add(message)
        log.log(level, "quality: %s", message)

    def _reference_round(self, problems: list[str]) -> str:
        from whisper_exporter.quality.evaluate import SCORED, evaluate_item
        from whisper_exporter.quality.manifest import ManifestError
        from whisper_exporter.quality.manifest import load as load_manifest

        assert self.manifest_path is not None  # update() runs this round only with a manifest
        manifest = load_manifest(self.manifest_path)
        for problem in manifest.problems:
            self._once(f"{self.manifest_path}: {problem} (skipped)")
        with self._state_lock:
            self._items, self._manifest_problems = len(manifest.items), len(manifest.problems)
        if not manifest.items:
            raise ManifestError(f"{self.manifest_path}: no usable line ({len(manifest.problems)} skipped)")
        batch = self.sampler.sample(manifest.items, self.section.per_run)
        # A language new to a running exporter (the manifest was edited) is exported at 0 this run
        # and scored from the next, so Prometheus sees its series before the first count.
        fresh = {lang for lang in manifest.languages() if not self.quality.has(lang, REFERENCE)}
        self._seed(manifest.languages(), self._sets())
        batch = [item for item in batch if item.language not in fresh]
        self._seed_identified(manifest.languages())
        client = self.client() if batch else None
        share = self.section.max_server_share
        deadline = self.clock() + self.section.run_budget
        results: list[ItemResult] = []
        down = 0
        stopped = ""
        for n, item in enumerate(batch):
            if self._stop.is_set():
                stopped = "stopping"
                break
            if self.clock() >= deadline:
                stopped = f"run budget of {self.section.run_budget:g}s used up"
                break
            assert client is not None  # made above for a non-empty batch
            result = evaluate_item(client, item, REFERENCE, self.language_mode)
            self.sampler.done(item)
            if result.outcome == "audio_error":
                problems.append(f"{item.id} (line {item.line}): {result.reason}")
                self._once(f"{self.manifest_path}: line {item.line}: {result.reason} (skipped)")
                continue
            results.append(result)
            if result.detected is not None:
                self.identified.count(item.language, result.detected, REFERENCE)
            elif result.detect_outcome:
                self._once(f"{item.id}: detection request: {result.detect_outcome}", logging.INFO)
            if result.score is not None:
                self.quality.record(result.score, REFERENCE)
                if result.punctuation is not None:
                    self.quality.record_punctuation(item.language, REFERENCE, result.punctuation)
                if result.transcript is not None:
                    self.hallucinations.count(item.language, REFERENCE, result.suspects, result.transcript)
            else:
                self.quality.record_failure(item.language, REFERENCE)
                self._once(f"{item.id}: {result.outcome}: {result.reason}", logging.INFO)
            down = down + 1 if result.outcome in DOWN_OUTCOMES else 0
            if down >= MAX_CONSECUTIVE_DOWN:
                stopped = f"{down} {result.outcome.replace('_', ' ')}s in a row"
                break
            if n + 1 < len(batch) and share < 1:
                pause = (result.elapsed + result.detect_elapsed) * (1 - share) / share
                pause = min(pause, max(0.0, deadline - self.clock()))
                if pause > 0:
                    self.wait(pause)
        self.quality.end_round(REFERENCE)
        try:
            self.sampler.save()
        except OSError as err:
            problems.append(f"cannot write the sampling state {self.sampler.state_path} ({err.strerror or err})")
            self._once(problems[-1])
        with self._state_lock:
            if results:
                self._latest[REFERENCE] = results
        scored = sum(1 for r in results if r.result == SCORED)
        text = (f"reference set: {scored} scored, {len(results) - scored} failed of {len(batch)} sampled "
                f"from {len(manifest.items)} items")
        if manifest.problems:
            text += f" ({len(manifest.problems)} manifest lines skipped)"
        text += f"; pass {self.sampler.passes + 1}, {self.sampler.coverage():.0%} covered"
        if stopped:
            text += f"; stopped early: {stopped}"
        return text

    def _production_round(self, problems: list[str]) -> str:
        # update() runs this round only with both files configured (QualityConfig.check).
        from whisper_exporter.quality.evaluate import SCORED, ItemResult
        from whisper_exporter.quality.sampling import load_references

        assert self.references_path is not None and self.queue is not None
        references, bad = load_references(self.references_path)
        for problem in bad:
            self._once(f"{self.references_path}: {problem} (skipped)")
        waiting = self.queue.items()
        done_ids: list[str] = []
        fresh: list[ItemResult] = []
        deferred = flagged = 0
        for queued in waiting:
            ref = references.get(queued.id)
            if ref is None:
                self.quality.seed(queued.language, PRODUCTION)  # exported at 0 while it waits for review
                self.reviews.seed(queued.language)
                continue
            language = ref.language or queued.language
            if queued.id not in self._scored_ids and not (self.quality.has(language, PRODUCTION)
                                                          and self.reviews.has(language)):
                # Queued and reviewed between two runs (or a reference in another language): its
                # series goes out at 0 now and the item is scored next run, so rate() sees it.
                self.quality.seed(language, PRODUCTION)
                self.reviews.seed(language)
                deferred += 1
                continue
            done_ids.append(queued.id)
            if queued.id in self._scored_ids:
                continue  # scored already; a queue rewrite failed last time
            self._scored_ids[queued.id] = None
            if len(self._scored_ids) > MAX_SCORED_IDS:
                self._scored_ids.popitem(last=False)
            had_text = bool(queued.transcript.strip())
            # The detector's verdict on the transcript the reviewer judged (text and duration: the
            # queue keeps no segments), against the reviewer's.
            suspected = had_text and bool(hallucination.suspect(queued.transcript, language, queued.duration))
            self.reviews.reviewed(language, ref.flags, had_text, suspected)
            if ref.language and queued.detected and "no_speech" not in ref.flags:
                # The reviewer named the language and the server identified one (the request named
                # none): a language the client gave was never identified, so it is not counted.
                self.identified.count(ref.language, queued.detected, PRODUCTION)
            if ref.flags:
                flagged += 1
                continue  # a flagged item is never scored as WER
            score = scoring.score(ref.reference, queued.transcript, language)
            self.quality.record(score, PRODUCTION)
            # Scored only where the reviewer kept punctuation (the reference has a mark).
            marks = punctuation.score(ref.reference, queued.transcript)
            self.quality.record_punctuation(language, PRODUCTION, marks)
            fresh.append(ItemResult(
                id=queued.id, line=ref.line, audio=queued.audio, language=scoring.base_language(language),
                unit=score.unit, strata={"duration_band": queued.duration_band}, reference=ref.reference,
                result=SCORED, outcome=clients.SUCCESS, transcript=queued.transcript, score=score, punctuation=marks,
                audio_duration=queued.duration or 0.0, started=time.time(), set=PRODUCTION))
        self.reviews.mark_reviewed(q.id for q in waiting if q.id in references)
        if fresh:
            self.quality.end_round(PRODUCTION)
            with self._state_lock:
                self._latest[PRODUCTION] = fresh
                self._recent_production.extendleft(fresh)
        try:
            self.queue.remove(done_ids)
            self.reviews.forget(done_ids)
        except OSError as err:
            problems.append(f"cannot rewrite the review queue {self.queue.path} ({err.strerror or err})")
            self._once(problems[-1])
        text = f"production: {len(fresh)} scored, {len(self.queue)} waiting for review"
        if flagged:
            text += f"; {flagged} flagged by reviewers (not scored)"
        if deferred:
            text += f" ({deferred} of a new language scored next run)"
        return text

    # -- exposition -------------------------------------------------------------------------

    def families(self) -> Iterable[Metric]:
        with self._state_lock:
            items, skipped = self._items, self._manifest_problems
        out: list[Metric] = []
        if self.manifest_path:
            items_f = GaugeMetricFamily("whisper_quality_reference_items",
                                        "Usable items in the reference set's manifest, at the last run.")
            items_f.add_metric([], float(items))
            skipped_f = GaugeMetricFamily("whisper_quality_manifest_problems",
                                          "Manifest lines skipped at the last run (bad JSON, unknown column, "
                                          "missing audio, empty reference ...); the log names each.")
            skipped_f.add_metric([], float(skipped))
            coverage = GaugeMetricFamily("whisper_quality_reference_coverage_ratio",
                                         "Share of the reference set evaluated in the current sampling pass.")
            coverage.add_metric([], self.sampler.coverage())
            passes = CounterMetricFamily("whisper_quality_reference_passes_total",
                                         "Complete passes over the reference set (every item evaluated once).")
            passes.add_metric([], float(self.sampler.passes))
            out += [items_f, skipped_f, coverage, passes]
        thresholds = self.section.thresholds
        if thresholds:
            family = GaugeMetricFamily("whisper_quality_max_error_rate",
                                       "Configured quality threshold (collectors.quality.thresholds) per language.",
                                       labels=["language"])
            languages = {k for k in thresholds if k != "default"}
            languages |= {key[0] for key in self.quality.snapshot() if key[1] != "canary"}
            from whisper_exporter.quality.evaluate import threshold_for

            for language in sorted(languages):
                rate = threshold_for(thresholds, language)
                if rate is not None:
                    family.add_metric([language], rate)
            out.append(family)
        if self.standalone:
            if self.queue is not None:
                out.extend(review_queue_families(self.queue))
                out.extend(self.reviews.families(self.queue))
            out.extend(self.quality.families())
            out.extend(self.hallucinations.families())
            out.extend(self.identified.families())
        return out

    # -- the landing page -------------------------------------------------------------------

    def last_round(self, set_: str = REFERENCE) -> list[ItemResult]:
        """The items of the last round of `set_`, in the order they were evaluated."""
        with self._state_lock:
            return list(self._latest.get(set_, ()))

    def worst_items(self, n: int = WORST) -> dict[str, list[ItemResult]]:
        """Per set, the worst items of its last round (production: of the recent ones)."""
        from whisper_exporter.quality.evaluate import FAILED, worst

        with self._state_lock:
            latest = {k: list(v) for k, v in self._latest.items()}
            recent = list(self._recent_production)
        out = {}
        if REFERENCE in latest:
            out[REFERENCE] = worst(latest[REFERENCE], n) + [r for r in latest[REFERENCE] if r.result == FAILED][:n]
        if recent:
            out[PRODUCTION] = worst(recent, n)
        return out


def make(section: QualityConfig, shared: Shared) -> QualityCollector:
    collector = QualityCollector(section, shared.config, quality=shared.use_quality(), queue=shared.review_queue,
                                 hallucinations=shared.use_hallucinations(), identified=shared.use_language_id(),
                                 reviews=shared.reviews)
    shared.quality_view = collector
    return collector


PLUGIN = Plugin("quality", QualityConfig, make, "the labeled reference set and verified production samples")
