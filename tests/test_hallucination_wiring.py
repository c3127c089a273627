"""The hallucination watch as a user meets it: negative canaries in the probe, transcripts in the
log and in the reference set counted by source, one set of counters per exporter, the status page."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fake_whisper import FakeWhisper
from helpers import samples
from prometheus_client import generate_latest

from whisper_exporter import wiring
from whisper_exporter.collectors.logs import LogsCollector
from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary, bundled_negative_canary
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.runtime.exporter import make_registry
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.web import status
from whisper_exporter.whisper import hallucination


@pytest.fixture
def fake():
    server = FakeWhisper(answers={"en.wav": bundled_canary().reference, "silence.wav": "Thank you for watching!"})
    yield server
    server.close()


def exposition(collector) -> dict:
    class One:
        def collect(self):
            return collector.families()

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return samples(generate_latest(registry).decode())


def test_default_canaries_are_the_english_one_and_a_negative_one():
    config = from_dict({})
    collector = ProbeCollector(config.collectors.probe, config)
    names = {c.name: c.reference for c in collector.canaries}
    assert names == {"en-short": bundled_canary().reference, "silence": ""}


def test_negative_canary_answered_with_text_is_a_hallucination(fake):
    config = from_dict({"service": {"url": fake.url}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    latest = {name: records[0] for name, records in collector.recent_probes().items()}
    assert latest["en-short"].result == "success"
    assert latest["silence"].result == "hallucination" and not latest["silence"].success
    assert "known_phrase" in latest["silence"].reason and "Thank you for watching" in latest["silence"].reason
    values = exposition(collector)
    assert values[("whisper_probe_runs_total", (("probe", "silence"), ("result", "hallucination")))] == 1
    assert values[("whisper_probe_success", (("probe", "silence"),))] == 0
    assert values[("whisper_probe_info", (("kind", "negative"), ("language", "en"), ("probe", "silence"),
                                          ("unit", "word")))] == 1
    assert ("whisper_probe_word_error_rate", (("probe", "silence"),)) not in values  # nothing to score against
    checked = values[("whisper_hallucination_checked_total", (("language", "en"), ("source", "canary")))]
    assert checked == 2  # both answers checked ...
    assert values[("whisper_hallucination_suspects_total",
                   (("language", "en"), ("reason", "known_phrase"), ("source", "canary")))] == 1  # ... one suspect
    assert values[("whisper_hallucination_suspected_total", (("language", "en"), ("source", "canary")))] == 1


def test_negative_canary_answered_with_nothing_succeeds(fake):
    fake.answers = {"silence.wav": ""}
    config = from_dict({"service": {"url": fake.url},
                        "collectors": {"probe": {"canaries": [
                            {"name": "quiet", "audio": bundled_negative_canary().audio, "reference": ""}]}}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    assert collector.recent_probes()["quiet"][0].result == "success"


def test_a_canary_without_reference_is_refused_but_an_empty_one_is_negative(tmp_path):
    audio = bundled_negative_canary().audio
    with pytest.raises(ConfigError) as err:
        from_dict({"collectors": {"probe": {"canaries": [{"audio": audio}]}}})
    assert err.value.key == "collectors.probe.canaries[0].reference" and "negative canary" in str(err.value)
    config = from_dict({"collectors": {"probe": {"canaries": [{"audio": audio, "reference": ""}]}}})
    assert config.collectors.probe.canaries[0].reference == ""
    path = tmp_path / "c.yml"
    path.write_text(f"collectors:\n  probe:\n    canaries:\n      - {{audio: {audio}, reference: ''}}\n")
    result = subprocess.run([sys.executable, "-m", "whisper_exporter", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_log_transcripts_are_checked_as_traffic(tmp_path):
    log = tmp_path / "requests.jsonl"
    lines = [
        {"path": "/v1/audio/transcriptions", "status": 200, "language": "en", "audio_s": 5.0,
         "text": "the meeting moved to thursday at noon"},
        {"path": "/v1/audio/transcriptions", "status": 200, "language": "en", "audio_s": 5.0,
         "text": "beep " * 24},
        {"path": "/v1/audio/transcriptions", "status": 200, "language": "ja", "audio_s": 3.0,
         "text": "ご視聴ありがとうございました"},
        {"path": "/v1/audio/transcriptions", "status": 200, "language": "en", "audio_s": 1.0},  # no transcript
    ]
    log.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    config = from_dict({"collectors": {"logs": {"enabled": True, "start_at": "beginning", "files": [
        {"path": str(log), "format": "json", "fields": {
            "endpoint": "path", "status_code": "status", "language": "language",
            "audio_duration": "audio_s", "transcript": "text"}}]}}})
    counters = HallucinationCounters()
    # an unbounded budget: every transcript checked (the default skips a replayed backlog beyond 2% CPU)
    collector = LogsCollector(config.collectors.logs, hallucinations=counters,
                              budget=hallucination.CpuBudget(share=1.0, floor=1.0))
    collector.update()
    values = exposition(counters)
    assert values[("whisper_hallucination_checked_total", (("language", "en"), ("source", "traffic")))] == 2
    assert values[("whisper_hallucination_checked_total", (("language", "ja"), ("source", "traffic")))] == 1
    assert values[("whisper_hallucination_suspects_total",
                   (("language", "en"), ("reason", "repetition"), ("source", "traffic")))] == 1
    assert values[("whisper_hallucination_suspects_total",
                   (("language", "ja"), ("reason", "known_phrase"), ("source", "traffic")))] == 1
    assert values[("whisper_hallucination_suspected_total", (("language", "en"), ("source", "traffic")))] == 1


def test_one_set_of_counters_rendered_once_and_shown_on_the_page(fake, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(json.dumps({"path": "/v1/audio/transcriptions", "status": 200, "text": "Thanks for watching!",
                               "language": "en"}) + "\n")
    config = from_dict({"service": {"url": fake.url}, "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False},
        "logs": {"enabled": True, "start_at": "beginning", "files": [
            {"path": str(log), "format": "json", "fields": {
                "endpoint": "path", "status_code": "status", "language": "language", "transcript": "text"}}]}}})
    scheduler = wiring.build_scheduler(config)
    for collector, _ in scheduler.entries:
        collector.update()
    text = generate_latest(make_registry(scheduler)).decode()
    assert text.count("# HELP whisper_hallucination_checked_total") == 1
    values = samples(text)
    assert values[("whisper_hallucination_checked_total", (("language", "en"), ("source", "traffic")))] == 1
    assert values[("whisper_hallucination_checked_total", (("language", "en"), ("source", "canary")))] == 2
    rows = status.hallucination_rows(scheduler)
    assert {(r["source"], r["reasons"]) for r in rows} == {("traffic", "known_phrase"), ("canary", "known_phrase")}
    traffic = next(r for r in rows if r["source"] == "traffic")
    assert "Thanks for watching" not in traffic["transcript"]  # users' words never reach the page
    page = status.render(config, scheduler)
    assert "Suspected hallucinations" in page and "Thank you for watching!" in page  # the canary's own
    for collector, _ in scheduler.entries:
        collector.stop()


def test_evaluate_reports_suspects_per_language_and_gates_on_them(tmp_path):
    from click.testing import CliRunner
    from helpers import wav

    from whisper_exporter.cli import main

    for name in ("a", "b", "c", "d"):
        wav(tmp_path / f"{name}.wav", seconds=2.0)
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text("".join(json.dumps({"id": n, "audio": f"{n}.wav", "reference": "the cat sat on the mat",
                                            "language": "en"}) + "\n" for n in ("a", "b", "c", "d")))
    server = FakeWhisper(answers={"a.wav": "the cat sat on the mat", "b.wav": "the cat sat on a mat",
                                  "c.wav": "the cat sat on the mat", "d.wav": "Thanks for watching!"})
    try:
        base = ["evaluate", "--manifest", str(manifest), "--target", server.url, "--max-error-rate", "1.5",
                "--no-progress"]
        ungated = CliRunner().invoke(main, base + ["--json"])
        report = json.loads(ungated.output)
        assert report["languages"]["en"]["hallucination_suspects"] == 1
        assert report["languages"]["en"]["hallucination_reasons"] == {"known_phrase": 1}
        assert [i["id"] for i in report["items"] if i.get("suspects")] == ["d"]
        assert ungated.exit_code == 0  # reported, not judged, without the flag
        gated = CliRunner().invoke(main, base + ["--max-hallucination-rate", "0.2"])
        assert gated.exit_code == 1
        assert "Suspected hallucinations (1):" in gated.output and "d (line 4, en): known_phrase" in gated.output
        assert "1 of 4 transcript(s) suspected of hallucination (0.250), above --max-hallucination-rate 0.2" \
            in gated.output
        assert CliRunner().invoke(main, base + ["--max-hallucination-rate", "0.25"]).exit_code == 0
    finally:
        server.close()
