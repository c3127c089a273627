"""Reviews of production samples: what reviewers decided, and how the hallucination detector did against them.

The quality collector counts a verified record when it takes the item off the queue, whichever tool
wrote the record (the review page, `review import`); the review page counts skips, which write no
record. Per reviewed item whose transcript has text, the detector's verdict (suspected) is counted
against the reviewer's (confirmed: flagged "no speech"), so the detector's precision and recall on
real traffic are ratios of these counters:

    precision = review_total{suspected="true",confirmed="true"} / review_total{suspected="true"}
    recall    = review_total{suspected="true",confirmed="true"} / review_total{confirmed="true"}

Pending items and the age of the oldest come from the queue's memory at scrape time (no file read).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.quality.flags import FLAGS
from whisper_exporter.whisper.languages import language_code

VERIFIED, FLAGGED, SKIPPED = "verified", "flagged", "skipped"
MAX_LANGUAGES = 128
MAX_REVIEWED = 100000  # ids reviewed but still queued (a queue holds max_queue items; this is a backstop)
_BOOL = ("false", "true")


class ReviewCounters:
    def __init__(self, clock=time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._results: dict[tuple[str, str], int] = {(VERIFIED, ""): 0, (SKIPPED, ""): 0}
        self._results.update({(FLAGGED, flag): 0 for flag in FLAGS})
        self._verified: dict[str, int] = {}  # language -> items verified (scored)
        self._confirmed: dict[str, int] = {}  # language -> confirmed hallucinations
        self._matrix: dict[tuple[str, bool, bool], int] = {}  # (language, suspected, confirmed)
        self._reviewed: set[str] = set()  # ids with a record, not yet taken off the queue

    def _language(self, language: Optional[str]) -> str:
        code = language_code(language) if language else None
        if code is None:
            return "unknown"
        if code not in self._verified and len(self._verified) >= MAX_LANGUAGES:
            return "other"
        return code

    def seed(self, language: Optional[str]) -> None:
        """Export a language's series at 0 before its first review counts."""
        with self._lock:
            lang = self._language(language)
            self._verified.setdefault(lang, 0)
            self._confirmed.setdefault(lang, 0)
            for suspected in (False, True):
                for confirmed in (False, True):
                    self._matrix.setdefault((lang, suspected, confirmed), 0)

    def has(self, language: Optional[str]) -> bool:
        with self._lock:
            return self._language(language) in self._verified

    def skipped(self) -> None:
        with self._lock:
            self._results[(SKIPPED, "")] += 1

    def reviewed(self, language: Optional[str], flags: Iterable[str], had_text: bool, suspected: bool) -> None:
        """One record taken: verified (no flag, scored) or flagged (once per flag); with text, the
        detector's verdict against the reviewer's."""
        flags = tuple(flags)
        self.seed(language)
        with self._lock:
            lang = self._language(language)
            if flags:
                for flag in flags:
                    self._results[(FLAGGED, flag)] = self._results.get((FLAGGED, flag), 0) + 1
            else:
                self._results[(VERIFIED, "")] += 1
                self._verified[lang] += 1
            if had_text:
                confirmed = "no_speech" in flags
                if confirmed:
                    self._confirmed[lang] += 1
                if "unintelligible" not in flags:  # someone spoke, nobody could tell what: no verdict
                    self._matrix[(lang, suspected, confirmed)] += 1

    def mark_reviewed(self, ids: Iterable[str]) -> None:
        """Ids that have a record now: no longer pending."""
        with self._lock:
            if len(self._reviewed) > MAX_REVIEWED:
                self._reviewed.clear()
            self._reviewed.update(ids)

    def forget(self, ids: Iterable[str]) -> None:
        """Ids taken off the queue."""
        with self._lock:
            self._reviewed.difference_update(ids)

    def totals(self) -> tuple[int, dict[str, int], int]:
        """(verified, flagged by flag, skipped) since start-up, as whisper_quality_reviews_total counts them."""
        with self._lock:
            flagged = {flag: n for (result, flag), n in self._results.items() if result == FLAGGED}
            return self._results[(VERIFIED, "")], flagged, self._results[(SKIPPED, "")]

    def reviewed_ids(self) -> set[str]:
        with self._lock:
            return set(self._reviewed)

    def families(self, queue: Any = None) -> list[Metric]:
        out: list[Metric] = []
        if queue is not None:
            waiting, oldest = queue.pending(self.reviewed_ids())
            pending = GaugeMetricFamily("whisper_quality_review_pending_items",
                                        "Production samples in the review queue that no reviewer has verified yet.")
            pending.add_metric([], float(waiting))
            age = GaugeMetricFamily("whisper_quality_review_oldest_pending_age_seconds",
                                    "How long the oldest pending production sample has waited for review "
                                    "(0 when none waits).")
            age.add_metric([], max(0.0, self._clock() - oldest) if oldest is not None else 0.0)
            out += [pending, age]
        results = CounterMetricFamily(
            "whisper_quality_reviews_total",
            "Reviews of production samples by result: verified (a reference, scored), flagged (once per "
            "flag: no_speech, unintelligible, wrong_language, personal_data; never scored), skipped.",
            labels=["result", "flag"])
        verified = CounterMetricFamily("whisper_quality_verified_items_total",
                                       "Production samples verified with a reference and scored, by language.",
                                       labels=["language"])
        confirmed = CounterMetricFamily(
            "whisper_hallucination_confirmed_total",
            "Production transcripts with text on audio a reviewer flagged as no speech: confirmed hallucinations.",
            labels=["language"])
        matrix = CounterMetricFamily(
            "whisper_hallucination_review_total",
            "Reviewed production transcripts with text, by the detector's verdict (suspected) and the reviewer's "
            "(confirmed: flagged no speech); items flagged unintelligible are left out.",
            labels=["language", "suspected", "confirmed"])
        with self._lock:
            for (result, flag), n in self._results.items():
                results.add_metric([result, flag], float(n))
            for lang in sorted(self._verified):
                verified.add_metric([lang], float(self._verified[lang]))
                confirmed.add_metric([lang], float(self._confirmed[lang]))
            for (lang, suspected, conf), n in sorted(self._matrix.items()):
                matrix.add_metric([lang, _BOOL[suspected], _BOOL[conf]], float(n))
        return out + [results, verified, confirmed, matrix]
