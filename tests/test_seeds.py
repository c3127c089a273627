"""Request series whose labels are known in advance are exported at 0 before the first request
(issue 21, defect 1): Prometheus takes a new series' first sample as its baseline."""
import socket

import requests
from helpers import wait_for, wav

from whisper_exporter.collectors import logs as logs_collector
from whisper_exporter.collectors import tap as tap_collector
from whisper_exporter.config import from_dict
from whisper_exporter.runtime.seeds import COMMON_STATUS_CODES, MAX_SEEDED
from whisper_exporter.runtime.shared import Shared

TRANSCRIPTIONS, TRANSLATIONS = "/v1/audio/transcriptions", "/v1/audio/translations"


def families(shared):
    return {f.name: f for f in shared.families()}


def requests_total(shared):
    return {(s.labels["endpoint"], s.labels["status_code"], s.labels["language"]): s.value
            for s in families(shared)["whisper_requests"].samples}


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once closed


def test_the_tap_exports_its_work_endpoints_statuses_and_languages_at_0_before_any_request():
    config = from_dict({"service": {"url": f"http://127.0.0.1:{closed_port()}"},
                        "collectors": {"tap": {"enabled": True, "listen": "127.0.0.1:0"},
                                       "logs": {"languages": ["en", "German"]}}})
    shared = Shared.build(config)
    collector = tap_collector.make(config.collectors.tap, shared)
    counts = requests_total(shared)
    expected = {(ep, str(code), lang) for ep in (TRANSCRIPTIONS, TRANSLATIONS) for code in COMMON_STATUS_CODES
                for lang in ("unknown", "en", "de")}
    assert set(counts) == expected and set(counts.values()) == {0.0}
    fams = families(shared)
    durations = {s.labels["endpoint"] for s in fams["whisper_request_duration_seconds"].samples
                 if s.name.endswith("_count") and s.value == 0}
    assert durations == {TRANSCRIPTIONS, TRANSLATIONS}
    for name in ("whisper_audio_duration_seconds", "whisper_realtime_factor"):
        assert {s.labels["language"] for s in fams[name].samples if s.name.endswith("_count") and s.value == 0} \
            == {"unknown", "en", "de"}, name
    assert {s.labels["language"]: s.value for s in fams["whisper_audio_processed_seconds"].samples
            if s.name.endswith("_total")} == {"unknown": 0.0, "en": 0.0, "de": 0.0}
    # the first 502 counts into a series Prometheus has already seen at 0
    collector.start()
    try:
        r = requests.post(f"http://127.0.0.1:{collector.tap.port}{TRANSCRIPTIONS}",
                          files={"file": ("a.wav", b"x")}, data={"language": "de"})
        assert r.status_code == 502
        # the record is handed over by a worker thread
        assert wait_for(lambda: requests_total(shared)[(TRANSCRIPTIONS, "502", "de")])
        after = requests_total(shared)
        assert after[(TRANSCRIPTIONS, "502", "de")] == 1
        assert set(after) == expected and sum(after.values()) == 1
    finally:
        collector.stop()


def test_known_languages_come_from_the_canaries_and_the_manifest_when_none_is_configured(tmp_path):
    wav(tmp_path / "a.wav")
    (tmp_path / "refs.jsonl").write_text(
        '{"id": "1", "audio": "a.wav", "reference": "bonjour", "language": "fr"}\n'
        '{"id": "2", "audio": "a.wav", "reference": "你好", "language": "zh"}\n', encoding="utf-8")
    config = from_dict({"service": {"api": "whispercpp"},
                        "collectors": {"logs": {"enabled": True, "files": [{"path": str(tmp_path / "x.log")}]},
                                       "probe": {"canaries": [{"audio": str(tmp_path / "a.wav"),
                                                               "reference": "guten tag", "language": "de"}]},
                                       "quality": {"enabled": True, "manifest": "refs.jsonl"}}},
                       source=str(tmp_path / "exporter.yml"))
    shared = Shared.build(config)
    logs_collector.make(config.collectors.logs, shared)
    counts = requests_total(shared)
    assert {ep for ep, _, _ in counts} == {"/inference"}
    assert {lang for _, _, lang in counts} == {"unknown", "de", "fr", "zh"}
    # a log says nothing of audio by itself: no audio series are made up for it
    fams = families(shared)
    assert fams["whisper_audio_duration_seconds"].samples == []


def test_seeding_is_bounded_however_many_languages_are_configured():
    languages = ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sv", "da", "fi", "no", "tr",
                 "el", "hu", "ro", "bg", "hr", "sk", "sl", "lt", "lv", "et", "ja", "zh", "ko", "ar", "he", "hi"]
    config = from_dict({"collectors": {"tap": {"enabled": True, "listen": "127.0.0.1:0"},
                                       "logs": {"languages": languages}}})
    shared = Shared.build(config)
    tap_collector.make(config.collectors.tap, shared)
    counts = requests_total(shared)
    assert 0 < len(counts) <= MAX_SEEDED
    assert ("/v1/audio/transcriptions", "502", "unknown") in counts  # "unknown" first: most requests name none
