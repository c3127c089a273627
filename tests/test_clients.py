"""The Whisper API clients: request shapes of the three APIs, answers, failures, secrets.

HTTP failure paths use `responses` (a real server will not answer garbage on
demand); connection refused also runs for real against a closed loopback port, and a
malformed and a dripping answer against tests/fake_whisper.py.
"""
import json

import pytest
import requests
import responses
from fake_whisper import FakeWhisper, verbose_answer
from helpers import free_port
from responses import matchers

from whisper_exporter.config import ServiceConfig
from whisper_exporter.whisper import clients, marker
from whisper_exporter.whisper.clients import (
    AsrWebserviceClient,
    ClientSetupError,
    OpenAIClient,
    Secret,
    WhisperCppClient,
    load_api_key,
    make_client,
)

BASE = "http://whisper.test:8000"
AUDIO = b"RIFF....WAVEfmt fake audio bytes"

VERBOSE = {
    "task": "transcribe", "language": "en", "duration": 4.0, "text": " Hello there.",
    "segments": [
        {"id": 0, "start": 0.0, "end": 2.0, "text": " Hello", "temperature": 0.0, "avg_logprob": -0.2,
         "compression_ratio": 1.1, "no_speech_prob": 0.01},
        {"id": 1, "start": 2.0, "end": 4.0, "text": " there.", "temperature": 0.4, "avg_logprob": -1.3,
         "compression_ratio": 2.6, "no_speech_prob": 0.7},
    ],
}


def _multipart(request) -> bytes:
    body = request.body
    return body if isinstance(body, bytes) else body.encode()


@responses.activate
def test_openai_request_shape_and_verbose_json():
    responses.post(BASE + "/v1/audio/transcriptions", json=VERBOSE)
    client = OpenAIClient(BASE, model="tiny", timeout=5)
    result = client.transcribe(AUDIO, "canary.wav", "en")
    assert result.outcome == "success" and result.ok
    assert result.status_code == 200
    body = _multipart(responses.calls[0].request)
    for part in (b'name="file"; filename="canary.wav"', b'name="model"\r\n\r\ntiny', b'name="model_name"\r\n\r\ntiny',
                 b'name="response_format"\r\n\r\nverbose_json', b'name="language"\r\n\r\nen', AUDIO):
        assert part in body, part
    t = result.transcription
    assert t.text == " Hello there." and t.language == "en" and t.duration == 4.0
    assert [s.temperature for s in t.segments] == [0.0, 0.4]
    assert t.segments[1].compression_ratio == 2.6 and t.segments[1].no_speech_prob == 0.7
    assert result.elapsed >= 0


@responses.activate
def test_openai_json_format_and_v1_base_url():
    responses.post(BASE + "/v1/audio/transcriptions", json={"text": "hi"})
    client = OpenAIClient(BASE + "/v1/", model="whisper-1", response_format="json")
    result = client.transcribe(AUDIO)
    assert result.transcription.text == "hi" and result.transcription.segments == ()
    # marked as the exporter's own: a query the server's access log prints, and a header for the tap
    assert responses.calls[0].request.url == BASE + f"/v1/audio/transcriptions?whisper_exporter_canary={marker.VALUE}"
    assert responses.calls[0].request.headers["X-Whisper-Exporter-Canary"] == marker.VALUE  # this process's token
    assert b'name="response_format"\r\n\r\njson' in _multipart(responses.calls[0].request)
    assert b'name="language"' not in _multipart(responses.calls[0].request)  # none given: the server detects


@responses.activate
def test_vllm_shape_duration_as_string_and_null_no_speech_prob():
    responses.post(BASE + "/v1/audio/transcriptions", json={
        "text": "hi", "language": "english", "duration": "4.25",
        "segments": [{"text": "hi", "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 0.9,
                      "no_speech_prob": None}],
    })
    t = OpenAIClient(BASE).transcribe(AUDIO).transcription
    assert t.duration == 4.25 and t.language == "en"
    assert t.segments[0].no_speech_prob is None and t.segments[0].avg_logprob == -0.3


@responses.activate
def test_asr_webservice_request_shape_and_json_labelled_text_plain():
    responses.post(
        BASE + "/asr",
        body=json.dumps({"text": " Hello.", "language": "en", "segments": [[0, 0, 0.0, 1.0, " Hello.", [], 0.0]]}),
        content_type="text/plain",
        match=[matchers.query_param_matcher({"output": "json", "task": "transcribe", "language": "en", "encode": "true",
                                             "whisper_exporter_canary": marker.VALUE})],
    )
    result = AsrWebserviceClient(BASE).transcribe(AUDIO, "a.wav", "en")
    assert result.ok, result.reason
    assert result.transcription.text == " Hello."
    assert result.transcription.segments == ()  # segments dumped as lists carry no names: ignored
    assert result.transcription.duration is None  # its json has none
    assert b'name="audio_file"; filename="a.wav"' in _multipart(responses.calls[0].request)


@responses.activate
def test_asr_webservice_plain_text_answer_is_the_transcript():
    responses.post(BASE + "/asr", body="Hello there.\n", content_type="text/plain")
    result = AsrWebserviceClient(BASE).transcribe(AUDIO)
    assert result.ok and result.transcription.text == "Hello there."


@responses.activate
def test_asr_webservice_html_is_still_a_bad_response():
    responses.post(BASE + "/asr", body="<html>proxy error</html>", content_type="text/plain")
    assert AsrWebserviceClient(BASE).transcribe(AUDIO).outcome == "bad_response"


@responses.activate
def test_whispercpp_request_shape_language_name_and_missing_compression_ratio():
    responses.post(BASE + "/inference", json={
        "task": "transcribe", "language": "english", "duration": 4.0, "text": " Hello.",
        "segments": [{"id": 0, "text": " Hello.", "start": 0.0, "end": 1.0, "temperature": 0.0, "avg_logprob": -0.4}],
    })
    result = WhisperCppClient(BASE).transcribe(AUDIO, "a.wav", "en")
    assert result.ok
    t = result.transcription
    assert t.language == "en"
    assert t.segments[0].compression_ratio is None and t.segments[0].no_speech_prob is None
    body = _multipart(responses.calls[0].request)
    assert b'name="file"; filename="a.wav"' in body and b'name="response_format"\r\n\r\nverbose_json' in body
    assert b'name="language"\r\n\r\nen' in body


@responses.activate
def test_whispercpp_error_in_a_200_answer_is_a_bad_response():
    responses.post(BASE + "/inference", json={"error": "failed to process audio"})
    result = WhisperCppClient(BASE).transcribe(AUDIO)
    assert result.outcome == "bad_response" and result.status_code == 200
    assert "failed to process audio" in result.reason


@responses.activate
def test_http_500_is_an_http_error_with_the_status_and_body():
    responses.post(BASE + "/v1/audio/transcriptions", status=500, body="Internal Server Error: CUDA out of memory")
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "http_error"
    assert result.status_code == 500
    assert "HTTP 500" in result.reason and "CUDA out of memory" in result.reason
    assert result.transcription is None


@responses.activate
def test_redirect_is_not_followed():
    responses.post(BASE + "/v1/audio/transcriptions", status=307, headers={"Location": "http://elsewhere.test/x"})
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "http_error" and result.status_code == 307
    assert "elsewhere.test" in result.reason and len(responses.calls) == 1


@responses.activate
def test_html_instead_of_json_is_a_bad_response():
    responses.post(BASE + "/v1/audio/transcriptions", body="<!DOCTYPE html><html><body>Welcome to nginx</body></html>",
                   content_type="text/html")
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "bad_response" and result.status_code == 200
    assert "not JSON" in result.reason and "text/html" in result.reason
    assert "Welcome to nginx" in result.exchange.body_excerpt


@pytest.mark.parametrize("body, reason", [
    ('{"text": "unterminated', "not JSON"),
    ('["text"]', "not an object"),
    ('{"segments": []}', 'no "text"'),
    ('{"text": 42}', 'no "text"'),
    ('{"detail": {"error": {"message": "unknown model: whisper-1"}}}', "unknown model"),
    (b"\xff\xfe\x00garbage", "not JSON"),
])
@responses.activate
def test_malformed_answers_are_bad_responses(body, reason):
    responses.post(BASE + "/v1/audio/transcriptions", body=body, content_type="application/json")
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "bad_response"
    assert reason in result.reason


def test_malformed_answer_from_a_real_socket_is_a_bad_response():
    with FakeWhisper(mode="malformed") as fake:
        result = OpenAIClient(fake.url, timeout=10).transcribe(AUDIO)
    assert result.outcome == "bad_response" and result.status_code == 200
    assert "not JSON" in result.reason


DRIP = {"mode": "drip", "drip_interval": 0.005}  # the ~500-byte answer takes over 2.5 s


def test_answer_dripping_past_the_timeout_is_a_timeout():
    """Each byte comes well within the timeout, the whole answer does not: the timeout is for
    the whole exchange, not for each read."""
    with FakeWhisper(**DRIP) as fake:
        result = OpenAIClient(fake.url, timeout=0.5).transcribe(AUDIO)
    assert result.outcome == "timeout" and result.status_code == 200
    assert "did not arrive in full within 0.5s" in result.reason


def test_dripping_answer_is_cut_off_at_the_deadline():
    with FakeWhisper(**DRIP) as fake:
        result = OpenAIClient(fake.url, timeout=0.5).transcribe(AUDIO)
        whole = len(json.dumps(verbose_answer(fake.text)).encode())
    assert result.exchange.body_bytes < whole


@responses.activate
def test_oversized_answer_is_a_bad_response(monkeypatch):
    monkeypatch.setattr(clients, "MAX_BODY_BYTES", 1000)
    responses.post(BASE + "/v1/audio/transcriptions", json={"text": "x" * 5000})
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "bad_response" and "larger than 1000 bytes" in result.reason


@pytest.mark.parametrize("error", [requests.exceptions.ReadTimeout("read timed out"),
                                   requests.exceptions.ConnectTimeout("connect timed out")])
@responses.activate
def test_timeouts(error):
    responses.post(BASE + "/v1/audio/transcriptions", body=error)
    result = OpenAIClient(BASE, timeout=7).transcribe(AUDIO)
    assert result.outcome == "timeout"
    assert "7s" in result.reason and result.status_code is None


@responses.activate
def test_connection_refused_by_responses():
    responses.post(BASE + "/v1/audio/transcriptions", body=requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='whisper.test', port=8000): Max retries exceeded (Caused by NewConnectionError("
        "'<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a new connection: "
        "[Errno 111] Connection refused'))"))
    result = OpenAIClient(BASE).transcribe(AUDIO)
    assert result.outcome == "connection_error"
    assert result.reason == "cannot connect: connection refused"


def test_connection_refused_for_real():
    port = free_port()  # closed again: nothing listens there
    result = OpenAIClient(f"http://127.0.0.1:{port}", timeout=30).transcribe(AUDIO)
    assert result.outcome == "connection_error"
    assert "refused" in result.reason
    assert result.elapsed < 10  # at once, not after the timeout (a wide margin for a loaded machine)


# -- secrets --------------------------------------------------------------------------


@responses.activate
def test_api_key_from_env_is_sent_and_never_shown(monkeypatch):
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("WHISPER_TEST_KEY", secret)
    # A server that echoes the request headers in its error page.
    responses.post(BASE + "/v1/audio/transcriptions", status=401,
                   body=f"<html>bad credentials: Authorization: Bearer {secret}</html>")
    service = ServiceConfig(url=BASE, api_key_env="WHISPER_TEST_KEY")
    client = make_client(service)
    result = client.transcribe(AUDIO)
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {secret}"
    assert result.outcome == "http_error"
    shown = " ".join([repr(client), str(client.url), result.reason, repr(result), json.dumps(result.exchange.__dict__)])
    assert secret not in shown
    assert "<masked>" in result.reason


@responses.activate
def test_secret_in_an_exception_message_is_masked(tmp_path):
    secret = "file-key-abcdef123456"
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    responses.post(BASE + "/v1/audio/transcriptions",
                   body=requests.exceptions.ConnectionError(f"weird proxy said Bearer {secret} [Errno 104] reset"))
    client = make_client(ServiceConfig(url=BASE, api_key_file=str(key_file)))
    result = client.transcribe(AUDIO)
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {secret}"
    assert result.outcome == "connection_error"
    assert secret not in result.reason and secret not in repr(result)


@responses.activate
def test_credential_headers_and_url_password_are_masked():
    responses.post("http://whisper.test:8000/v1/audio/transcriptions", status=500,
                   body="echo: X-Api-Key=hdr-secret-999 pass=url-pass-777")
    client = OpenAIClient("http://user:url-pass-777@whisper.test:8000", headers={"X-Api-Key": "hdr-secret-999"})
    result = client.transcribe(AUDIO)
    assert responses.calls[0].request.headers["X-Api-Key"] == "hdr-secret-999"
    for text in (result.reason, result.exchange.url, result.exchange.body_excerpt, client.url, repr(client)):
        assert "hdr-secret-999" not in text and "url-pass-777" not in text


def test_api_key_problems_name_the_source_not_the_value(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ClientSetupError, match="NO_SUCH_KEY_VAR is not set"):
        load_api_key("NO_SUCH_KEY_VAR", None)
    with pytest.raises(ClientSetupError, match="cannot read"):
        load_api_key(None, str(tmp_path / "missing"))
    assert load_api_key(None, None) is None
    assert "abc123" not in repr(Secret("abc123")) and "abc123" not in str(Secret("abc123"))


def test_make_client_picks_the_api():
    for api, cls in (("openai", OpenAIClient), ("asr-webservice", AsrWebserviceClient), ("whispercpp", WhisperCppClient)):
        client = make_client(ServiceConfig(url=BASE, api=api), timeout=3)
        assert type(client) is cls and client.timeout == 3
    assert make_client(ServiceConfig(url=BASE), url="http://other.test:1").url == "http://other.test:1"
    from whisper_exporter.whisper.wyoming import WyomingClient

    wyoming = make_client(ServiceConfig(url="tcp://127.0.0.1:10300", api="wyoming"), timeout=3, pace=2.0)
    assert type(wyoming) is WyomingClient and (wyoming.timeout, wyoming.pace, wyoming.port) == (3, 2.0, 10300)
    with pytest.raises(ClientSetupError, match="service.url: expected a tcp://host:port URL"):
        make_client(ServiceConfig(url="tcp://127.0.0.1:10300", api="wyoming"), url="http://127.0.0.1:1")


def test_one_list_of_apis_names_every_client_and_every_choice():
    # A new server API is one client class plus its name in config.APIS; nothing else to keep in step.
    from click import Choice

    from whisper_exporter import cli, config
    assert set(clients._CLIENTS) | set(clients._STREAMING_CLIENTS) == set(config.APIS)
    for command in (cli.probe, cli.evaluate):
        (api,) = [p for p in command.params if p.name == "api"]
        assert isinstance(api.type, Choice) and tuple(api.type.choices) == config.APIS
