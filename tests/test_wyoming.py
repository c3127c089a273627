"""The Wyoming client and canary against Wyoming servers that misbehave on demand (written from
rhasspy/wyoming's event framing): down, silent, closing, erring, hostile framing, streaming partials;
and the configuration and command-line rules of service.api wyoming."""
import socket
import threading
from importlib import resources

import pytest
from click.testing import CliRunner

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector, health_families
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.whisper import audio, wyoming
from whisper_exporter.whisper.streaming_clients import read_pcm, send_time

EN = resources.files("whisper_exporter") / "canary" / "en.wav"


class FakeServer:
    """A TCP listener on loopback; `handle(conn, events)` runs per connection in its own thread,
    `events()` yields the client's events as they arrive. `describe` is answered with an info
    unless `describe` is False."""

    def __init__(self, handle, describe=True):
        self.handle = handle
        self.describe = describe
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[str] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        decoder = wyoming.Decoder()

        def events():
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                for event in decoder.feed(chunk):
                    self.seen.append(event.type)
                    if event.type == "describe" and self.describe:
                        conn.sendall(wyoming.encode("info", {"asr": [{"name": "fake", "version": "1.0"}]}))
                        continue
                    yield event

        try:
            self.handle(conn, events())
        finally:
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def serve():
    servers = []

    def start(handle, describe=True):
        server = FakeServer(handle, describe)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def answer_after_stop(text="hello", partial_after=None):
    def handle(conn, events):
        chunks = 0
        for event in events:
            if event.type == "audio-chunk":
                chunks += 1
                if partial_after is not None and chunks == partial_after:
                    conn.sendall(wyoming.encode("transcript-start") + wyoming.encode("transcript-chunk", {"text": "hel"}))
            if event.type == "audio-stop":
                conn.sendall(wyoming.encode("transcript", {"text": text}))
                return
    return handle


def config_for(url, **probe):
    return from_dict({"service": {"url": url, "api": "wyoming"}, "collectors": {"probe": {
        "canaries": [{"name": "en", "audio": str(EN), "reference": "hello", "language": "en"}], **probe}}})


def probe(url, **section):
    config = config_for(url, **section)
    collector = ProbeCollector(config.collectors.probe, config)
    collector.update()
    (record,) = collector.recent_probes()["en"]
    return collector, record


# -- framing ------------------------------------------------------------------------------


def test_events_round_trip_byte_by_byte():
    wire = (wyoming.encode("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 10)
            + wyoming.encode("transcript", {"text": "héllo"}) + wyoming.encode("audio-stop"))
    decoder = wyoming.Decoder()
    events = [e for i in range(len(wire)) for e in decoder.feed(wire[i:i + 1])]
    assert [e.type for e in events] == ["audio-chunk", "transcript", "audio-stop"]
    assert events[0].data == {"rate": 16000, "width": 2, "channels": 1} and events[0].payload == b"\x01\x02" * 10
    assert events[1].data == {"text": "héllo"} and events[1].payload is None


def test_inline_data_and_data_length_are_merged():
    # wyoming's reader merges the data_length bytes into the header's own "data".
    (event,) = wyoming.Decoder().feed(b'{"type": "transcript", "data": {"language": "en"}, "data_length": 15}\n'
                                      b'{"text": "hi"} ')
    assert event.data == {"language": "en", "text": "hi"}


@pytest.mark.parametrize("wire, problem", [
    (b"x" * (wyoming.MAX_LINE_BYTES + 1), "header line longer"),
    (b'{"type": "info", "data_length": 999999999}\n', "over the limit"),
    (b'{"type": "info", "payload_length": -1}\n', "not a length"),
    (b'{"type": "info", "data_length": "12"}\n', "not a length"),
    (b'not json\n', "not JSON"),
    (b'[1]\n', "not a JSON object"),
    (b'{"data": {}}\n', '"type"'),
    (b'{"type": "info", "data_length": 2}\n[]', "not a JSON object"),
    (b"[" * 50000 + b"\n", "nested too deep"),
])
def test_hostile_framing_is_refused_before_it_is_buffered(wire, problem):
    with pytest.raises(wyoming.ProtocolError, match=problem):
        wyoming.Decoder().feed(wire)


def test_pcm_from_wav_and_pacing():
    pcm = read_pcm(EN.read_bytes())
    assert (pcm.rate, pcm.width, pcm.channels) == (16000, 2, 1)
    chunks = pcm.chunks(1024)
    assert b"".join(c for _, c in chunks) == pcm.data and chunks[1][0] == pytest.approx(1024 / 16000)
    assert send_time(2.0, 1.0) == 2.0 and send_time(2.0, 4.0) == 0.5 and send_time(2.0, 0) == 0.0
    with pytest.raises(audio.AudioError, match="PCM WAV"):
        read_pcm(b"fLaC\x00\x00\x00\x22" + b"\x00" * 64, "x.flac")


# -- the canary against misbehaving servers ---------------------------------------------------


def test_success_with_partials_and_lag(serve):
    server = serve(answer_after_stop("hello", partial_after=20))
    collector, record = probe(server.url, pace=4.0)
    assert record.result == "success", record.reason
    assert record.transcript == "hello" and record.error_rate == 0
    st = record.stream
    assert st.partials == 1 and st.pace == 4.0
    # The partial came after the 20th chunk was sent, due once spoken: 20 chunks into the audio.
    assert st.first_partial >= send_time(20 * 1024 / 16000, 4.0)
    assert record.duration >= st.audio_seconds / 4.0 and st.finalisation_lag >= 0
    assert server.seen[:3] == ["describe", "transcribe", "audio-start"] and server.seen[-1] == "audio-stop"
    assert server.seen.count("audio-chunk") == len(read_pcm(EN.read_bytes()).chunks(1024))
    names = {m.name: m for m in collector.families()}
    assert names["whisper_probe_first_partial_seconds"].samples[0].value == st.first_partial
    assert names["whisper_wyoming_up"].samples[0].value == 1.0


def test_server_down_is_success_0_with_a_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    collector, record = probe(f"tcp://127.0.0.1:{port}", pace=0)
    assert record.result == "connection_error" and record.reason == "cannot connect: connection refused"
    assert not collector.health.up and collector.health.reason == "cannot connect: connection refused"
    names = {m.name: m for m in collector.families()}
    assert names["whisper_probe_success"].samples[0].value == 0.0
    assert names["whisper_wyoming_up"].samples[0].value == 0.0
    assert names["whisper_wyoming_info"].samples == []


def test_a_server_that_accepts_and_never_answers_hits_the_total_deadline(serve):
    server = serve(lambda conn, events: [None for _ in events], describe=False)  # reads all, says nothing
    collector, record = probe(server.url, pace=0, timeout=1.5)
    assert record.result == "timeout"
    assert record.reason == "no transcript within 1.5s (still waiting for the transcript)"
    assert record.duration >= 1.5
    assert not collector.health.up and collector.health.reason == "no info within 1.5s"


def test_paced_sending_past_the_deadline_is_a_timeout(serve):
    server = serve(answer_after_stop())
    _, record = probe(server.url, pace=1.0, timeout=1.0)  # 4 s of audio cannot go out in 1 s
    assert record.result == "timeout" and record.reason.endswith("(still sending the audio)")
    assert "audio-stop" not in server.seen


def test_closed_before_the_transcript(serve):
    def handle(conn, events):
        for event in events:
            if event.type == "audio-stop":
                return
    server = serve(handle)
    _, record = probe(server.url, pace=0)
    assert record.result == "connection_error"
    assert record.reason == "the server closed the connection before the transcript"


def test_an_error_event_is_a_bad_response_with_its_text(serve):
    def handle(conn, events):
        for event in events:
            if event.type == "audio-stop":
                conn.sendall(wyoming.encode("error", {"text": "model not loaded", "code": "no-model"}))
                return
    server = serve(handle)
    _, record = probe(server.url, pace=0)
    assert record.result == "bad_response"
    assert record.reason == "the server reported an error: model not loaded (no-model)"


def test_a_hostile_answer_is_a_bad_response(serve):
    def handle(conn, events):
        for event in events:
            if event.type == "audio-stop":
                conn.sendall(b'{"type": "transcript", "payload_length": 4000000000}\n')
                return
    server = serve(handle)
    _, record = probe(server.url, pace=0)
    assert record.result == "bad_response" and "over the limit" in record.reason


def test_a_transcript_without_text(serve):
    def handle(conn, events):
        for event in events:
            if event.type == "audio-stop":
                conn.sendall(wyoming.encode("transcript", {"txt": "x"}))
                return
    server = serve(handle)
    _, record = probe(server.url, pace=0)
    assert record.result == "bad_response" and record.reason == 'the transcript event has no "text" string'


def test_a_server_that_finalises_early_stops_the_sending(serve):
    def handle(conn, events):  # VAD endpointing: the server ends the utterance itself
        for event in events:
            if event.type == "audio-chunk":
                conn.sendall(wyoming.encode("transcript", {"text": "hello"}))
                return
    server = serve(handle)
    _, record = probe(server.url, pace=4.0)
    assert record.result == "success" and record.stream.finalisation_lag == 0.0
    assert "audio-stop" not in server.seen


def test_health_families_without_a_describe_yet():
    up, took, info = health_families(None)
    assert up.samples == [] and took.samples == [] and info.samples == []


# -- configuration and the command ---------------------------------------------------------------


@pytest.mark.parametrize("service, probe_section, key", [
    ({"api": "wyoming", "url": "http://127.0.0.1:10300"}, {}, "service.url"),
    ({"api": "wyoming", "url": "tcp://user:pw@127.0.0.1:10300"}, {}, "service.url"),
    ({"api": "openai", "url": "tcp://127.0.0.1:10300"}, {}, "service.url"),
    ({"api": "wyoming", "url": "tcp://127.0.0.1:10300"}, {"pace": -1}, "collectors.probe.pace"),
    ({"api": "wyoming", "url": "tcp://127.0.0.1:10300"}, {"via_tap": True}, "collectors.probe.via_tap"),
])
def test_bad_configuration_names_the_key(service, probe_section, key):
    raw = {"service": service, "collectors": {"probe": probe_section}}
    if probe_section.get("via_tap"):
        raw["collectors"]["tap"] = {"enabled": True, "listen": "127.0.0.1:18089", "upstream": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert key in str(err.value)
    assert "pw" not in str(err.value)


def test_a_tcp_url_is_accepted_for_wyoming():
    config = from_dict({"service": {"api": "wyoming", "url": "tcp://wyoming.local:10300"},
                        "collectors": {"probe": {"pace": 2.5}}})
    assert config.service.api == "wyoming" and config.collectors.probe.pace == 2.5


@pytest.mark.parametrize("args, message", [
    (["--api", "wyoming"], "--api wyoming with service.url 'http://127.0.0.1:8000': give --target"),
    (["--api", "wyoming", "--target", "http://127.0.0.1:10300"], "--target: expected a tcp://HOST:PORT URL"),
    (["--api", "wyoming", "--target", "tcp://127.0.0.1:10300", "--pace", "-2"], "--pace: expected 0"),
])
def test_probe_command_usage_errors_exit_2(args, message):
    result = CliRunner().invoke(main, ["probe", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_probe_command_against_a_fake_server(serve):
    server = serve(answer_after_stop("Please call Stella."))
    result = CliRunner().invoke(main, ["probe", "--api", "wyoming", "--target", server.url, "--pace", "0",
                                       "--audio", str(EN), "--reference", "Please call Stella."])
    assert result.exit_code == 0, result.output
    assert "Answer: a transcript" in result.output and "Result: success" in result.output
