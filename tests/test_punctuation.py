"""Punctuation Error Rate (whisper/punctuation.py) against NeMo's documented example and an
independent implementation written here: top-down recursion over prefixes instead of a table,
aligned pairs collected and counted afterwards instead of counted on the way."""
import functools
import re
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from whisper_exporter.whisper import punctuation

NAMES = {".": "period", ",": "comma", "?": "question_mark", "!": "exclamation_mark"}


def reference_tokens(text):
    """Tokens as the paper describes them, with the issue's normalisation, written out by hand."""
    text = unicodedata.normalize("NFKC", text).replace("\u3002", ".").replace("\u3001", ",")
    return re.findall(r"[\w']+|[.,?!]", text)


def independent(reference, hypothesis):
    """Per mark (C, S, D, I) and the substitution pairs, by NeMo's documented rule."""
    ref, hyp = reference_tokens(reference), reference_tokens(hypothesis)
    r = ["<P>" if t in NAMES else t for t in ref]
    h = ["<P>" if t in NAMES else t for t in hyp]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * (len(r) + len(h)) + 1000))

    @functools.lru_cache(maxsize=None)
    def dist(i, j):
        if i == 0 or j == 0:
            return i + j
        if r[i - 1] == h[j - 1]:
            return dist(i - 1, j - 1)
        return 1 + min(dist(i - 1, j - 1), dist(i, j - 1), dist(i - 1, j))

    pairs = []  # (reference index, hypothesis index) the path matches as equal tokens
    i, j = len(r), len(h)
    try:
        while i or j:
            if i and j and r[i - 1] == h[j - 1]:
                pairs.append((i - 1, j - 1))
                i, j = i - 1, j - 1
            elif i == 0:
                j -= 1
            elif j == 0:
                i -= 1
            else:  # the first of substitution, insertion, deletion that is optimal
                here = dist(i, j)
                if dist(i - 1, j - 1) + 1 == here:
                    i, j = i - 1, j - 1
                elif dist(i, j - 1) + 1 == here:
                    j -= 1
                else:
                    i -= 1
        assert dist(len(r), len(h)) == Levenshtein.distance(r, h)  # the checker's own alignment is optimal
    finally:
        sys.setrecursionlimit(limit)
    counts = {name: {"correct": 0, "substituted": 0, "deleted": 0, "inserted": 0} for name in NAMES.values()}
    subs = {}
    matched_ref, matched_hyp = set(), set()
    for a, b in pairs:
        if r[a] != "<P>":
            continue
        matched_ref.add(a)
        matched_hyp.add(b)
        if ref[a] == hyp[b]:
            counts[NAMES[ref[a]]]["correct"] += 1
        else:
            counts[NAMES[ref[a]]]["substituted"] += 1
            key = (NAMES[ref[a]], NAMES[hyp[b]])
            subs[key] = subs.get(key, 0) + 1
    for a, t in enumerate(ref):
        if t in NAMES and a not in matched_ref:
            counts[NAMES[t]]["deleted"] += 1
    for b, t in enumerate(hyp):
        if t in NAMES and b not in matched_hyp:
            counts[NAMES[t]]["inserted"] += 1
    return counts, subs


def test_nemo_docstring_example_gives_its_documented_numbers():
    # NeMo's OccurancePunctuationErrorRate docstring and its unit test.
    got = punctuation.count("Hi, dear! Nice to see you. What's", "Hi dear! Nice to see you! What's?")
    assert got.counts == {
        "period": {"correct": 0, "substituted": 1, "deleted": 0, "inserted": 0},
        "comma": {"correct": 0, "substituted": 0, "deleted": 1, "inserted": 0},
        "exclamation_mark": {"correct": 1, "substituted": 0, "deleted": 0, "inserted": 0},
        "question_mark": {"correct": 0, "substituted": 0, "deleted": 0, "inserted": 1},
    }
    assert got.substitutions == {("period", "exclamation_mark"): 1}
    assert got.operations == 4
    for result in punctuation.RESULTS:
        assert got.total(result) / got.operations == 0.25
    assert got.error_rate == 0.75


def test_full_width_marks_count_as_their_ascii_marks():
    ascii_ = punctuation.count("Hello, world. Really? Yes!", "Hello, world. Really? Yes!")
    wide = punctuation.count("Hello， world。 Really？ Yes！", "Hello、 world． Really? Yes!")
    assert wide.counts == ascii_.counts and wide.error_rate == 0.0
    assert punctuation.tokens("你好，今天天气很好。") == ["你好", ",", "今天天气很好", "."]
    assert punctuation.tokens("早晨、你食咗飯未呀？") == ["早晨", ",", "你食咗飯未呀", "?"]


def test_what_counts_and_what_does_not():
    assert not punctuation.has_marks("well: \"quoted\" - dashed; ¿qué ¡sí")
    assert [t for t in punctuation.tokens("well: \"quoted\" - dashed; ¿qué ¡sí") if t in NAMES] == []
    assert punctuation.tokens("It's 3.5 ...") == ["It's", "3", ".", "5", ".", ".", "."]  # as NeMo does
    assert punctuation.has_marks("done.") and not punctuation.has_marks("no marks here")


def test_a_reference_without_marks_is_not_scored():
    p = punctuation.score("the quick brown fox", "The quick brown fox.")
    assert p.outcome == punctuation.NO_REFERENCE_MARKS and not p.scored and p.operations == 0
    # the same pair through count() would call the server's full stop an insertion
    assert punctuation.count("the quick brown fox", "The quick brown fox.").total("inserted") == 1
    p = punctuation.score("The quick brown fox.", "the quick brown fox")
    assert p.scored and p.counts["period"]["deleted"] == 1 and p.error_rate == 1.0


def test_a_pair_too_long_to_align_is_not_scored():
    words = " ".join(f"w{i}," for i in range(800))
    p = punctuation.score(words, words)
    assert p.outcome == punctuation.TOO_LONG and p.operations == 0
    short = " ".join(f"w{i}," for i in range(300))
    assert punctuation.score(short, short).counts["comma"]["correct"] == 300


def test_sums_add_up():
    total = punctuation.Punctuation()
    a = punctuation.count("One, two.", "One two.")
    b = punctuation.count("Three? Four!", "Three. Four!")
    total.add(a)
    total.add(b)
    assert total.total("correct") == 2 and total.total("deleted") == 1 and total.total("substituted") == 1
    assert total.error_rate == 2 / 4
    assert total.substitutions == {("question_mark", "period"): 1}


# Few distinct words and many marks, so alignments tie often and the tie rule is exercised.
PIECES = ["a", "b", "it's", "c", ".", ",", "?", "!", "。", "、", "？", "，", " ", " ", "-", ":"]
text = st.lists(st.sampled_from(PIECES), max_size=24).map(" ".join) | \
    st.lists(st.sampled_from(PIECES), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(reference=text, hypothesis=text)
def test_equals_an_independent_implementation_on_random_pairs(reference, hypothesis):
    got = punctuation.count(reference, hypothesis)
    counts, subs = independent(reference, hypothesis)
    assert got.counts == counts
    assert got.substitutions == subs
    ref, hyp = reference_tokens(reference), reference_tokens(hypothesis)
    for char, name in NAMES.items():  # every mark is accounted for exactly once on each side
        c = got.counts[name]
        assert c["correct"] + c["substituted"] + c["deleted"] == ref.count(char)
        into = sum(n for (_, b), n in got.substitutions.items() if b == name)
        assert c["correct"] + into + c["inserted"] == hyp.count(char)


def test_ties_follow_nemo_order_substitution_first():
    # masked: [a, P] against [P, b]. Substituting twice and deleting a, matching P, inserting b cost
    # the same (2); NeMo's back-trace takes the substitutions, so the comma is deleted and inserted.
    got = punctuation.count("a,", ",b")
    assert got.counts["comma"] == {"correct": 0, "substituted": 0, "deleted": 1, "inserted": 1}
    assert independent("a,", ",b")[0]["comma"] == got.counts["comma"]


@pytest.mark.parametrize("reference,hypothesis,rate", [
    ("Yes.", "Yes.", 0.0),
    ("Yes.", "Yes", 1.0),
    ("Yes", "Yes", None),
])
def test_error_rate(reference, hypothesis, rate):
    assert punctuation.count(reference, hypothesis).error_rate == rate
