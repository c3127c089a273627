"""Punctuation Error Rate where transcripts are scored: the reference set, verified production items
and the canary feed whisper_quality_punctuation_marks_total per language, set, mark and result;
`evaluate` reports PER per language and gates on --max-punctuation-error-rate."""
import json

import pytest
from click.testing import CliRunner
from fake_whisper import FakeWhisper
from helpers import write_manifest
from test_punctuation import independent
from test_quality import FakeClient, make, samples

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary
from whisper_exporter.config import from_dict
from whisper_exporter.quality.sampling import QueueItem, ReviewQueue, item_id
from whisper_exporter.runtime.quality_counters import QualityCounters

# (id, language, reference, what the server answers)
SET = [
    ("en-1", "en", "Yes, it is. Is it?", "Yes it is! Is it?"),                 # , deleted; . -> !; ? correct
    ("en-2", "en", "Well, well, well.", "Well, well, well."),                   # 3 correct
    ("en-3", "en", "no marks in this reference", "No marks, in this one."),     # not scored: no mark
    ("zh-1", "zh", "你好，今天天气很好。", "你好今天天气很好。"),                  # ， deleted; 。 correct
    ("de-1", "de", "Guten Morgen, wie geht es Ihnen?", "Guten Morgen, wie geht es Ihnen."),
]
MARKS = ("period", "comma", "question_mark", "exclamation_mark")
RESULTS = ("correct", "substituted", "deleted", "inserted")


def expected(rows):
    """Per language, the independent implementation's counts summed over references with marks."""
    out = {}
    for _, language, reference, hypothesis in rows:
        counts, _ = independent(reference, hypothesis)
        if not any(c in reference for c in ".,?!。，？！、"):
            continue
        mine = out.setdefault(language, {m: dict.fromkeys(RESULTS, 0) for m in MARKS})
        for mark, results in counts.items():
            for result, n in results.items():
                mine[mark][result] += n
    return out


def marks(collector_or_counters, **labels):
    found = samples(collector_or_counters, "whisper_quality_punctuation_marks_total", **labels)
    out = {}
    for key, v in found.items():
        d = dict(key)
        out.setdefault(d["language"], {}).setdefault(d["mark"], {})[d["result"]] = v
    return out


@pytest.fixture
def labeled(tmp_path):
    write_manifest(tmp_path, (row[:3] for row in SET))
    return tmp_path


def test_reference_set_counts_equal_the_independent_implementation(labeled):
    _, collector = make(labeled, FakeClient({f"{i}.wav": hyp for i, _, _, hyp in SET}))
    collector.update()
    want = expected(SET)
    got = marks(collector, set="reference")
    assert got == want
    assert got["en"]["comma"]["deleted"] == 1 and got["en"]["period"]["substituted"] == 1  # not 0 == 0
    utterances = samples(collector, "whisper_quality_punctuation_utterances_total", set="reference", language="en")
    assert {dict(k)["result"]: v for k, v in utterances.items()} == {
        "scored": 2, "no_reference_marks": 1, "too_long": 0}
    # a round later the counters have grown by the same counts: exact over any window
    collector.update()
    assert marks(collector, set="reference")["en"]["comma"]["deleted"] == 2


def test_verified_production_items_are_scored_where_the_reviewer_kept_punctuation(labeled):
    queue_path, refs = labeled / "queue.jsonl", labeled / "verified.jsonl"
    _, collector = make(labeled, FakeClient({}), manifest=None,
                        production={"queue": str(queue_path), "references": str(refs)})
    queue = ReviewQueue(str(queue_path), 100)
    collector.queue = queue
    items = [("/srv/a.wav", "Sure, see you at ten.", "Sure. See you at ten?"),
             ("/srv/b.wav", "no punctuation typed", "No punctuation typed.")]
    for audio, _, transcript in items:
        assert queue.add(QueueItem(id=item_id(audio, transcript), audio=audio, transcript=transcript,
                                   language="en", duration=3.0, duration_band="0-5s", sampled_at=0.0))
    refs.write_text("".join(json.dumps({"id": item_id(audio, transcript), "reference": reference}) + "\n"
                            for audio, reference, transcript in items), encoding="utf-8")
    collector.update()  # a language first seen in the queue goes out at 0 first (docs/quality.md)
    assert all(v == 0 for by_result in marks(collector, set="production")["en"].values()
               for v in by_result.values())
    collector.update()
    got = marks(collector, set="production")
    counts, _ = independent(items[0][1], items[0][2])
    assert got["en"] == counts and got["en"]["comma"]["substituted"] == 1  # the second is not scored
    utterances = samples(collector, "whisper_quality_punctuation_utterances_total", set="production")
    assert {dict(k)["result"]: v for k, v in utterances.items()} == {
        "scored": 1, "no_reference_marks": 1, "too_long": 0}
    assert collector.worst_items()["production"][0].punctuation is not None


def test_the_canary_counts_with_set_canary():
    reference = bundled_canary().reference
    assert reference.endswith(".")
    with FakeWhisper(text=reference.rstrip(".") + "!") as server:
        config = from_dict({"service": {"url": server.url, "model": "tiny"}, "collectors": {"probe": {
            "canaries": [{"name": "en-short", "audio": bundled_canary().audio, "reference": reference,
                          "language": "en"}]}}})
        collector = ProbeCollector(config.collectors.probe, config)
        collector.update()
    got = marks(collector.quality, set="canary")
    assert got["en"]["period"]["substituted"] == 1 and got["en"]["exclamation_mark"]["inserted"] == 0
    record = collector.recent_probes()["en-short"][0]
    assert json.loads(json.dumps(record.to_dict()))["punctuation"]["error_rate"] == 1.0


def test_every_quality_series_has_its_punctuation_series_at_0():
    # A (language, set) the quality families export (seeded, or counted without marks) is exported
    # here too, at 0, so the first punctuated batch is an increase rate() can see.
    counters = QualityCounters()
    counters.record_failure("de", "reference")
    got = marks(counters, set="reference")
    assert got == {"de": {m: dict.fromkeys(RESULTS, 0.0) for m in MARKS}}
    assert samples(counters, "whisper_quality_punctuation_utterances_total", language="de", result="scored") != {}


def test_languages_fold_into_other_like_the_quality_families():
    counters = QualityCounters(max_languages=1)
    from whisper_exporter.whisper import punctuation

    counters.record_punctuation("en", "reference", punctuation.score("Yes.", "Yes."))
    counters.record_punctuation("de", "reference", punctuation.score("Ja.", "Ja"))
    got = marks(counters, set="reference")
    assert got["en"]["period"]["correct"] == 1 and got["other"]["period"]["deleted"] == 1


# -- evaluate ---------------------------------------------------------------------------------


@pytest.fixture
def server():
    fake = FakeWhisper(answers={f"{ident}.wav": answer for ident, _, _, answer in SET})
    yield fake
    fake.close()


def evaluate(*args):
    return CliRunner().invoke(main, ["evaluate", "--allow-unthresholded", *map(str, args)])


def per(counts):
    errors = sum(c[r] for c in counts.values() for r in ("substituted", "deleted", "inserted"))
    return errors / sum(sum(c.values()) for c in counts.values())


def test_evaluate_reports_per_per_language(server, labeled):
    result = evaluate("--manifest", labeled / "refs.jsonl", "--target", server.url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    want = expected(SET)
    for language, counts in want.items():
        got = report["languages"][language]
        assert got["punctuation_marks"] == counts
        assert got["punctuation_error_rate"] == per(counts)
    assert report["languages"]["en"]["punctuation_scored"] == 2
    assert report["languages"]["en"]["punctuation_error_rate"] == 2 / 6  # 1 D + 1 S over 6 marks
    text = evaluate("--manifest", labeled / "refs.jsonl", "--target", server.url).output
    assert "Punctuation (. , ? ! of the utterances whose reference has marks):" in text
    assert any(line.split()[:8] == ["en", "2", "6", "4", "1", "1", "0", "0.3333"] for line in text.splitlines()), text


def test_evaluate_gates_on_max_punctuation_error_rate(server, labeled):
    args = ["--manifest", labeled / "refs.jsonl", "--target", server.url]
    above = evaluate(*args, "--max-punctuation-error-rate", "en=0.33")
    assert above.exit_code == 1, above.output
    assert "en: punctuation error rate 0.3333 is above --max-punctuation-error-rate 0.33 (2 of 6 marks)" in above.output
    assert evaluate(*args, "--max-punctuation-error-rate", f"en={2 / 6!r}").exit_code == 0  # equal passes
    # zh: 1 of 2 marks wrong (the comma); de: 1 of 2 (? -> .)
    assert evaluate(*args, "--max-punctuation-error-rate", "0.5").exit_code == 0
    assert evaluate(*args, "--max-punctuation-error-rate", "0.49").exit_code == 1
    # a gate that judges nothing fails: no language it covers has a reference with marks
    nothing = evaluate(*args, "--max-punctuation-error-rate", "fr=0.1", "--json")
    assert nothing.exit_code == 1
    assert json.loads(nothing.stdout)["breaches"] == [
        "--max-punctuation-error-rate judged no language: no reference with punctuation marks (. , ? !) "
        "in a language it covers"]
    bad = evaluate(*args, "--max-punctuation-error-rate", "klingon=0.1")
    assert bad.exit_code == 2 and "--max-punctuation-error-rate: unknown language 'klingon'" in bad.output
