"""The quality collector with a scripted client: counts and round rates, the rate limit, the run
budget, the shared families' single owner, production scoring from the review queue, the page."""
import json

import jiwer
import pytest
from helpers import wait_for, wav, write_manifest
from prometheus_client import CollectorRegistry, generate_latest

from whisper_exporter import wiring as daemon
from whisper_exporter.collectors.logs import LogsCollector
from whisper_exporter.collectors.quality import QualityCollector
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.logfiles import parse as logparse
from whisper_exporter.quality.sampling import item_id
from whisper_exporter.runtime.exporter import make_registry
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.web import status as landing
from whisper_exporter.whisper import clients


class FakeClient:
    """Answers each audio file (by name) with a scripted transcript or outcome."""

    api, model, url = "openai", "fake", "http://fake"

    def __init__(self, answers, elapsed=0.2):
        self.answers = answers  # file name -> transcript, or an outcome such as clients.CONNECTION_ERROR
        self.elapsed = elapsed
        self.calls = []

    def transcribe(self, data, filename, language=None):
        self.calls.append((filename, language))
        answer = self.answers.get(filename, "")
        if answer in clients.OUTCOMES:
            return clients.TranscribeResult(outcome=answer, elapsed=self.elapsed, reason="scripted")
        return clients.TranscribeResult(outcome=clients.SUCCESS, elapsed=self.elapsed, status_code=200,
                                        transcription=clients.Transcription(text=answer))


SET = [
    ("en-1", "en", "The quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over a lazy dog."),
    ("en-2", "en", "Mr. Smith paid twenty-five dollars.", "Mister Smith paid $25."),
    ("de-1", "de", "Guten Morgen, wie geht es Ihnen?", "Guten Morgen wie geht's Ihnen"),
    ("zh-1", "zh", "你好，今天天气很好。", "你好今天天气不好"),
    ("yue-1", "yue", "早晨，你今日食咗飯未呀？", "早晨 你今日食左饭未"),
    ("yue-2", "yue", "唔該你講慢啲。", "thank you for watching"),
]


@pytest.fixture
def labeled(tmp_path):
    write_manifest(tmp_path, (row[:3] for row in SET))
    return tmp_path


def make(tmp_path, client=None, probe=False, logs=False, **quality):
    # One request per item (language identification's second request: tests/test_language_id.py).
    section = {"enabled": True, "manifest": str(tmp_path / "refs.jsonl"), "per_run": 50,
               "max_server_share": 1.0, "language": "given", **quality}
    config = from_dict({"collectors": {"quality": section, "probe": {"enabled": probe},
                                       "logs": {"enabled": logs}, "gpu": {"enabled": False},
                                       "process": {"enabled": False}}},
                       source=str(tmp_path / "exporter.yml"))
    collector = QualityCollector(config.collectors.quality, config)
    if client is not None:
        collector.client = lambda: client
    return config, collector


def samples(collector, name, **labels):
    out = {}
    for family in collector.families():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(collector, name, **labels):
    found = samples(collector, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def independent(rows):
    """jiwer + whisper_normalizer directly (not our scoring module): per language (S, D, I, units)."""
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    out = {}
    for _, language, reference, hypothesis in rows:
        norm = EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()
        ref, hyp = norm(reference), norm(hypothesis)
        if language in ("zh", "yue"):
            ref, hyp = " ".join("".join(ref.split())), " ".join("".join(hyp.split()))
        o = jiwer.process_words(ref, hyp)
        s, d, i, n = out.get(language, (0, 0, 0, 0))
        out[language] = (s + o.substitutions, d + o.deletions, i + o.insertions, n + len(ref.split()))
    return out


def test_a_run_counts_errors_and_units_per_language_with_set_reference(labeled):
    client = FakeClient({f"{ident}.wav": hyp for ident, _, _, hyp in SET})
    _, collector = make(labeled, client)
    collector.update()
    assert len(client.calls) == len(SET)
    assert ("zh-1.wav", "zh") in client.calls and ("yue-1.wav", "yue") in client.calls  # the language is sent
    for language, (s, d, i, n) in independent(SET).items():
        unit = "char" if language in ("zh", "yue") else "word"
        labels = dict(language=language, set="reference", unit=unit)
        assert value(collector, "whisper_quality_reference_units_total", **labels) == n
        assert value(collector, "whisper_quality_errors_total", type="substitution", **labels) == s
        assert value(collector, "whisper_quality_errors_total", type="deletion", **labels) == d
        assert value(collector, "whisper_quality_errors_total", type="insertion", **labels) == i
        assert value(collector, "whisper_quality_error_rate", **labels) == (s + d + i) / n
    assert value(collector, "whisper_quality_utterances_total", language="yue", result="scored") == 2
    assert value(collector, "whisper_quality_reference_items") == len(SET)
    assert value(collector, "whisper_quality_reference_passes_total") == 1  # the whole set in one run
    # a second run counts on; the gauge is the second round's rate (the same transcripts here)
    collector.update()
    s, d, i, n = independent(SET)["en"]
    assert value(collector, "whisper_quality_reference_units_total", language="en") == 2 * n
    assert value(collector, "whisper_quality_error_rate", language="en") == (s + d + i) / n


def test_failed_requests_are_failed_utterances_not_errors(labeled):
    client = FakeClient({"en-1.wav": clients.HTTP_ERROR, "en-2.wav": "Mister Smith paid $25."})
    _, collector = make(labeled, client)
    collector.update()
    assert value(collector, "whisper_quality_utterances_total", language="en", result="failed") == 1
    assert value(collector, "whisper_quality_utterances_total", language="en", result="scored") == 1
    # en-2 only: "mister smith paid $25" after Whisper's English normaliser
    assert value(collector, "whisper_quality_reference_units_total", language="en") == 4


def test_rate_limit_keeps_to_the_configured_share_of_the_server(labeled):
    client = FakeClient({}, elapsed=0.5)
    _, collector = make(labeled, client, max_server_share=0.2, per_run=4)
    waits = []
    collector.wait = waits.append
    collector.update()
    assert len(client.calls) == 4
    # after each request but the last: 0.5 s x (1 - 0.2) / 0.2 = 2 s; busy 2 s of 8 s = 25%
    # (of the run's wall time, 4 x 0.5 busy / (4 x 0.5 + 3 x 2) = 25%; over runs back to back, 20%)
    assert waits == pytest.approx([2.0, 2.0, 2.0])
    busy = 4 * 0.5
    assert busy / (busy + sum(waits) + 2.0) == pytest.approx(0.2)  # + the wait the next run would make


def test_full_share_never_waits(labeled):
    _, collector = make(labeled, FakeClient({}), max_server_share=1.0)
    waits = []
    collector.wait = waits.append
    collector.update()
    assert waits == []


def test_a_run_stops_at_its_budget_and_the_rest_comes_first_next_time(labeled):
    client = FakeClient({}, elapsed=5.0)
    _, collector = make(labeled, client, interval="100s", max_server_share=0.1)  # budget 90 s
    now = [0.0]
    collector.clock = lambda: now[0]

    def wait(seconds):
        now[0] += seconds

    collector.wait = wait
    collector.update()
    # each request: 5 s (not on this fake clock) then a 45 s pause; the second pause reaches the
    # 90 s budget, so the third item is not sent
    first = [name for name, _ in client.calls]
    assert len(first) == 2
    assert "stopped early" in collector.status and "budget" in collector.status
    client.calls.clear()
    now[0] = 0.0
    collector.section.per_run = len(SET) - len(first)
    collector.section.max_server_share = 1.0
    collector.update()
    assert sorted(name for name, _ in client.calls) == sorted(f"{i}.wav" for i, *_ in SET if f"{i}.wav" not in first)


def test_stop_interrupts_the_pause_between_requests(labeled):
    import threading

    client = FakeClient({}, elapsed=10.0)  # a 90 s pause after the first request at share 0.1
    _, collector = make(labeled, client, max_server_share=0.1)
    thread = threading.Thread(target=collector.update)
    thread.start()
    assert wait_for(lambda: len(client.calls) == 1)  # the first request is sent: the pause follows
    collector.stop()
    thread.join(30)
    assert not thread.is_alive()  # well before the 90 s pause ends: it was interrupted
    assert len(client.calls) == 1 and "stopping" in collector.status


def test_three_connection_errors_in_a_row_end_the_run(labeled):
    client = FakeClient({f"{i}.wav": clients.CONNECTION_ERROR for i, *_ in SET})
    _, collector = make(labeled, client)
    collector.update()  # not raised: the server being down is the probe's news, not a broken collector
    assert len(client.calls) == 3
    assert "3 connection errors in a row" in collector.status


def test_unreadable_manifest_marks_the_collector_down(labeled):
    _, collector = make(labeled, FakeClient({}))
    (labeled / "refs.jsonl").unlink()
    with pytest.raises(RuntimeError, match="no such file"):
        collector.update()


def test_broken_manifest_lines_are_logged_once_and_counted(labeled, caplog):
    with open(labeled / "refs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"audio": "audio/none.wav", "reference": "x", "language": "en"}\n')
        f.write('{"audio": "audio/en-1.wav", "reference": "x", "language": "en", "speaker": "a"}\n')
    client = FakeClient({})
    _, collector = make(labeled, client)
    collector.update()
    collector.update()
    assert len(client.calls) == 2 * len(SET)
    assert value(collector, "whisper_quality_manifest_problems") == 2
    assert caplog.text.count("line 7:") == 1 and caplog.text.count("line 8:") == 1
    assert "unknown column 'speaker'" in caplog.text and "2 manifest lines skipped" in collector.status


def test_audio_gone_at_send_time_is_skipped_not_failed(labeled, monkeypatch):
    from whisper_exporter.quality import manifest

    # the file vanishes between loading the manifest and sending it (the collector imports
    # manifest.load when it is needed)
    load = manifest.load
    monkeypatch.setattr(manifest, "load", lambda path, **_: load(path, check_audio=False))
    (labeled / "audio" / "de-1.wav").unlink()
    client = FakeClient({})
    _, collector = make(labeled, client)
    collector.update()
    assert ("de-1.wav", "de") not in client.calls and len(client.calls) == len(SET) - 1
    # neither scored nor failed: its series stay at the 0 they were exported at
    assert set(samples(collector, "whisper_quality_utterances_total", language="de").values()) == {0.0}
    assert collector.problems and "de-1" in collector.problems[0] and "no such file" in collector.problems[0]


def test_a_manifest_without_a_usable_line_marks_the_collector_down(labeled):
    (labeled / "refs.jsonl").write_text('{"audio": "audio/none.wav", "reference": "x", "language": "en"}\n')
    _, collector = make(labeled, FakeClient({}))
    with pytest.raises(RuntimeError, match="no usable line"):
        collector.update()
    assert value(collector, "whisper_quality_manifest_problems") == 1


def test_thresholds_are_exported_for_alert_rules(labeled):
    _, collector = make(labeled, FakeClient({}), thresholds={"default": 0.3, "en": 0.1})
    collector.update()
    rates = {dict(k)["language"]: v for k, v in samples(collector, "whisper_quality_max_error_rate").items()}
    assert rates == {"en": 0.1, "de": 0.3, "zh": 0.3, "yue": 0.3}


# -- one owner for the shared families ---------------------------------------------------------


def quality_help_lines(config):
    scheduler = daemon.build_scheduler(config)
    try:
        text = generate_latest(make_registry(scheduler)).decode()
    finally:
        for collector, _ in scheduler.entries:
            collector.stop()
    return text.count("# HELP whisper_quality_errors_total"), [c.name for c, _ in scheduler.entries]


def _registry(collector):
    class One:
        def collect(self):
            return collector.families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return registry


@pytest.mark.parametrize("probe, quality, owners", [(True, True, 1), (False, True, 1), (True, False, 1)])
def test_the_quality_families_are_rendered_exactly_once(labeled, probe, quality, owners):
    config = from_dict({"collectors": {
        "quality": {"enabled": quality, "manifest": str(labeled / "refs.jsonl")},
        "probe": {"enabled": probe}, "gpu": {"enabled": False}, "process": {"enabled": False}}})
    count, names = quality_help_lines(config)
    assert count == owners
    assert ("quality" in names) == quality and ("probe" in names) == probe


def test_known_series_are_exported_at_0_before_the_first_run(labeled):
    """Issue 21, defect 1: Prometheus takes a new series' first sample as its baseline, so each
    (language, set) the collector will feed goes out at 0 before anything is counted into it."""
    queue = labeled / "queue.jsonl"
    queue.write_text(json.dumps({"id": "q1", "audio": "/srv/q1.wav", "transcript": "bonjour", "language": "fr",
                                 "duration": 2.0, "duration_band": "0-5s", "sampled_at": 1.0}) + "\n")
    _, collector = make(labeled, FakeClient({}), production={"queue": str(queue),
                                                             "references": str(labeled / "verified.jsonl")})
    units = samples(collector, "whisper_quality_reference_units_total")
    manifest_languages = {("en", "word"), ("de", "word"), ("zh", "char"), ("yue", "char")}
    expected = {(lang, set_, unit) for lang, unit in manifest_languages for set_ in ("reference", "production")}
    expected.add(("fr", "production", "word"))  # queued, waiting for review
    assert {(dict(k)["language"], dict(k)["set"], dict(k)["unit"]) for k in units} == expected
    assert set(units.values()) == {0.0}
    errors = samples(collector, "whisper_quality_errors_total")
    assert len(errors) == 3 * len(expected) and set(errors.values()) == {0.0}
    assert len(samples(collector, "whisper_quality_utterances_total")) == 2 * len(expected)
    assert samples(collector, "whisper_quality_error_rate") == {}  # no round yet: no rate to show


def test_a_language_first_seen_in_a_review_is_scored_one_run_later(labeled):
    """Queued and verified between two runs: its series goes out at 0 first, the score next run."""
    queue, refs = labeled / "queue.jsonl", labeled / "verified.jsonl"
    _, collector = make(labeled, FakeClient({}), manifest=None,
                        production={"queue": str(queue), "references": str(refs)})
    assert samples(collector, "whisper_quality_reference_units_total") == {}  # nothing known yet
    queue.write_text(json.dumps({"id": "q1", "audio": "/srv/q1.wav", "transcript": "guten tag", "language": "de",
                                 "duration": 2.0, "duration_band": "0-5s", "sampled_at": 1.0}) + "\n")
    refs.write_text(json.dumps({"id": "q1", "reference": "guten morgen"}) + "\n")
    collector.update()
    labels = dict(language="de", set="production", unit="word")
    assert value(collector, "whisper_quality_reference_units_total", **labels) == 0
    assert "1 of a new language scored next run" in collector.status
    collector.update()
    assert value(collector, "whisper_quality_reference_units_total", **labels) == 2
    assert value(collector, "whisper_quality_errors_total", type="substitution", **labels) == 1
    assert value(collector, "whisper_quality_error_rate", **labels) == 0.5
    assert queue.read_text() == ""


def test_a_language_added_to_the_manifest_is_exported_at_0_first(labeled):
    client = FakeClient({"en-1.wav": "The quick brown fox jumped over a lazy dog."})
    _, collector = make(labeled, client)
    wav(labeled / "audio" / "fr-1.wav")
    with open(labeled / "refs.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"id": "fr-1", "audio": "audio/fr-1.wav", "reference": "bonjour tout le monde",
                              "language": "fr"}) + "\n")
    collector.update()
    assert ("fr-1.wav", "fr") not in client.calls and len(client.calls) == len(SET)
    labels = dict(language="fr", set="reference", unit="word")
    assert value(collector, "whisper_quality_reference_units_total", **labels) == 0
    collector.update()
    assert ("fr-1.wav", "fr") in client.calls
    assert value(collector, "whisper_quality_reference_units_total", **labels) == 4


def test_quality_alone_owns_and_renders_its_counts(labeled):
    config, collector = make(labeled, FakeClient({"en-1.wav": "the quick brown fox"}))
    assert collector.standalone  # built outside the wiring: it renders the quality families itself
    collector.update()
    text = generate_latest(_registry(collector)).decode()
    assert 'whisper_quality_reference_units_total{language="en",set="reference",unit="word"}' in text


# -- production -------------------------------------------------------------------------------


def test_log_lines_with_audio_and_transcript_reach_the_queue_and_verified_ones_are_scored(labeled):
    queue, refs = labeled / "queue.jsonl", labeled / "verified.jsonl"
    config, collector = make(labeled, FakeClient({}), logs=True, manifest=None,
                             production={"queue": str(queue), "references": str(refs), "fraction": 0.5})
    log_file = labeled / "requests.jsonl"
    log_file.write_text("")
    logs_section = from_dict({"collectors": {"logs": {"enabled": True, "start_at": "beginning", "files": [
        {"path": str(log_file), "format": "json",
         "fields": {"endpoint": "path", "status_code": "status", "language": "lang",
                    "audio_duration": "seconds", "audio_path": "audio.path", "transcript": "text"}}]}}}).collectors.logs
    shared = Shared.build(config)  # one review queue for the sampler and the quality collector
    collector.queue = shared.review_queue
    logs = LogsCollector(logs_section, sampler=shared.production_sampler())
    lines = [
        {"path": "/v1/audio/transcriptions", "status": 200, "lang": "en", "seconds": 3.0,
         "audio": {"path": "/srv/a1.wav"}, "text": "the cat sat on a mat"},
        {"path": "/v1/audio/transcriptions", "status": 200, "lang": "en", "seconds": 3.5,
         "audio": {"path": "/srv/a2.wav"}, "text": "not drawn: the second of its cell at 50%"},
        {"path": "/v1/audio/transcriptions", "status": 500, "lang": "en", "seconds": 3.0,
         "audio": {"path": "/srv/a3.wav"}, "text": "a failed request is never sampled"},
        {"path": "/v1/audio/transcriptions", "status": 200, "lang": "Cantonese", "seconds": 20.0,
         "audio": {"path": "/srv/y1.wav"}, "text": "早晨你今日食左饭未"},
        {"path": "/v1/audio/transcriptions", "status": 200, "lang": "en", "seconds": 3.0},  # no audio path
    ]
    log_file.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    logs.update()
    queued = [json.loads(line) for line in queue.read_text(encoding="utf-8").splitlines()]
    assert [(q["audio"], q["language"], q["duration_band"]) for q in queued] == [
        ("/srv/a1.wav", "en", "0-5s"), ("/srv/y1.wav", "yue", "15-30s")]
    fams = {f.name: f for f in shared.families()}
    assert fams["whisper_quality_review_queue_items"].samples[0].value == 2
    # nothing verified yet: nothing scored, nothing taken off the queue
    collector.update()
    # (the queued languages are exported at 0 while they wait: Prometheus sees them before a count)
    assert samples(collector, "whisper_quality_reference_units_total", set="production") == {
        (("language", "en"), ("set", "production"), ("unit", "word")): 0.0,
        (("language", "yue"), ("set", "production"), ("unit", "char")): 0.0}
    # a reviewer verifies the Cantonese one
    yue = item_id("/srv/y1.wav", "早晨你今日食左饭未")
    refs.write_text(json.dumps({"id": yue, "reference": "早晨，你今日食咗飯未呀？"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    collector.update()
    (s, d, i, n), = independent([(yue, "yue", "早晨，你今日食咗飯未呀？", "早晨你今日食左饭未")]).values()
    labels = dict(language="yue", set="production", unit="char")
    assert value(collector, "whisper_quality_reference_units_total", **labels) == n == 10
    assert value(collector, "whisper_quality_errors_total", type="substitution", **labels) == s
    assert value(collector, "whisper_quality_error_rate", **labels) == (s + d + i) / n
    assert [json.loads(line)["audio"] for line in queue.read_text().splitlines()] == ["/srv/a1.wav"]
    assert "1 scored, 1 waiting" in collector.status
    collector.update()  # scored once, not again
    assert value(collector, "whisper_quality_utterances_total", result="scored", **labels) == 1
    assert collector.worst_items()["production"][0].id == yue


def test_a_flagged_review_leaves_the_queue_and_is_never_scored_as_wer(labeled):
    """A "no speech" verdict has an empty reference: scored as WER it would count the whole
    transcript as insertions against nothing. It is taken off the queue unscored."""
    queue, refs = labeled / "queue.jsonl", labeled / "verified.jsonl"
    _, collector = make(labeled, FakeClient({}), manifest=None,
                        production={"queue": str(queue), "references": str(refs)})
    queue.write_text("".join(json.dumps({"id": ident, "audio": f"/srv/{ident}.wav", "transcript": text,
                                         "language": "en", "duration": 2.0, "duration_band": "0-5s",
                                         "sampled_at": 1.0}) + "\n"
                             for ident, text in (("q1", "thanks for watching"), ("q2", "good morning"))))
    collector.update()  # both wait: their series go out at 0
    refs.write_text(json.dumps({"id": "q1", "reference": "", "flags": ["no_speech"], "source": "label-studio"})
                    + "\n" + json.dumps({"id": "q2", "reference": "good morning"}) + "\n")
    collector.update()
    labels = dict(language="en", set="production", unit="word")
    assert value(collector, "whisper_quality_reference_units_total", **labels) == 2  # q2's two words alone
    assert value(collector, "whisper_quality_errors_total", type="insertion", **labels) == 0
    assert value(collector, "whisper_quality_utterances_total", result="scored", **labels) == 1
    assert queue.read_text() == ""  # the flagged one is done too


def test_logparse_maps_the_new_fields():
    parser = logparse.make_parser("json", None, {"audio_path": "file", "transcript": "result.text"})
    record = parser.parse(b'{"file": "/a.wav", "result": {"text": "hi"}, "status_code": 200}')
    assert (record.audio_path, record.transcript, record.status_code) == ("/a.wav", "hi", 200)
    assert parser.parse(b'{"file": "/a.wav", "result": {"text": "hi"}}') is None  # alone: not a request
    with pytest.raises(logparse.LineError):
        parser.parse(b'{"file": 3, "status_code": 200}')


# -- configuration -----------------------------------------------------------------------------


def test_defaults_and_watchdog():
    section = from_dict({}).collectors.quality
    assert (section.enabled, section.interval, section.per_run, section.max_server_share) == (False, 3600, 50, 0.1)
    assert section.production.fraction == 0.01 and section.production.queue is None
    assert section.run_timeout == 0.9 * 3600 + 3 * 60 + 60
    assert section.run_timeout > section.run_budget


@pytest.mark.parametrize("quality, key, expected", [
    ({"enabled": True}, "collectors.quality.manifest", "labeled reference set"),
    ({"enabled": True, "manifest": "nope.jsonl"}, "collectors.quality.manifest", "readable manifest"),
    ({"max_server_share": 0}, "collectors.quality.max_server_share", "above 0"),
    ({"max_server_share": 1.5}, "collectors.quality.max_server_share", "at most 1"),
    ({"per_run": 0}, "collectors.quality.per_run", "greater than 0"),
    ({"thresholds": {"english": 0.1}}, "collectors.quality.thresholds.english", "language code"),
    ({"thresholds": {"en": -1}}, "collectors.quality.thresholds.en", "0 or more"),
    ({"production": {"fraction": 2}}, "collectors.quality.production.fraction", "from 0 to 1"),
    ({"production": {"references": "r.jsonl"}}, "collectors.quality.production.queue", "review queue"),
    ({"production": {"max_queue": 0}}, "collectors.quality.production.max_queue", "greater than 0"),
])
def test_bad_quality_config_names_the_key(tmp_path, quality, key, expected):
    with pytest.raises(ConfigError) as info:
        from_dict({"collectors": {"quality": quality}}, source=str(tmp_path / "c.yml"))
    assert info.value.key == key and expected in info.value.expected


def test_relative_paths_resolve_against_the_config_folder(labeled, monkeypatch):
    (labeled / "conf").mkdir()
    config = from_dict({"collectors": {"quality": {"enabled": True, "manifest": "../refs.jsonl",
                                                   "state_file": "state.json", "max_server_share": 1}}},
                       source=str(labeled / "conf" / "exporter.yml"))
    monkeypatch.chdir("/")
    collector = QualityCollector(config.collectors.quality, config)
    collector.client = lambda: FakeClient({})
    collector.update()
    assert collector.manifest_path == str(labeled / "conf" / "../refs.jsonl")
    assert (labeled / "conf" / "state.json").exists()


# -- the landing page -------------------------------------------------------------------------


def test_landing_page_shows_rates_and_worst_items_escaped(labeled):
    client = FakeClient({"en-1.wav": "<script>alert(1)</script> fox", "de-1.wav": clients.TIMEOUT})
    config, collector = make(labeled, client)
    collector.update()
    shared = Shared.build(config)
    shared.quality, shared.quality_in_use, shared.quality_view = collector.quality, True, collector
    scheduler = Scheduler([(collector, 3600.0, 4000.0)], shared=shared)
    collector.quality.seed("fr", "reference")  # exported at 0, nothing evaluated: not a row of the page
    rows = landing.quality_rows(scheduler)
    assert {(r["set"], r["language"]) for r in rows["rates"]} >= {("reference", "en"), ("reference", "yue")}
    assert "fr" not in {r["language"] for r in rows["rates"]}
    worst = rows["worst"]
    assert worst[0]["set"] == "reference" and float(worst[0]["error_rate"]) >= float(worst[1]["error_rate"])
    assert any(r["id"] == "de-1" and "timeout" in r["result"] for r in worst)
    page = landing.render(config, scheduler)
    assert "<h2>Quality</h2>" in page and "Worst recent items" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
