"""Hallucination suspects: text that Whisper wrote although nobody said it.

`suspect(text, language, audio_seconds, segments)` returns the reasons to
suspect a transcript, in REASONS order, or () for none. Pure functions, no
metrics; the callers count (docs/hallucination.md).

- repetition: a decoding loop. Whisper's own test, the zlib compression ratio
  of the text above 2.4 (computed as Whisper does, on windows about the size
  of one 30 s decoding window, so a long transcript is not penalised for being
  long), or the ratio a segment reports; or a run of one n-gram repeated
  back to back (5 times for one word, 4 for longer n-grams, 8 for one CJK
  character), which catches short loops ("you you you you you") that are too
  short for the compression ratio to say anything.
- known_phrase: the normalised transcript (case, punctuation, spacing and
  width do not matter) is made up of phrases from the bag, repeated or not,
  joined or not by a few CONNECTORS, the last repetition possibly cut off ("Thanks for watching! Thanks for wat");
  or it contains a phrase marked `match: anywhere` (subtitle credits such as
  "Subtitles by the Amara.org community", which real speech never contains).
  Everyday phrases ("Thank you.") only count when they are the whole
  transcript: inside real speech they are real speech.
- no_speech: a segment with text whose no_speech_prob is above Whisper's 0.6,
  or a transcript with text but no word in it (". . .", "♪").
- too_much_text: more characters than the audio can hold at a per-language
  bound on characters per second (only when the duration is known).
"""
from __future__ import annotations

import functools
import itertools
import math
import re
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping, Optional, Sequence, TypeGuard

REASONS = ("repetition", "known_phrase", "no_speech", "too_much_text")

COMPRESSION_RATIO_THRESHOLD = 2.4  # Whisper's compression_ratio_threshold
NO_SPEECH_THRESHOLD = 0.6  # Whisper's no_speech_threshold
# Whisper decodes 30 s windows; ~30 s of fast speech is ~500 bytes of text. Longer
# transcripts are judged window by window, as Whisper judges each window.
COMPRESSION_WINDOW = 512
# zlib's output is never under 11 bytes, so a text under 27 bytes cannot exceed 2.4.
COMPRESSION_MIN_BYTES = 27
MAX_NGRAM = 12  # the longest looping unit looked for (words, or CJK characters)
MAX_UNITS = 4000  # n-gram search is on the first MAX_UNITS units
MAX_TEXT = 20_000  # characters of a transcript that are examined (hostile input)
MAX_SEGMENTS = 1000

# Characters per second (whitespace not counted) that speech does not exceed.
# Fast speech is ~20 letters/s in alphabetic scripts; Mandarin ~7 and Japanese
# ~10 characters/s, Korean ~8 syllable blocks/s. The bounds leave a wide margin:
# the point is text that no audio of that length could hold.
CHARS_PER_SECOND = {"zh": 12.0, "yue": 12.0, "ja": 16.0, "ko": 14.0}
DEFAULT_CHARS_PER_SECOND = 30.0
CHARS_SLACK = 12  # a one-word answer on a very short clip is not "too much"

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff\u0f00-\u0fff"
# Units for loop search: a word, or one character of a script written without spaces.
_UNIT = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_NOT_WORD = re.compile(r"[\W_]+")
# Arabic letters that the same word is written with or without (hamza on alef, alef maqsura).
_ARABIC_FOLD = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي"})


@dataclass(frozen=True)
class Segment:
    text: str
    no_speech_prob: Optional[float] = None
    avg_logprob: Optional[float] = None
    compression_ratio: Optional[float] = None
    temperature: Optional[float] = None


# ASCII text (most English) is lower-cased and its punctuation turned into spaces by one
# str.translate, which CPython runs from a cache for ASCII; other text takes NFKC + casefold + a regex.
_ASCII_WORDS = {i: (chr(i).lower() if chr(i).isalnum() else " ") for i in range(128)}
# Windows whose share of distinct words is above this never compressed beyond 2.4 in our
# tests (tests/test_hallucination.py pins it on adversarial loops): zlib is skipped for them.
COMPRESSION_SCREEN = 0.85


def _words(text: str) -> tuple[list[str], bool]:
    """The text's words, case-folded, without punctuation; and whether it was all ASCII."""
    if text.isascii():
        return text.translate(_ASCII_WORDS).split(), True
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split(), False


def normalize(text: str) -> str:
    """Matching form: NFKC, case-folded, without anything but letters and digits."""
    words, ascii_only = _words(text)
    key = "".join(words)
    return key if ascii_only else key.translate(_ARABIC_FOLD)


def compression_ratio(text: str) -> float:
    """Whisper's compression ratio: UTF-8 bytes over zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _window_ratio(data: bytes) -> float:
    # Same size as zlib.compress(data) for inputs up to 512 bytes (a 1 KiB window reaches
    # every match, and the block buffer holds every symbol); a fifth of its set-up cost.
    c = zlib.compressobj(6, zlib.DEFLATED, 10, 4)
    return len(data) / len(c.compress(data) + c.flush())


def _compresses_like_a_loop(text: str, screen: bool = True) -> bool:
    """Some ~30 s window of the text has a zlib compression ratio above 2.4."""
    data = text.encode("utf-8", "replace")
    if len(data) < COMPRESSION_MIN_BYTES:
        return False
    for start in range(0, len(data), COMPRESSION_WINDOW):
        window = data[start:start + COMPRESSION_WINDOW]
        if start and len(window) < COMPRESSION_WINDOW // 2:
            window = data[max(0, len(data) - COMPRESSION_WINDOW):]  # a short tail joins the one before
        if len(window) < COMPRESSION_MIN_BYTES:
            continue
        if screen and window.isascii():
            words = window.split()
            if len(words) >= 4 and len(set(words)) > COMPRESSION_SCREEN * len(words):
                continue  # too few repeated words to compress that well
        if _window_ratio(window) > COMPRESSION_RATIO_THRESHOLD:
            return True
    return False


def _units(text: str) -> list[str]:
    """Units for loop search: words, and each character of scripts written without spaces."""
    words, ascii_only = _words(text[:MAX_TEXT])
    if ascii_only or not _CJK_CHAR.search(text, 0, MAX_TEXT):
        return words[:MAX_UNITS]
    return _UNIT.findall(" ".join(words))[:MAX_UNITS]


def repeated_run(units: Sequence[str]) -> bool:
    """True when one n-gram (n <= MAX_NGRAM) repeats back to back often enough to be a loop.

    5 times for one word, 8 for one CJK character ("哈哈哈哈" is laughter), 4 for longer n-grams.
    """
    if len(units) < 5:
        return False
    # Every unit of a looping n-gram occurs at least 4 times, and one of its occurrences is
    # followed by more at n, 2n and 3n units: only those few starts are verified.
    frequent = {u for u, c in Counter(units).items() if c >= 4}
    if not frequent:
        return False
    where: dict[str, list[int]] = {u: [] for u in frequent}
    for i, u in enumerate(units):
        if u in frequent:
            where[u].append(i)
    for positions in where.values():
        at = set(positions)
        for p in positions:
            for n in range(1, MAX_NGRAM + 1):
                if p + n in at and p + 2 * n in at and p + 3 * n in at and _loops(units, p, n):
                    return True
    return False


def _loops(units: Sequence[str], p: int, n: int) -> bool:
    gram = units[p:p + n]
    reps = 4 if n > 1 else 8 if _CJK_CHAR.match(gram[0]) else 5
    return all(units[p + k * n:p + (k + 1) * n] == gram for k in range(1, reps))


@functools.lru_cache(maxsize=256)
def chars_per_second(language: Optional[str]) -> float:
    """The bound for a language code or locale ("zh", "zh-TW", "ja_JP"); the default for others."""
    base = (language or "").strip().lower().replace("_", "-").split("-", 1)[0]
    return CHARS_PER_SECOND.get(base, DEFAULT_CHARS_PER_SECOND)


def too_much_text(text: str, language: Optional[str], audio_seconds: Optional[float]) -> bool:
    """More characters than `audio_seconds` of speech can hold in this language."""
    if not isinstance(audio_seconds, (float, int)) or isinstance(audio_seconds, bool) \
            or not 0 <= audio_seconds < math.inf:
        return False  # unknown, NaN, negative, infinite, or a bool: no judgement
    chars = len(text) - text.count(" ") - text.count("\n")
    if chars <= CHARS_SLACK:
        return False
    bound = chars_per_second(language if isinstance(language, str) else None)
    return chars > bound * audio_seconds + CHARS_SLACK


# ---------------------------------------------------------------------------
# The phrase bag

# Words Whisper strings its sign-offs together with ("Thank you for watching and I'll see
# you in the next video, bye!"): allowed between and after bag phrases, never a phrase on
# their own ("Bye bye." and "Okay, bye." are how real calls end).
CONNECTORS = ("and", "so", "but", "then", "also", "again", "oh", "okay", "ok", "guys", "everyone", "bye",
              "that's it", "und", "et", "y", "e", "и")


@dataclass(frozen=True)
class Phrase:
    text: str
    language: str
    source: str
    anywhere: bool = False  # match inside a longer transcript, not only as all of it


class PhraseBag:
    """Known hallucination phrases, searched all at once (Aho–Corasick, pyahocorasick)."""

    def __init__(self, phrases: Iterable[Phrase]):
        import ahocorasick  # C extension; imported here so the module loads without it for tests of the rest

        self.phrases = list(phrases)
        self._automaton = ahocorasick.Automaton()
        keys: dict[str, bool] = {}
        for phrase in self.phrases:
            key = normalize(phrase.text)
            if key:
                keys[key] = keys.get(key, False) or phrase.anywhere
        for key, anywhere in keys.items():
            self._automaton.add_word(key, (len(key), anywhere, key))
        for word in map(normalize, CONNECTORS):
            if word not in keys:
                self._automaton.add_word(word, (len(word), False, ""))  # no phrase key: a connector
        self._empty = not keys
        if keys:
            self._automaton.make_automaton()

    @classmethod
    def from_yaml(cls, text: str, origin: str = "phrase file") -> "PhraseBag":
        """Parse the phrase file format (docs/hallucination.md). Raises ValueError on a bad entry."""
        import yaml

        data = yaml.safe_load(text)
        entries = data.get("phrases") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{origin}: expected a mapping with a list `phrases`")
        phrases = []
        for i, entry in enumerate(entries):
            where = f"{origin}: phrases[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a mapping")
            unknown = set(entry) - {"text", "language", "source", "match"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            for key in ("text", "language", "source"):
                if not isinstance(entry.get(key), str) or not entry[key].strip():
                    raise ValueError(f"{where}: `{key}` must be a non-empty string")
            match = entry.get("match", "whole")
            if match not in ("whole", "anywhere"):
                raise ValueError(f"{where}: `match` must be whole or anywhere, not {match!r}")
            if not normalize(entry["text"]):
                raise ValueError(f"{where}: {entry['text']!r} has no letters or digits to match")
            phrases.append(Phrase(entry["text"], entry["language"], entry["source"], match == "anywhere"))
        return cls(phrases)

    def languages(self) -> set[str]:
        return {p.language for p in self.phrases}

    def matches(self, key: str) -> bool:
        """True when the normalised text is made of bag phrases, or holds an `anywhere` phrase."""
        if self._empty or not key:
            return False
        spans = []
        for end, (length, anywhere, phrase_key) in self._automaton.iter(key):
            if anywhere:
                return True
            spans.append((end + 1 - length, end + 1, phrase_key))
        spans.sort()
        if not spans or spans[0][0] != 0:
            return False
        reach, i, last = 0, 0, ""
        while reach < len(key):
            best, best_key = reach, last
            while i < len(spans) and spans[i][0] <= reach:
                if spans[i][1] > best:
                    best, best_key = spans[i][1], spans[i][2] or last
                i += 1
            if best == reach:
                break
            reach, last = best, best_key
        if not last:
            return False  # connectors alone ("and so") are no phrase
        if reach >= len(key):
            return True
        # A loop cut off mid-phrase by the token limit: the rest starts the last phrase again.
        rest = key[reach:]
        return any(s[2].startswith(rest) for s in spans if s[2])


@functools.lru_cache(maxsize=1)
def default_bag() -> PhraseBag:
    """The bag shipped with the package (hallucination_phrases.yml)."""
    text = resources.files(__package__).joinpath("hallucination_phrases.yml").read_text(encoding="utf-8")
    return PhraseBag.from_yaml(text, "hallucination_phrases.yml")


# ---------------------------------------------------------------------------
# The detector


def suspect(text: str, language: Optional[str], audio_seconds: Optional[float],
            segments: Sequence[Segment] = (), *, bag: Optional[PhraseBag] = None) -> tuple[str, ...]:
    """The reasons (a subset of REASONS, in that order) to suspect `text` is a hallucination."""
    if not isinstance(text, str):
        return ()
    stripped = text.strip()
    if not stripped:
        return ()
    clipped = stripped[:MAX_TEXT]
    words, ascii_only = _words(clipped)
    key = "".join(words) if ascii_only else "".join(words).translate(_ARABIC_FOLD)
    try:
        seg_list = [s for s in itertools.islice(segments, MAX_SEGMENTS) if isinstance(s, Segment)]
    except TypeError:  # not iterable
        seg_list = []
    found = set()

    if key:
        if ascii_only or not _CJK_CHAR.search(clipped):
            units = words[:MAX_UNITS]
        else:
            units = _UNIT.findall(" ".join(words))[:MAX_UNITS]
        if repeated_run(units) or _compresses_like_a_loop(clipped):
            found.add("repetition")
    if any(_finite(s.compression_ratio) and s.compression_ratio > COMPRESSION_RATIO_THRESHOLD
           and isinstance(s.text, str) and s.text.strip() for s in seg_list):
        found.add("repetition")
    if key and (bag or default_bag()).matches(key):
        found.add("known_phrase")
    if not key or any(_finite(s.no_speech_prob) and s.no_speech_prob > NO_SPEECH_THRESHOLD
                      and isinstance(s.text, str) and s.text.strip() for s in seg_list):
        found.add("no_speech")
    if too_much_text(stripped, language, audio_seconds):
        found.add("too_much_text")
    return tuple(r for r in REASONS if r in found)


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def segments_from_answer(answer: Any) -> list[Segment]:
    """The segments of an OpenAI / faster-whisper / whisper.cpp verbose_json answer; [] when it has none."""
    if not isinstance(answer, Mapping):
        return []
    raw = answer.get("segments")
    if not isinstance(raw, (list, tuple)):
        return []
    segments = []
    for item in raw[:MAX_SEGMENTS]:
        if not isinstance(item, Mapping):
            continue
        text = item.get("text")
        segments.append(Segment(
            text=text[:MAX_TEXT] if isinstance(text, str) else "",
            no_speech_prob=_number(item.get("no_speech_prob")),
            avg_logprob=_number(item.get("avg_logprob")),
            compression_ratio=_number(item.get("compression_ratio")),
            temperature=_number(item.get("temperature")),
        ))
    return segments


# ---------------------------------------------------------------------------
# Cost control for hot paths


class CpuBudget:
    """Lets a hot path run the detector within a CPU budget, and skips it beyond.

    The detector may use `share` of the CPU the process itself uses, plus `floor` of
    one core: a few hundred checks a second whatever the rest of the process does.
    At real request rates (a Whisper server answers tens of requests a second, a
    check takes tens of microseconds) every transcript is checked; replaying a
    backlog (a log read from the beginning) checks as many as fit. Callers count
    what was checked, so a ratio over checked transcripts stays exact.
    """

    SKIP = 64  # calls skipped without reading a clock, once over budget

    def __init__(self, share: float = 0.02, floor: float = 0.005,
                 cpu=time.process_time, wall=time.monotonic):
        self.share, self.floor = share, floor
        self._cpu, self._wall = cpu, wall
        self._cpu0, self._wall0 = cpu(), wall()
        self._spent = 0.0
        self._skip = 0

    def run(self, check, *args):
        """check(*args) when within budget, else None."""
        if self._skip:
            self._skip -= 1
            return None
        begin = self._cpu()
        allowed = (begin - self._cpu0) * self.share + (self._wall() - self._wall0) * self.floor + 0.001
        if self._spent > allowed:
            self._skip = self.SKIP
            return None
        try:
            return check(*args)
        finally:
            self._spent += self._cpu() - begin
