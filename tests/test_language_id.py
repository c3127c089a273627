"""Language identification (issue 23, part 3) against the loopback fake server over real HTTP: each
item sent without a language is counted under the language the server's answer named, per item;
the labels are bounded; new series go out at 0 before their first count; the canary and reviewed
production items feed the same counters; `evaluate` reports accuracy per language and gates on it."""
import json

import pytest
from click.testing import CliRunner
from fake_whisper import FakeWhisper
from helpers import wav, write_manifest

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector
from whisper_exporter.collectors.quality import QualityCollector
from whisper_exporter.config import from_dict
from whisper_exporter.quality.sampling import QueueItem, ReviewQueue, append_reference
from whisper_exporter.runtime.language_id_counters import LanguageIdCounters
from whisper_exporter.whisper.language_id import detected_label, truth_label

FAMILY = "whisper_quality_language_identified_total"
# (id, labelled language, reference, what the server answers when asked to detect: text, language)
SET = [
    ("en-1", "en", "The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog.",
     "en"),
    ("en-2", "en", "Please call Stella.", "Please call Stella.", "english"),  # a name, as OpenAI answers
    ("de-1", "de", "Guten Morgen, wie geht es Ihnen?", "Good morning, how are you?", "en"),
    ("de-2", "de", "Das ist ein Test.", "Das ist ein Test.", "German"),
    ("zh-1", "zh", "你好，今天天气很好。", "你好今天天气很好", "zh"),
    ("yue-1", "yue", "早晨，你今日食咗飯未呀？", "早晨你今日食咗饭未呀", "zh"),  # Cantonese taken for Mandarin
    ("yue-2", "yue", "唔該你講慢啲。", "唔該你講慢啲", "xx"),  # a language Whisper does not know
    ("fr-1", "fr", "Bonjour tout le monde.", "Bonjour tout le monde.", None),  # the answer names none
]


def expected_counts(set_="reference"):
    """What the answers said, per item, as (language, detected, set) -> items."""
    out = {}
    for _, language, _, _, detected in SET:
        label = {"english": "en", "German": "de", "xx": "other", None: "unknown"}.get(detected, detected)
        key = (language, label, set_)
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture
def server():
    answers = {}
    for ident, _, _, text, detected in SET:
        answer = {"text": text, "duration": 1.0, "segments": []}
        if detected is not None:
            answer["language"] = detected
        answers[f"{ident}.wav"] = answer
    fake = FakeWhisper(answers=answers)
    yield fake
    fake.close()


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(tmp_path, (row[:3] for row in SET))


def collector_for(server, manifest, api="openai", **quality):
    config = from_dict({"service": {"url": server.url, "api": api},
                        "collectors": {"quality": {"enabled": True, "manifest": str(manifest), "per_run": 50,
                                                   "max_server_share": 1.0, **quality},
                                       "probe": {"enabled": False}, "gpu": {"enabled": False},
                                       "process": {"enabled": False}}},
                       source=str(manifest.parent / "exporter.yml"))
    return QualityCollector(config.collectors.quality, config)


def scraped(collector):
    """One scrape of the identification family: (language, detected, set) -> value."""
    out = {}
    for family in collector.families():
        for s in family.samples:
            if s.name == FAMILY:
                out[(s.labels["language"], s.labels["detected"], s.labels["set"])] = s.value
    return out


def test_labels_are_whisper_codes_else_other_and_unknown_when_unsaid():
    assert [detected_label(v) for v in ("en", "English", "german", "zh-yue", "Cantonese", "mandarin")] == \
        ["en", "en", "de", "yue", "yue", "zh"]
    assert detected_label("xx") == "other" and detected_label("klingon") == "other"
    assert detected_label(None) == "unknown" and detected_label("") == "unknown" and detected_label("auto") == "unknown"
    assert truth_label("yue") == "yue" and truth_label("qq") == "other"


def test_default_both_counts_what_each_answer_said_and_scores_the_given_request(server, manifest):
    collector = collector_for(server, manifest)
    assert collector.language_mode == "both"  # openai's verbose_json names the language
    # Before the first run: each manifest language's correct series at 0.
    assert scraped(collector) == {(lang, lang, "reference"): 0.0 for lang in ("de", "en", "fr", "yue", "zh")}
    collector.update()
    # Each item twice: with its language (scored), then without one (identified).
    sent = sorted((r.filename, r.language or "") for r in server.requests)
    assert sent == sorted([(f"{i}.wav", lang) for i, lang, *_ in SET] + [(f"{i}.wav", "") for i, *_ in SET])
    want = expected_counts()
    assert {k: v for k, v in collector.identified.snapshot().items() if v} == want
    # A series new in this run goes out at 0 first, its count at the next scrape.
    first = scraped(collector)
    assert first[("de", "en", "reference")] == 0 and first[("yue", "other", "reference")] == 0
    assert first[("en", "en", "reference")] == 2  # scraped at 0 before: counted at once
    second = scraped(collector)
    assert {k: v for k, v in second.items() if v} == want
    # The WER comes from the request that named the language (the fake echoes it back).
    assert collector.quality.snapshot()[("de", "reference", "word")]["scored"] == 2


def test_detect_sends_no_language_and_scores_that_answer(server, manifest):
    collector = collector_for(server, manifest, language="detect")
    collector.update()
    assert len(server.requests) == len(SET) and all(r.language is None for r in server.requests)
    scraped(collector)
    assert {k: v for k, v in scraped(collector).items() if v} == expected_counts()
    # de-1 came back in English: scored as what the user would get.
    de = collector.quality.snapshot()[("de", "reference", "word")]
    assert de["substitution"] + de["deletion"] + de["insertion"] > 0


def test_given_sends_each_item_once_with_its_language_and_counts_nothing(server, manifest):
    collector = collector_for(server, manifest, language="given")
    collector.update()
    assert sorted((r.filename, r.language) for r in server.requests) == sorted((f"{i}.wav", lang)
                                                                               for i, lang, *_ in SET)
    assert scraped(collector) == {}


def test_whispercpp_is_asked_for_auto_and_its_full_names_are_codes(server, manifest):
    collector = collector_for(server, manifest, api="whispercpp", language="detect")
    collector.update()
    assert {r.language for r in server.requests} == {"auto"}  # else it uses its start-up language
    assert all(r.path.startswith("/inference") for r in server.requests)
    assert collector.identified.snapshot()[("en", "en", "reference")] == 2  # "english" counted as en


def test_a_failed_detection_request_is_no_identification(server, manifest):
    server.answers["de-2.wav"] = 500
    collector = collector_for(server, manifest, language="detect")
    collector.update()
    counts = collector.identified.snapshot()
    assert counts.get(("de", "de", "reference")) == 0 and counts[("de", "en", "reference")] == 1
    assert collector.quality.snapshot()[("de", "reference", "word")]["failed"] == 1


def test_reviewed_production_items_count_where_the_reviewer_named_the_language(server, tmp_path):
    """Truth: the reviewer's language; detected: the one the server identified. An item whose
    client named its language was never identified (the page shows that language, so a reviewer
    leaving it as it is would count as a correct identification), so it counts nothing here."""
    queue, refs = tmp_path / "queue.jsonl", tmp_path / "verified.jsonl"
    # (id, queued language, what the server identified, the reviewer's language)
    queued = [("a", "en", "en", "de"), ("b", "en", "en", "en"), ("c", "zh", "zh", None),
              ("d", "unknown", "unknown", "yue"), ("e", "fr", None, "fr"), ("f", "fr", None, "de")]
    queue.write_text("".join(QueueItem(id=i, audio=f"/x/{i}.wav", transcript="hallo welt", language=lang,
                                       duration=2.0, duration_band="short", sampled_at=1.0,
                                       detected=detected).to_json() + "\n"
                             for i, lang, detected, _ in queued), encoding="utf-8")
    for ident, _, _, reviewer in queued:
        append_reference(str(refs), ident, "hallo welt", language=reviewer)
    config = from_dict({"service": {"url": server.url},
                        "collectors": {"quality": {"enabled": True, "production": {"queue": str(queue),
                                                                                   "references": str(refs)}},
                                       "probe": {"enabled": False}, "gpu": {"enabled": False},
                                       "process": {"enabled": False}}})
    collector = QualityCollector(config.collectors.quality, config)
    # b's language (en) was in the queue, so exported at 0 from the start and scored at once; a's
    # and d's reviewed languages (de, yue) are new: exported at 0 this round, scored the next
    collector.update()
    assert {k: v for k, v in collector.identified.snapshot().items() if v} == {("en", "en", "production"): 1}
    collector.update()
    # c has no reviewed language; e and f named theirs (f's reviewer corrected it: still no identification)
    assert {k: v for k, v in collector.identified.snapshot().items() if v} == {
        ("de", "en", "production"): 1, ("en", "en", "production"): 1, ("yue", "unknown", "production"): 1}
    assert not any(k[0] == "fr" or k[1] == "fr" for k in collector.identified.snapshot())
    assert server.requests == []  # production items are not sent again


def test_the_queue_keeps_what_the_server_identified_and_old_lines_read_as_unidentified(tmp_path):
    item = QueueItem(id="a", audio="/x/a.wav", transcript="t", language="de", duration=1.0,
                     duration_band="short", sampled_at=1.0, detected="de")
    assert json.loads(item.to_json())["detected"] == "de"
    plain = QueueItem(id="b", audio="/x/b.wav", transcript="t", language="de", duration=1.0,
                      duration_band="short", sampled_at=1.0)
    assert "detected" not in json.loads(plain.to_json())  # the format of queues written before it
    path = tmp_path / "queue.jsonl"
    path.write_text(item.to_json() + "\n" + plain.to_json() + "\n")
    path.chmod(0o600)
    read = {i.id: i.detected for i in ReviewQueue(str(path), 100).items()}
    assert read == {"a": "de", "b": None}


def test_probe_both_identifies_speech_canaries_and_sends_non_speech_with_its_language(tmp_path):
    wav(tmp_path / "de.wav")
    wav(tmp_path / "silence.wav")
    fake = FakeWhisper(answers={"de.wav": {"text": "guten morgen", "language": "en"},
                                "silence.wav": {"text": "", "language": "cy"}})
    config = from_dict({"service": {"url": fake.url}, "collectors": {"probe": {
        "language": "both", "canaries": [
            {"audio": str(tmp_path / "de.wav"), "reference": "Guten Morgen", "language": "de"},
            {"audio": str(tmp_path / "silence.wav"), "reference": "", "language": "en"}]}}})
    probe = ProbeCollector(config.collectors.probe, config)
    assert {k: v for k, v in probe.identified.snapshot().items()} == {("de", "de", "canary"): 0}
    try:
        probe.update()
    finally:
        fake.close()
    assert sorted((r.filename, r.language or "") for r in fake.requests) == [
        ("de.wav", ""), ("de.wav", "de"), ("silence.wav", "en")]
    assert probe.identified.snapshot() == {("de", "de", "canary"): 0, ("de", "en", "canary"): 1}
    assert probe._latest["de"].detected == "en" and probe._latest["de"].language == "de"


@pytest.mark.parametrize("section, key, expected", [
    ({"quality": {"language": "sometimes"}}, "collectors.quality.language", "one of given, detect, both"),
    ({"probe": {"language": "auto"}}, "collectors.probe.language", "one of given, detect, both"),
    ({"probe": {"language": "detect", "response_format": "json"}}, "collectors.probe.language", "verbose_json"),
])
def test_bad_setting_exits_2_naming_the_key(tmp_path, section, key, expected):
    path = tmp_path / "exporter.yml"
    path.write_text(json.dumps({"collectors": section}))
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2, result.output
    assert key in result.output and expected in result.output


def evaluate(*args):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def test_evaluate_reports_accuracy_per_language_and_what_it_was_mistaken_for(server, manifest):
    result = evaluate("--manifest", manifest, "--target", server.url, "--allow-unthresholded", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    lid = report["language_id"]
    assert report["language_mode"] == "both"
    assert lid["en"]["accuracy"] == 1.0 and lid["de"]["accuracy"] == 0.5 and lid["yue"]["accuracy"] == 0.0
    assert lid["yue"]["detected"] == {"other": 1, "zh": 1} and lid["fr"]["detected"] == {"unknown": 1}
    assert [i["detected"] for i in report["items"]] == [
        {"english": "en", "German": "de", "xx": "other", None: "unknown"}.get(d, d) for *_, d in SET]
    text = evaluate("--manifest", manifest, "--target", server.url, "--allow-unthresholded").output
    assert "Language identification" in text
    assert any(line.split()[:5] == ["yue", "2", "0", "0", "0.0000"] and "other 1, zh 1" in line
               for line in text.splitlines()), text


def test_evaluate_gates_on_min_language_id_accuracy(server, manifest):
    args = ("--manifest", manifest, "--target", server.url, "--allow-unthresholded")
    result = evaluate(*args, "--min-language-id-accuracy", "0.5")
    assert result.exit_code == 1, result.output
    assert "yue: language identification accuracy 0.0000 (0 of 2) is below --min-language-id-accuracy 0.5" \
        in result.output
    assert "de: language identification" not in result.output  # 0.5 passes: equal is enough
    assert "fr: language identification accuracy 0.0000" in result.output  # named no language: not right
    result = evaluate(*args, "--min-language-id-accuracy", "0")
    assert result.exit_code == 0, result.output
    result = evaluate(*args, "--language", "given", "--min-language-id-accuracy", "0.5")
    assert result.exit_code == 2 and "--min-language-id-accuracy" in result.output
    server.answers["en-1.wav"] = 503
    result = evaluate(*args, "--language", "detect", "--min-language-id-accuracy", "0")
    assert result.exit_code == 1 and "en: 1 of 2 detection request(s) got no answer" in result.output


def test_series_past_the_bound_fold_into_other():
    counters = LanguageIdCounters(max_series=2)
    counters.count("en", "en", "reference")
    counters.count("de", "en", "reference")
    counters.count("fr", "es", "reference")
    counters.count("it", "es", "reference")
    assert counters.snapshot() == {("en", "en", "reference"): 1, ("de", "en", "reference"): 1,
                                   ("other", "other", "reference"): 2}
    assert counters.folded_total == 2
