"""Language identification against a real, unmodified faster-whisper-server (tiny.en, CPU,
temperature 0): espeak-ng speech in en, de, Mandarin and Cantonese, sent without a language.

tiny.en is English-only, so it names every item English: each non-English item is misidentified.
What is checked is against the server's own answers, not the model's words: the confusion counters
equal, per item, the language the server's verbose_json answer names when asked directly (plain
requests here, not our client)."""
import json

import pytest
import requests
from whisper_server import make_speech

from whisper_exporter.collectors.quality import QualityCollector
from whisper_exporter.config import from_dict

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration

FAMILY = "whisper_quality_language_identified_total"
# (id, language, espeak-ng voice, what is said)
SET = [
    ("en-1", "en", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("de-1", "de", "de", "Guten Morgen, wie geht es Ihnen heute?"),
    ("zh-1", "zh", "cmn", "你好，今天天气很好。"),
    ("yue-1", "yue", "yue", "早晨，你今日食咗飯未呀？"),
]
# faster-whisper-server answers codes; the names are here in case a version answers names.
NAMES = {"english": "en", "german": "de", "chinese": "zh", "cantonese": "yue"}


@pytest.fixture(scope="module")
def speech_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lid-set")
    lines = []
    (folder / "audio").mkdir()
    for ident, language, voice, text in SET:
        make_speech(text, folder / "audio" / f"{ident}.wav", voice=voice)
        lines.append(json.dumps({"id": ident, "audio": f"audio/{ident}.wav", "reference": text,
                                 "language": language}, ensure_ascii=False))
    (folder / "refs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def answered_language(server, path):
    """The language the server's own answer names for `path` sent without one."""
    with open(path, "rb") as f:
        response = requests.post(server.url + "/v1/audio/transcriptions", timeout=120,
                                 files={"file": (path.name, f, "audio/wav")},
                                 data={"model": server.model, "model_name": server.model,
                                       "response_format": "verbose_json"})
    response.raise_for_status()
    language = response.json()["language"].strip().lower()
    return NAMES.get(language, language)


def test_confusion_counters_equal_the_servers_answers_per_item(whisper_server, speech_set):
    config = from_dict({"service": {"url": whisper_server.url, "model": whisper_server.model},
                        "collectors": {"quality": {"enabled": True, "manifest": str(speech_set / "refs.jsonl"),
                                                   "per_run": 50, "max_server_share": 1.0},
                                       "probe": {"enabled": False}, "gpu": {"enabled": False},
                                       "process": {"enabled": False}}},
                       source=str(speech_set / "exporter.yml"))
    collector = QualityCollector(config.collectors.quality, config)
    assert collector.language_mode == "both"  # the default for the openai API
    collector.update()
    expected = {}
    for ident, language, *_ in SET:
        key = (language, answered_language(whisper_server, speech_set / "audio" / f"{ident}.wav"), "reference")
        expected[key] = expected.get(key, 0) + 1
    assert any(language != detected for language, detected, _ in expected)  # tiny.en: misidentified ones
    assert {k: v for k, v in collector.identified.snapshot().items() if v} == expected
    # and so does the exposition, once each new series has gone out at 0
    for _ in range(2):
        exposed = {(s.labels["language"], s.labels["detected"], s.labels["set"]): s.value
                   for family in collector.families() for s in family.samples if s.name == FAMILY}
    assert {k: v for k, v in exposed.items() if v} == expected
    # every item was also scored from its request with the language (the WER path is unchanged)
    assert sum(v["scored"] for v in collector.quality.snapshot().values()) == len(SET)
