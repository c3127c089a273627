"""The hallucination detector on hand-made transcripts: each reason pinned, and hostile input."""
from __future__ import annotations

import math
import random
import re
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whisper_exporter.whisper import hallucination as h
from whisper_exporter.whisper.hallucination import REASONS, Segment, segments_from_answer, suspect

ROOT = Path(__file__).resolve().parents[1]
REAL_SPEECH = (
    "The weather service expects heavy rain along the coast tomorrow afternoon. Drivers should leave "
    "early, check their tyres and avoid the bridge near the harbour. Schools will stay open, but the "
    "evening football match has been moved to Sunday. The council thanks everyone for their patience "
    "and asks residents to keep drains clear of leaves. More updates will follow on the radio at six, "
    "and again at nine, when the river levels are known. Thank you for listening, and stay safe out there."
)


def test_reasons_and_api_shape():
    assert REASONS == ("repetition", "known_phrase", "no_speech", "too_much_text")
    assert suspect("", "en", 5.0) == ()
    assert suspect("   ", "en", 5.0) == ()
    assert suspect(REAL_SPEECH, "en", 40.0) == ()
    assert Segment("x") == Segment(text="x", no_speech_prob=None, avg_logprob=None, compression_ratio=None,
                                   temperature=None)


# --- repetition ------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "you you you you you",
    " ".join(["Beep"] * 24),
    "Beep, beep, beep, beep, beep, beep, beep, beep, beep, beep, beep.",
    "Thank you. Thank you. Thank you. Thank you.",
    "I'm going to say that I'm going to say that I'm going to say that I'm going to say that",
    "好的好的好的好的",
    "啊啊啊啊啊啊啊啊",
    "ありがとうありがとうありがとうありがとう",
])
def test_loops_are_repetition(text):
    assert "repetition" in suspect(text, None, None)


@pytest.mark.parametrize("text", [
    "no no no no",  # four: still speech
    "Bye bye.",
    "No, no, no. Very, very good.",
    "哈哈哈哈",  # laughter, four characters
    "It is what it is, and that is that.",
    "one two three four five six seven eight nine ten",
])
def test_short_repeats_in_speech_are_not_loops(text):
    assert suspect(text, "en", None) == ()


def test_a_loop_longer_than_the_ngram_search_is_caught_by_the_compression_ratio():
    unit = "the quick brown fox jumps over the lazy dog near the old river bank this morning "
    assert len(unit.split()) > h.MAX_NGRAM
    text = unit * 4
    assert not h.repeated_run(h._units(text))
    assert h.compression_ratio(text) > 2.4
    assert suspect(text, "en", None) == ("repetition",)


def test_a_long_transcript_is_judged_window_by_window():
    # Whisper judges each 30 s window; a long transcript is judged in windows of that size,
    # so prose is not a loop however long it is, and a loop inside it still is.
    prose = REAL_SPEECH + " " + " ".join(
        line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"[A-Z][a-z]", line) and "|" not in line)
    assert len(prose.encode()) > 4 * h.COMPRESSION_WINDOW
    assert suspect(prose, "en", None) == ()
    looped = prose + " and then" + " we will see you soon" * 30
    assert "repetition" in suspect(looped, "en", None)
    assert not h.repeated_run(h._units(prose + " and then" + " we will see you soon, my friend, whatever happens next" * 3))


def test_compression_ratio_is_whispers():
    text = "beep " * 24
    data = text.encode()
    assert h.compression_ratio(text) == len(data) / len(zlib.compress(data))
    assert h.compression_ratio("") == 0.0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab cdé字 .", max_size=512))
def test_the_cheaper_window_compressor_gives_zlib_compress_sizes(text):
    data = text.encode()[:512]
    if data:
        assert h._window_ratio(data) == len(data) / len(zlib.compress(data))


def test_no_text_under_27_bytes_reaches_the_threshold():
    # Why short texts skip compression: zlib never writes fewer than 11 bytes.
    for n in range(1, h.COMPRESSION_MIN_BYTES):
        assert len(b"a" * n) / len(zlib.compress(b"a" * n)) <= 2.4


def test_a_segment_reporting_a_high_compression_ratio_is_repetition():
    segs = [Segment(" Some text.", compression_ratio=3.1)]
    assert suspect("Some text.", "en", 3.0, segs) == ("repetition",)
    assert suspect("Some text.", "en", 3.0, [Segment("", compression_ratio=3.1)]) == ()


# --- known phrases ---------------------------------------------------------------

BAG = h.default_bag()


def test_the_bag_covers_the_languages_and_says_where_each_phrase_comes_from():
    assert {"en", "zh", "ja", "ko", "de", "fr", "es", "pt", "ru", "it", "tr", "ar"} <= BAG.languages()
    for phrase in BAG.phrases:
        assert phrase.source.strip() and phrase.text.strip() and phrase.language.strip()


@pytest.mark.parametrize("phrase", BAG.phrases, ids=lambda p: f"{p.language}:{p.text[:24]}")
def test_every_phrase_in_the_bag_is_found_alone(phrase):
    assert "known_phrase" in suspect(phrase.text, phrase.language, None)


@pytest.mark.parametrize("phrase", [p for p in BAG.phrases if p.anywhere], ids=lambda p: f"{p.language}:{p.text[:24]}")
def test_credit_phrases_are_found_after_real_speech(phrase):
    text = "We met at the station and walked to the market together. " + phrase.text
    assert "known_phrase" in suspect(text, phrase.language, None)


@pytest.mark.parametrize("text,language", [
    ("THANKS FOR WATCHING", "en"),
    ("thanks,for   watching!!!", "en"),
    ("Thank you for watching! Thank you for watching! Thank you for watching!", "en"),
    ("Thanks for watching! See you in the next video. See you in the nex", "en"),  # loop cut off
    # tiny.en on espeak-ng French, in a loaded run: the outro signed off with a bye
    ("Thank you very much for watching, I'll see you in the next video, bye!", "en"),
    ("That's it, I'll see you in the next video.", "en"),  # tiny.en on espeak-ng French, loaded run
    ("You.", "en"),
    ("ｙｏｕ", "en"),  # full width
    ("字幕由 Amara.org 社区提供", "zh"),
    ("ご視聴ありがとうございました。", "ja"),
    ("시청해 주셔서 감사합니다!", "ko"),
    ("untertitel der amara org community", "de"),
    ("Sous-titres réalisés par la communauté d'Amara.org.", "fr"),
    ("Subtítulos realizados por la comunidad de Amara.org", "es"),
    ("Legendas pela comunidade Amara.org", "pt"),
    ("Продолжение следует…", "ru"),
    ("Sottotitoli creati dalla comunità Amara.org", "it"),
    ("Abone olmayı unutmayın!", "tr"),
    ("ترجمة نانسي قنقر", "ar"),
    ("تَرجمة نانسي قنقر.", "ar"),  # with a diacritic
])
def test_matching_ignores_case_punctuation_spacing_and_width(text, language):
    assert "known_phrase" in suspect(text, language, None)


@pytest.mark.parametrize("text", [
    "Thank you for your help with the move.",
    "You know what I mean?",
    "Bye, see you tomorrow at the office.",
    "Okay, bye.",
    "That's it.",
    "Thanks for watching the kids last night, see you on Monday.",
    "Young people are welcome.",
    "The series ends here, to be continued next week on channel four.",
])
def test_everyday_phrases_inside_real_speech_are_not_known_phrases(text):
    assert suspect(text, "en", None) == ()


def test_a_phrase_from_another_language_is_found_too():
    # Whisper writes Japanese sign-offs on silence for English speakers (amical issue 71).
    assert suspect("ご視聴ありがとうございました", "en", 5.0) == ("known_phrase",)


def test_a_custom_bag():
    bag = h.PhraseBag.from_yaml("phrases:\n  - {text: 'Hold music', language: en, source: ours}\n"
                                "  - {text: 'Call Center X', language: en, source: ours, match: anywhere}\n")
    assert suspect("hold music", "en", None, bag=bag) == ("known_phrase",)
    assert suspect("Hello, this is Call Center X speaking.", "en", None, bag=bag) == ("known_phrase",)
    assert suspect("Thank you for watching!", "en", None, bag=bag) == ()


@pytest.mark.parametrize("text,message", [
    ("[]", "list `phrases`"),
    ("phrases: [1]", "expected a mapping"),
    ("phrases: [{text: x, language: en}]", "`source`"),
    ("phrases: [{text: x, language: en, source: s, match: inside}]", "whole or anywhere"),
    ("phrases: [{text: '...', language: en, source: s}]", "no letters"),
    ("phrases: [{text: x, language: en, source: s, weight: 2}]", "unknown keys"),
])
def test_bad_phrase_files_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        h.PhraseBag.from_yaml(text)


# --- no speech -------------------------------------------------------------------

def test_no_speech_prob_above_whispers_threshold_on_a_segment_with_text():
    assert suspect("Hello there.", "en", 2.0, [Segment(" Hello there.", no_speech_prob=0.7)]) == ("no_speech",)
    assert suspect("Hello there.", "en", 2.0, [Segment(" Hello there.", no_speech_prob=0.6)]) == ()
    assert suspect("Hello there.", "en", 2.0, [Segment(" Hello there.", no_speech_prob=0.2),
                                               Segment("   ", no_speech_prob=0.99)]) == ()


@pytest.mark.parametrize("text", [". . . . .", "♪", "♪ ♪ ♪", "...", "- -"])
def test_text_without_a_single_word_is_no_speech(text):
    assert suspect(text, "en", 5.0) == ("no_speech",)


# --- too much text -----------------------------------------------------------------

def letters(count: int) -> str:
    """Words of random letters, `count` letters in all: text with no loop in it."""
    rng = random.Random(count)
    words, total = [], 0
    while total < count:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(min(rng.randint(3, 9), count - total)))
        words.append(word)
        total += len(word)
    return " ".join(words)


def test_characters_per_second_bound_for_alphabetic_languages():
    words = letters(400)
    assert suspect(letters(300), "en", 10.0) == ()  # 300 letters in 10 s: fast but possible
    assert suspect(words, "en", 10.0) == ("too_much_text",)  # 400 letters in 10 s
    assert suspect(words, "de-DE", 10.0) == ("too_much_text",)
    assert suspect(words, "en", None) == ()  # duration unknown: no judgement


def test_characters_per_second_bound_depends_on_the_script():
    hanzi = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(200))  # 200 distinct characters
    assert suspect(hanzi[:100], "zh", 10.0) == ()
    assert suspect(hanzi, "zh", 10.0) == ("too_much_text",)  # 20 characters a second
    assert suspect(hanzi, "ja", 10.0) == ("too_much_text",)
    assert suspect(hanzi, "en", 10.0) == ()  # the alphabetic bound is 30 a second


def test_short_clips_keep_some_slack():
    assert suspect("Yes, thanks.", "en", 0.3) == ()
    assert suspect("Hello there my good friend, how are you?", "en", 0.0) == ("too_much_text",)


@pytest.mark.parametrize("duration", [float("nan"), float("inf"), -1.0, True, "10"])
def test_unusable_durations_are_ignored(duration):
    assert suspect(letters(400), "en", duration) == ()


# --- segments from answers -----------------------------------------------------------

def test_segments_from_a_verbose_json_answer():
    answer = {"text": " You", "segments": [
        {"id": 0, "text": " You", "no_speech_prob": 0.93, "avg_logprob": -0.97, "compression_ratio": 0.27,
         "temperature": 0.0}]}
    assert segments_from_answer(answer) == [Segment(" You", 0.93, -0.97, 0.27, 0.0)]
    assert segments_from_answer({"text": "x"}) == []


def test_hostile_segments_become_harmless():
    answer = {"segments": [None, 1, "x", [], {"text": 5, "no_speech_prob": "0.9"},
                           {"text": "hi", "no_speech_prob": math.nan, "avg_logprob": True},
                           {"text": "a" * 1_000_000, "compression_ratio": 1e308 * 10},
                           {"text": {"nested": ["deep", {"x": 1}]}, "temperature": [0.2]}]}
    segs = segments_from_answer(answer)
    assert [s.text for s in segs] == ["", "hi", "a" * h.MAX_TEXT, ""]
    assert all(s.no_speech_prob is None and s.compression_ratio is None for s in segs)
    assert segments_from_answer({"segments": [{"text": "x"}] * 5000}) == [Segment("x")] * h.MAX_SEGMENTS
    for junk in (None, 5, "text", [], {"segments": "x"}, {"segments": {"a": 1}}):
        assert segments_from_answer(junk) == []


def test_hostile_input_never_raises():
    assert suspect(None, None, None) == ()  # type: ignore[arg-type]
    assert suspect("hi", 5, "x", ["junk", None, 3]) == ()  # type: ignore[arg-type]
    assert suspect("hi", None, None, 3) == ()  # type: ignore[arg-type]
    assert suspect("hi", None, None, iter([Segment("hi", no_speech_prob=0.9)])) == ("no_speech",)
    huge = "a " * 5_000_000  # 10 MB: examined up to MAX_TEXT
    assert suspect(huge, "en", 1.0) == ("repetition", "too_much_text")
    assert "known_phrase" in suspect("you " * 2_000_000, "en", None)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=8)),
       st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       st.lists(st.builds(Segment, st.text(max_size=40), st.one_of(st.none(), st.floats()),
                          st.one_of(st.none(), st.floats()), st.one_of(st.none(), st.floats())), max_size=4))
def test_suspect_never_raises(text, language, duration, segments):
    reasons = suspect(text, language, duration, segments)
    assert set(reasons) <= set(REASONS) and list(reasons) == sorted(reasons, key=REASONS.index)


JSONISH = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                       max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["segments", "text", "x"]), JSONISH | st.lists(
    st.dictionaries(st.sampled_from(["text", "no_speech_prob", "avg_logprob", "compression_ratio", "temperature"]),
                    JSONISH), max_size=4)))
def test_segments_from_answer_never_raises(answer):
    for seg in segments_from_answer(answer):
        assert isinstance(seg.text, str)
        for value in (seg.no_speech_prob, seg.avg_logprob, seg.compression_ratio, seg.temperature):
            assert value is None or math.isfinite(value)


# --- the CPU budget for hot paths ---------------------------------------------------

def test_cpu_budget_runs_checks_while_under_its_share():
    cpu, wall = [0.0], [0.0]

    def check(x):
        cpu[0] += 0.01  # each check costs 10 ms of CPU
        return x * 2

    budget = h.CpuBudget(share=0.02, floor=0.005, cpu=lambda: cpu[0], wall=lambda: wall[0])
    assert budget.run(check, 1) == 2  # nothing spent yet
    assert budget.run(check, 2) is None  # 10 ms spent, 0.2 ms + 1 ms allowed
    assert [budget.run(check, 3) for _ in range(h.CpuBudget.SKIP)] == [None] * h.CpuBudget.SKIP
    cpu[0] += 0.5  # the rest of the process worked 0.5 s: 2% of it is another 10 ms
    assert budget.run(check, 4) == 8
    assert budget.run(check, 5) is None
    budget._skip = 0
    wall[0] += 4.0  # idle for 4 s: the floor (0.5% of a core) allows 20 ms more
    assert budget.run(check, 6) == 12


def test_the_compression_screen_never_hides_a_window_above_the_threshold():
    # zlib is skipped for ASCII windows with more than 85% distinct words. Adversarial
    # texts (prose, loops of 1-40 words after prose, near-loops with a changed word,
    # small vocabularies) must give the same answer with and without the screen.
    rng = random.Random(7)
    words = " ".join(
        line for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
        for line in path.read_text().splitlines() if re.match(r"[A-Za-z]", line)).split()
    positives = 0
    for _ in range(4000):
        start = rng.randrange(len(words) - 200)
        kind = rng.random()
        if kind < 0.25:
            text = " ".join(words[start:start + rng.randint(5, 120)])
        elif kind < 0.55:
            unit = " ".join(words[start:start + rng.randint(1, 40)])
            text = " ".join(words[start + 50:start + 50 + rng.randint(0, 60)] + [unit] * rng.randint(2, 8))
        elif kind < 0.8:
            vocab = rng.sample(words, rng.randint(5, 60))
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 120)))
        else:
            unit, out = words[start:start + rng.randint(2, 30)], []
            for _ in range(rng.randint(2, 6)):
                copy = list(unit)
                copy[rng.randrange(len(copy))] = rng.choice(words)
                out += copy
            text = " ".join(out)
        full = h._compresses_like_a_loop(text, screen=False)
        positives += full
        assert h._compresses_like_a_loop(text) == full, text
    assert positives > 500  # the generator does make windows above 2.4


@pytest.mark.parametrize("text,flagged", [
    ("Thank you very much for watching and I'll see you in the next video.", True),
    ("Thanks for watching, guys. See you in the next video!", True),
    ("and so", False),  # connectors alone
    ("Thank you and goodbye, Maria.", False),  # a name is not a connector
    ("See you in the next video and the one after it.", False),
])
def test_connectors_between_bag_phrases(text, flagged):
    assert ("known_phrase" in suspect(text, "en", None)) is flagged
