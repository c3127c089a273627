"""The `whisper_quality_punctuation_*` families: punctuation marks scored per language, set and mark.

Owned by the exporter's one QualityCounters (runtime/quality_counters.py), which
folds languages the same way for both, and renders them with its own families:
every (language, set) the quality families export is exported here too, at 0
until its first punctuated reference, so a series seeded there is seeded here.

    counters.record_punctuation("en", "reference", punctuation.score(reference, transcript))

PER over any window is then a ratio of rates, exact (rules/recording.yml):
rate(marks{result!="correct"}) / rate(marks).
"""
from __future__ import annotations

import threading
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from whisper_exporter.whisper.punctuation import MARKS, OUTCOMES, RESULTS, Punctuation

Key = tuple[str, str]  # (language, set)


class PunctuationCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marks: dict[Key, Punctuation] = {}
        self._utterances: dict[Key, dict[str, int]] = {}

    def add(self, language: str, set_: str, p: Punctuation) -> None:
        """Count one utterance: its marks when scored, else why it was not."""
        key = (language, set_)
        with self._lock:
            self._utterances.setdefault(key, dict.fromkeys(OUTCOMES, 0))[p.outcome] += 1
            totals = self._marks.setdefault(key, Punctuation())
            if p.scored:
                totals.add(p)

    def snapshot(self) -> dict[Key, dict[str, object]]:
        """Plain copies, for tests and the status page."""
        with self._lock:
            return {key: {"marks": {m: dict(c) for m, c in self._marks[key].counts.items()},
                          "utterances": dict(self._utterances[key])} for key in self._marks}

    def families(self, keys: Iterable[Key] = ()) -> list[Metric]:
        """The families, with every key of `keys` present (at 0 when nothing was counted)."""
        marks = CounterMetricFamily(
            "whisper_quality_punctuation_marks",
            "Punctuation marks (. , ? !) of scored utterances by result: correct, substituted (counted on "
            "the reference's mark), deleted, inserted; PER = the errors' rate over all results' rate.",
            labels=["language", "set", "mark", "result"])
        utterances = CounterMetricFamily(
            "whisper_quality_punctuation_utterances",
            "Utterances considered for punctuation: scored, no_reference_marks (the reference has no "
            "mark, so it is not scored), too_long (too long to align).",
            labels=["language", "set", "result"])
        with self._lock:
            for key in sorted(set(keys) | set(self._marks)):
                p = self._marks.get(key) or Punctuation()
                for name in MARKS.values():
                    for result in RESULTS:
                        marks.add_metric([*key, name, result], float(p.counts[name][result]))
                done = self._utterances.get(key) or dict.fromkeys(OUTCOMES, 0)
                for outcome in OUTCOMES:
                    utterances.add_metric([*key, outcome], float(done[outcome]))
        return [marks, utterances]
