"""The Wyoming canary against a real, unmodified wyoming-faster-whisper (tiny.en, CPU) with speech made
by espeak-ng: success, the error rate equal to an independent jiwer computation on the same transcript,
the finalisation lag, the describe health check, negative canaries and `whisper-exporter probe --api wyoming`."""
import json

import jiwer
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from whisper_normalizer.english import EnglishTextNormalizer

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector
from whisper_exporter.config import from_dict

pytest_plugins = ["wyoming_server"]
pytestmark = pytest.mark.integration

# tiny.en mishears this one: a non-zero error rate to compare.
HARD = "The weather today is sunny and warm, with a light breeze from the west."


def config_for(server, **probe):
    return from_dict({"service": {"url": server.url, "api": "wyoming"}, "collectors": {"probe": probe}})


def exported(collector):
    class One:
        def collect(self):
            return collector.families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


def test_paced_canary_succeeds_with_an_independent_wer_and_a_lag(wyoming_server, tmp_path):
    from whisper_server import make_speech

    audio = make_speech(HARD, tmp_path / "hard.wav")
    config = config_for(wyoming_server, max_error_rate=5.0, timeout=60, canaries=[
        {"name": "hard", "audio": str(audio), "reference": HARD, "language": "en"}])
    assert config.collectors.probe.pace == 1.0  # real time by default
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["hard"]
    assert record.result == "success", record.reason
    assert record.api == "wyoming" and record.status_code is None
    normalise = EnglishTextNormalizer()
    ref, hyp = normalise(HARD), normalise(record.transcript)
    assert hyp  # the server heard speech
    assert record.error_rate == pytest.approx(jiwer.wer(ref, hyp))
    stream = record.stream
    assert stream is not None and stream.pace == 1.0
    assert stream.audio_seconds == pytest.approx(record.audio_duration, abs=0.01)
    # Sent as spoken: the exchange cannot end before the audio's own length has passed.
    assert record.duration >= stream.audio_seconds
    assert 0 < stream.finalisation_lag < record.duration
    assert stream.first_partial is None and stream.partials == 0  # faster-whisper answers once
    metrics = exported(collector)
    assert metrics[("whisper_probe_success", (("probe", "hard"),))] == 1.0
    assert metrics[("whisper_probe_finalisation_lag_seconds", (("probe", "hard"),))] == pytest.approx(
        stream.finalisation_lag)
    assert ("whisper_probe_first_partial_seconds", (("probe", "hard"),)) not in metrics
    assert metrics[("whisper_probe_word_error_rate", (("probe", "hard"),))] == pytest.approx(jiwer.wer(ref, hyp))
    assert metrics[("whisper_wyoming_up", ())] == 1.0
    assert metrics[("whisper_wyoming_info", (("program", "faster-whisper"), ("version", collector.health.version)))] == 1.0


def test_negative_canary_and_describe(wyoming_server):
    config = config_for(wyoming_server, pace=0, canaries=[
        {"name": "silence", "audio": str(_bundled("silence.wav")), "reference": "", "language": "en"}])
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["silence"]
    assert record.transcript is not None, record.reason
    # tiny.en without VAD writes "You" on silence: a hallucination, reported as such; "" is a success.
    assert record.result == ("hallucination" if record.transcript else "success")
    assert collector.health.up and collector.health.program == "faster-whisper"
    assert collector.health.streaming is False


def test_probe_command_with_api_wyoming(wyoming_server):
    result = CliRunner().invoke(main, ["probe", "--api", "wyoming", "--target", wyoming_server.url, "--pace", "0",
                                       "--canary", "en-short", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)["records"]
    assert record["api"] == "wyoming" and record["result"] == "success"
    assert record["stream"]["finalisation_lag"] > 0 and record["stream"]["pace"] == 0
    text = CliRunner().invoke(main, ["probe", "--api", "wyoming", "--target", wyoming_server.url, "--pace", "0",
                                     "--canary", "en-short"])
    assert text.exit_code == 0, text.output
    assert "Request: WYOMING " + wyoming_server.url in text.output
    assert "finalisation lag (audio-stop to transcript)" in text.output


def _bundled(name):
    from importlib import resources

    return resources.files("whisper_exporter") / "canary" / name
