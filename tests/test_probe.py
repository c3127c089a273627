"""The probe collector against small local HTTP servers that misbehave on purpose (loopback only).

Each fake server reads the whole request, then does what the test asks: answer
the canary's transcript after an injected delay, hang, answer 500 or HTML, or
stall in the middle of its body.
"""
import json
import shutil
import threading
import time

import pytest
import requests
from click.testing import CliRunner
from fake_whisper import FakeWhisper
from helpers import free_port, wav

from whisper_exporter import wiring as daemon
from whisper_exporter.cli import main
from whisper_exporter.collectors import probe
from whisper_exporter.collectors.probe import ProbeCollector, bundled_canary, probe_canary, resolve_canaries
from whisper_exporter.config import ConfigError, from_dict, load
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.web import status as landing
from whisper_exporter.whisper import clients, marker

REFERENCE = bundled_canary().reference


@pytest.fixture
def fake():
    server = FakeWhisper()
    yield server
    server.close()


def closed_port_url():
    return f"http://127.0.0.1:{free_port()}"


SPEECH_ONLY = [{"name": "en-short", "audio": bundled_canary().audio, "reference": REFERENCE, "language": "en"}]


def make_config(url, **probe):
    """The probe section over `url`; the English canary alone unless the test names canaries (the
    negative one of the default set is tests/test_hallucination_wiring.py's)."""
    probe.setdefault("canaries", SPEECH_ONLY)
    return from_dict({"service": {"url": url, "model": "tiny"}, "collectors": {"probe": probe}})


def families(collector):
    return {f.name: f for f in collector.families()}


def value(fams, name, **labels):
    family = fams[name]
    wanted = name if family.type != "counter" else name + "_total"
    for sample in family.samples:
        if sample.name == wanted and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def run_probe(url, **probe_section):
    collector = ProbeCollector((c := make_config(url, **probe_section)).collectors.probe, c)
    collector.update()
    return collector, collector.recent_probes()["en-short"][0]


# -- results ------------------------------------------------------------------------------


def test_success_against_a_good_server(fake):
    collector, record = run_probe(fake.url)
    assert record.result == "success" and record.status_code == 200
    assert record.error_rate == 0.0 and record.transcript == REFERENCE
    # worst segment: lowest logprob, highest ratio and no-speech probability, one fallback
    assert (record.avg_logprob, record.compression_ratio, record.no_speech_prob, record.fallback_segments) == (
        -0.5, 3.1, 0.3, 1)
    fams = families(collector)
    assert value(fams, "whisper_probe_success", probe="en-short") == 1.0
    assert value(fams, "whisper_probe_http_status_code", probe="en-short") == 200.0
    assert value(fams, "whisper_probe_word_error_rate", probe="en-short") == 0.0
    assert value(fams, "whisper_probe_realtime_factor", probe="en-short") == pytest.approx(
        record.duration / record.audio_duration)
    assert value(fams, "whisper_probe_compression_ratio", probe="en-short") == 3.1
    assert value(fams, "whisper_probe_fallback_segments", probe="en-short") == 1.0
    assert value(fams, "whisper_probe_runs", probe="en-short", result="success") == 1.0
    assert value(fams, "whisper_probe_runs", probe="en-short", result="timeout") == 0.0
    # the request: the bundled canary's bytes, language and model
    path, headers, body = fake.requests[0]
    assert path == f"/v1/audio/transcriptions?{marker.QUERY_STRING}"  # marked as the exporter's own (its token)
    assert b'name="model_name"\r\n\r\ntiny' in body and b'name="language"\r\n\r\nen' in body
    assert headers["User-Agent"] == "whisper-exporter"


def test_server_down_is_a_connection_error():
    collector, record = run_probe(closed_port_url())
    assert record.result == "connection_error"
    assert "refused" in record.reason
    fams = families(collector)
    # blackbox habit: success and duration are there on failure too
    assert value(fams, "whisper_probe_success", probe="en-short") == 0.0
    assert value(fams, "whisper_probe_duration_seconds", probe="en-short") is not None
    assert value(fams, "whisper_probe_http_status_code", probe="en-short") == 0.0
    # no transcript: no error rate or real-time factor from this run
    assert value(fams, "whisper_probe_word_error_rate", probe="en-short") is None
    assert value(fams, "whisper_probe_realtime_factor", probe="en-short") is None
    assert value(fams, "whisper_probe_runs", probe="en-short", result="connection_error") == 1.0


def test_hang_past_the_timeout(fake):
    fake.mode = "hang"
    started = time.monotonic()
    collector, record = run_probe(fake.url, timeout="500ms")
    assert record.result == "timeout"
    assert 0.5 <= record.duration < 0.75
    assert time.monotonic() - started < 2.0
    assert value(families(collector), "whisper_probe_runs", probe="en-short", result="timeout") == 1.0


def test_body_that_stops_arriving_is_a_timeout(fake):
    fake.mode = "stall"
    collector, record = run_probe(fake.url, timeout="500ms")
    assert record.result == "timeout"
    assert record.status_code == 200
    assert "did not arrive in full" in record.reason  # the total deadline passed while it stalled
    assert record.duration < 1.5


def test_http_500(fake):
    fake.mode = "500"
    collector, record = run_probe(fake.url)
    assert record.result == "http_error" and record.status_code == 500
    assert value(families(collector), "whisper_probe_http_status_code", probe="en-short") == 500.0


def test_html_instead_of_json(fake):
    fake.mode = "html"
    collector, record = run_probe(fake.url)
    assert record.result == "bad_response" and record.status_code == 200
    assert "not JSON" in record.reason and "text/html" in record.reason


def test_wrong_transcript_above_the_threshold(fake):
    fake.text = "Please call Stella."  # 3 of 15 words: 12 deletions, WER 0.8
    collector, record = run_probe(fake.url, max_error_rate=0.5)
    assert record.result == "wrong_transcript"
    assert record.error_rate == pytest.approx(12 / 15)
    assert "above max_error_rate 0.5" in record.reason
    fams = families(collector)
    assert value(fams, "whisper_probe_success", probe="en-short") == 0.0
    assert value(fams, "whisper_probe_word_error_rate", probe="en-short") == pytest.approx(0.8)
    # the same transcript under a laxer threshold succeeds
    _, lax = run_probe(fake.url, max_error_rate=0.9)
    assert lax.result == "success"


def test_injected_delay_is_measured_between_the_server_and_the_caller(fake):
    """The probe's duration holds the server's injected 1 s and no more than the caller's own clock
    saw around it (a bound that holds on a loaded machine, unlike a fixed 5% margin)."""
    import time

    run_probe(fake.url)  # warm up
    fake.delay = 1.0
    for _ in range(3):
        start = time.perf_counter()
        duration = run_probe(fake.url)[1].duration
        assert 1.0 <= duration <= time.perf_counter() - start, duration


def test_canary_scores_feed_the_quality_counters(fake):
    fake.text = "Please call Stella and ask her to bring these things with her from the shop."  # 1 substitution
    collector, record = run_probe(fake.url)
    fams = families(collector)
    labels = dict(language="en", set="canary", unit="word")
    assert value(fams, "whisper_quality_reference_units", **labels) == 15.0
    assert value(fams, "whisper_quality_errors", type="substitution", **labels) == 1.0
    assert value(fams, "whisper_quality_errors", type="deletion", **labels) == 0.0
    assert value(fams, "whisper_quality_error_rate", **labels) == pytest.approx(1 / 15)
    assert value(fams, "whisper_quality_utterances", result="scored", **labels) == 1.0
    # a failed probe counts as a failed utterance, adds no reference units
    fake.mode = "500"
    collector.update()
    fams = families(collector)
    assert value(fams, "whisper_quality_utterances", result="failed", **labels) == 1.0
    assert value(fams, "whisper_quality_reference_units", **labels) == 15.0


def test_several_canaries_run_one_after_another(fake, tmp_path):
    audio = bundled_canary().audio
    config = make_config(fake.url, canaries=[
        {"name": "a", "audio": audio, "reference": REFERENCE, "language": "en"},
        {"name": "b", "audio": audio, "reference": "Something else entirely was said here.", "language": "en"},
    ])
    fake.delay = 0.2
    active, peak = [0], [0]
    original = probe.probe_canary

    def counting(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    collector = ProbeCollector(config.collectors.probe, config)
    probe.probe_canary, saved = counting, probe.probe_canary
    try:
        threads = [threading.Thread(target=collector.update) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        probe.probe_canary = saved
    assert peak[0] == 1  # never two probes at once
    recent = collector.recent_probes()
    assert [r.result for r in recent["a"]] == ["success", "success"]
    assert [r.result for r in recent["b"]] == ["wrong_transcript", "wrong_transcript"]
    assert recent["a"][0].started > recent["a"][1].started  # newest first


def test_history_is_bounded_per_canary(fake):
    config = make_config(fake.url)
    collector = ProbeCollector(config.collectors.probe, config)
    for _ in range(probe.HISTORY + 3):
        collector.update()
    assert len(collector.recent_probes()["en-short"]) == probe.HISTORY
    fake.mode = "500"
    collector.update()
    assert collector.last_failures()["en-short"].result == "http_error"


def test_unreadable_canary_marks_the_collector_down_but_probes_the_others(fake, tmp_path):
    doomed = tmp_path / "nope.wav"
    shutil.copy(bundled_canary().audio, doomed)
    config = make_config(fake.url, canaries=[
        {"name": "missing", "audio": str(doomed), "reference": "x", "language": "en"},
        {"name": "good", "audio": bundled_canary().audio, "reference": REFERENCE, "language": "en"},
    ])
    collector = ProbeCollector(config.collectors.probe, config)
    doomed.unlink()  # deleted while the exporter runs
    with pytest.raises(RuntimeError, match="canary missing: .*nope.wav: no such file"):
        collector.update()
    assert collector.recent_probes()["good"][0].result == "success"
    assert collector.recent_probes()["missing"] == []


def test_missing_api_key_marks_the_collector_down(fake, monkeypatch):
    monkeypatch.delenv("PROBE_TEST_KEY", raising=False)
    config = from_dict({"service": {"url": fake.url, "api_key_env": "PROBE_TEST_KEY"}})
    collector = ProbeCollector(config.collectors.probe, config)
    with pytest.raises(clients.ClientSetupError, match="PROBE_TEST_KEY"):
        collector.update()
    assert fake.requests == []


# -- configuration ---------------------------------------------------------------------


def test_default_is_the_bundled_canary_enabled():
    config = load(None)
    assert config.collectors.probe.enabled
    canary, negative = resolve_canaries(config.collectors.probe, config)
    assert canary.name == "en-short" and canary.language == "en"
    assert canary.reference.startswith("Please call Stella")
    assert negative.name == "silence" and negative.reference == ""  # the non-speech canary


def test_relative_canary_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "conf" / "c.yml"
    (tmp_path / "conf" / "clips").mkdir(parents=True)
    shutil.copy(bundled_canary().audio, tmp_path / "conf" / "clips" / "de.wav")
    path.write_text("collectors:\n  probe:\n    canaries:\n      - {audio: clips/de.wav, reference: Hallo, language: de}\n")
    config = load(str(path))
    (canary,) = resolve_canaries(config.collectors.probe, config)
    assert canary.audio == str(tmp_path / "conf" / "clips" / "de.wav")
    assert canary.name == "de"


@pytest.mark.parametrize("text, key, expected", [
    ("canaries: [{reference: hi}]", "collectors.probe.canaries[0].audio", "audio file"),
    ("canaries: [{audio: a.wav}]", "collectors.probe.canaries[0].reference", "text spoken"),
    ("canaries: [{audio: a.wav, reference: hi, language: English}]", "collectors.probe.canaries[0].language",
     "language code"),
    ("canaries: [{audio: a.wav, reference: hi}, {audio: b/a.wav, reference: ho}]",
     "collectors.probe.canaries[1].name", "a name no other canary has"),
    ("canaries: [{audio: missing.wav, reference: hi}]", "collectors.probe.canaries[0].audio",
     "a readable audio file (no such file)"),
    ("canaries: [{audio: notes.txt, reference: hi}]", "collectors.probe.canaries[0].audio",
     "a readable audio file (unknown audio format"),
    ("canaries: [{audio: a.wav, reference: hi, colour: red}]", "collectors.probe.canaries[0].colour", "a known key"),
    ("response_format: text", "collectors.probe.response_format", "one of json"),
    ("timeout: 0s", "collectors.probe.timeout", "greater than 0"),
    ("max_error_rate: -1", "collectors.probe.max_error_rate", "0 or more"),
    ("via_tap: yes please", "collectors.probe.via_tap", "true or false"),
    ("via_tap: true", "collectors.probe.via_tap", "collectors.tap.enabled: true"),
])
def test_bad_probe_config(tmp_path, text, key, expected):
    (tmp_path / "b").mkdir()
    for name in ("a.wav", "b/a.wav"):
        shutil.copy(bundled_canary().audio, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not audio")
    path = tmp_path / "bad.yml"
    path.write_text("collectors:\n  probe:\n    " + text + "\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.key == key
    assert expected in info.value.expected


def test_watchdog_outlasts_every_canary_timing_out():
    config = make_config("http://127.0.0.1:1", timeout="10s", canaries=[
        {"name": n, "audio": bundled_canary().audio, "reference": "x"} for n in ("a", "b", "c")])
    section = config.collectors.probe
    assert section.run_timeout > 3 * 3 * section.timeout  # three canaries, each up to three timeouts
    assert load(None).collectors.probe.run_timeout > 30 * 3


def test_scheduler_watchdog_for_the_probe_derives_from_the_probe_timeout():
    config = make_config("http://127.0.0.1:1", timeout="10s")
    scheduler = daemon.build_scheduler(config)
    (state,) = [s for c, s in scheduler.entries if s.name == "probe"]
    assert state.timeout == config.collectors.probe.run_timeout > config.collectors.probe.timeout


def test_the_canary_quality_series_are_exported_at_0_before_the_first_probe(tmp_path):
    """Issue 21, defect 1: a series that first appears with a count in it hides that count from rate()."""
    for name in ("a", "b", "c"):
        wav(tmp_path / f"{name}.wav")
    config = from_dict({"collectors": {"probe": {"canaries": [
        {"audio": str(tmp_path / "a.wav"), "reference": "hello there", "language": "en"},
        {"audio": str(tmp_path / "b.wav"), "reference": "guten tag", "language": "de"},
        {"audio": str(tmp_path / "c.wav"), "reference": "", "language": "fr", "name": "silence"}]}}})
    collector = ProbeCollector(config.collectors.probe, config)
    units = {(s.labels["language"], s.labels["set"], s.labels["unit"]): s.value
             for f in collector.families() if f.name == "whisper_quality_reference_units"
             for s in f.samples if s.name.endswith("_total")}
    # the negative canary (fr) has no words to count: no quality series for it
    assert units == {("en", "canary", "word"): 0.0, ("de", "canary", "word"): 0.0}


# -- the exporter around it ---------------------------------------------------------------


def test_scrapes_stay_fast_while_a_probe_hangs(fake):
    config = from_dict({"listen": "127.0.0.1:0", "service": {"url": fake.url},
                        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                                       "probe": {"timeout": "2s", "interval": "300ms"}}})
    section = config.collectors.probe
    collector = ProbeCollector(section, config)
    scheduler = Scheduler([(collector, section.interval, section.run_timeout)])
    running = daemon.start(config, scheduler)

    def metrics():
        return requests.get(running.url + "/metrics", timeout=5).text

    try:
        deadline = time.monotonic() + 10
        while 'result="success"} 1.0' not in metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        fake.mode = "hang"  # the next probe hangs for longer than its 2 s timeout
        asked = len(fake.requests)
        while len(fake.requests) == asked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fake.requests) > asked, "no probe reached the server"
        for _ in range(5):
            started = time.monotonic()
            response = requests.get(running.url + "/metrics", timeout=5)
            took = time.monotonic() - started
            assert response.status_code == 200 and took < 0.5, took
            # the last finished probe is still what a scrape shows, and the collector is up
            assert 'whisper_probe_success{probe="en-short"} 1.0' in response.text
            assert 'whisper_exporter_collector_up{collector="probe"} 1.0' in response.text
            assert requests.get(running.url + "/", timeout=5).status_code == 200
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while 'result="timeout"} 1.0' not in metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = metrics()
        assert 'whisper_probe_runs_total{probe="en-short",result="timeout"} 1.0' in text
        assert 'whisper_probe_success{probe="en-short"} 0.0' in text
        assert 'whisper_exporter_collector_up{collector="probe"} 1.0' in text
    finally:
        running.close()


def test_landing_page_shows_recent_probes_escaped(fake):
    fake.text = "<script>alert('x')</script> Please call Stella"
    config = make_config(fake.url)
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    fake.mode = "500"
    collector.update()
    scheduler = Scheduler(shared=_views(config, probe=collector), collectors=[(collector, 60.0, 100.0)])
    page = landing.render(config, scheduler)
    assert "Recent probes" in page and "Canary en-short" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Please call Stella" in page
    assert "wrong_transcript" in page and "http_error" in page and "HTTP 500" in page
    rows = landing.probe_rows(scheduler)["en-short"]
    assert [r["result"] for r in rows] == ["http_error", "wrong_transcript"]
    assert rows[1]["error_rate"].endswith("(word)")


# -- the `probe` command --------------------------------------------------------------


def write_config(tmp_path, url, **service):
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"service": {"url": url, "model": "tiny", **service},
                                "collectors": {"probe": {"canaries": SPEECH_ONLY}}}))
    return str(path)


def test_probe_command_success(fake, tmp_path):
    result = CliRunner().invoke(main, ["probe", "--config", write_config(tmp_path, fake.url)])
    assert result.exit_code == 0, result.output
    assert "Result: success" in result.output
    assert "word error rate 0.000" in result.output
    assert f"POST {fake.url}/v1/audio/transcriptions" in result.output


def test_probe_command_failure_says_why_and_exits_1(fake, tmp_path):
    fake.mode = "html"
    result = CliRunner().invoke(main, ["probe", "--config", write_config(tmp_path, fake.url), "--metrics"])
    assert result.exit_code == 1
    assert "Result: bad_response (the answer is not JSON (Content-Type text/html)" in result.output
    assert "It works!" in result.output
    assert 'whisper_probe_success{probe="en-short"} 0.0' in result.output


def test_probe_command_target_overrides_the_service_url(fake, tmp_path):
    config = write_config(tmp_path, closed_port_url())
    result = CliRunner().invoke(main, ["probe", "--config", config, "--target", fake.url, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (record,) = data["records"]
    assert record["result"] == "success" and record["target"] == fake.url
    assert record["error_rate"] == 0.0 and record["realtime_factor"] > 0


def test_probe_command_with_own_audio_and_reference(fake, tmp_path):
    fake.text = "hello world"
    result = CliRunner().invoke(main, ["probe", "--target", fake.url, "--audio", bundled_canary().audio,
                                       "--reference", "Hello, world!", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)["records"]
    assert record["canary"] == "en" and record["score"]["reference_units"] == 2


@pytest.mark.parametrize("args, message", [
    (["--target", "ftp://x"], "--target"),
    (["--audio", "x.wav"], "--audio and --reference go together"),
    (["--canary", "nope"], "no canary named nope"),
])
def test_probe_command_usage_errors_exit_2(args, message):
    result = CliRunner().invoke(main, ["probe"] + args)
    assert result.exit_code == 2
    assert message in result.output


def test_probe_command_never_prints_the_api_key(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_KEY", "sk-very-secret-42")
    fake.mode = "500"
    config = write_config(tmp_path, fake.url, api_key_env="PROBE_KEY")
    for extra in ([], ["--json"], ["--metrics"]):
        result = CliRunner().invoke(main, ["probe", "--config", config] + extra)
        assert result.exit_code == 1
        assert "sk-very-secret-42" not in result.output
    assert fake.requests[0][1]["Authorization"] == "Bearer sk-very-secret-42"
    monkeypatch.delenv("PROBE_KEY")
    result = CliRunner().invoke(main, ["probe", "--config", config])
    assert result.exit_code == 2 and "PROBE_KEY is not set" in result.output


def test_probe_canary_reports_the_audio_duration_from_the_header(fake):
    config = make_config(fake.url)
    client = clients.make_client(config.service, timeout=5)
    record = probe_canary(client, resolve_canaries(probe.ProbeConfig(canaries=[bundled_canary()]), None)[0], 0.5)
    assert record.audio_duration == pytest.approx(4.0, abs=0.01)
    assert record.realtime_factor == pytest.approx(record.duration / record.audio_duration)
    assert "Result: success" in probe.debug_text(record)


def _views(config, probe=None):
    """The shared state the wiring would build, with the probe as the status page's handle."""
    from whisper_exporter.runtime.shared import Shared

    shared = Shared.build(config)
    shared.probe_view = probe
    return shared


def test_probe_command_model_and_api_without_a_config(fake):
    # A bare `probe --target` against a server whose model is not whisper-1.
    result = CliRunner().invoke(main, ["probe", "--target", fake.url, "--model", "Systran/faster-whisper-small",
                                       "--api", "openai", "--canary", "en-short"])
    assert result.exit_code == 0, result.output
    _, _, body = fake.requests[-1]
    assert b'name="model"\r\n\r\nSystran/faster-whisper-small\r\n' in body
    assert "Systran/faster-whisper-small" in result.output


def test_probe_command_json_keeps_the_metrics(fake, tmp_path):
    result = CliRunner().invoke(main, ["probe", "--config", write_config(tmp_path, fake.url), "--json", "--metrics"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["records"][0]["result"] == "success"
    assert 'whisper_probe_success{probe="en-short"} 1.0' in data["metrics"]
    assert "metrics" not in json.loads(CliRunner().invoke(
        main, ["probe", "--config", write_config(tmp_path, fake.url), "--json"]).stdout)


def test_results_older_than_the_interval_and_run_timeout_are_not_served(fake, monkeypatch):
    """Issue 15: a probe collector that fails before probing (here: its API key gone) must not
    keep serving its last success as current. Once a result is older than the interval plus the
    run timeout, only its timestamp stays (WhisperProbeStale alerts on that)."""
    import dataclasses

    monkeypatch.setenv("PROBE_TEST_KEY", "k")
    config = from_dict({"service": {"url": fake.url, "model": "tiny", "api_key_env": "PROBE_TEST_KEY"}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    name = collector.canaries[0].name
    assert value(families(collector), "whisper_probe_success", probe=name) == 1.0
    monkeypatch.delenv("PROBE_TEST_KEY")
    with pytest.raises(clients.ClientSetupError):
        collector.update()
    # Still within interval + run timeout: the last result is current.
    assert value(families(collector), "whisper_probe_success", probe=name) == 1.0
    section = config.collectors.probe
    age = float(section.interval) + section.run_timeout + 1
    record = collector._latest[name]
    collector._latest[name] = dataclasses.replace(record, started=record.started - age)
    fams = families(collector)
    for family in ("whisper_probe_success", "whisper_probe_duration_seconds", "whisper_probe_http_status_code",
                   "whisper_probe_word_error_rate", "whisper_probe_realtime_factor"):
        assert value(fams, family, probe=name) is None, family
    assert value(fams, "whisper_probe_last_run_timestamp_seconds", probe=name) == record.started - age
    assert value(fams, "whisper_probe_runs", probe=name, result="success") == 1.0


def test_probe_command_reports_a_hallucinating_negative_canary(fake):
    """Issue 21: the default set's silence canary, answered with text (as tiny.en does): shown and
    reported as a finding, exit 0 (it exited 1 on the default configuration against a healthy server)."""
    result = CliRunner().invoke(main, ["probe", "--target", fake.url])
    assert result.exit_code == 0, result.output
    assert "Result: hallucination" in result.output
    assert "expected: no text (a negative canary: non-speech audio)" in result.output
    assert "Result: success" in result.output  # the English canary
    assert ("Finding: negative canary 'silence' was answered with text ('" + REFERENCE) in result.output
    assert "vad_filter" in result.output and "--fail-on-hallucination makes it one" in result.output
    data = json.loads(CliRunner().invoke(main, ["probe", "--target", fake.url, "--json"]).stdout)
    (finding,) = data["findings"]
    assert finding.startswith("negative canary 'silence' was answered with text")
    assert {r["canary"]: r["result"] for r in data["records"]} == {"en-short": "success", "silence": "hallucination"}


def test_probe_command_fails_on_hallucination_when_asked(fake):
    result = CliRunner().invoke(main, ["probe", "--target", fake.url, "--fail-on-hallucination"])
    assert result.exit_code == 1, result.output
    assert "Finding: negative canary 'silence'" in result.output
    assert "makes it one" not in result.output
    # A negative canary answered cleanly passes with the flag too.
    fake.text = ""
    result = CliRunner().invoke(main, ["probe", "--target", fake.url, "--fail-on-hallucination",
                                       "--canary", "silence"])
    assert result.exit_code == 0, result.output
    assert "Result: success" in result.output and "Finding" not in result.output


def test_probe_command_a_negative_canary_that_fails_otherwise_still_exits_1(fake):
    fake.mode = "500"
    result = CliRunner().invoke(main, ["probe", "--target", fake.url, "--canary", "silence"])
    assert result.exit_code == 1, result.output
    assert "Result: http_error" in result.output and "Finding" not in result.output


# -- through the tap (issue 21): the canary takes the path users take ---------------------------


def exporter_with_tap(fake, via_tap, until):
    """Run the exporter with the tap in front of `fake` until its metrics satisfy `until`; its samples."""
    from helpers import samples, wait_for

    tap_port = free_port()
    config = from_dict({
        "listen": "127.0.0.1:0",
        "service": {"url": fake.url, "model": "tiny"},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                       "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}"},
                       "probe": {"canaries": SPEECH_ONLY, "interval": "1s", "via_tap": via_tap}}})
    running = daemon.start(config)
    seen = {}

    def ready():
        seen.update(samples(requests.get(running.url + "/metrics", timeout=10).text))
        return until(seen)

    try:
        assert wait_for(ready, timeout=60, interval=0.2), seen
    finally:
        running.close()
    return tap_port, seen


def test_via_tap_sends_the_scheduled_canary_through_the_tap(fake):
    """Issue 21: the docs said the canary counter shows the tap carries traffic, but the scheduled
    probe went straight to service.url, so whisper_canary_requests_seen_total{source="tap"} never
    moved. With collectors.probe.via_tap the probe sends to the tap, which counts it as a canary
    (never as user traffic) and passes it to the server."""
    seen_by_tap = ("whisper_canary_requests_seen_total", (("source", "tap"),))
    tap_port, values = exporter_with_tap(fake, via_tap=True, until=lambda v: v.get(seen_by_tap, 0) >= 1
                                         and v.get(("whisper_probe_success", (("probe", "en-short"),))) == 1)
    assert values[seen_by_tap] >= 1
    assert values[("whisper_probe_success", (("probe", "en-short"),))] == 1
    assert not any(name == "whisper_requests_total" and value > 0 for (name, _), value in values.items())
    path, headers, _ = fake.requests[-1]
    assert path == f"/v1/audio/transcriptions?{marker.QUERY_STRING}"
    assert headers[marker.HEADER] == marker.VALUE
    assert values[("whisper_tap_request_bytes_total", ())] > 0  # the tap carried it
    # Its audio is the server's work (capacity counts it), kept out of user demand.
    import wave
    with wave.open(str(bundled_canary().audio)) as clip:
        seconds = clip.getnframes() / clip.getframerate()
    audio = ("whisper_canary_audio_processed_seconds_total", ())
    assert values[audio] == pytest.approx(values[seen_by_tap] * seconds, rel=1e-6)
    assert not any(name == "whisper_audio_processed_seconds_total" and value > 0 for (name, _), value in values.items())
    probe_section = from_dict({"collectors": {"tap": {"enabled": True, "listen": f"0.0.0.0:{tap_port}"},
                                              "probe": {"via_tap": True}}})
    assert ProbeCollector(probe_section.collectors.probe, probe_section).url == f"http://127.0.0.1:{tap_port}"
    for listen, url in (("[::]:10112", "http://[::1]:10112"), ("[::1]:10112", "http://[::1]:10112"),
                        ("tap.internal:10112", "http://tap.internal:10112")):
        c = from_dict({"collectors": {"tap": {"enabled": True, "listen": listen}, "probe": {"via_tap": True}}})
        assert probe.tap_url(c) == url


def test_without_via_tap_the_probe_goes_straight_to_the_server(fake):
    _, values = exporter_with_tap(fake, via_tap=False, until=lambda v: len(fake.requests) >= 2
                                  and v.get(("whisper_probe_success", (("probe", "en-short"),))) == 1)
    assert values.get(("whisper_canary_requests_seen_total", (("source", "tap"),)), 0) == 0
    assert values[("whisper_probe_success", (("probe", "en-short"),))] == 1
    assert values[("whisper_tap_request_bytes_total", ())] == 0
    assert values[("whisper_canary_audio_processed_seconds_total", ())] == 0  # exported at 0 with the tap


def test_via_tap_needs_a_fixed_tap_port():
    with pytest.raises(ConfigError) as info:
        from_dict({"collectors": {"tap": {"enabled": True, "listen": "127.0.0.1:0"}, "probe": {"via_tap": True}}})
    assert info.value.key == "collectors.probe.via_tap" and "a fixed port" in info.value.expected
    # A disabled probe's via_tap asks nothing of the tap.
    assert not from_dict({"collectors": {"probe": {"enabled": False, "via_tap": True}}}).collectors.tap.enabled
