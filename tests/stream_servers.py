"""Protocol-faithful streaming test servers (aiohttp handlers), written from the servers' own source.

- `realtime`: speaches' OpenAI Realtime endpoint (src/speaches/routers/realtime_ws.py,
  realtime/input_audio_buffer_event_router.py, types/realtime.py): `session.created` on accept,
  `session.update` -> `session.updated`, `input_audio_buffer.append` (base64 pcm16 at 24 kHz),
  `input_audio_buffer.commit` -> an `error` (invalid_request_error) under 100 ms of audio, else
  `input_audio_buffer.committed` {item_id, previous_item_id} and, after the transcription,
  `conversation.item.input_audio_transcription.completed` {item_id, content_index, transcript}.
  speaches sends no `...delta`; OpenAI's own API does, so `deltas` adds them before completed.
- `whisperlive`: collabora/WhisperLive (whisper_live/server.py, backend/base.py): the client's
  options JSON first (uid, language, audio_format ...); `{"uid", "status": "WAIT", "message":
  minutes}` and a close when all max_clients are busy; `{"uid", "message": "SERVER_READY",
  "backend": "faster_whisper"}`; binary frames (float32 16 kHz) and a final b"END_OF_AUDIO";
  `{"uid", "segments": [{"start": "0.000", "end": "1.000", "text", "completed"}]}` (times as
  strings with three decimals); `{"uid", "message": "DISCONNECT"}` past max_connection_time.
The timings are set by the test, so the tap's figures can be checked against the client's clock.
"""
from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

PCM16_24K = 48000  # bytes per second of the Realtime API's pcm16
FLOAT32_16K = 64000  # bytes per second of WhisperLive's float32 frames


@dataclass
class RealtimeScript:
    transcription_delay: float = 0.5  # seconds from committed to completed
    deltas: tuple[float, ...] = ()  # seconds after committed at which a delta is sent
    transcript: str = "hello world"
    seen: list[str] = field(default_factory=list)  # the client events' types, in order


def realtime(script: RealtimeScript):
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        n = 0
        session = {"id": "sess_1", "object": "realtime.session", "model": request.query.get("model", ""),
                   "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1"},
                   "turn_detection": None}
        await ws.send_str(json.dumps({"type": "session.created", "event_id": "event_0", "session": session}))
        buffered = 0
        previous = None
        tasks = []
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            script.seen.append(event["type"])
            if event["type"] == "session.update":
                session.update(event["session"])
                await ws.send_str(json.dumps({"type": "session.updated", "event_id": "e", "session": session}))
            elif event["type"] == "input_audio_buffer.append":
                buffered += len(base64.b64decode(event["audio"]))
            elif event["type"] == "input_audio_buffer.commit":
                if buffered * 1000 // PCM16_24K < 100:  # MIN_AUDIO_BUFFER_DURATION_MS
                    await ws.send_str(json.dumps({"type": "error", "event_id": "e", "error": {
                        "type": "invalid_request_error", "message": "Error committing input audio buffer: "
                        "buffer too small."}}))
                    continue
                n += 1
                item = f"item_{n}"
                await ws.send_str(json.dumps({"type": "input_audio_buffer.committed", "event_id": "e",
                                              "item_id": item, "previous_item_id": previous}))
                previous, buffered = item, 0
                tasks.append(asyncio.ensure_future(_transcribe(ws, script, item)))
        await asyncio.gather(*tasks, return_exceptions=True)
        return ws
    return handler


async def _transcribe(ws: web.WebSocketResponse, script: RealtimeScript, item: str) -> None:
    waited = 0.0
    words = script.transcript.split()
    for i, at in enumerate(script.deltas):
        await asyncio.sleep(at - waited)
        waited = at
        await ws.send_str(json.dumps({"type": "conversation.item.input_audio_transcription.delta", "event_id": "e",
                                      "item_id": item, "content_index": 0, "delta": words[i % len(words)] + " "}))
    await asyncio.sleep(script.transcription_delay - waited)
    await ws.send_str(json.dumps({
        "type": "conversation.item.input_audio_transcription.completed", "event_id": "e", "item_id": item,
        "content_index": 0, "transcript": script.transcript,
        "usage": {"type": "duration", "seconds": 1.0}}))


@dataclass
class LiveScript:
    ready_delay: float = 0.3  # seconds from the options to SERVER_READY
    lag: float = 1.0  # completed segments end this many seconds before the audio received
    max_clients: int = 4
    clients: int = 0
    disconnect_after: int = 0  # frames; 0: never (else DISCONNECT as for max_connection_time)
    text: str = "hello"
    first_segment_delay: float = 0.0  # seconds the first frame's answer waits (the first transcription)


def whisperlive(script: LiveScript):
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        options = json.loads(await ws.receive_str())
        uid = options["uid"]
        if script.clients >= script.max_clients:
            await ws.send_str(json.dumps({"uid": uid, "status": "WAIT", "message": 9.5}))
            await ws.close()
            return ws
        script.clients += 1
        try:
            await asyncio.sleep(script.ready_delay)
            await ws.send_str(json.dumps({"uid": uid, "message": "SERVER_READY", "backend": "faster_whisper"}))
            received, frames = 0, 0
            async for msg in ws:
                if msg.type is not WSMsgType.BINARY:
                    continue
                if msg.data == b"END_OF_AUDIO":
                    break
                received += len(msg.data)
                frames += 1
                if frames == 1:
                    await asyncio.sleep(script.first_segment_delay)
                seconds = received / FLOAT32_16K
                done = max(0.0, seconds - script.lag)
                segments = []
                if done > 0:
                    segments.append({"start": "0.000", "end": f"{done:.3f}", "text": script.text, "completed": True})
                segments.append({"start": f"{done:.3f}", "end": f"{seconds:.3f}", "text": "...", "completed": False})
                await ws.send_str(json.dumps({"uid": uid, "segments": segments}))
                if script.disconnect_after and frames >= script.disconnect_after:
                    await ws.send_str(json.dumps({"uid": uid, "message": "DISCONNECT"}))
                    await ws.close()
                    break
        finally:
            script.clients -= 1
        return ws
    return handler
