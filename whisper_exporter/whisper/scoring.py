"""Word (or character) error counts, the way Whisper's own evaluation computes them.

Both texts are first normalised like Whisper's evaluation does: the English
normaliser (`EnglishTextNormalizer`: "Mr." -> "mister", spelled-out numbers to
digits, British to American spelling, contractions expanded, punctuation
dropped) for English, the basic normaliser (`BasicTextNormalizer`: lower case,
bracketed text and punctuation/symbols/marks removed) for every other language.
Both come from the `whisper-normalizer` package, a copy of Whisper's
`whisper/normalizers` with the English spelling map shipped as package data, so
it works offline.

Then jiwer aligns them (Levenshtein) and we keep the counts, not just a rate:
substitutions, deletions, insertions and the reference length. Counting units
are characters for languages written without spaces between words (Whisper's
evaluation reports CER for zh, yue, ja, ko, th; lo, my, km and bo are written
the same way) and words otherwise. Whitespace is never a character unit.

A corpus error rate is sum(errors) / sum(reference units), which is why the
counts are what the metrics export.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

# Languages scored in characters. Whisper's evaluation uses CER for the first five;
# the rest are written without spaces between words, so a "word" would be a phrase.
CHAR_LANGUAGES = frozenset({"zh", "yue", "ja", "ko", "th", "lo", "my", "km", "bo"})

WORD, CHAR = "word", "char"


def base_language(language: str | None) -> str:
    """'en-US', 'EN', 'zh_Hant' -> 'en', 'en', 'zh'. Empty for None."""
    if not language:
        return ""
    return language.strip().lower().replace("_", "-").split("-", 1)[0]


def unit_for(language: str | None) -> str:
    """'char' for languages scored in characters, else 'word'."""
    return CHAR if base_language(language) in CHAR_LANGUAGES else WORD


@functools.lru_cache(maxsize=None)
def _english() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@functools.lru_cache(maxsize=None)
def _basic() -> Callable[[str], str]:
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalizer_for(language: str | None) -> Callable[[str], str]:
    """Whisper's English normaliser for English, its basic normaliser for anything else."""
    return _english() if base_language(language) == "en" else _basic()


def normalize(text: str, language: str | None) -> str:
    """The text as Whisper's evaluation compares it: normalised, single spaces, stripped."""
    return " ".join(normalizer_for(language)(text or "").split())


def units(normalized: str, unit: str) -> list[str]:
    """The counting units of a normalised text: its words, or its characters without spaces."""
    if unit == CHAR:
        return [c for c in normalized if not c.isspace()]
    return normalized.split()


@dataclass(frozen=True)
class Score:
    """Alignment counts of one hypothesis against its reference."""

    language: str
    unit: str  # "word" or "char"
    reference_units: int
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    reference: str  # normalised, as compared
    hypothesis: str  # normalised, as compared

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        """Errors over reference units (WER or CER). Can exceed 1 (insertions).

        An empty reference gives 0 for an empty hypothesis and 1 for anything else,
        so that a hallucination on silence does not score as perfect.
        """
        if self.reference_units:
            return self.errors / self.reference_units
        return 0.0 if not self.insertions else 1.0


def score(reference: str, hypothesis: str, language: str | None) -> Score:
    """Normalise both texts for `language` and count the edit operations between them."""
    unit = unit_for(language)
    ref_norm, hyp_norm = normalize(reference, language), normalize(hypothesis, language)
    ref_units, hyp_units = units(ref_norm, unit), units(hyp_norm, unit)
    if not ref_units and not hyp_units:
        return Score(base_language(language), unit, 0, 0, 0, 0, 0, ref_norm, hyp_norm)
    import jiwer  # on the first score: jiwer and rapidfuzz are ~3 MB an idle exporter need not hold

    # jiwer splits on whitespace, so the units go in space-joined (a character unit is
    # never whitespace, and a word never contains any).
    out = jiwer.process_words(" ".join(ref_units), " ".join(hyp_units))
    return Score(
        language=base_language(language),
        unit=unit,
        reference_units=len(ref_units),
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        hits=out.hits,
        reference=ref_norm,
        hypothesis=hyp_norm,
    )
