"""The real-server tests' exporter-side checks (tests/answer_checks.py), fed the answers tiny.en
gave on other CPUs, with no real server: each check passes for every one of them, so no CPU's
answer can fail a real-server test; and each check fails an exporter that gets the verdict wrong,
so passing means something.

The answers: '' (the AMD EPYC with AVX-512 on the undithered beeps), the outro loop (this
machine on the same beeps), "Beep, beep, ..." (the dithered beeps), "You" (tiny.en on
silence), ". . . . ." (a chord, once), and a plain sentence.
"""
import json

import jiwer
import pytest
from answer_checks import (
    negative_canary_problems,
    non_speech_problems,
    probe_command_problems,
    scored_canary_problems,
    speech_problems,
)
from click.testing import CliRunner
from fake_whisper import FakeWhisper
from whisper_normalizer.basic import BasicTextNormalizer

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary
from whisper_exporter.config import from_dict

OUTRO = (" We'll see you in the next video. See you in the next video. See you in the next video. "
         "See you in the next video.")
SENTENCE = " The meeting starts at ten in the small room on the second floor."


def answer(text: str, no_speech_prob: float = 0.2, compression_ratio: float = 1.3) -> dict:
    """A verbose_json answer as faster-whisper-server gives it: one segment of the text."""
    segments = [{"text": text, "no_speech_prob": no_speech_prob, "compression_ratio": compression_ratio,
                 "avg_logprob": -0.5, "temperature": 0.0}] if text else []
    return {"task": "transcribe", "language": "en", "duration": 4.0, "text": text, "segments": segments}


SEEN = {
    "epyc_empty": answer(""),
    "outro_loop": answer(OUTRO, compression_ratio=3.9),
    "outro_loop_low_ratio": answer(OUTRO, compression_ratio=1.1),  # the loop found from the words alone
    "beep_loop": answer(" Beep, beep, beep, beep, beep, beep, beep, beep."),
    "you": answer(" You"),
    "you_no_speech": answer(" You", no_speech_prob=0.83),
    "dots": answer(" . . . . ."),
    "sentence": answer(SENTENCE, no_speech_prob=0.05),
    # German through tiny.en on an AMD EPYC: a half-loop Whisper's own ratio test calls a loop
    "german_garble": answer(" That's all to lead to intent on that stat. That's all to lead to intent on "
                            "intent on that stat.", no_speech_prob=0.7, compression_ratio=2.6),
}
KINDS = {"epyc_empty": "empty", "outro_loop": "hallucination", "outro_loop_low_ratio": "hallucination",
         "beep_loop": "hallucination", "you": "hallucination", "you_no_speech": "hallucination",
         "dots": "no_speech", "sentence": "plain", "german_garble": "model_signal"}


def never(*args, **kwargs) -> tuple[str, ...]:
    return ()


def always(*args, **kwargs) -> tuple[str, ...]:
    return ("too_much_text",)


@pytest.mark.parametrize("name", sorted(SEEN))
def test_the_non_speech_check_passes_for_every_answer_seen(name):
    assert non_speech_problems(SEEN[name]) == []


@pytest.mark.parametrize("name", sorted(SEEN))
def test_the_speech_check_passes_for_every_answer_seen(name):
    kind, problems = speech_problems(SEEN[name])
    assert problems == [] and kind == KINDS[name]


@pytest.mark.parametrize("name", ["outro_loop", "outro_loop_low_ratio", "beep_loop", "you", "dots"])
def test_the_checks_fail_a_detector_that_misses(name):
    assert non_speech_problems(SEEN[name], detector=never)
    if KINDS[name] == "hallucination":
        assert speech_problems(SEEN[name], detector=never)[1]


def test_the_speech_check_fails_a_loop_flag_the_model_does_not_back():
    """A repetition flag is allowed on speech only where Whisper's own ratio test backs it."""
    garble = SEEN["german_garble"]
    assert speech_problems(garble, detector=lambda *a, **k: ("repetition",)) == ("model_signal", [])
    sentence = SEEN["sentence"]
    assert speech_problems(sentence, detector=lambda *a, **k: ("repetition",))[1]


@pytest.mark.parametrize("name", ["epyc_empty", "sentence"])
def test_the_checks_fail_a_detector_that_flags_what_it_should_not(name):
    assert speech_problems(SEEN[name], detector=always)[1]
    if name == "epyc_empty":
        assert non_speech_problems(SEEN[name], detector=always)


@pytest.fixture
def negative_probe():
    """A probe of one non-speech canary against a fake server answering what the test sets."""
    def probe(text: str):
        with FakeWhisper(text=text) as fake:
            config = from_dict({"service": {"url": fake.url}, "collectors": {"probe": {"canaries": [
                {"name": "beeps", "audio": bundled_canary().audio, "reference": "", "language": "en"}]}}})
            collector = ProbeCollector(config.collectors.probe, config)
            collector.update()
            (record,) = collector.recent_probes()["beeps"]
            return record
    return probe


@pytest.mark.parametrize("name", sorted(SEEN))
def test_the_negative_canary_check_passes_for_every_answer_seen(negative_probe, name):
    record = negative_probe(SEEN[name]["text"])
    assert record.result == ("hallucination" if SEEN[name]["text"].strip() else "success")
    assert negative_canary_problems(record) == []


def test_the_negative_canary_check_fails_a_wrong_result(negative_probe):
    record = negative_probe(OUTRO)
    record.result = "success"
    assert negative_canary_problems(record)
    record = negative_probe("")
    record.result = "hallucination"
    assert negative_canary_problems(record)


MANDARIN = "你好，今天天气很好，我们去公园散步吧。"


def cer(reference: str, transcript: str) -> float:
    normalise = BasicTextNormalizer()
    return jiwer.cer("".join(normalise(reference).split()), "".join(normalise(transcript).split()) or "")


@pytest.mark.parametrize("text", [SEEN[n]["text"] for n in sorted(SEEN)] + [MANDARIN],
                         ids=sorted(SEEN) + ["right"])
def test_the_scored_canary_check_passes_for_every_answer_seen(text):
    with FakeWhisper(text=text) as fake:
        config = from_dict({"service": {"url": fake.url}, "collectors": {"probe": {"canaries": [
            {"name": "zh", "audio": bundled_canary().audio, "reference": MANDARIN, "language": "zh"}]}}})
        collector = ProbeCollector(config.collectors.probe, config)
        collector.update()
    (record,) = collector.recent_probes()["zh"]
    assert record.unit == "char"
    assert scored_canary_problems(record, 16, cer(MANDARIN, record.transcript)) == []
    assert record.result == ("success" if text == MANDARIN else "wrong_transcript")
    record.result = "success" if record.result != "success" else "wrong_transcript"
    assert scored_canary_problems(record, 16, cer(MANDARIN, record.transcript))  # it would see a wrong one


@pytest.mark.parametrize("name", sorted(SEEN))
def test_the_probe_command_check_passes_for_every_answer_seen(tmp_path, name):
    """`probe` with the default set (the English canary and silence), the silence answered as seen."""
    with FakeWhisper(answers={"en.wav": bundled_canary().reference, "silence.wav": SEEN[name]["text"]}) as fake:
        path = tmp_path / "c.yml"
        path.write_text(json.dumps({"service": {"url": fake.url}}))
        result = CliRunner().invoke(main, ["probe", "--config", str(path), "--json"])
    records = {r["canary"]: r for r in json.loads(result.output)["records"]}
    assert probe_command_problems(result.exit_code, result.output, records) == []
    assert result.exit_code == 0  # a hallucinated negative canary is a finding, not a failure
    assert bool(json.loads(result.output)["findings"]) == bool(SEEN[name]["text"].strip())
    records["silence"]["result"] = "success" if records["silence"]["result"] != "success" else "hallucination"
    assert probe_command_problems(result.exit_code, result.output, records)


@pytest.mark.parametrize("name", sorted(SEEN))
def test_the_quality_guard_holds_for_every_answer_seen_on_the_chinese_clips(name):
    """test_quality_real_server asserts zh and yue are scored far off (CER above 0.6), so that its
    exact comparison is not 0 == 0; whatever tiny.en writes for Chinese, as any answer seen, that holds."""
    from pathlib import Path

    from test_quality_real_server import independent

    refs = [json.loads(line) for line in (Path(__file__).parent / "data" / "quality" / "refs.jsonl").read_text(
        encoding="utf-8").splitlines()]
    chinese = [(r["language"], r["reference"], SEEN[name]["text"]) for r in refs if r["language"] in ("zh", "yue")]
    rates = independent(chinese)
    assert sorted(rates) == ["yue", "zh"] and min(r["error_rate"] for r in rates.values()) > 0.6, rates


@pytest.mark.parametrize("name", sorted(SEEN))
@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgraded"])
def test_the_tap_checks_pass_for_every_answer_seen(name, upgrade):
    """The tap in front of a server answering each seen text: its record holds what the client
    got, and an upgraded json request the verbose answer's language and segments."""
    import requests
    from aiohttp import web
    from answer_checks import tap_transcript_problems, upgrade_problems
    from fake_whisper import verbose_answer
    from tap_helpers import Records, Upstream, start_tap, wav_bytes

    text = SEEN[name]["text"]

    async def transcribe(request):
        await request.read()  # the whole upload, chunked or not (the upgrade re-sends it chunked)
        return web.json_response(verbose_answer(text))

    records = Records()
    upstream = Upstream({"/v1/audio/transcriptions": transcribe})
    tap = start_tap(upstream.url, records, upgrade_response_format=upgrade)
    try:
        r = requests.post(f"http://127.0.0.1:{tap.port}/v1/audio/transcriptions",
                          files={"file": ("a.wav", wav_bytes(1.0))},
                          data={"model": "whisper-1", "response_format": "json"}, timeout=30)
        (record,) = records.wait(1)
    finally:
        tap.stop()
        upstream.stop()
    assert r.status_code == 200
    assert tap_transcript_problems(record, r.content) == []
    if upgrade:
        assert upgrade_problems(record, verbose_answer(text)) == []
        record.segments = []
        assert upgrade_problems(record, verbose_answer(text))  # it would see segments lost
    record.transcript = "something else"
    assert tap_transcript_problems(record, r.content)  # and a transcript that is not the client's
