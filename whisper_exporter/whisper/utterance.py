"""One path to read, transcribe and score an utterance, for the probe, the quality collector and `evaluate`.

    u = utterance.run(client, "/canary/en.wav", "the quick brown fox", "en")
    u.outcome, u.elapsed, u.transcript, u.score, u.signals

Audio that cannot be read raises `audio.AudioError` (the caller decides whether
that is a configuration problem or a skipped item); everything the server does
becomes the utterance's outcome, never an exception.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from whisper_exporter.whisper import audio, clients, hallucination, language_id, punctuation, scoring
from whisper_exporter.whisper.punctuation import Punctuation

if TYPE_CHECKING:
    from whisper_exporter.whisper.streaming_clients import StreamTimes

MAX_TRANSCRIPT_CHARS = 20000  # kept and scored at most: alignment is quadratic, and a hostile answer can be megabytes


@dataclass
class Signals:
    """Whisper's reference-free signs of failed decoding, over the answer's segments (verbose_json)."""

    segments: int = 0
    avg_logprob: Optional[float] = None  # lowest of the segments
    compression_ratio: Optional[float] = None  # highest of the segments
    no_speech_prob: Optional[float] = None  # highest of the segments
    fallback_segments: Optional[int] = None  # segments with temperature > 0

    @classmethod
    def of(cls, segments: tuple[clients.Segment, ...]) -> "Signals":
        logprobs = [s.avg_logprob for s in segments if s.avg_logprob is not None]
        ratios = [s.compression_ratio for s in segments if s.compression_ratio is not None]
        silence = [s.no_speech_prob for s in segments if s.no_speech_prob is not None]
        temperatures = [s.temperature for s in segments if s.temperature is not None]
        return cls(
            segments=len(segments),
            avg_logprob=min(logprobs) if logprobs else None,
            compression_ratio=max(ratios) if ratios else None,
            no_speech_prob=max(silence) if silence else None,
            fallback_segments=sum(1 for x in temperatures if x > 0) if temperatures else None,
        )


@dataclass
class Utterance:
    """One utterance sent to the server: what came back and how it scored against its reference."""

    audio_path: str
    language: str
    reference: str
    started: float  # unix seconds
    outcome: str = ""  # the client's outcome: success, http_error, timeout, ...
    elapsed: float = 0.0  # seconds the request took
    status_code: Optional[int] = None
    reason: str = ""
    audio_duration: Optional[float] = None  # seconds, from the file's header
    transcript: Optional[str] = None  # as the server returned it (clipped to MAX_TRANSCRIPT_CHARS)
    score: Optional[scoring.Score] = None
    punctuation: Optional[Punctuation] = None  # marks of the raw texts (whisper/punctuation.py)
    signals: Signals = field(default_factory=Signals)
    suspects: tuple[str, ...] = ()  # why the transcript looks hallucinated (whisper/hallucination.py)
    server_language: Optional[str] = None
    server_duration: Optional[float] = None
    exchange: clients.Exchange = field(default_factory=clients.Exchange)
    stream: Optional["StreamTimes"] = None  # first partial, finalisation lag (streaming APIs)

    @property
    def unit(self) -> str:
        return scoring.unit_for(self.language)


def run(client: clients.WhisperClient, path: str, reference: str, language: str,
        measure_duration: bool = True, detect: bool = False) -> Utterance:
    """Read the audio at `path`, send it with `language` (with `detect`, without it: the server
    identifies it), score the answer against `reference`.

    Raises audio.AudioError when the audio cannot be read (or, with `measure_duration`, has no
    readable duration)."""
    data = audio.read_audio(path)  # a regular file of bounded size, never a FIFO or /dev/zero
    duration = audio.duration_seconds(data, name=path) if measure_duration else None
    started = time.time()
    sent = language_id.DETECTION.get(client.api, ("", None))[1] if detect else language
    outcome = client.transcribe(data, os.path.basename(path), sent)
    u = Utterance(audio_path=path, language=language, reference=reference, started=started,
                  outcome=outcome.outcome, elapsed=outcome.elapsed, status_code=outcome.status_code,
                  reason=outcome.reason, audio_duration=duration, exchange=outcome.exchange,
                  stream=outcome.stream)
    t = outcome.transcription
    if t is None:
        return u
    u.transcript = t.text[:MAX_TRANSCRIPT_CHARS]
    u.server_language, u.server_duration = t.language, t.duration
    u.score = scoring.score(reference, u.transcript, language)
    u.punctuation = punctuation.score(reference, u.transcript)
    u.signals = Signals.of(t.segments)
    u.suspects = check(u.transcript, language, duration if duration is not None else t.duration, t.segments)
    return u


def check(text: str, language: Optional[str], audio_seconds: Optional[float],
          segments: tuple[clients.Segment, ...] = ()) -> tuple[str, ...]:
    """The hallucination reasons for an answer, from its text and (verbose_json) segments."""
    return hallucination.suspect(text, language, audio_seconds, [
        hallucination.Segment(text=s.text or "", no_speech_prob=s.no_speech_prob, avg_logprob=s.avg_logprob,
                              compression_ratio=s.compression_ratio, temperature=s.temperature)
        for s in segments[:hallucination.MAX_SEGMENTS]])
