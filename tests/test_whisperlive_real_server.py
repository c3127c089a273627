"""WhisperLive, the real server (collabora/WhisperLive 0.10.0, faster_whisper backend, tiny.en on the
CPU; tests/whisperlive_server.py), with espeak-ng speech sent in real time: a session through the
tap measured against the client's own clock and messages, a WAIT from a full server counted, and
the whisperlive canary. Before, every WhisperLive figure came from stand-ins written from its
source (tests/stream_servers.py, tests/streaming_servers.py). What the model writes differs by CPU:
the checks compare the exporter's figures with what the server sent, never with fixed words."""
from __future__ import annotations

import asyncio
import json
import time
import wave
from pathlib import Path

import aiohttp
import jiwer
import pytest
from click.testing import CliRunner
from test_tap_streaming import collector, ended, value
from whisper_normalizer.english import EnglishTextNormalizer

from whisper_exporter.cli import main
from whisper_exporter.collectors.probe import ProbeCollector
from whisper_exporter.config import from_dict
from whisper_exporter.tap.streaming import WHISPERLIVE

pytest_plugins = ["whisperlive_server"]
pytestmark = pytest.mark.integration

FIRST = "Please send the quarterly report to the finance team by Friday."
SECOND = "The meeting starts at nine tomorrow morning."
RATE = 16000
CHUNK = 4096  # samples per frame, as WhisperLive's own client sends them (0.256 s)


@pytest.fixture(scope="module")
def two_sentences(tmp_path_factory) -> Path:
    """Two sentences with 1.5 s between them (WhisperLive completes a segment once the next one
    starts) and 2 s of silence after, 16 kHz mono 16-bit."""
    from whisper_server import make_speech

    folder = tmp_path_factory.mktemp("whisperlive-speech")
    frames = b""
    for i, text in enumerate((FIRST, SECOND)):
        with wave.open(str(make_speech(text, folder / f"{i}.wav")), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
            frames += w.readframes(w.getnframes()) + b"\0\0" * int(RATE * (1.5 if i == 0 else 2.0))
    path = folder / "two.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(frames)
    return path


def float32_frames(path: Path) -> list[bytes]:
    import array

    with wave.open(str(path), "rb") as w:
        pcm = array.array("h", w.readframes(w.getnframes()))
    audio = array.array("f", (s / 32768.0 for s in pcm)).tobytes()
    step = CHUNK * 4
    return [audio[i:i + step] for i in range(0, len(audio), step)]


async def live_session(url: str, frames: list[bytes], pace: float = 1.0) -> dict:
    """WhisperLive's client protocol, in real time: what the client saw, on its own clock."""
    t: dict = {"segments": [], "sent": 0.0}
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url) as ws:
            t["options"] = time.monotonic()
            await ws.send_str(json.dumps({"uid": "real-1", "language": "en", "task": "transcribe",
                                          "model": "tiny.en", "use_vad": False}))
            ready = json.loads((await ws.receive(timeout=60)).data)
            t["ready_message"] = ready
            t["ready"] = time.monotonic()
            if ready.get("message") != "SERVER_READY":
                t["close"] = (await ws.receive(timeout=10)).data
                return t

            async def reader() -> None:
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    event = json.loads(msg.data)
                    if isinstance(event.get("segments"), list):
                        # the audio the client had sent when this message came, beside it
                        t["segments"].append((time.monotonic(), t["sent"], event["segments"]))
                t["close"] = ws.close_code

            reading = asyncio.ensure_future(reader())
            t["first_audio"] = time.monotonic()
            for frame in frames:
                await ws.send_bytes(frame)
                t["sent"] += len(frame) / (4.0 * RATE)
                await asyncio.sleep(max(0.0, t["first_audio"] + t["sent"] / pace - time.monotonic()))
            await ws.send_bytes(b"END_OF_AUDIO")  # the server closes after it
            await asyncio.wait_for(reading, timeout=60)
    return t


def client_lags(t: dict) -> list[float]:
    """Transcript lag as the client sees it at each segments message: audio sent minus the end of
    the last completed segment so far."""
    lags, end = [], 0.0
    for _, sent, segments in t["segments"]:
        for seg in segments:
            if seg.get("completed") is True:
                end = max(end, float(seg["end"]))
        lags.append(sent - end)
    return lags


def client_transcript(t: dict) -> str:
    completed: dict[float, str] = {}
    partial = ""
    for _, _, segments in t["segments"]:
        partial = ""
        for seg in segments:
            if seg.get("completed") is True:
                completed.setdefault(float(seg["start"]), seg["text"])
            else:
                partial = seg["text"]
    texts = [completed[k].strip() for k in sorted(completed)]
    if partial.strip() and (not texts or texts[-1] != partial.strip()):
        texts.append(partial.strip())
    return " ".join(x for x in texts if x)


def test_a_real_whisperlive_session_through_the_tap_is_measured_as_the_client_saw_it(whisperlive_server,
                                                                                        two_sentences):
    frames = float32_frames(two_sentences)
    port = whisperlive_server.port
    col = collector(f"http://127.0.0.1:{port}")
    finals: list[str] = []
    detector = col.tap.streams.on_final
    assert detector is not None

    def final(text, language, audio):
        finals.append(text)
        detector(text, language, audio)

    col.tap.streams.on_final = final
    try:
        t = asyncio.run(live_session(f"http://127.0.0.1:{col.tap.port}/", frames))
        snap = ended(col)
    finally:
        col.stop()
    assert t["ready_message"].get("message") == "SERVER_READY", (t, whisperlive_server.log()[-3000:])
    assert t["segments"], whisperlive_server.log()[-3000:]
    p = {"protocol": WHISPERLIVE}
    assert value(snap, "whisper_stream_sessions_total", close_code=str(t["close"]), closed_by="server", **p) == 1
    audio = sum(len(f) for f in frames) / (4.0 * RATE)
    assert value(snap, "whisper_stream_audio_seconds_total", **p) == pytest.approx(audio)
    # Ready and first partial against the client's clock: a hop apart, on a loaded machine.
    assert value(snap, "whisper_stream_ready_seconds_sum", **p) == pytest.approx(t["ready"] - t["options"], abs=0.1)
    first_partial = t["segments"][0][0] - t["first_audio"]
    assert value(snap, "whisper_stream_first_partial_seconds_sum", **p) == pytest.approx(first_partial, abs=0.1)
    # One lag per segments message, each as the client computes it; the tap counts the audio as it
    # passes, the client when its send returns: at most a frame apart per message.
    lags = client_lags(t)
    assert value(snap, "whisper_stream_transcript_lag_seconds_count", **p) == len(lags)
    frame_seconds = CHUNK / RATE
    assert abs(value(snap, "whisper_stream_transcript_lag_seconds_sum", **p) - sum(lags)) <= frame_seconds * len(lags)
    assert value(snap, "whisper_stream_partials_per_turn_sum", **p) == len(t["segments"])
    # The session's final transcript, read as the client reads it (the completed segments and the
    # last partial after them: the server closes without completing its last segment, and on some
    # runs completes none), went to the hallucination detector once, as traffic.
    assert finals == [client_transcript(t)]
    assert value(snap, "whisper_hallucination_checked_total", language="en", source="traffic") == 1


def test_a_full_real_whisperlive_answers_wait_and_the_tap_counts_it(whisperlive_server, two_sentences):
    """max_clients is 1: while one client holds the server, the next gets WAIT (minutes to wait)
    and the server closes; the tap counts a rejection, not an error."""
    port = whisperlive_server.port
    col = collector(f"http://127.0.0.1:{port}")

    async def go() -> dict:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{port}/") as holder:  # directly, not through the tap
                await holder.send_str(json.dumps({"uid": "holder", "language": "en", "task": "transcribe",
                                                  "model": "tiny.en", "use_vad": False}))
                assert json.loads((await holder.receive(timeout=60)).data).get("message") == "SERVER_READY"
                second = await live_session(f"http://127.0.0.1:{col.tap.port}/", float32_frames(two_sentences))
                await holder.send_bytes(b"END_OF_AUDIO")
                await holder.receive(timeout=30)
                return second

    try:
        second = asyncio.run(go())
        snap = ended(col)
    finally:
        col.stop()
    assert second["ready_message"].get("status") == "WAIT", second["ready_message"]
    assert float(second["ready_message"]["message"]) >= 0  # WhisperLive's estimate, in minutes
    p = {"protocol": WHISPERLIVE}
    assert value(snap, "whisper_stream_rejections_total", reason="wait", **p) == 1
    assert sum(v for k, v in snap["whisper_stream_sessions_total"].items() if ("protocol", WHISPERLIVE) in k) == 1
    assert sum(snap.get("whisper_stream_errors_total", {}).values()) == 0


def test_the_whisperlive_canary_against_the_real_server(whisperlive_server, two_sentences):
    """The probe's whisperlive API, paced in real time: its error rate equals an independent jiwer
    computation on the transcript it took, and its timings are ordered as a session's are."""
    reference = f"{FIRST} {SECOND}"
    config = from_dict({"service": {"url": whisperlive_server.url, "api": "whisperlive", "model": "tiny.en"},
                        "collectors": {"probe": {"max_error_rate": 5.0, "timeout": 90, "canaries": [
                            {"name": "two", "audio": str(two_sentences), "reference": reference,
                             "language": "en"}]}}})
    probe = ProbeCollector(config.collectors.probe, config)
    probe.update()
    (record,) = probe.recent_probes()["two"]
    assert record.result == "success", (record.reason, whisperlive_server.log()[-3000:])
    assert record.api == "whisperlive"
    normalise = EnglishTextNormalizer()
    hyp = normalise(record.transcript)
    # Whatever the server made of it (under load it may transcribe less), the error rate is jiwer's.
    assert record.error_rate == pytest.approx(jiwer.wer(normalise(reference), hyp) if hyp else 1.0)
    stream = record.stream
    assert stream is not None and stream.pace == 1.0
    assert stream.audio_seconds == pytest.approx(record.audio_duration, abs=0.01)
    assert record.duration >= stream.audio_seconds  # sent as spoken
    assert 0 < stream.ready < record.duration
    if stream.partials:  # the server said something: after the first audio, before the end
        assert 0 < stream.first_partial < record.duration
    assert stream.transcript_lag is not None and 0 <= stream.transcript_lag <= stream.audio_seconds

    # The command a user runs, unpaced: its exit status is its verdict.
    result = CliRunner().invoke(main, ["probe", "--api", "whisperlive", "--target", whisperlive_server.url,
                                       "--model", "tiny.en", "--pace", "0", "--audio", str(two_sentences),
                                       "--reference", reference, "--json"])
    (cli,) = json.loads(result.output)["records"]
    assert cli["api"] == "whisperlive" and cli["stream"]["pace"] == 0
    assert result.exit_code == (0 if cli["result"] == "success" else 1), result.output
    cli_hyp = normalise(cli["transcript"])
    assert cli["error_rate"] == pytest.approx(jiwer.wer(normalise(reference), cli_hyp) if cli_hyp else 1.0)
