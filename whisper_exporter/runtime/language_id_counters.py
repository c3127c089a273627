"""`whisper_quality_language_identified_total{language,detected,set}`: the language-identification counters.

Fed by the quality collector (reference and production sets) and the probe (canary), built once
in the wiring (runtime/shared.py) and rendered once by the runtime.

    counters = shared.use_language_id()
    counters.seed("de", "reference")               # {language=de, detected=de} exported at 0
    counters.count("de", "en", "reference")        # one German item the server took for English

A series first scraped with a count in it hides that count from rate() and increase(), and
which language a server mistakes another for cannot be known in advance. So a count that would
create a series is held back: the series is exported at 0 first, and the count joins it at the
next scrape. `snapshot()` has every count, held or not.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional

from prometheus_client.core import CounterMetricFamily, Metric

from whisper_exporter.whisper.language_id import OTHER, detected_label, truth_label

log = logging.getLogger("whisper_exporter.quality")

Key = tuple[str, str, str]  # (language, detected, set)
# Labels are Whisper's codes (about 100) squared, times three sets; a bound keeps a mistake cheap.
MAX_SERIES = 4096


class LanguageIdCounters:
    def __init__(self, max_series: int = MAX_SERIES):
        self._lock = threading.Lock()
        self._totals: dict[Key, int] = {}
        self._held: dict[Key, int] = {}  # counts of series not scraped yet
        self._shown: set[Key] = set()  # series that went out in a scrape
        self.max_series = max_series
        self.folded_total = 0  # counts folded into (other, other) past max_series

    def _key(self, language: str, detected: str, set_: str) -> Key:
        key = (truth_label(language), detected, set_)
        if key not in self._totals and len(self._totals) >= self.max_series:
            if not self.folded_total:
                log.warning("quality: more than %d language identification series; the rest counted as other",
                            self.max_series)
            self.folded_total += 1
            key = (OTHER, OTHER, set_)
        return key

    def seed(self, language: str, set_: str) -> None:
        """Export (language, detected=language, set) at 0: the correct answers' series."""
        label = truth_label(language)
        with self._lock:
            self._totals.setdefault(self._key(label, label, set_), 0)

    def count(self, language: str, detected: Optional[str], set_: str) -> None:
        """One item of `language` that the server identified as `detected` (its answer's language, None: unsaid)."""
        with self._lock:
            key = self._key(language, detected_label(detected), set_)
            self._totals.setdefault(key, 0)
            if key in self._shown:
                self._totals[key] += 1
            else:
                self._held[key] = self._held.get(key, 0) + 1

    def snapshot(self) -> dict[Key, int]:
        """Every count, held back or not, for tests, the page and the CLI."""
        with self._lock:
            return {key: n + self._held.get(key, 0) for key, n in self._totals.items()}

    def families(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "whisper_quality_language_identified_total",
            "Items sent without a language, by their labelled language and the language the server "
            "detected (unknown: the answer named none); detected == language is a correct identification.",
            labels=["language", "detected", "set"])
        with self._lock:
            for key in [k for k in self._held if k in self._shown]:
                self._totals[key] += self._held.pop(key)
            for key, n in sorted(self._totals.items()):
                family.add_metric(list(key), float(n))
            self._shown.update(self._totals)
        return [family]
