"""Protocol-faithful WebSocket test servers for the streaming canaries, written from the real source.

- `Realtime`: speaches' `/v1/realtime` (src/speaches/routers/realtime_ws.py,
  realtime/input_audio_buffer_event_router.py, realtime/input_audio_buffer.py,
  types/realtime.py): `session.created` on connect; `session.update` answered by
  `session.updated`; `input_audio_buffer.append` carries base64 PCM16 at 24 kHz;
  a commit of under 100 ms is an `invalid_request_error`; a commit is answered by
  `input_audio_buffer.committed`, then the buffer is resampled to 16 kHz, written
  as a WAV and sent to an OpenAI-compatible transcription endpoint
  (`response_format=text`), and the text comes back as
  `conversation.item.input_audio_transcription.completed`. A wrong API key is
  refused before the handshake (HTTP 403). speaches sends no deltas; OpenAI does
  (`...delta`), so `deltas_after` makes this one send them.
- `WhisperLive`: collabora/WhisperLive's server (whisper_live/server.py,
  backend/base.py): the options JSON first; `{"uid", "status": "WAIT",
  "message": minutes}` and a close when full, else `{"uid", "message":
  "SERVER_READY", "backend": "faster_whisper"}`; binary float32 16 kHz frames;
  `{"uid", "segments": [{"start": "%.3f", "end": "%.3f", "text", "completed"}]}`
  (the last few segments, the last one possibly not completed); on
  `END_OF_AUDIO` the last segment is sent completed and the connection closed.
  Its transcription is scripted: segment i is completed once `lag` seconds of
  audio past its end have arrived, so the transcript lag is known.

Each runs an aiohttp server on its own event loop in a thread, on loopback.
"""
from __future__ import annotations

import array
import asyncio
import base64
import io
import json
import threading
import time
import wave
from dataclasses import dataclass, field
from typing import Callable, Optional

import requests
from aiohttp import WSMsgType, web
from helpers import free_port

from whisper_exporter.whisper import streaming_clients


class _Threaded:
    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._runner: Optional[web.AppRunner] = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def app(self) -> web.Application:
        raise NotImplementedError

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app())
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def resample(pcm16: bytes, src: int, dst: int) -> bytes:
    """Linear resampling of 16-bit mono (speaches uses its own resample_audio_data; this, the client's)."""
    return streaming_clients.resample(array.array("h", pcm16), src, dst).tobytes()


def wav16k(pcm16: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm16)
    return out.getvalue()


@dataclass
class Session:
    """What the server saw of one session."""

    headers: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)  # (time, type)
    audio: bytearray = field(default_factory=bytearray)


class Realtime(_Threaded):
    """speaches' Realtime endpoint. `transcribe(wav16k_bytes, model, language) -> text`."""

    def __init__(self, transcribe: Callable[[bytes, str, Optional[str]], str], api_key: Optional[str] = None,
                 deltas_after: Optional[int] = None, completed_delay: float = 0.0):
        self.transcribe = transcribe
        self.api_key = api_key
        self.deltas_after = deltas_after
        self.completed_delay = completed_delay
        self.sessions: list[Session] = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/realtime", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            raise web.HTTPForbidden()  # verify_websocket_api_key: refused before accept
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = Session(dict(request.headers), dict(request.query))
        self.sessions.append(session)
        model = request.query.get("model", "")
        config = {"id": "sess_test", "model": model, "input_audio_format": "pcm16",
                  "input_audio_transcription": {"model": model, "language": request.query.get("language")},
                  "turn_detection": {"type": "server_vad", "threshold": 0.9, "silence_duration_ms": 550}}
        await ws.send_json({"type": "session.created", "event_id": "event_1", "session": config})
        buffer = bytearray()
        appends = 0
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            session.messages.append((time.perf_counter(), event.get("type")))
            kind = event.get("type")
            if kind == "session.update":
                for key, value in event.get("session", {}).items():
                    config[key] = value
                await ws.send_json({"type": "session.updated", "event_id": "event_2", "session": config})
            elif kind == "input_audio_buffer.append":
                chunk = base64.b64decode(event["audio"])
                buffer += chunk
                session.audio += chunk
                appends += 1
                if self.deltas_after is not None and appends >= self.deltas_after:
                    await ws.send_json({"type": "conversation.item.input_audio_transcription.delta",
                                        "item_id": "item_1", "content_index": 0, "delta": "x"})
            elif kind == "input_audio_buffer.commit":
                duration_ms = len(buffer) // 2 // 24
                if duration_ms < 100:  # MIN_AUDIO_BUFFER_DURATION_MS
                    await ws.send_json({"type": "error", "event_id": "event_3", "error": {
                        "type": "invalid_request_error",
                        "message": "Error committing input audio buffer: buffer too small. Expected at least "
                                   f"100ms of audio, but buffer only has {duration_ms}.00ms of audio."}})
                    continue
                await ws.send_json({"type": "input_audio_buffer.committed", "event_id": "event_4",
                                    "previous_item_id": None, "item_id": "item_1"})
                audio = wav16k(resample(bytes(buffer), 24000, 16000))
                buffer = bytearray()
                transcription = config.get("input_audio_transcription") or {}
                text = await asyncio.get_running_loop().run_in_executor(
                    None, self.transcribe, audio, transcription.get("model", model), transcription.get("language"))
                await asyncio.sleep(self.completed_delay)
                await ws.send_json({"type": "conversation.item.input_audio_transcription.completed",
                                    "event_id": "event_5", "item_id": "item_1", "content_index": 0,
                                    "transcript": text,
                                    "usage": {"type": "duration", "seconds": len(audio) / 32000}})
        return ws


def openai_transcriber(url: str) -> Callable[[bytes, str, Optional[str]], str]:
    """speaches' transcription_client.create(file, model, response_format="text", language). Here
    response_format json: faster-whisper-server 0.0.3 answers text with 400 "Unsupported response_format"."""
    def transcribe(audio: bytes, model: str, language: Optional[str]) -> str:
        data = {"model": model, "model_name": model, "response_format": "json"}
        if language:
            data["language"] = language
        answer = requests.post(url + "/v1/audio/transcriptions", data=data,
                               files={"file": ("audio.wav", audio, "audio/wav")}, timeout=60)
        answer.raise_for_status()
        return str(answer.json()["text"]).strip()
    return transcribe


class WhisperLive(_Threaded):
    """WhisperLive's server with a scripted transcript: `segments` are (start, end, text)."""

    def __init__(self, segments: list[tuple[float, float, str]], lag: float = 0.5, max_clients: int = 4,
                 busy: int = 0, delay: float = 0.0, close_at_end: bool = False):
        self.segments = segments
        self.lag = lag
        # A slow server: what it says about the audio heard comes `delay` seconds after it; and, as
        # WhisperLive 0.10.0 does (tests/test_whisperlive_real_server.py), END_OF_AUDIO closes at
        # once, dropping what it has not said yet, instead of sending the last segments.
        self.delay, self.close_at_end = delay, close_at_end
        self.max_clients = max_clients
        self.busy = busy  # clients already connected elsewhere
        self.sessions: list[Session] = []
        self.ready_sent: list[float] = []
        super().__init__()
        self.url = f"ws://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.handle)
        return app

    def _segment(self, i: int, completed: bool) -> dict:
        start, end, text = self.segments[i]
        return {"start": "{:.3f}".format(start), "end": "{:.3f}".format(end), "text": text, "completed": completed}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = Session(dict(request.headers), dict(request.query))
        self.sessions.append(session)
        options = json.loads((await ws.receive()).data)
        uid = options["uid"]
        if self.busy >= self.max_clients:  # ClientManager.is_server_full
            await ws.send_str(json.dumps({"uid": uid, "status": "WAIT", "message": 3.5}))
            await ws.close()
            return ws
        await ws.send_str(json.dumps({"uid": uid, "message": "SERVER_READY", "backend": "faster_whisper"}))
        self.ready_sent.append(time.perf_counter())
        state = {"done": 0}  # segments completed so far
        pending: list[asyncio.Task] = []

        async def progress(heard: float) -> None:
            if self.delay:
                await asyncio.sleep(self.delay)
            done = state["done"]
            progressed = False
            while done < len(self.segments) and heard >= self.segments[done][1] + self.lag:
                done += 1
                progressed = True
            state["done"] = done
            if progressed and not ws.closed:
                shown = [self._segment(i, True) for i in range(max(0, done - 10), done)]
                if done < len(self.segments):
                    shown.append(self._segment(done, False))
                await ws.send_str(json.dumps({"uid": uid, "segments": shown}))

        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            if msg.data == b"END_OF_AUDIO":
                if not self.close_at_end:
                    await ws.send_str(json.dumps({"uid": uid, "segments": [
                        self._segment(i, True) for i in range(max(0, len(self.segments) - 10), len(self.segments))]}))
                for task in pending:
                    task.cancel()
                await ws.close()
                break
            session.audio += msg.data
            heard = len(session.audio) / 4 / 16000
            if self.delay:
                pending.append(asyncio.ensure_future(progress(heard)))
            else:
                await progress(heard)
        return ws
