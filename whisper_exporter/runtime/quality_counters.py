"""The `whisper_quality_*` metric families, shared by every collector that scores transcripts.

The canary probe (set="canary") and the reference-set evaluation
(set="reference") both count into the one `QualityCounters` of the exporter,
built in the wiring (runtime/shared.py) and rendered once by the runtime, so
each family appears once per scrape whatever the number of collectors feeding
it, and none vanishes while one of them is overdue.

    counters = shared.use_quality()
    counters.seed("en", "canary")                  # exported at 0 before its first count
    counters.record(score, set_="canary")          # one scored utterance
    counters.record_failure("en", "canary")       # one utterance without a transcript
    counters.end_round("canary")                  # error-rate gauges for this round

Counters (monotonic): reference units, errors by type, utterances by result,
labelled language, set, unit. `whisper_quality_error_rate` is the corpus error
rate of the last evaluation round (errors / reference units over that round's
utterances), and `whisper_quality_last_evaluation_timestamp_seconds` when that
round ended; both from the last scheduled run.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.runtime.punctuation_counters import PunctuationCounters
from whisper_exporter.whisper.punctuation import Punctuation
from whisper_exporter.whisper.scoring import Score, base_language, unit_for

ERROR_TYPES = ("substitution", "deletion", "insertion")
# "scored": a transcript was compared with its reference; "failed": no transcript came back.
RESULTS = ("scored", "failed")
# Languages come from configuration and manifests, but a bound keeps a mistake cheap.
MAX_LANGUAGES = 128
OTHER = "other"

Key = tuple[str, str, str]  # (language, set, unit)


@dataclass
class _Totals:
    reference_units: int = 0
    substitution: int = 0
    deletion: int = 0
    insertion: int = 0
    scored: int = 0
    failed: int = 0


class QualityCounters:
    def __init__(self, max_languages: int = MAX_LANGUAGES):
        self._lock = threading.Lock()
        self._totals: dict[Key, _Totals] = {}
        self._round: dict[Key, list[int]] = {}  # key -> [errors, reference units] of the open round
        self._rate: dict[Key, float] = {}
        self._evaluated: dict[Key, float] = {}
        self._languages: set[str] = set()
        self.max_languages = max_languages
        self.folded_total = 0  # utterances whose language was folded into "other"
        self.punctuation = PunctuationCounters()  # rendered with these, its languages folded by these

    def _language(self, language: str) -> str:
        language = base_language(language) or "unknown"
        if language in self._languages:
            return language
        if len(self._languages) >= self.max_languages:
            self.folded_total += 1
            return OTHER
        self._languages.add(language)
        return language

    def seed(self, language: str, set_: str) -> None:
        """Export (language, set) at 0 before its first count."""
        # Prometheus takes a new series' first sample as its baseline: a series that first
        # appears with a batch in it hides that batch from rate() and increase().
        with self._lock:
            self._totals.setdefault((self._language(language), set_, unit_for(language)), _Totals())

    def has(self, language: str, set_: str) -> bool:
        """Whether (language, set) is exported already (seeded or counted)."""
        key = (base_language(language) or "unknown", set_, unit_for(language))
        with self._lock:
            return key in self._totals or (key[0] not in self._languages
                                           and len(self._languages) >= self.max_languages)

    def record(self, score: Score, set_: str) -> None:
        """Count one scored utterance into its (language, set, unit) and the open round."""
        with self._lock:
            key = (self._language(score.language), set_, score.unit)
            totals = self._totals.setdefault(key, _Totals())
            totals.reference_units += score.reference_units
            totals.substitution += score.substitutions
            totals.deletion += score.deletions
            totals.insertion += score.insertions
            totals.scored += 1
            pending = self._round.setdefault(key, [0, 0])
            pending[0] += score.errors
            pending[1] += score.reference_units

    def record_punctuation(self, language: str, set_: str, p: Punctuation) -> None:
        """Count one utterance's punctuation (whisper/punctuation.py) into its (language, set)."""
        with self._lock:
            language = self._language(language)
        self.punctuation.add(language, set_, p)

    def record_failure(self, language: str, set_: str) -> None:
        """Count one utterance that could not be scored (no transcript came back)."""
        with self._lock:
            key = (self._language(language), set_, unit_for(language))
            self._totals.setdefault(key, _Totals()).failed += 1

    def end_round(self, set_: str, now: Optional[float] = None) -> None:
        """Close the open round of `set_`: its error rates become the gauges' values.

        A (language, set, unit) with no scored utterance in the round keeps its last
        rate and timestamp: the timestamp tells how old the rate is.
        """
        now = time.time() if now is None else now
        with self._lock:
            for key in [k for k in self._round if k[1] == set_]:
                errors, reference_units = self._round.pop(key)
                if reference_units:
                    self._rate[key] = errors / reference_units
                else:
                    self._rate[key] = 0.0 if not errors else 1.0
                self._evaluated[key] = now

    def snapshot(self) -> dict[Key, dict[str, Any]]:
        """Plain copies of everything, for tests and the status page."""
        with self._lock:
            return {
                key: dict(vars(t), error_rate=self._rate.get(key), evaluated=self._evaluated.get(key))
                for key, t in self._totals.items()
            }

    def families(self) -> Iterable[Metric]:
        labels = ["language", "set", "unit"]
        units_family = CounterMetricFamily(
            "whisper_quality_reference_units_total",
            "Words (or characters, unit=char) in the references of the scored utterances.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "whisper_quality_errors_total",
            "Edit operations between normalised reference and transcript, by type; "
            "divide its rate by the reference units' rate for the corpus error rate.",
            labels=labels + ["type"],
        )
        utterances = CounterMetricFamily(
            "whisper_quality_utterances_total",
            "Utterances evaluated: scored (a transcript was compared) or failed (none came back).",
            labels=labels + ["result"],
        )
        rate = GaugeMetricFamily(
            "whisper_quality_error_rate",
            "Word (or character) error rate of the last evaluation round, from the last scheduled run.",
            labels=labels,
        )
        evaluated = GaugeMetricFamily(
            "whisper_quality_last_evaluation_timestamp_seconds",
            "Unix time at which the last evaluation round of this language and set ended.",
            labels=labels,
        )
        with self._lock:
            for key, t in sorted(self._totals.items()):
                values = list(key)
                units_family.add_metric(values, float(t.reference_units))
                for kind in ERROR_TYPES:
                    errors.add_metric(values + [kind], float(getattr(t, kind)))
                for result in RESULTS:
                    utterances.add_metric(values + [result], float(getattr(t, result)))
                if key in self._rate:
                    rate.add_metric(values, self._rate[key])
                    evaluated.add_metric(values, self._evaluated[key])
            keys = {(language, set_) for language, set_, _ in self._totals}
        return [units_family, errors, utterances, rate, evaluated, *self.punctuation.families(keys)]


def review_queue_families(queue: Any) -> list[Metric]:
    """The review queue's metrics (quality/sampling.py ReviewQueue.stats())."""
    size, added, dropped = queue.stats()
    items = GaugeMetricFamily("whisper_quality_review_queue_items",
                              "Production samples waiting in the review queue for a verified reference.")
    items.add_metric([], float(size))
    added_f = CounterMetricFamily("whisper_quality_review_queue_added_total",
                                  "Production samples added to the review queue.")
    added_f.add_metric([], float(added))
    dropped_f = CounterMetricFamily(
        "whisper_quality_review_queue_dropped_total",
        "Production samples drawn but not queued: full (max_queue reached), duplicate (already "
        "queued), write_error (the file cannot be written).", labels=["reason"])
    for reason, n in dropped.items():
        dropped_f.add_metric([reason], float(n))
    return [items, added_f, dropped_f]
