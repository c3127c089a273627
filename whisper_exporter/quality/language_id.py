"""Language identification accuracy of one evaluation, per labelled language, and its gate.

Accuracy of a language = items the server identified as that language / items of it whose
detection request was answered. A detection request that got no answer is counted apart and
fails a gate (an evaluation with holes in it is not a pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol

from whisper_exporter.whisper.language_id import truth_label


class Identified(Protocol):
    """What an item result carries about its detection request."""

    language: str
    detected: Optional[str]  # label of the answer's language; None: no detection request answered
    detect_outcome: str  # "" not asked; the client's outcome otherwise


@dataclass
class LanguageIdSummary:
    language: str
    sent: int = 0  # detection requests
    failed: int = 0  # of them without an answer
    correct: int = 0
    detected: dict[str, int] = field(default_factory=dict)  # detected label -> items

    @property
    def identified(self) -> int:
        return self.sent - self.failed

    @property
    def accuracy(self) -> Optional[float]:
        """Share identified correctly of the answered ones; None when none was answered."""
        return self.correct / self.identified if self.identified else None

    def mistaken_for(self) -> list[tuple[str, int]]:
        """The wrong detections, most frequent first."""
        return sorted(((d, n) for d, n in self.detected.items() if d != self.language), key=lambda dn: (-dn[1], dn[0]))

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "sent": self.sent, "failed": self.failed, "identified": self.identified,
                "correct": self.correct, "accuracy": self.accuracy, "detected": dict(sorted(self.detected.items()))}


def summarize(results: Iterable[Identified]) -> dict[str, LanguageIdSummary]:
    """Per labelled language, over the items that had a detection request."""
    out: dict[str, LanguageIdSummary] = {}
    for r in results:
        if not r.detect_outcome:
            continue
        language = truth_label(r.language)
        s = out.setdefault(language, LanguageIdSummary(language))
        s.sent += 1
        if r.detected is None:
            s.failed += 1
            continue
        s.detected[r.detected] = s.detected.get(r.detected, 0) + 1
        s.correct += r.detected == language
    return dict(sorted(out.items()))


def breaches(summaries: dict[str, LanguageIdSummary], min_accuracy: Optional[float]) -> list[str]:
    """Why the identification gate fails, one sentence each; empty when it passes or is off."""
    if min_accuracy is None:
        return []
    out = []
    for language, s in summaries.items():
        if s.failed:
            out.append(f"{language}: {s.failed} of {s.sent} detection request(s) got no answer")
        if s.accuracy is not None and s.accuracy < min_accuracy:
            out.append(f"{language}: language identification accuracy {s.accuracy:.4f} ({s.correct} of "
                       f"{s.identified}) is below --min-language-id-accuracy {min_accuracy:g}")
    return out


def text_lines(summaries: dict[str, LanguageIdSummary], min_accuracy: Optional[float],
               table: Any) -> list[str]:
    """The report's section: one row per language, with what it was mistaken for."""
    if not summaries:
        return []
    rows = [["language", "sent", "no answer", "correct", "accuracy", "minimum", "mistaken for", ""]]
    for language, s in summaries.items():
        accuracy = "-" if s.accuracy is None else f"{s.accuracy:.4f}"
        verdict = "" if min_accuracy is None else ("FAIL" if s.failed or (s.accuracy is not None and
                                                                        s.accuracy < min_accuracy) else "ok")
        mistaken = ", ".join(f"{d} {n}" for d, n in s.mistaken_for()) or "-"
        rows.append([language, str(s.sent), str(s.failed), str(s.correct), accuracy,
                     "-" if min_accuracy is None else f"{min_accuracy:g}", mistaken, verdict])
    return ["", "Language identification (items sent without a language):"] + table(rows, right=range(1, 6))
