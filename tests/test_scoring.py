"""Scoring pinned on hand-checked examples: Whisper's normalisers, then jiwer's alignment counts."""
import jiwer
import pytest

from whisper_exporter.runtime.quality_counters import QualityCounters
from whisper_exporter.whisper import scoring
from whisper_exporter.whisper.scoring import score


# reference, hypothesis, language -> unit, reference units, S, D, I
@pytest.mark.parametrize(
    "reference, hypothesis, language, unit, n, s, d, i",
    [
        # punctuation and case vanish
        ("Hello, World!", "hello world", "en", "word", 2, 0, 0, 0),
        # English normaliser: "Mr." is "mister"
        ("Mr. Smith is here.", "Mister Smith is here", "en", "word", 4, 0, 0, 0),
        # spelled-out numbers become digits, so the reference is 4 words, not 5
        ("I have twenty five apples", "I have 25 apples", "en", "word", 4, 0, 0, 0),
        # British spelling and contractions
        ("the colour grey", "the color gray", "en", "word", 3, 0, 0, 0),
        ("We're done", "we are done", "en", "word", 3, 0, 0, 0),
        # bracketed annotations are dropped
        ("hello there", "[MUSIC] hello there", "en", "word", 2, 0, 0, 0),
        # one of each: quick->quack (S), brown missing (D), high added (I)
        ("the quick brown fox jumps", "the quack fox jumps high", "en", "word", 5, 1, 1, 1),
        # "twenty dollars" -> "$20", "three" -> "3"; paid->made is the one error in 7 words
        ("Mr. Smith paid twenty dollars for three books.", " Mr. Smith made $20 for three books.", "en", "word", 7, 1, 0, 0),
        # basic normaliser for other languages: case and punctuation only, no number words
        ("Über den Fluss.", "über den fluss", "de", "word", 3, 0, 0, 0),
        ("zwei Hunde", "2 Hunde", "de", "word", 2, 1, 0, 0),
        # characters for Chinese and Japanese; punctuation and spaces are not units
        ("你好，世界！", "你好世借", "zh", "char", 4, 1, 0, 0),
        ("你好，世界！", "你好 世界", "zh", "char", 4, 0, 0, 0),
        ("こんにちは", "こんにちはは", "ja", "char", 5, 0, 0, 1),
        ("粤语好难", "粤语好", "yue", "char", 4, 0, 1, 0),
        # nothing came back: every reference word deleted
        ("alpha beta gamma", "", "en", "word", 3, 0, 3, 0),
    ],
)
def test_hand_checked_counts(reference, hypothesis, language, unit, n, s, d, i):
    got = score(reference, hypothesis, language)
    assert (got.unit, got.reference_units, got.substitutions, got.deletions, got.insertions) == (unit, n, s, d, i)
    assert got.error_rate == pytest.approx((s + d + i) / n)


def test_english_normaliser_effects_are_visible_in_the_normalised_text():
    got = score("Mr. Smith paid twenty dollars for three books.", "Mister Smith made $20 for 3 books", "en")
    assert got.reference == "mister smith paid $20 for 3 books"
    assert got.hypothesis == "mister smith made $20 for 3 books"


def test_basic_normaliser_is_used_for_other_languages():
    # The English normaliser would turn "Mr." into "mister"; the basic one only drops the dot.
    assert scoring.normalize("Mr. Smith", "de") == "mr smith"
    assert scoring.normalize("Mr. Smith", "en") == "mister smith"
    assert scoring.normalize("Mr. Smith", "en-US") == "mister smith"


def test_empty_reference():
    assert score("", "", "en").error_rate == 0.0
    hallucination = score("", "Thank you for watching.", "en")
    assert hallucination.insertions == 4 and hallucination.reference_units == 0
    assert hallucination.error_rate == 1.0


def test_units_by_language():
    for language in ("zh", "yue", "ja", "ko", "th", "lo", "my", "km", "zh-TW", "ZH"):
        assert scoring.unit_for(language) == "char", language
    for language in ("en", "de", "fr", "ar", "hi", None, ""):
        assert scoring.unit_for(language) == "word", language


@pytest.mark.parametrize(
    "reference, hypothesis",
    [
        ("The weather today is sunny and warm.", "The weather grenades are hit and warm"),
        ("Please call Stella.", "please call stella and ask her to bring"),
        ("one small step for a man", "one giant leap"),
    ],
)
def test_agrees_with_an_independent_jiwer_computation(reference, hypothesis):
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    expected = jiwer.wer(normalise(reference), normalise(hypothesis))
    assert score(reference, hypothesis, "en").error_rate == pytest.approx(expected)


def test_quality_counters_count_errors_and_units_and_round_rates():
    counters = QualityCounters()
    counters.record(score("the quick brown fox jumps", "the quack fox jumps high", "en"), "canary")  # 3 / 5
    counters.record(score("hello world", "hello world", "en"), "canary")  # 0 / 2
    counters.record(score("你好世界", "你好世借", "zh"), "canary")  # 1 / 4 chars
    counters.record_failure("en", "canary")
    counters.end_round("canary", now=1000.0)
    snap = counters.snapshot()
    en = snap[("en", "canary", "word")]
    assert (en["reference_units"], en["substitution"], en["deletion"], en["insertion"]) == (7, 1, 1, 1)
    assert (en["scored"], en["failed"]) == (2, 1)
    # the round's corpus rate, not the mean of the utterances' rates (0.6 and 0)
    assert en["error_rate"] == pytest.approx(3 / 7)
    assert en["evaluated"] == 1000.0
    assert snap[("zh", "canary", "char")]["error_rate"] == pytest.approx(0.25)

    # A round without scores keeps the last rate and its timestamp.
    counters.record_failure("en", "canary")
    counters.end_round("canary", now=2000.0)
    assert counters.snapshot()[("en", "canary", "word")]["error_rate"] == pytest.approx(3 / 7)
    assert counters.snapshot()[("en", "canary", "word")]["evaluated"] == 1000.0

    families = {f.name: f for f in counters.families()}
    errors = {(s.labels["language"], s.labels["type"]): s.value for s in families["whisper_quality_errors"].samples
              if s.name.endswith("_total")}
    assert errors[("en", "substitution")] == 1 and errors[("zh", "substitution")] == 1
    units = {s.labels["language"]: s.value for s in families["whisper_quality_reference_units"].samples
             if s.name.endswith("_total")}
    assert units == {"en": 7.0, "zh": 4.0}


def test_quality_languages_are_bounded():
    counters = QualityCounters(max_languages=2)
    for language in ("en", "de", "fr", "es"):
        counters.record(score("a b", "a b", language), "reference")
    keys = {k[0] for k in counters.snapshot()}
    assert keys == {"en", "de", "other"}
    assert counters.folded_total == 2


def test_shared_counters_are_one_per_exporter():
    from whisper_exporter.config import from_dict
    from whisper_exporter.runtime.shared import Shared

    config = from_dict({})
    shared = Shared.build(config)
    assert shared.use_quality() is shared.use_quality() is shared.quality
    assert Shared.build(config).quality is not shared.quality  # two exporters in one process: two sets
