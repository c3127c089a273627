"""Real traffic through the tap to a real faster-whisper-server (tiny.en, CPU, temperature 0).

The official openai client and curl send espeak-ng speech in several languages and response
formats, through the tap and straight to the server: every answer is byte-identical; the
tap's metrics count what was sent (status, language, audio seconds) and its durations are
within 5% of what the client measured; canary requests are kept apart; faults (malformed
upload, non-audio file, the server killed mid-answer and down) are answered and counted,
the tap keeps serving and memory stays flat."""
import json
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest
import requests
from answer_checks import tap_transcript_problems, upgrade_problems
from tap_helpers import Records

from whisper_exporter.tap import TapConfig
from whisper_exporter.whisper import marker
from whisper_exporter.whisper.audio import duration_seconds

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration

TRANSCRIPTIONS = "/v1/audio/transcriptions"
SPEECH = {
    "en": ("en", "The quick brown fox jumps over the lazy dog."),
    "de": ("de", "Guten Morgen, wie geht es dir heute?"),
    "fr": ("fr", "Bonjour, je voudrais un café, s'il vous plaît."),
    "es": ("es", "Buenos días, me llamo Carlos y vivo en Madrid."),
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    from whisper_server import make_speech

    folder = tmp_path_factory.mktemp("speech")
    return {lang: make_speech(text, folder / f"{lang}.wav", voice=voice) for lang, (voice, text) in SPEECH.items()}


@pytest.fixture
def tapped(whisper_server):
    """A tap collector in front of the server, and the records it observed."""
    from whisper_exporter.collectors.tap import TapCollector

    col = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), whisper_server.url)
    records = Records()
    observe = col.observe
    col.tap.on_record = lambda rec: (observe(rec), records(rec))
    col.start()
    yield col, records, f"http://127.0.0.1:{col.tap.port}"
    col.stop()


def openai_call(base, path, lang_field, fmt, stream, model):
    """(status, body bytes, seconds) for one request by the official openai client."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    options = {"response_format": fmt, "extra_body": {"model_name": model}}
    if lang_field:
        options["language"] = lang_field
    if stream:
        options["stream"] = True
    with open(path, "rb") as audio:
        start = time.perf_counter()
        try:
            raw = client.audio.transcriptions.with_raw_response.create(file=audio, model="whisper-1", **options)
            response = raw.http_response
            body = response.read()
        except openai.APIStatusError as err:
            response, body = err.response, err.response.read()
        seconds = time.perf_counter() - start
    return response.status_code, body, seconds


def curl_call(base, path, lang_field, fmt, stream, model):
    """(status, body bytes, seconds) for one request by curl (its own time_total)."""
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{time_total}", base + TRANSCRIPTIONS,
           "-F", f"file=@{path}", "-F", f"model_name={model}", "-F", f"response_format={fmt}"]
    if lang_field:
        cmd += ["-F", f"language={lang_field}"]
    if stream:
        cmd += ["-F", "stream=true"]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    body, _, tail = out.rpartition(b"\n")
    code, seconds = tail.split()
    return int(code), body, float(seconds)


# (client, speech, language field, response_format, stream)
CASES = [
    ("openai", "en", "en", "json", False),
    ("openai", "en", None, "verbose_json", False),
    ("openai", "de", "de", "json", False),
    ("openai", "fr", "fr", "verbose_json", False),
    ("openai", "es", "es", "text", False),  # faster-whisper-server 0.0.3: 400, relayed as is
    ("openai", "en", "en", "srt", False),
    ("openai", "en", "en", "json", True),  # stream=true: this server answers plain JSON
    ("curl", "en", "en", "json", False),
    ("curl", "de", "de", "verbose_json", False),
    ("curl", "es", None, "json", False),  # language from the answer
    ("curl", "fr", "fr", "json", True),
    ("curl", "en", "en", "text", False),
]


def samples(col, family):
    return [s for f in col.families() if f.name == family for s in f.samples]


def test_real_traffic_through_the_tap(whisper_server, speech, tapped):
    col, records, tap_url = tapped
    sent = Counter()
    audio = Counter()
    timings = []
    for i, (client, lang, lang_field, fmt, stream) in enumerate(CASES):
        call = openai_call if client == "openai" else curl_call
        path = speech[lang]
        d_status, d_body, _ = call(whisper_server.url, path, lang_field, fmt, stream, whisper_server.model)
        t_status, t_body, t_seconds = call(tap_url, path, lang_field, fmt, stream, whisper_server.model)
        assert (t_status, t_body) == (d_status, d_body), CASES[i]
        record = records.wait(i + 1)[i]
        # The label: the request's language, else the answer's: verbose_json says "en" (tiny.en);
        # json says none (the response-format upgrade is there for that).
        label = lang_field or ("en" if t_status == 200 and fmt == "verbose_json" else "unknown")
        sent[(str(t_status), label)] += 1
        assert (record.status, record.response_format, record.stream) == (t_status, fmt, stream)
        assert record.response_bytes == len(t_body)
        assert record.audio_duration == pytest.approx(duration_seconds(path))
        if t_status == 200:
            audio[label] += duration_seconds(path)
            timings.append((record.duration, t_seconds, CASES[i]))
            # The transcript the client got, whatever it is: tiny.en's words on foreign speech differ by CPU.
            assert tap_transcript_problems(record, t_body) == [], CASES[i]
            assert (record.segments is not None) == (fmt == "verbose_json")

    got = Counter()
    for s in samples(col, "whisper_requests"):
        if s.name == "whisper_requests_total":
            assert s.labels["endpoint"] == TRANSCRIPTIONS
            got[(s.labels["status_code"], s.labels["language"])] += s.value
    assert got == sent
    processed = {s.labels["language"]: s.value for s in samples(col, "whisper_audio_processed_seconds")}
    assert processed == pytest.approx(dict(audio))
    for tap_seconds, client_seconds, case in timings:
        assert abs(tap_seconds - client_seconds) <= 0.05 * client_seconds, case
    count = {s.labels["endpoint"]: s.value for s in samples(col, "whisper_request_duration_seconds")
             if s.name.endswith("_count")}
    assert count == {TRANSCRIPTIONS: len(CASES)}
    rtf = [s.value for s in samples(col, "whisper_realtime_factor") if s.name.endswith("_count")]
    assert sum(rtf) == len(timings)


def test_canary_requests_are_kept_apart(whisper_server, speech, tapped):
    col, records, tap_url = tapped
    with open(speech["en"], "rb") as f:
        audio = f.read()
    form = {"model_name": whisper_server.model}
    for url, headers in ((tap_url + TRANSCRIPTIONS, {marker.HEADER: marker.VALUE}),
                         (marker.marked_url(tap_url + TRANSCRIPTIONS), {}),
                         (tap_url + TRANSCRIPTIONS, {})):
        r = requests.post(url, files={"file": ("en.wav", audio)}, data=form, headers=headers)
        assert r.status_code == 200
    recs = records.wait(3)
    assert [r.canary for r in recs] == [True, True, False]
    total = sum(s.value for s in samples(col, "whisper_requests") if s.name == "whisper_requests_total")
    assert total == 1
    assert [s.value for s in samples(col, "whisper_canary_requests_seen")] == [2]


def test_faults_with_the_real_server(whisper_server, speech, tapped, tmp_path):
    col, records, tap_url = tapped
    proc = psutil.Process()
    with open(speech["en"], "rb") as f:
        audio = f.read()
    form = {"model_name": whisper_server.model}
    # Warm up, then measure memory around the faults.
    requests.post(tap_url + TRANSCRIPTIONS, files={"file": ("en.wav", audio)}, data=form)
    before = proc.memory_info().rss
    n = 1
    for _ in range(3):
        # Malformed multipart: the server's own answer, byte for byte.
        bad = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + audio[:5000]
        headers = {"Content-Type": "multipart/form-data; boundary=B"}
        direct = requests.post(whisper_server.url + TRANSCRIPTIONS, data=bad, headers=headers)
        tapped_r = requests.post(tap_url + TRANSCRIPTIONS, data=bad, headers=headers)
        assert (tapped_r.status_code, tapped_r.content) == (direct.status_code, direct.content)
        assert tapped_r.status_code >= 400
        # A file that is not audio.
        files = {"file": ("notes.txt", b"no audio here\n" * 50)}
        direct = requests.post(whisper_server.url + TRANSCRIPTIONS, files=files, data=form)
        tapped_r = requests.post(tap_url + TRANSCRIPTIONS, files=files, data=form)
        assert (tapped_r.status_code, tapped_r.content) == (direct.status_code, direct.content)
        assert tapped_r.status_code >= 400
        n += 2
    recs = records.wait(n)
    assert Counter(r.analysis_error for r in recs) == {None: 1, "multipart": 3, "audio": 3}
    stats = col.tap.stats.snapshot()
    assert stats["analysis_errors"] == {"multipart": 3, "audio": 3}
    r = requests.post(tap_url + TRANSCRIPTIONS, files={"file": ("en.wav", audio)}, data=form)
    assert r.status_code == 200 and r.json()["text"]  # still serving
    growth = proc.memory_info().rss - before
    assert growth < 30e6, f"RSS grew by {growth / 1e6:.0f} MB"


def test_server_killed_mid_answer_and_down(speech, tmp_path):
    """A server of its own, killed while it transcribes: 502 to the client, counted; while it
    is down, 502 again; once it is back, the same tap serves again."""
    from whisper_server import free_port, start_server

    from whisper_exporter.collectors.tap import TapCollector

    port = free_port()
    server = start_server(tmp_path / "a", port=port)
    long_audio = tmp_path / "long.wav"
    subprocess.run(["sox"] + [str(speech["en"])] * 12 + [str(long_audio)], check=True)  # ~30 s
    col = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), server.url)
    records = Records()
    observe = col.observe
    col.tap.on_record = lambda rec: (observe(rec), records(rec))
    col.start()
    tap_url = f"http://127.0.0.1:{col.tap.port}"
    form = {"model_name": server.model}
    try:
        answers = []
        with open(long_audio, "rb") as f:
            audio = f.read()
        sender = threading.Thread(target=lambda: answers.append(requests.post(
            tap_url + TRANSCRIPTIONS, files={"file": ("long.wav", audio)}, data=form)))
        sender.start()
        deadline = time.monotonic() + 30
        while col.tap.stats.snapshot()["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the upload (1 MB on loopback) is in; the server is transcribing 30 s of speech
        server.proc.kill()
        sender.join(60)
        assert answers[0].status_code == 502 and answers[0].text == "upstream closed the connection\n"
        down = requests.post(tap_url + TRANSCRIPTIONS, files={"file": ("en.wav", b"RIFF")}, data=form)
        assert down.status_code == 502 and down.text == "upstream unreachable\n"
        server.stop()
        server = start_server(tmp_path / "b", port=port)
        back = requests.post(tap_url + TRANSCRIPTIONS, files={"file": ("en.wav", open(speech["en"], "rb"))},
                             data=form)
        assert back.status_code == 200 and back.json()["text"]
        recs = records.wait(3)
        assert [r.error for r in recs] == ["closed", "connect", None]
        errors = {s.labels["reason"]: s.value for s in samples(col, "whisper_tap_upstream_errors")}
        assert errors["closed"] == 1 and errors["connect"] == 1
        codes = Counter()
        for s in samples(col, "whisper_requests"):
            if s.name == "whisper_requests_total":
                codes[s.labels["status_code"]] += s.value
        assert codes == {"502": 2, "200": 1}
    finally:
        col.stop()
        server.stop()


def test_response_format_upgrade_with_the_real_server(whisper_server, speech):
    """faster-whisper-server is FastAPI: a json request asked as verbose_json comes back as
    exactly the server's own json answer, and the record has the language and segments."""
    from tap_helpers import start_tap

    records = Records()
    tap = start_tap(whisper_server.url, records, upgrade_response_format=True)
    try:
        tap_url = f"http://127.0.0.1:{tap.port}"
        verbose = []
        for lang in ("en", "de"):
            direct = openai_call(whisper_server.url, speech[lang], None, "json", False, whisper_server.model)
            through = openai_call(tap_url, speech[lang], None, "json", False, whisper_server.model)
            assert through[:2] == direct[:2] and direct[0] == 200
            status, body, _ = openai_call(whisper_server.url, speech[lang], None, "verbose_json", False,
                                          whisper_server.model)
            verbose.append(json.loads(body))
        recs = records.wait(2)
    finally:
        tap.stop()
    # English has segments; what tiny.en writes for German (and so how many segments) differs by CPU.
    assert recs[0].segments
    for rec, answer in zip(recs, verbose):
        assert rec.language == "en"  # tiny.en is English only
        assert upgrade_problems(rec, answer) == [], answer
