"""One evaluation of labeled utterances against the Whisper server, and its report.

`evaluate_item()` sends one manifest item to the server and scores the
transcript (Whisper's normalisers + jiwer, scoring.py); the quality collector
uses it for its sampled runs. `run()` does one full pass over a manifest, for
the `whisper-exporter evaluate` quality gate: a summary per language, with
its corpus error rate sum(S + D + I) / sum(reference units) over the scored
utterances, the worst items, the manifest's skipped lines, and the verdict
against per-language thresholds.

Verdict: a language fails when its error rate is above its threshold (equal
passes), or when it has a threshold and no utterance of it could be scored.
The whole run fails when a language fails or an utterance got no transcript
(an evaluation with holes in it is not a pass).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from whisper_exporter.whisper import audio, clients
from whisper_exporter.whisper import scoring
from whisper_exporter.quality.manifest import Item, Manifest, Problem

DEFAULT_THRESHOLD = "default"  # the thresholds key for "every other language"
SCORED, FAILED = "scored", "failed"


@dataclass
class ItemResult:
    """One utterance sent and scored (or not)."""

    id: str
    line: int
    audio: str
    language: str
    unit: str
    strata: dict[str, str]
    reference: str
    result: str  # scored | failed
    outcome: str  # the client's outcome (success, http_error, ...); "audio_error" when not sent
    reason: str = ""
    transcript: Optional[str] = None  # as the server returned it
    score: Optional[scoring.Score] = None
    elapsed: float = 0.0  # seconds the request took
    audio_duration: float = 0.0
    started: float = 0.0  # unix seconds
    set: str = "reference"

    @property
    def error_rate(self) -> Optional[float]:
        return None if self.score is None else self.score.error_rate

    def to_dict(self) -> dict[str, Any]:
        s = self.score
        return {
            "id": self.id, "line": self.line, "audio": self.audio, "language": self.language,
            "unit": self.unit, "strata": dict(self.strata), "set": self.set, "result": self.result,
            "outcome": self.outcome, "reason": self.reason, "reference": self.reference,
            "transcript": self.transcript,
            "reference_normalized": None if s is None else s.reference,
            "transcript_normalized": None if s is None else s.hypothesis,
            "reference_units": None if s is None else s.reference_units,
            "substitutions": None if s is None else s.substitutions,
            "deletions": None if s is None else s.deletions,
            "insertions": None if s is None else s.insertions,
            "errors": None if s is None else s.errors,
            "error_rate": self.error_rate,
            "elapsed_seconds": round(self.elapsed, 6), "audio_seconds": self.audio_duration,
            "started": self.started,
        }


def evaluate_item(client: clients.WhisperClient, item: Item, set_: str = "reference") -> ItemResult:
    """Send `item`'s audio with its language, score what comes back. Never raises for the
    server or for the audio file (outcome "audio_error": not sent, not counted)."""
    result = ItemResult(
        id=item.id, line=item.line, audio=item.audio, language=item.language, unit=item.unit,
        strata=item.tags, reference=item.reference, result=FAILED, outcome="", audio_duration=item.duration,
        started=time.time(), set=set_,
    )
    try:
        data = audio.read_audio(item.audio)  # a regular file of bounded size, never a FIFO
    except audio.AudioError as err:
        result.outcome = "audio_error"
        result.reason = f"cannot read {err}"
        return result
    outcome = client.transcribe(data, os.path.basename(item.audio), item.language)
    result.outcome, result.elapsed, result.reason = outcome.outcome, outcome.elapsed, outcome.reason
    if outcome.transcription is None:
        return result
    result.transcript = outcome.transcription.text
    result.score = scoring.score(item.reference, outcome.transcription.text, item.language)
    result.result = SCORED
    return result


def worst(results: Iterable[ItemResult], n: int) -> list[ItemResult]:
    """The `n` scored items with the highest error rate (most errors first among equals)."""
    scored = [r for r in results if r.score is not None]
    scored.sort(key=lambda r: (-r.score.error_rate, -r.score.errors, r.id))
    return scored[:n]


@dataclass
class LanguageSummary:
    language: str
    unit: str
    utterances: int = 0
    scored: int = 0
    failed: int = 0
    reference_units: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    threshold: Optional[float] = None

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> Optional[float]:
        """Corpus rate over the scored utterances; None when none was scored."""
        if not self.scored:
            return None
        if self.reference_units:
            return self.errors / self.reference_units
        return 0.0 if not self.errors else 1.0

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        rate = self.error_rate
        return rate is not None and rate <= self.threshold

    def add(self, r: ItemResult) -> None:
        self.utterances += 1
        if r.score is None:
            self.failed += 1
            return
        self.scored += 1
        self.reference_units += r.score.reference_units
        self.substitutions += r.score.substitutions
        self.deletions += r.score.deletions
        self.insertions += r.score.insertions

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "unit": self.unit, "utterances": self.utterances,
                "scored": self.scored, "failed": self.failed, "reference_units": self.reference_units,
                "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "errors": self.errors, "error_rate": self.error_rate,
                "threshold": self.threshold, "passed": self.passed}


def summarize(results: Iterable[ItemResult], thresholds: Optional[dict[str, float]] = None) -> dict[str, LanguageSummary]:
    thresholds = thresholds or {}
    out: dict[str, LanguageSummary] = {}
    for r in results:
        if r.outcome == "audio_error":
            continue
        summary = out.get(r.language)
        if summary is None:
            summary = out[r.language] = LanguageSummary(r.language, r.unit)
        summary.add(r)
    for language, summary in out.items():
        summary.threshold = threshold_for(thresholds, language)
    return dict(sorted(out.items()))


def threshold_for(thresholds: dict[str, float], language: str) -> Optional[float]:
    if language in thresholds:
        return thresholds[language]
    return thresholds.get(DEFAULT_THRESHOLD)


def parse_thresholds(text: str) -> dict[str, float]:
    """'en=0.1,zh=0.15' (and a bare number for every other language: '0.3,en=0.1'). Raises ValueError."""
    from whisper_exporter.quality.manifest import language_code

    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.rpartition("=")
        key = key.strip() if sep else DEFAULT_THRESHOLD
        if key in ("*", DEFAULT_THRESHOLD):
            key = DEFAULT_THRESHOLD
        else:
            code = language_code(key)
            if code is None:
                raise ValueError(f"unknown language {key!r} in {part!r}")
            key = code
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"not an error rate: {value.strip()!r} in {part!r}") from None
        if not rate >= 0 or rate == float("inf"):
            raise ValueError(f"an error rate of 0 or more expected in {part!r}")
        out[key] = rate
    if not out:
        raise ValueError("no threshold given")
    return out


@dataclass
class Report:
    manifest: Manifest
    target: str
    api: str
    model: str
    results: list[ItemResult] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    worst_n: int = 10
    not_sent: list[ItemResult] = field(default_factory=list)  # audio that vanished after loading

    @property
    def languages(self) -> dict[str, LanguageSummary]:
        return summarize(self.results, self.thresholds)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.result == FAILED]

    def problems(self) -> list[Problem]:
        return list(self.manifest.problems) + [Problem(r.line, r.reason) for r in self.not_sent]

    def breaches(self) -> list[str]:
        """Why the gate fails, one sentence each; empty when it passes."""
        out = []
        for lang, s in self.languages.items():
            if s.threshold is None:
                continue
            if s.error_rate is None:
                out.append(f"{lang}: no utterance could be scored (threshold {s.threshold:g})")
            elif s.error_rate > s.threshold:
                out.append(f"{lang}: {s.unit} error rate {s.error_rate:.4f} is above {s.threshold:g}")
        failed = self.failed
        if failed:
            out.append(f"{len(failed)} utterance(s) got no transcript ({', '.join(r.id for r in failed[:5])}"
                       f"{', ...' if len(failed) > 5 else ''})")
        return out

    @property
    def passed(self) -> bool:
        return not self.breaches()

    def unused_thresholds(self) -> list[str]:
        present = {r.language for r in self.results}
        return sorted(k for k in self.thresholds if k != DEFAULT_THRESHOLD and k not in present)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest.path, "target": self.target, "api": self.api, "model": self.model,
            "seconds": round(self.seconds, 3), "passed": self.passed, "breaches": self.breaches(),
            "thresholds": dict(self.thresholds),
            "languages": {k: v.to_dict() for k, v in self.languages.items()},
            "items": [r.to_dict() for r in self.results],
            "worst": [r.id for r in worst(self.results, self.worst_n)],
            "manifest_problems": [{"line": p.line, "message": p.message} for p in self.problems()],
            "unused_thresholds": self.unused_thresholds(),
        }


def run(manifest: Manifest, client: clients.WhisperClient, thresholds: Optional[dict[str, float]] = None,
        worst_n: int = 10, progress: Optional[Callable[[int, int, ItemResult], None]] = None) -> Report:
    """Every item of the manifest once, one after another."""
    report = Report(manifest=manifest, target=client.url, api=client.api, model=client.model,
                    thresholds=dict(thresholds or {}), worst_n=worst_n)
    started = time.monotonic()
    total = len(manifest.items)
    for n, item in enumerate(manifest.items, start=1):
        result = evaluate_item(client, item)
        if result.outcome == "audio_error":
            report.not_sent.append(result)
        else:
            report.results.append(result)
        if progress is not None:
            progress(n, total, result)
    report.seconds = time.monotonic() - started
    return report


# -- text ---------------------------------------------------------------------------------------


def _rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _clip(text: Optional[str], limit: int = 120) -> str:
    if text is None:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def text_report(report: Report) -> str:
    m = report.manifest
    lines = [
        f"Evaluated {len(report.results)} utterance(s) from {m.path} against {report.target} "
        f"(api {report.api}, model {report.model}) in {report.seconds:.1f} s",
        "",
    ]
    rows = [["language", "unit", "utterances", "failed", "ref units", "S", "D", "I", "error rate", "threshold", ""]]
    for lang, s in report.languages.items():
        verdict = "" if s.threshold is None else ("ok" if s.passed else "FAIL")
        rows.append([lang, s.unit, str(s.utterances), str(s.failed), str(s.reference_units),
                     str(s.substitutions), str(s.deletions), str(s.insertions), _rate(s.error_rate),
                     "-" if s.threshold is None else f"{s.threshold:g}", verdict])
    lines += table(rows, right=range(2, 10))
    bad = worst(report.results, report.worst_n)
    if bad:
        lines += ["", f"Worst {len(bad)} item(s):"]
        for r in bad:
            s = r.score
            lines.append(f"  {r.id} (line {r.line}, {r.language}): {r.unit} error rate {s.error_rate:.3f} "
                         f"({s.substitutions} S, {s.deletions} D, {s.insertions} I / {s.reference_units})")
            lines.append(f"      reference:  {_clip(s.reference)!r}")
            lines.append(f"      transcript: {_clip(s.hypothesis)!r}")
    failed = report.failed
    if failed:
        lines += ["", f"No transcript for {len(failed)} item(s):"]
        lines += [f"  {r.id} (line {r.line}): {r.outcome}: {r.reason}" for r in failed]
    problems = report.problems()
    if problems:
        lines += ["", f"Skipped {len(problems)} manifest line(s):"]
        lines += [f"  {p}" for p in problems]
    unused = report.unused_thresholds()
    if unused:
        lines += ["", f"Thresholds for languages not in the manifest: {', '.join(unused)}"]
    breaches = report.breaches()
    lines.append("")
    lines.append("Result: PASS" if not breaches else "Result: FAIL: " + "; ".join(breaches))
    return "\n".join(lines)
