"""The openai-realtime and whisperlive canaries against protocol-faithful servers written from speaches'
and WhisperLive's source (tests/streaming_servers.py); the realtime one transcribing through the real
faster-whisper-server (tiny.en), as speaches does: success, an independent WER, first partials,
finalisation and transcript lag, refusals, and the canary marker on the handshake."""
import time
from importlib import resources

import jiwer
import pytest
from click.testing import CliRunner
from streaming_servers import Realtime, WhisperLive, openai_transcriber
from whisper_normalizer.english import EnglishTextNormalizer

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.whisper import marker
from whisper_exporter.whisper.streaming_clients import SETTLE_SECONDS

pytest_plugins = ["whisper_server"]

EN = resources.files("whisper_exporter") / "canary" / "en.wav"
REFERENCE = (resources.files("whisper_exporter") / "canary" / "en.txt").read_text().strip()


@pytest.fixture
def started():
    servers = []

    def start(server):
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def probe(api, url, model="whisper-1", reference=REFERENCE, **section):
    config = from_dict({"service": {"url": url, "api": api, "model": model}, "collectors": {"probe": {
        "canaries": [{"name": "en", "audio": str(EN), "reference": reference, "language": "en"}], **section}}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["en"]
    return collector, record


def metric(collector, name):
    (family,) = [f for f in collector.families() if f.name == name]
    return [s.value for s in family.samples]


# -- openai-realtime -------------------------------------------------------------------------------


@pytest.mark.integration
def test_realtime_canary_through_the_real_server(whisper_server, started):
    server = started(Realtime(openai_transcriber(whisper_server.url)))
    collector, record = probe("openai-realtime", server.url, model=whisper_server.model, pace=2.0)
    assert record.result == "success", record.reason
    normalise = EnglishTextNormalizer()
    ref, hyp = normalise(REFERENCE), normalise(record.transcript)
    assert hyp and record.error_rate == pytest.approx(jiwer.wer(ref, hyp))
    (session,) = server.sessions
    # The whole clip arrived as PCM16 at 24 kHz, the API's rate: 2 bytes a sample.
    assert len(session.audio) / 2 / 24000 == pytest.approx(record.audio_duration, abs=0.01)
    kinds = [k for _, k in session.messages]
    assert kinds[0] == "session.update" and kinds[-1] == "input_audio_buffer.commit"
    assert session.query["model"] == whisper_server.model and session.query["intent"] == "transcription"
    # Marked as the canary on the handshake, as HTTP probes are: the tap keeps it out of user metrics.
    assert marker.classify(session.headers, session.query) == marker.GENUINE
    st = record.stream
    assert st.finalisation_lag > 0 and st.first_partial is None  # speaches sends no deltas
    assert record.duration >= st.audio_seconds / 2.0  # paced at twice real time
    assert metric(collector, "whisper_probe_finalisation_lag_seconds") == [st.finalisation_lag]


def test_realtime_deltas_give_the_first_partial(started):
    server = started(Realtime(lambda audio, model, language: REFERENCE, deltas_after=10, completed_delay=0.3))
    collector, record = probe("openai-realtime", server.url, pace=4.0)
    assert record.result == "success" and record.error_rate == 0
    st = record.stream
    appends = sum(1 for _, k in server.sessions[0].messages if k == "input_audio_buffer.append")
    assert st.partials == appends - 9  # one delta per append from the 10th on
    # The 10th append was due once spoken, 1.0 s of audio in, at four times real time.
    assert st.first_partial >= 1.0 / 4.0
    assert st.finalisation_lag >= 0.3  # the server held its completed event that long
    assert metric(collector, "whisper_probe_first_partial_seconds") == [st.first_partial]


def test_realtime_errors(started, tmp_path):
    import wave

    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:  # 50 ms: under speaches' 100 ms minimum commit
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x01" * 800)
    server = started(Realtime(lambda audio, model, language: "x"))
    config = from_dict({"service": {"url": server.url, "api": "openai-realtime"}, "collectors": {"probe": {
        "canaries": [{"name": "short", "audio": str(short), "reference": "x"}], "timeout": 5}}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["short"]
    assert record.result == "bad_response"
    assert record.reason.startswith("the server reported an error: invalid_request_error: Error committing "
                                    "input audio buffer: buffer too small")


def test_realtime_refused_handshake_gives_its_status(started, monkeypatch):
    server = started(Realtime(lambda audio, model, language: "x", api_key="right-key"))
    monkeypatch.setenv("WX_REALTIME_KEY", "wrong-key")
    config = from_dict({"service": {"url": server.url, "api": "openai-realtime", "api_key_env": "WX_REALTIME_KEY"},
                        "collectors": {"probe": {"canaries": [{"name": "en", "audio": str(EN),
                                                                "reference": REFERENCE}], "pace": 0}}})
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["en"]
    assert record.result == "http_error" and record.status_code == 403
    assert record.reason == "the WebSocket handshake was refused: HTTP 403"
    assert server.sessions == []
    assert metric(collector, "whisper_probe_http_status_code") == [403.0]


def test_realtime_server_down():
    from helpers import free_port

    _, record = probe("openai-realtime", f"http://127.0.0.1:{free_port()}", pace=0)
    assert record.result == "connection_error" and record.reason == "cannot connect: connection refused"


# -- whisperlive --------------------------------------------------------------------------------------

SEGMENTS = [(0.0, 1.2, "Please call Stella"), (1.2, 2.6, "and ask her to bring these things"),
            (2.6, 3.9, "with her from the store.")]


def test_whisperlive_canary_with_known_lags(started):
    server = started(WhisperLive(SEGMENTS, lag=0.5))
    collector, record = probe("whisperlive", server.url, pace=4.0)
    assert record.result == "success", record.reason
    assert record.transcript == "Please call Stella and ask her to bring these things with her from the store."
    assert record.error_rate == 0
    st = record.stream
    # The third segment (ends 3.9 s) completes only after 4.4 s of audio: the 4.0 s clip never gets
    # there, so at the end of the audio the last completed segment is the second (ends 2.6 s).
    assert st.transcript_lag == pytest.approx(record.audio_duration - 2.6, abs=0.11)  # one 0.1 s frame
    assert st.ready is not None and st.ready >= 0
    # The first segments came once 1.7 s of audio had arrived: the frame ending at 1.7 s, due at 1.7 / 4.
    assert st.first_partial >= 1.7 / 4.0
    assert st.finalisation_lag >= 0
    (session,) = server.sessions
    assert len(session.audio) / 4 / 16000 == pytest.approx(record.audio_duration, abs=0.01)  # float32 16 kHz
    assert marker.classify(session.headers, session.query) == marker.GENUINE
    assert metric(collector, "whisper_probe_transcript_lag_seconds") == [st.transcript_lag]


def test_whisperlive_canary_waits_for_a_slow_server_before_end_of_audio(started):
    """WhisperLive 0.10.0 closes at END_OF_AUDIO and drops what it has not transcribed yet (seen with
    the real server under the full suite's load: the canary got an empty transcript and a WER of 1).
    Its own client waits for quiet first; so does the canary now. Against a server that speaks a
    second after the audio and closes at END_OF_AUDIO, the canary sent 4 s of audio in 1 s: before,
    END_OF_AUDIO at 1 s came before any segment. The finalisation lag is the last segments'
    arrival, not the close after the quiet."""
    server = started(WhisperLive(SEGMENTS, lag=0.5, delay=1.0, close_at_end=True))
    _, record = probe("whisperlive", server.url, pace=4.0)
    assert record.result == "success", record.reason
    assert record.transcript == "Please call Stella and ask her to bring these things with her from the store."
    st = record.stream
    # the server's 1 s, less the last frames' own sending, after the audio; end to end to that
    # transcript, not to the close after the wait for quiet
    assert 0.5 <= st.finalisation_lag <= 1.5, st.finalisation_lag
    assert record.duration == pytest.approx(st.audio_seconds / 4 + st.finalisation_lag, abs=0.3)
    assert record.duration < st.audio_seconds / 4 + SETTLE_SECONDS


def test_whisperlive_full_server_says_wait(started):
    server = started(WhisperLive(SEGMENTS, max_clients=1, busy=1))
    _, record = probe("whisperlive", server.url, pace=0)
    assert record.result == "connection_error"
    assert record.reason == "the server is full (WAIT, about 3.5 minutes)"


def test_whisperlive_negative_canary(started):
    server = started(WhisperLive([]))
    _, record = probe("whisperlive", server.url, reference="", pace=0)
    assert record.result == "success" and record.transcript == ""
    # Nothing said: the (empty) transcript is final at the end of the audio, not at the close after
    # the canary's wait for quiet before END_OF_AUDIO.
    assert record.stream.finalisation_lag < 0.5 and record.duration < SETTLE_SECONDS


def test_probe_command_with_the_websocket_apis(started):
    server = started(WhisperLive(SEGMENTS, lag=0.0))
    result = CliRunner().invoke(main, ["probe", "--api", "whisperlive", "--target", server.url, "--pace", "0",
                                       "--canary", "en-short"])
    assert result.exit_code == 0, result.output
    assert "Request: WEBSOCKET ws://127.0.0.1" in result.output and "transcript lag" in result.output
    bad = CliRunner().invoke(main, ["probe", "--api", "openai-realtime", "--target", "tcp://x:1"])
    assert bad.exit_code == 2 and "expected an http(s):// or ws(s):// URL" in bad.output


@pytest.mark.parametrize("api", ["openai-realtime", "whisperlive"])
def test_websocket_apis_need_an_http_or_ws_url(api):
    assert from_dict({"service": {"api": api, "url": "ws://127.0.0.1:9090"}}).service.api == api
    with pytest.raises(ConfigError, match="service.url"):
        from_dict({"service": {"api": api, "url": "tcp://127.0.0.1:9090"}})


# -- through the tap: the canary takes the path users' streaming clients take ----------------------


@pytest.mark.parametrize("api", ["openai-realtime", "whisperlive"])
def test_a_streaming_canary_via_the_tap_reaches_the_server_as_a_canary(started, api):
    """collectors.probe.via_tap with a WebSocket API: the session goes through the tap's relay, which
    counts it as the exporter's canary and keeps it out of the user's whisper_stream_* figures."""
    from helpers import free_port, samples

    from whisper_exporter.collectors.tap import TapCollector
    from whisper_exporter.runtime.hallucination_counters import HallucinationCounters

    if api == "openai-realtime":
        server = started(Realtime(lambda audio, model, language: REFERENCE))
    else:
        server = started(WhisperLive(SEGMENTS, lag=0.5))
    upstream = server.url.replace("ws://", "http://")
    port = free_port()
    config = from_dict({"service": {"url": upstream, "api": api, "model": "whisper-1"}, "collectors": {
        "tap": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "probe": {"canaries": [{"name": "en", "audio": str(EN), "reference": REFERENCE, "language": "en"}],
                  "via_tap": True, "pace": 0}}})
    tap = TapCollector(config.collectors.tap, upstream, hallucinations=HallucinationCounters())
    tap.start()
    try:
        collector = ProbeCollector(config.collectors.probe, config)
        collector.update()
        (record,) = collector.recent_probes()["en"]
        canary = ("whisper_canary_requests_seen_total", (("source", "tap"),))
        deadline = time.monotonic() + 15  # the tap counts a session once both legs have closed
        while (seen := samples(list(tap.families()))).get(canary, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        tap.stop()
    assert record.result == "success", record.reason
    (session,) = server.sessions  # it reached the server, through the tap
    assert marker.classify(session.headers, session.query) == marker.GENUINE
    assert seen[canary] == 1
    assert seen[("whisper_stream_upgrades_total", (("result", "accepted"),))] == 1
    assert not any(v for (name, _), v in seen.items() if name == "whisper_stream_sessions_total")
    assert not any(v for (name, _), v in seen.items() if name == "whisper_stream_audio_seconds_total")


def test_realtime_negative_canary(started):
    """A silence canary (reference "") on the Realtime API: an empty transcript is a success."""
    server = started(Realtime(lambda audio, model, language: ""))
    _, record = probe("openai-realtime", server.url, reference="", pace=0)
    assert record.result == "success" and record.transcript == ""
    server = started(Realtime(lambda audio, model, language: "Thank you."))
    collector, record = probe("openai-realtime", server.url, reference="", pace=0)
    assert record.result == "hallucination", (record.result, record.reason)
