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
(an evaluation with holes in it is not a pass). A gate must not pass by
accident, so two more things fail it unless allowed explicitly: more skipped
manifest lines than `max_skipped` (default 0), and a language without a
threshold (unless `allow_unthresholded`, or a default threshold covers it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from whisper_exporter.quality import language_id as lid
from whisper_exporter.quality.manifest import Item, Manifest, Problem
from whisper_exporter.whisper import clients, scoring, utterance
from whisper_exporter.whisper.audio import AudioError
from whisper_exporter.whisper.language_id import BOTH, DETECT, GIVEN, detected_label
from whisper_exporter.whisper.punctuation import Punctuation

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
    punctuation: Optional[Punctuation] = None  # the raw texts' marks (whisper/punctuation.py)
    elapsed: float = 0.0  # seconds the request took
    audio_duration: float = 0.0
    started: float = 0.0  # unix seconds
    set: str = "reference"
    suspects: tuple[str, ...] = ()  # hallucination reasons (whisper/hallucination.py)
    detected: Optional[str] = None  # the language the server detected (a label), when sent without one
    detect_outcome: str = ""  # the detection request's outcome; "" when none was sent
    detect_elapsed: float = 0.0  # seconds of a separate detection request (language: both)

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
            "started": self.started, "suspects": list(self.suspects),
            "punctuation": None if self.punctuation is None else self.punctuation.to_dict(),
            "detected": self.detected, "detect_outcome": self.detect_outcome,
        }


def evaluate_item(client: clients.WhisperClient, item: Item, set_: str = "reference", mode: str = GIVEN) -> ItemResult:
    """Send `item`'s audio with its language (mode detect: without it; both: with it, then once
    more without it), score what comes back. Never raises for the server or for the audio file
    (outcome "audio_error": not sent, not counted)."""
    result = ItemResult(
        id=item.id, line=item.line, audio=item.audio, language=item.language, unit=item.unit,
        strata=item.tags, reference=item.reference, result=FAILED, outcome="", audio_duration=item.duration,
        started=time.time(), set=set_,
    )
    try:
        u = utterance.run(client, item.audio, item.reference, item.language, measure_duration=False,
                          detect=mode == DETECT)
        if mode == BOTH:
            d = utterance.run(client, item.audio, item.reference, item.language, measure_duration=False,
                              detect=True)
            result.detect_elapsed = d.elapsed
            _identified(result, d)
    except AudioError as err:
        result.outcome = "audio_error"
        result.reason = f"cannot read {err}"
        return result
    result.outcome, result.elapsed, result.reason = u.outcome, u.elapsed, u.reason
    if mode == DETECT:
        _identified(result, u)
    if u.transcript is None or u.score is None:
        return result
    result.transcript, result.score, result.result = u.transcript, u.score, SCORED
    result.punctuation = u.punctuation
    result.suspects = u.suspects
    return result


def _identified(result: ItemResult, u: utterance.Utterance) -> None:
    """Note what a request sent without a language said about it."""
    result.detect_outcome = u.outcome
    result.detected = detected_label(u.server_language) if u.transcript is not None else None


def worst(results: Iterable[ItemResult], n: int) -> list[ItemResult]:
    """The `n` scored items with the highest error rate (most errors first among equals)."""
    scored = [(r, r.score) for r in results if r.score is not None]
    scored.sort(key=lambda rs: (-rs[1].error_rate, -rs[1].errors, rs[0].id))
    return [r for r, _ in scored[:n]]


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
    suspects: int = 0  # scored utterances whose transcript looks hallucinated
    suspect_reasons: dict[str, int] = field(default_factory=dict)
    punctuation: Punctuation = field(default_factory=Punctuation)  # summed over punctuation_scored
    punctuation_scored: int = 0  # utterances whose reference has marks
    punctuation_threshold: Optional[float] = None  # --max-punctuation-error-rate for this language

    @property
    def punctuation_error_rate(self) -> Optional[float]:
        """PER over the utterances whose reference has marks; None when there were none."""
        return self.punctuation.error_rate if self.punctuation_scored else None

    @property
    def hallucination_rate(self) -> Optional[float]:
        """Share of the scored utterances suspected of hallucination; None when none was scored."""
        return self.suspects / self.scored if self.scored else None

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
        if r.punctuation is not None and r.punctuation.scored:
            self.punctuation_scored += 1
            self.punctuation.add(r.punctuation)
        if r.suspects:
            self.suspects += 1
            for reason in r.suspects:
                self.suspect_reasons[reason] = self.suspect_reasons.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "unit": self.unit, "utterances": self.utterances,
                "scored": self.scored, "failed": self.failed, "reference_units": self.reference_units,
                "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "errors": self.errors, "error_rate": self.error_rate,
                "threshold": self.threshold, "passed": self.passed, "hallucination_suspects": self.suspects,
                "hallucination_rate": self.hallucination_rate, "hallucination_reasons": dict(self.suspect_reasons),
                "punctuation_scored": self.punctuation_scored,
                "punctuation_error_rate": self.punctuation_error_rate,
                "punctuation_threshold": self.punctuation_threshold,
                "punctuation_marks": {m: dict(c) for m, c in self.punctuation.counts.items()}}


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
    max_skipped: Optional[int] = 0  # skipped manifest lines allowed; None: any number
    allow_unthresholded: bool = False  # languages without a threshold are reported, not failed
    max_hallucination_rate: Optional[float] = None  # per language; None: suspects reported, not judged
    max_punctuation_error_rate: Optional[dict[str, float]] = None  # like thresholds; None: PER not judged
    language_mode: str = GIVEN  # given | detect | both (whisper/language_id.py)
    min_language_id_accuracy: Optional[float] = None  # per language; None: reported, not judged

    @property
    def language_id(self) -> dict[str, lid.LanguageIdSummary]:
        return lid.summarize(self.results)

    @property
    def languages(self) -> dict[str, LanguageSummary]:
        out = summarize(self.results, self.thresholds)
        for language, summary in out.items():
            summary.punctuation_threshold = threshold_for(self.max_punctuation_error_rate or {}, language)
        return out

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.result == FAILED]

    def problems(self) -> list[Problem]:
        return list(self.manifest.problems) + [Problem(r.line, r.reason) for r in self.not_sent]

    def unthresholded(self) -> list[str]:
        """Languages evaluated with no threshold to judge them by."""
        return [lang for lang, s in self.languages.items() if s.threshold is None]

    def breaches(self) -> list[str]:
        """Why the gate fails, one sentence each; empty when it passes."""
        out = []
        skipped = len(self.problems())
        if self.max_skipped is not None and skipped > self.max_skipped:
            total = skipped + len(self.results)
            out.append(f"{skipped} of {total} manifest line(s) skipped, more than --max-skipped {self.max_skipped}")
        unjudged = self.unthresholded()
        if unjudged and not self.allow_unthresholded:
            out.append(f"no threshold for {', '.join(unjudged)} (give --max-error-rate LANG=RATE or a default "
                       "rate for every language, or --allow-unthresholded to report them unjudged)")
        for lang, s in self.languages.items():
            if s.threshold is None:
                continue
            if s.error_rate is None:
                out.append(f"{lang}: no utterance could be scored (threshold {s.threshold:g})")
            elif s.error_rate > s.threshold:
                out.append(f"{lang}: {s.unit} error rate {s.error_rate:.4f} is above {s.threshold:g}")
        if self.max_hallucination_rate is not None:
            for lang, s in self.languages.items():
                rate = s.hallucination_rate
                if rate is not None and rate > self.max_hallucination_rate:
                    out.append(f"{lang}: {s.suspects} of {s.scored} transcript(s) suspected of hallucination "
                               f"({rate:.3f}), above --max-hallucination-rate {self.max_hallucination_rate:g}")
        out += self.punctuation_breaches()
        out += lid.breaches(self.language_id, self.min_language_id_accuracy)
        failed = self.failed
        if failed:
            out.append(f"{len(failed)} utterance(s) got no transcript ({', '.join(r.id for r in failed[:5])}"
                       f"{', ...' if len(failed) > 5 else ''})")
        return out

    def punctuation_breaches(self) -> list[str]:
        """The punctuation gate: a PER above its language's limit, or nothing to judge at all."""
        if self.max_punctuation_error_rate is None:
            return []
        out = []
        judged = 0
        for lang, s in self.languages.items():
            rate, limit = s.punctuation_error_rate, s.punctuation_threshold
            if rate is None or limit is None:
                continue  # no reference of it has marks, or no limit covers it
            judged += 1
            if rate > limit:
                out.append(f"{lang}: punctuation error rate {rate:.4f} is above --max-punctuation-error-rate "
                           f"{limit:g} ({s.punctuation.errors} of {s.punctuation.operations} marks)")
        if not judged:  # a gate that judged nothing must not pass by accident
            out.append("--max-punctuation-error-rate judged no language: no reference with punctuation marks "
                       "(. , ? !) in a language it covers")
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
            "max_skipped": self.max_skipped, "allow_unthresholded": self.allow_unthresholded,
            "unthresholded": self.unthresholded(), "max_hallucination_rate": self.max_hallucination_rate,
            "max_punctuation_error_rate": self.max_punctuation_error_rate,
            "language_mode": self.language_mode, "min_language_id_accuracy": self.min_language_id_accuracy,
            "language_id": {k: v.to_dict() for k, v in self.language_id.items()},
        }


def run(manifest: Manifest, client: clients.WhisperClient, thresholds: Optional[dict[str, float]] = None,
        worst_n: int = 10, progress: Optional[Callable[[int, int, ItemResult], None]] = None,
        max_skipped: Optional[int] = 0, allow_unthresholded: bool = False,
        max_hallucination_rate: Optional[float] = None, language_mode: str = GIVEN,
        min_language_id_accuracy: Optional[float] = None,
        max_punctuation_error_rate: Optional[dict[str, float]] = None) -> Report:
    """Every item of the manifest once, one after another."""
    report = Report(manifest=manifest, target=client.url, api=client.api, model=client.model,
                    thresholds=dict(thresholds or {}), worst_n=worst_n, max_skipped=max_skipped,
                    allow_unthresholded=allow_unthresholded, max_hallucination_rate=max_hallucination_rate,
                    language_mode=language_mode, min_language_id_accuracy=min_language_id_accuracy,
                    max_punctuation_error_rate=max_punctuation_error_rate)
    started = time.monotonic()
    total = len(manifest.items)
    for n, item in enumerate(manifest.items, start=1):
        result = evaluate_item(client, item, mode=language_mode)
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


def punctuation_table(report: Report) -> list[str]:
    """PER per language, for the languages whose references have marks (empty when none has)."""
    languages = {k: s for k, s in report.languages.items() if s.punctuation_scored}
    if not languages:
        return []
    rows = [["language", "utterances", "marks", "C", "S", "D", "I", "PER", "limit", ""]]
    for lang, s in languages.items():
        p, limit, rate = s.punctuation, s.punctuation_threshold, s.punctuation_error_rate
        verdict = "" if limit is None or rate is None else ("ok" if rate <= limit else "FAIL")
        rows.append([lang, str(s.punctuation_scored), str(p.operations), str(p.total("correct")),
                     str(p.total("substituted")), str(p.total("deleted")), str(p.total("inserted")),
                     _rate(rate), "-" if limit is None else f"{limit:g}", verdict])
    return ["", "Punctuation (. , ? ! of the utterances whose reference has marks):"] + table(rows, right=range(1, 9))


def text_report(report: Report) -> str:
    m = report.manifest
    lines = [
        f"Evaluated {len(report.results)} utterance(s) from {m.path} against {report.target} "
        f"(api {report.api}, model {report.model}) in {report.seconds:.1f} s",
        "",
    ]
    rows = [["language", "unit", "utterances", "failed", "ref units", "S", "D", "I", "error rate", "threshold",
             "suspects", ""]]
    for lang, s in report.languages.items():
        if s.threshold is None:
            verdict = "unjudged" if report.allow_unthresholded else "FAIL"
        else:
            verdict = "ok" if s.passed else "FAIL"
        rows.append([lang, s.unit, str(s.utterances), str(s.failed), str(s.reference_units),
                     str(s.substitutions), str(s.deletions), str(s.insertions), _rate(s.error_rate),
                     "-" if s.threshold is None else f"{s.threshold:g}", str(s.suspects), verdict])
    lines += table(rows, right=range(2, 11))
    lines += punctuation_table(report)
    suspected = [r for r in report.results if r.suspects]
    if suspected:
        lines += ["", f"Suspected hallucinations ({len(suspected)}):"]
        for r in suspected[: report.worst_n]:
            lines.append(f"  {r.id} (line {r.line}, {r.language}): {', '.join(r.suspects)}: {_clip(r.transcript)!r}")
    lines += lid.text_lines(report.language_id, report.min_language_id_accuracy, table)
    bad = worst(report.results, report.worst_n)
    if bad:
        lines += ["", f"Worst {len(bad)} item(s):"]
        for r in bad:
            score = r.score
            assert score is not None  # worst() returns scored items only
            lines.append(f"  {r.id} (line {r.line}, {r.language}): {r.unit} error rate {score.error_rate:.3f} "
                         f"({score.substitutions} S, {score.deletions} D, {score.insertions} I / "
                         f"{score.reference_units})")
            lines.append(f"      reference:  {_clip(score.reference)!r}")
            lines.append(f"      transcript: {_clip(score.hypothesis)!r}")
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
