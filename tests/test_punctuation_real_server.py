"""Punctuation Error Rate against a real, unmodified faster-whisper-server (tiny.en, CPU, temperature 0)
on the labeled set in tests/data/quality: `evaluate`'s PER per language and the quality collector's
counters equal the independent implementation of tests/test_punctuation.py on the very transcripts
the server returned."""
import json

import pytest
from click.testing import CliRunner
from test_punctuation import independent
from test_punctuation_wiring import MARKS, RESULTS, marks, per
from test_quality_real_server import labeled_set, six_language_collector  # noqa: F401 (a fixture)

from whisper_exporter.cli import main

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration


def expected(pairs):
    """Per language, the independent counts summed over the references that have marks."""
    out = {}
    for language, reference, transcript in pairs:
        if not any(c in reference for c in ".,?!。，？！、"):
            continue
        counts, _ = independent(reference, transcript)
        mine = out.setdefault(language, {m: dict.fromkeys(RESULTS, 0) for m in MARKS})
        for mark, results in counts.items():
            for result, n in results.items():
                mine[mark][result] += n
    return out


def test_evaluate_per_equals_the_independent_implementation(whisper_server, labeled_set):  # noqa: F811
    result = CliRunner().invoke(main, ["evaluate", "--manifest", str(labeled_set), "--target", whisper_server.url,
                                       "--model", whisper_server.model, "--json", "--allow-unthresholded",
                                       "--language", "given"])  # PER only: no second, language-less pass
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    items = report["items"]
    assert len(items) == 16 and all(i["result"] == "scored" for i in items)
    want = expected((i["language"], i["reference"], i["transcript"]) for i in items)
    assert sorted(want) == ["de", "en", "es", "fr", "yue", "zh"]  # every reference of the set has marks
    for language, counts in want.items():
        got = report["languages"][language]
        assert got["punctuation_marks"] == counts, language
        assert got["punctuation_error_rate"] == per(counts), language
    en = want["en"]
    # not 0 == 0: tiny.en writes English punctuation, and gets some of it right
    assert sum(c["correct"] for c in en.values()) > 0
    print({lang: round(per(c), 4) for lang, c in want.items()})
    # the gate, at the rate measured and just under it
    rate = report["languages"]["en"]["punctuation_error_rate"]
    args = ["evaluate", "--manifest", str(labeled_set), "--target", whisper_server.url, "--model",
            whisper_server.model, "--allow-unthresholded", "--language", "given"]
    if rate > 0:
        under = CliRunner().invoke(main, args + ["--max-punctuation-error-rate", f"en={rate * 0.99}"])
        assert under.exit_code == 1 and "en: punctuation error rate" in under.output, under.output
    at = CliRunner().invoke(main, args + ["--max-punctuation-error-rate", f"en={rate!r}"])
    assert at.exit_code == 0, at.output


def test_quality_collector_counters_equal_the_independent_implementation(whisper_server, labeled_set):  # noqa: F811
    collector = six_language_collector(whisper_server, labeled_set)
    collector.update()
    results = collector.last_round("reference")
    assert sorted(r.language for r in results) == ["de", "en", "es", "fr", "yue", "zh"]
    want = expected((r.language, r.reference, r.transcript) for r in results)
    got = marks(collector, set="reference")
    assert got == want
