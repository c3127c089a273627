"""Quality against a real, unmodified faster-whisper-server (tiny.en, CPU, temperature 0) on the
labeled set in tests/data/quality (espeak-ng speech in en, de, fr, es, Mandarin and Cantonese).

tiny.en mishears most of it and loops on the Chinese (that is fine): what is checked is that our
per-language counts and rates equal an independent computation — jiwer and whisper_normalizer
called directly, not our scoring module — on the very transcripts the server returned, exactly,
in characters for zh and yue."""
import json
from pathlib import Path

import jiwer
import pytest
from click.testing import CliRunner

from whisper_exporter.cli import main
from whisper_exporter.collectors.quality import QualityCollector
from whisper_exporter.config import from_dict

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data" / "quality"
CHAR_LANGUAGES = ("zh", "yue")


@pytest.fixture(scope="module")
def labeled_set(tmp_path_factory):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("quality_make_set", DATA / "make_set.py")
    make_set = module_from_spec(spec)
    spec.loader.exec_module(make_set)
    return make_set.build(tmp_path_factory.mktemp("quality-set"))


@pytest.fixture(scope="module")
def full_report(whisper_server, labeled_set):
    """One `evaluate --json` pass over the whole set (16 clips)."""
    result = CliRunner().invoke(main, ["evaluate", "--manifest", str(labeled_set), "--target", whisper_server.url,
                                       "--model", whisper_server.model, "--json", "--allow-unthresholded"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def normalise(text, language):
    """Whisper's normalisers, directly; characters without whitespace for zh and yue."""
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    text = (EnglishTextNormalizer() if language == "en" else BasicTextNormalizer())(text)
    if language in CHAR_LANGUAGES:
        return " ".join("".join(text.split()))  # one token per character
    return " ".join(text.split())


def independent(pairs):
    """Per language: jiwer's corpus counts over all (reference, transcript) pairs of it."""
    by_language = {}
    for language, reference, transcript in pairs:
        refs, hyps = by_language.setdefault(language, ([], []))
        refs.append(normalise(reference, language))
        hyps.append(normalise(transcript, language))
    out = {}
    for language, (refs, hyps) in by_language.items():
        o = jiwer.process_words(refs, hyps)
        units = sum(len(r.split()) for r in refs)
        out[language] = {"substitutions": o.substitutions, "deletions": o.deletions, "insertions": o.insertions,
                         "reference_units": units,
                         "error_rate": (o.substitutions + o.deletions + o.insertions) / units}
    return out


def test_evaluate_equals_an_independent_jiwer_computation_per_language(full_report, labeled_set):
    items = full_report["items"]
    assert len(items) == 16 and all(i["result"] == "scored" for i in items)
    assert full_report["manifest_problems"] == []
    expected = independent((i["language"], i["reference"], i["transcript"]) for i in items)
    languages = full_report["languages"]
    assert sorted(languages) == ["de", "en", "es", "fr", "yue", "zh"]
    for language, want in expected.items():
        got = languages[language]
        assert {k: got[k] for k in want} == want, language  # exactly, the rate included
        assert got["unit"] == ("char" if language in CHAR_LANGUAGES else "word")
    # the references went in as written, and the transcripts are the server's
    manifest = {json.loads(line)["id"]: json.loads(line) for line in labeled_set.read_text().splitlines()}
    assert all(i["reference"] == manifest[i["id"]]["reference"] for i in items)
    assert languages["zh"]["reference_units"] == 32 and languages["yue"]["reference_units"] == 33
    # not a 0 == 0 comparison: tiny.en gets English mostly right and Chinese wrong, whatever it
    # writes for it (a loop, English words or nothing, by CPU: each is a CER far above 0.6)
    assert languages["en"]["error_rate"] < 0.6 < min(languages["zh"]["error_rate"], languages["yue"]["error_rate"])
    assert full_report["worst"][0] in {i["id"] for i in items if i["language"] not in ("en",)}


def test_broken_lines_are_named_and_the_gate_exits_1_above_and_0_at_the_threshold(
        whisper_server, labeled_set, full_report, tmp_path):
    lines = labeled_set.read_text(encoding="utf-8").splitlines()
    good = [line for line in lines if json.loads(line)["id"] in ("en-01", "en-03")]
    audio = labeled_set.parent / "audio"
    broken = [
        good[0],
        json.dumps({"id": "gone", "audio": str(audio / "nope.wav"), "reference": "x", "language": "en"}),
        '{"id": "cut", "audio": ',
        good[1],
        json.dumps({"id": "blank", "audio": str(audio / "en-01.wav"), "reference": " ", "language": "en"}),
        json.dumps({"id": "col", "audio": str(audio / "en-01.wav"), "reference": "x", "language": "en",
                    "speaker": "s1"}),
    ]
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text("\n".join(line.replace('"audio/', f'"{audio}/') for line in broken) + "\n",
                        encoding="utf-8")
    # the threshold is the rate the full pass measured on these two items
    items = [i for i in full_report["items"] if i["id"] in ("en-01", "en-03")]
    rate = sum(i["errors"] for i in items) / sum(i["reference_units"] for i in items)
    assert rate > 0
    args = ["evaluate", "--manifest", str(manifest), "--target", whisper_server.url, "--model", whisper_server.model]
    above = CliRunner().invoke(main, args + ["--max-error-rate", f"en={rate * 0.99}", "--max-skipped", "4"])
    assert above.exit_code == 1, above.output
    assert "Evaluated 2 utterance(s)" in above.output and "Result: FAIL: en: word error rate" in above.output
    for line, text in ((2, "nope.wav: no such file"), (3, "not valid JSON"), (5, "empty reference"),
                       (6, "unknown column 'speaker'")):
        assert f"line {line}: " in above.output and text in above.output, (line, above.output)
    at = CliRunner().invoke(main, args + ["--max-error-rate", f"en={rate!r}", "--json"])
    assert at.exit_code == 1 and json.loads(at.stdout)["breaches"] == [
        "4 of 6 manifest line(s) skipped, more than --max-skipped 0"], at.output  # skipped lines fail the gate
    at = CliRunner().invoke(main, args + ["--max-error-rate", f"en={rate!r}", "--json", "--max-skipped", "4"])
    assert at.exit_code == 0, at.output
    report = json.loads(at.stdout)
    assert [p["line"] for p in report["manifest_problems"]] == [2, 3, 5, 6]
    assert report["languages"]["en"]["error_rate"] == rate  # the same transcripts at temperature 0


def six_language_collector(whisper_server, labeled_set: Path) -> QualityCollector:
    """A standalone quality collector scoring six items of the labelled set (one a language) a round."""
    config = from_dict({
        "service": {"url": whisper_server.url, "model": whisper_server.model},
        "collectors": {"probe": {"enabled": False},
                       "quality": {"enabled": True, "manifest": str(labeled_set), "per_run": 6,
                                   "max_server_share": 1.0}}})
    return QualityCollector(config.collectors.quality, config)


def test_quality_collector_samples_across_languages_and_counts_exactly(whisper_server, labeled_set):
    collector = six_language_collector(whisper_server, labeled_set)
    assert collector.standalone  # built outside the wiring: it renders the quality families itself
    collector.update()
    results = collector.last_round("reference")
    # six items, one of each language: the sample is stratified, not the manifest's first six lines
    assert sorted(r.language for r in results) == ["de", "en", "es", "fr", "yue", "zh"]
    assert all(r.result == "scored" for r in results)
    expected = independent((r.language, r.reference, r.transcript) for r in results)
    fams = {f.name: f for f in collector.families()}

    def metric(family, language, **labels):
        (value,) = [s.value for s in fams[family].samples
                    if s.labels.get("language") == language and s.labels.get("set") == "reference"
                    and all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")]
        return value

    for language, want in expected.items():
        unit = "char" if language in CHAR_LANGUAGES else "word"
        assert metric("whisper_quality_reference_units", language, unit=unit) == want["reference_units"]
        for kind in ("substitution", "deletion", "insertion"):
            assert metric("whisper_quality_errors", language, type=kind) == want[kind + "s"], (language, kind)
        assert metric("whisper_quality_error_rate", language) == want["error_rate"]
