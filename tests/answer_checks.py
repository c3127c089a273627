"""What the exporter does with a model's answer, checked against an independent judge.

tiny.en's words on non-speech and edge input differ by CPU (CTranslate2's int8 kernels
differ by instruction set): the undithered beeps come back as "see you in the next
video" four times on one machine and as '' on an AMD EPYC with AVX-512. So the
real-server tests never assert the model's words: they hand whatever the server
answered to these checks, which return the ways the exporter's verdict or counts
disagree with the judge ([] when they agree). tests/test_answer_checks.py feeds the
same checks the answers seen on other CPUs, so no CPU's answer can fail them.

The judge is a few plain rules written here, not the exporter's detector: a word or
phrase said back to back (5 times for one word, 4 for longer), a bare sign-off, an
outro, text without a word, and the model's own no_speech_prob above Whisper's 0.6.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Any, Callable, Optional

from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.whisper.hallucination import segments_from_answer, suspect

Detector = Callable[..., tuple[str, ...]]

# Everyday words that are a hallucination only as the whole transcript of a clip.
SIGN_OFFS = {"you", "thank you", "thank you very much", "thanks for watching", "thank you for watching", "bye"}
# YouTube outros: nobody says them into a transcription service.
OUTROS = ("for watching", "next video", "this video", "subscribe")
NO_SPEECH_PROB = 0.6  # Whisper's no_speech_threshold, as its paper and code give it
COMPRESSION_RATIO = 2.4  # Whisper's compression_ratio_threshold
LOOP_WORDS = 12  # the longest phrase looked for


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def loops(text: str) -> bool:
    """A word said 5 times back to back, or a phrase (up to 12 words) 4 times."""
    w = words(text)
    for n in range(1, LOOP_WORDS + 1):
        reps = 5 if n == 1 else 4
        for i in range(len(w) - n * reps + 1):
            if all(w[i + k * n:i + (k + 1) * n] == w[i:i + n] for k in range(1, reps)):
                return True
    return False


def sign_off(text: str) -> bool:
    return " ".join(words(text)) in SIGN_OFFS


def outro(text: str) -> bool:
    return any(k in text.lower() for k in OUTROS)


def wordless(text: str) -> bool:
    """Text with no letter or digit in it (". . .", a music note)."""
    return bool(text.strip()) and not re.search(r"\w", text)


def model_says_no_speech(answer: dict[str, Any]) -> bool:
    """A segment with text that the model itself gave a no_speech_prob above 0.6."""
    for seg in answer.get("segments") or []:
        prob = seg.get("no_speech_prob")
        if isinstance(prob, (int, float)) and prob > NO_SPEECH_PROB and str(seg.get("text") or "").strip():
            return True
    return False


def model_says_loop(answer: dict[str, Any]) -> bool:
    """Whisper's own loop test on the answer: a segment's compression_ratio, or the whole text's
    zlib ratio, above 2.4 (Whisper retries such a decode at a higher temperature)."""
    for seg in answer.get("segments") or []:
        ratio = seg.get("compression_ratio")
        if isinstance(ratio, (int, float)) and ratio > COMPRESSION_RATIO and str(seg.get("text") or "").strip():
            return True
    data = (answer.get("text") or "").strip().encode()
    return bool(data) and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO


def model_signals(answer: dict[str, Any]) -> set[str]:
    """The reasons the model's own numbers back: what an English model hearing another language
    may rightly be flagged for without the text being an obvious hallucination."""
    text = (answer.get("text") or "").strip()
    backed = set()
    if wordless(text) or model_says_no_speech(answer):
        backed.add("no_speech")
    if model_says_loop(answer):
        backed.add("repetition")
    return backed


def obvious_hallucination(text: str) -> bool:
    """Text nobody would say to a transcription service: a loop, an outro, or a bare sign-off."""
    return loops(text) or outro(text) or sign_off(text)


def counted(language: Optional[str], source: str, reasons: tuple[str, ...], text: str) -> dict[str, float]:
    """What the exporter's hallucination counters show after checking one transcript."""
    counters = HallucinationCounters()
    counters.count(language, source, reasons, text)
    out: dict[str, float] = {}
    for family in counters.families():
        for s in family.samples:
            if s.name.endswith("_total"):
                key = s.name if "reason" not in s.labels else f"{s.name}:{s.labels['reason']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def _count_problems(language: str, source: str, found: tuple[str, ...], text: str) -> list[str]:
    got = counted(language, source, found, text)
    want = {"whisper_hallucination_checked_total": 1.0,
            "whisper_hallucination_suspected_total": 1.0 if found else 0.0}
    problems = [f"{name} is {got.get(name)}, not {n}" for name, n in want.items() if got.get(name) != n]
    for key, n in got.items():
        if key.startswith("whisper_hallucination_suspects_total:"):
            reason = key.split(":", 1)[1]
            if n != (1.0 if reason in found else 0.0):
                problems.append(f"suspects{{reason={reason}}} is {n} for reasons {found}")
    return problems


def exporter_verdict(answer: dict[str, Any], language: Optional[str] = "en",
                     detector: Detector = suspect) -> tuple[str, ...]:
    """The exporter's detector on the server's answer, as the probe and the tap read it."""
    return detector(answer.get("text") or "", language, answer.get("duration"), segments_from_answer(answer))


def non_speech_problems(answer: dict[str, Any], language: str = "en", detector: Detector = suspect) -> list[str]:
    """The answer to a clip nobody spoke on: empty must not be flagged; text must carry every
    reason the judge sees in it (a loop: repetition; a sign-off: known_phrase; no word or the
    model's own no-speech signal: no_speech; an outro: repetition or known_phrase); and the
    counters must count exactly that verdict."""
    text = (answer.get("text") or "").strip()
    found = exporter_verdict(answer, language, detector)
    problems = _count_problems(language, "canary", found, text)
    if not text:
        if found:
            problems.append(f"an empty answer is flagged {found}")
        return problems
    need = set()
    if loops(text):
        need.add("repetition")
    if sign_off(text):
        need.add("known_phrase")
    if wordless(text) or model_says_no_speech(answer):
        need.add("no_speech")
    if not need <= set(found):
        problems.append(f"{text[:60]!r}: flagged {found}, the judge sees {sorted(need)}")
    if outro(text) and not {"repetition", "known_phrase"} & set(found):
        problems.append(f"{text[:60]!r}: an outro, flagged {found}")
    return problems


def speech_problems(answer: dict[str, Any], language: str = "en",
                    detector: Detector = suspect) -> tuple[str, list[str]]:
    """The answer to real speech, as (kind, problems). kind: empty, hallucination (the judge
    sees a loop, outro or bare sign-off: it must be flagged repetition or known_phrase),
    no_speech (flagged only no_speech, backed by text without a word or by the model's own
    no_speech_prob: its own signal, fine on an English model hearing another language),
    model_signal (flagged repetition, and maybe no_speech, each backed by the model's own numbers:
    Whisper's compression-ratio test, its no_speech_prob), or plain (must not be flagged)."""
    text = (answer.get("text") or "").strip()
    found = exporter_verdict(answer, language, detector)
    problems = _count_problems(language, "traffic", found, text)
    if not text:
        return "empty", problems + ([f"an empty answer is flagged {found}"] if found else [])
    if obvious_hallucination(text):
        if not {"repetition", "known_phrase"} & set(found):
            problems.append(f"missed: {text[:80]!r} -> {found}")
        return "hallucination", problems
    if found and set(found) <= model_signals(answer):
        return ("no_speech" if found == ("no_speech",) else "model_signal"), problems
    if found:
        problems.append(f"false positive: {text[:80]!r} -> {found}")
    return "plain", problems


def negative_canary_problems(record: Any) -> list[str]:
    """A probe of a non-speech canary (reference ""): result hallucination exactly when text came
    back, success when none did, the reason naming it, and the suspects the judge sees."""
    text = (record.transcript or "").strip()
    problems = []
    want = "hallucination" if text else "success"
    if record.result != want:
        problems.append(f"result {record.result!r} for transcript {text[:60]!r}, not {want!r}")
    if text and not all(w in record.reason.lower() for w in words(text)[:3]):
        problems.append(f"the reason {record.reason!r} does not quote the transcript")
    need = set()
    if loops(text):
        need.add("repetition")
    if sign_off(text):
        need.add("known_phrase")
    if not need <= set(record.suspects):
        problems.append(f"{text[:60]!r}: suspects {record.suspects}, the judge sees {sorted(need)}")
    if not text and record.suspects:
        problems.append(f"no text, suspects {record.suspects}")
    return problems


def scored_canary_problems(record: Any, reference_units: int, rate: float) -> list[str]:
    """A probe of a canary with a reference: result wrong_transcript exactly when the error rate
    computed independently (`rate`) is above the canary's threshold, the
    exporter's rate equal to it, and a loop the judge sees among its suspects."""
    problems = []
    if record.score is None or abs(record.error_rate - rate) > 1e-9:
        problems.append(f"error rate {record.error_rate}, computed independently {rate}")
    want = "wrong_transcript" if rate > record.max_error_rate else "success"
    if record.result != want:
        problems.append(f"result {record.result!r} at error rate {rate:.3f}, not {want!r}")
    if record.score is not None and record.score.reference_units != reference_units:
        problems.append(f"reference units {record.score.reference_units}, not {reference_units}")
    text = record.transcript or ""
    if loops(text) and "repetition" not in record.suspects:
        problems.append(f"{text[:60]!r}: a loop, suspects {record.suspects}")
    return problems


def probe_command_problems(exit_code: int, output: str, records: dict[str, dict[str, Any]]) -> list[str]:
    """`probe --json` with the default set: the speech canary succeeds; the silence canary is a
    hallucination exactly when text came back, and then a finding in the output; the command exits 1
    exactly when some canary failed other than by hallucinating (that is a finding, exit 0)."""
    problems = []
    speech = records["en-short"]
    if speech["result"] != "success" or not 0 < (speech["realtime_factor"] or 0) < 5:
        problems.append(f"en-short: {speech['result']}, real-time factor {speech['realtime_factor']}")
    silence = records["silence"]
    text = (silence["transcript"] or "").strip()
    want = "hallucination" if text else "success"
    if silence["result"] != want:
        problems.append(f"silence: {silence['result']!r} for transcript {text[:60]!r}, not {want!r}")
    if text and not silence["suspects"] and (sign_off(text) or loops(text) or wordless(text)):
        problems.append(f"silence: {text[:60]!r} has no suspects")
    if (silence["result"] == "hallucination") != any("silence" in f for f in output_findings(output)):
        problems.append(f"silence: {silence['result']!r} but findings {output_findings(output)}")
    failed = any(r["result"] not in ("success", "hallucination") for r in records.values())
    if exit_code != (1 if failed else 0):
        problems.append(f"exit code {exit_code} with results {[r['result'] for r in records.values()]}")
    return problems


def output_findings(output: str) -> list[str]:
    """The findings of `probe --json` output, or of its text output."""
    try:
        return list(json.loads(output).get("findings", []))
    except ValueError:
        return [line for line in output.splitlines() if line.startswith("Finding:")]


def answered_transcript(body: bytes) -> str:
    """The transcript in an answer body, read here: a JSON answer's `text`, else the body itself."""
    import json

    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    return obj.get("text", "") if isinstance(obj, dict) else body.decode("utf-8", "replace")


def tap_transcript_problems(record: Any, body: bytes) -> list[str]:
    """The tap's record of an answered request holds the transcript the client got, '' included."""
    want = answered_transcript(body)
    if record.transcript != want:
        return [f"the tap recorded {record.transcript!r:.80}, the client got {want!r:.80}"]
    return []


def upgrade_problems(record: Any, verbose: dict[str, Any]) -> list[str]:
    """A json request the tap asked as verbose_json: its record has the verbose answer's language
    and as many segments, each with the decoding signals, however many the model wrote."""
    problems = []
    if not (record.upgraded and record.response_format == "json"):
        problems.append(f"upgraded {record.upgraded}, response_format {record.response_format}")
    if record.language != verbose.get("language"):
        problems.append(f"language {record.language!r}, the server said {verbose.get('language')!r}")
    segments = record.segments or []
    if len(segments) != len(verbose.get("segments") or []):
        problems.append(f"{len(segments)} segments, the server wrote {len(verbose.get('segments') or [])}")
    for seg in segments:
        if not {"avg_logprob", "compression_ratio", "no_speech_prob"} <= set(seg):
            problems.append(f"a segment without the decoding signals: {sorted(seg)}")
    return problems
