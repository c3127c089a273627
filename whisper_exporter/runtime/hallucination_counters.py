"""`whisper_hallucination_*`: transcripts checked and suspected, from every source, counted in one place.

Every transcript the exporter sees is checked (whisper/hallucination.py) and
counted here by language and source (canary, reference, traffic): the checked
counter is the denominator, so the hallucination ratio over any window is exact,
`rate(suspects) / rate(checked)`. A transcript with several reasons counts once
per reason in the suspects counter; `whisper_hallucination_suspected_total`
counts it once, for the ratio. Languages are bounded like every label taken
from input.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

from prometheus_client.core import CounterMetricFamily, Metric

from whisper_exporter.whisper.hallucination import REASONS
from whisper_exporter.whisper.languages import language_code

SOURCES = ("canary", "reference", "traffic")
MAX_LANGUAGES = 128
RECENT = 20  # suspects kept for the status page
CLIP = 160  # characters of a suspect transcript kept for the status page


@dataclass(frozen=True)
class Suspect:
    """One suspected transcript, for the status page."""

    when: float  # unix seconds
    source: str
    language: str
    reasons: tuple[str, ...]
    text: str  # clipped


class HallucinationCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, str], int] = {}  # (language, source)
        self._suspected: dict[tuple[str, str], int] = {}
        self._reasons: dict[tuple[str, str, str], int] = {}  # (language, reason, source)
        self._languages: set[str] = set()
        self._recent: deque[Suspect] = deque(maxlen=RECENT)

    def _language(self, language: Optional[str]) -> str:
        code = language_code(language) if language else None
        if code is None:
            return "unknown"
        if code in self._languages:
            return code
        if len(self._languages) >= MAX_LANGUAGES:
            return "other"
        self._languages.add(code)
        return code

    def count(self, language: Optional[str], source: str, reasons: tuple[str, ...], text: str = "") -> None:
        """One transcript checked from `source`, with the reasons it is suspected for (or none)."""
        with self._lock:
            lang = self._language(language)
            self._checked[(lang, source)] = self._checked.get((lang, source), 0) + 1
            if not reasons:
                return
            self._suspected[(lang, source)] = self._suspected.get((lang, source), 0) + 1
            for reason in reasons:
                key = (lang, reason, source)
                self._reasons[key] = self._reasons.get(key, 0) + 1
            clipped = text if len(text) <= CLIP else text[: CLIP - 3] + "..."
            self._recent.appendleft(Suspect(time.time(), source, lang, reasons, clipped))

    def recent(self) -> list[Suspect]:
        """The last suspects, newest first."""
        with self._lock:
            return list(self._recent)

    def families(self) -> Iterable[Metric]:
        checked = CounterMetricFamily(
            "whisper_hallucination_checked_total",
            "Transcripts checked for hallucination (text nobody said), by language and source "
            "(canary, reference, traffic): the denominator of the hallucination ratio.",
            labels=["language", "source"])
        suspected = CounterMetricFamily(
            "whisper_hallucination_suspected_total",
            "Transcripts suspected of hallucination for at least one reason, by language and source.",
            labels=["language", "source"])
        suspects = CounterMetricFamily(
            "whisper_hallucination_suspects_total",
            "Suspected transcripts by reason: repetition (a decoding loop), known_phrase (a phrase Whisper "
            "writes on non-speech), no_speech (text where Whisper itself said nobody spoke), too_much_text "
            "(more text than the audio can hold).", labels=["language", "reason", "source"])
        with self._lock:
            for (lang, source), n in sorted(self._checked.items()):
                checked.add_metric([lang, source], float(n))
                suspected.add_metric([lang, source], float(self._suspected.get((lang, source), 0)))
                for reason in REASONS:  # zero-initialised, so increase() sees the first suspect
                    suspects.add_metric([lang, reason, source], float(self._reasons.get((lang, reason, source), 0)))
        return [checked, suspected, suspects]
