"""What the streaming APIs share: the timings a streamed canary measures, and real-time pacing.

A streaming client sends the audio as it would be spoken (`pace` 1.0; 2.0 sends
twice as fast; 0 sends it as fast as the connection takes) and reads the
server's events meanwhile, so the times are those a live speaker sees:

- first partial: from the start of the audio (the speaker starts talking;
  each chunk goes out once it has been spoken) to the first partial transcript
  (None when the server sends none: wyoming-faster-whisper answers once);
- finalisation lag: from the end of the audio (audio-stop, commit) to the
  final transcript; 0 when the server finalised before the audio ended;
- end to end: the result's `elapsed`, from connecting to the final transcript;
- transcript lag (WhisperLive): audio sent minus the end of the last completed
  segment, when the audio ended: how far the server was behind the speaker.

Two WebSocket APIs are spoken here, the Wyoming one in whisper/wyoming.py:

- `openai-realtime` (speaches' `/v1/realtime`, OpenAI's Realtime API): the
  session is opened for transcription (`?model=..&intent=transcription`,
  speaches' extension), `session.update` turns server VAD off, the clip goes as
  `input_audio_buffer.append` (base64 PCM16 mono at 24 kHz, the API's rate),
  then `input_audio_buffer.commit`; partials are
  `conversation.item.input_audio_transcription.delta`, the final transcript
  `...completed`; `error` and `...failed` are bad_response.
- `whisperlive` (collabora/WhisperLive): an options JSON (uid, language,
  model, use_vad false), `SERVER_READY` back (or `WAIT`: the server is full),
  the clip as binary float32 16 kHz frames, then, once the server has said
  nothing for SETTLE_SECONDS (at most SETTLE_MAX after the audio), `END_OF_AUDIO`;
  the server may send its last segments (`completed` true or false) and closes.
  WhisperLive 0.10.0 closes at once and drops what it has not transcribed yet,
  so its own client waits for silence (15 s) first; without the wait a loaded
  server's canary got no transcript at all. The transcript is the completed
  segments, in order, and the last partial after them; its time, for the
  finalisation lag, is the last segments message's (with none, the end of
  the audio).
"""
from __future__ import annotations

import array
import asyncio
import base64
import io
import json
import os
import sys
import time
import uuid
import wave
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit

from whisper_exporter.whisper import clients, marker, transport
from whisper_exporter.whisper.audio import AudioError

MAX_MESSAGE_BYTES = 1024 * 1024  # one server message; a transcript event is a few KB
MAX_RECEIVED_BYTES = clients.MAX_BODY_BYTES  # all of one session
MAX_SEGMENTS = 10_000  # WhisperLive segments kept (by start time)
# WhisperLive: after the audio, the server has caught up once it has sent nothing for this long (it
# transcribes its pending audio again and again, sending each pass, until the last segment is
# completed, then says nothing); its own client waits 15 s, too long for a canary that runs every
# minute; 3 s is ten passes of tiny.en on a loaded CPU. SETTLE_MAX bounds a server that never stops.
SETTLE_SECONDS = 3.0
SETTLE_MAX = 15.0
CHUNK_SECONDS = 0.1  # audio per message: what speaches' and WhisperLive's own clients send, about


@dataclass(frozen=True)
class StreamTimes:
    """Timings of one streamed utterance, in seconds."""

    pace: float  # audio seconds sent per wall-clock second; 0: unpaced
    audio_seconds: float  # of audio sent
    first_partial: Optional[float] = None
    finalisation_lag: Optional[float] = None
    partials: int = 0  # partial transcripts received
    ready: Optional[float] = None  # connecting to the server's ready (WhisperLive's SERVER_READY)
    transcript_lag: Optional[float] = None  # audio sent minus the last completed segment's end, at audio end


@dataclass(frozen=True)
class Pcm:
    """Raw PCM audio: what a streaming protocol sends in chunks."""

    data: bytes
    rate: int
    width: int  # bytes per sample
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.data) / float(self.rate * self.width * self.channels)

    def chunks(self, samples: int) -> list[tuple[float, bytes]]:
        """The audio cut into chunks of `samples` frames, each with its offset in seconds."""
        step = samples * self.width * self.channels
        return [(i / float(self.rate * self.width * self.channels), self.data[i:i + step])
                for i in range(0, len(self.data), step)]


def read_pcm(data: bytes, name: str = "audio") -> Pcm:
    """The PCM frames and format of a WAV file's bytes. Raises AudioError for anything else:
    the streaming protocols carry raw PCM, and the exporter decodes no compressed formats."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            pcm = Pcm(w.readframes(w.getnframes()), w.getframerate(), w.getsampwidth(), w.getnchannels())
    except (wave.Error, EOFError) as err:
        raise AudioError(f"{name}: a streaming API needs PCM WAV audio ({err})") from None
    if pcm.rate <= 0 or pcm.width not in (1, 2, 3, 4) or pcm.channels <= 0:
        raise AudioError(f"{name}: a streaming API needs PCM WAV audio (rate {pcm.rate}, width {pcm.width})")
    return pcm


def send_time(offset: float, pace: float) -> float:
    """When (seconds after the audio began) the audio up to `offset` seconds is due: real time / pace."""
    return 0.0 if pace <= 0 else offset / pace


def mono16(pcm: Pcm, rate: int) -> bytes:
    """The audio as 16-bit little-endian mono at `rate` Hz (channels averaged, linear interpolation)."""
    if pcm.width != 2:
        raise AudioError(f"a streaming API here needs 16-bit PCM WAV (this one has {8 * pcm.width}-bit samples)")
    samples = array.array("h", pcm.data[: len(pcm.data) - len(pcm.data) % (2 * pcm.channels)])
    if sys.byteorder == "big":
        samples.byteswap()
    if pcm.channels > 1:
        c = pcm.channels
        samples = array.array("h", (sum(samples[i:i + c]) // c for i in range(0, len(samples), c)))
    if pcm.rate != rate and len(samples) > 1:
        samples = resample(samples, pcm.rate, rate)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def resample(samples: "array.array[int]", src: int, dst: int) -> "array.array[int]":
    """16-bit samples at `src` Hz linearly interpolated to `dst` Hz."""
    n = int(len(samples) * dst / src)
    step = (len(samples) - 1) / max(1, n - 1)
    out = array.array("h", bytes(2 * n))
    for i in range(n):
        x = i * step
        j = int(x)
        k = min(j + 1, len(samples) - 1)
        out[i] = int(samples[j] + (samples[k] - samples[j]) * (x - j))
    return out


def float32(pcm16: bytes) -> bytes:
    """16-bit little-endian samples as float32 in [-1, 1), WhisperLive's default audio format."""
    samples = array.array("h", pcm16)
    if sys.byteorder == "big":
        samples.byteswap()
    out = array.array("f", (v / 32768.0 for v in samples))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


class _Failed(Exception):
    def __init__(self, outcome: str, reason: str, status: Optional[int] = None):
        super().__init__(reason)
        self.outcome, self.reason, self.status = outcome, reason, status


class _Session:
    """What one streamed utterance's messages said, with the times they came."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ready_at = 0.0
        self.first_audio = 0.0
        self.audio_end = 0.0
        self.first_partial_at = 0.0
        self.partials = 0
        self.final_at = 0.0
        self.text: Optional[str] = None
        self.language: Optional[str] = None
        self.transcript_lag: Optional[float] = None
        self.received = 0
        self.last_message = b""

    def partial(self) -> None:
        self.partials += 1
        self.first_partial_at = self.first_partial_at or time.perf_counter()

    def times(self, pace: float, audio_seconds: float) -> StreamTimes:
        def since(t: float, origin: float) -> Optional[float]:
            return t - origin if t and origin else None

        lag = None
        if self.text is not None and self.final_at:
            lag = max(0.0, self.final_at - self.audio_end) if self.audio_end else 0.0
        return StreamTimes(pace=pace, audio_seconds=audio_seconds,
                           first_partial=since(self.first_partial_at, self.first_audio),
                           finalisation_lag=lag, partials=self.partials,
                           ready=since(self.ready_at, self.started), transcript_lag=self.transcript_lag)


class WebSocketClient(clients.WhisperClient):
    """Base of the WebSocket streaming clients: one session per utterance, paced, one total deadline."""

    path = ""

    def __init__(self, url: str, model: str = "whisper-1", timeout: float = 30.0,
                 headers: Optional[dict[str, str]] = None, api_key: Optional[clients.Secret] = None,
                 response_format: str = "verbose_json", pace: float = 1.0):
        super().__init__(url, model=model, timeout=timeout, headers=headers, api_key=api_key,
                         response_format=response_format)
        self.pace = float(pace)

    def ws_url(self, language: Optional[str]) -> str:
        """The session's URL, marked as the exporter's canary (the tap keeps it out of user metrics)."""
        parts = urlsplit(self.endpoint_url())
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        query = "&".join(q for q in (self._query(language), urlencode({marker.QUERY: marker.VALUE})) if q)
        return urlunsplit((scheme, parts.netloc, parts.path, query, ""))

    def endpoint_url(self) -> str:
        return self._url + self.path

    def _query(self, language: Optional[str]) -> str:
        return ""

    def _headers_out(self) -> dict[str, str]:
        headers = {"User-Agent": clients.USER_AGENT, **self._headers, marker.HEADER: marker.VALUE}
        if self._api_key is not None:
            headers["Authorization"] = "Bearer " + self._api_key.reveal()
        return headers

    def transcribe(self, audio: bytes, filename: str = "audio.wav",
                   language: Optional[str] = None) -> clients.TranscribeResult:
        pcm = read_pcm(audio, filename)  # audio.AudioError: the canary, not the server
        exchange = clients.Exchange(
            method="WEBSOCKET", url=self.redact(clients.masked_url(self.ws_url(language))),
            fields=self._describe_fields(language), file_field="audio", file_name=filename,
            file_bytes=len(pcm.data),
            headers={k: self.redact(v) for k, v in clients.masked_headers(self._headers_out()).items()})
        session = _Session()
        outcome, reason, status = clients.SUCCESS, "", None
        try:
            asyncio.run(asyncio.wait_for(self._run(pcm, language, session), self.timeout))
        except asyncio.TimeoutError:
            where = "waiting for the transcript" if session.audio_end else (
                "sending the audio" if session.first_audio else "connecting")
            outcome, reason = clients.TIMEOUT, f"no transcript within {self.timeout:g}s (still {where})"
        except _Failed as failed:
            outcome, reason, status = failed.outcome, failed.reason, failed.status
        except Exception as err:  # aiohttp's errors: the connection, the handshake, the framing
            outcome, reason, status = _classify(err)
        exchange.status_code = status
        exchange.body_bytes = session.received
        exchange.body_excerpt = self.redact(clients._excerpt(session.last_message))
        # End to end: to the final transcript (WhisperLive's waits for quiet after it, then closes).
        elapsed = ((session.final_at if outcome == clients.SUCCESS and session.final_at else time.perf_counter())
                   - session.started)
        times = session.times(self.pace, pcm.seconds)
        if outcome == clients.SUCCESS and session.text is None:
            outcome, reason = clients.CONNECTION_ERROR, "the server closed the session before the transcript"
        if outcome != clients.SUCCESS:
            return clients.TranscribeResult(outcome, elapsed, status, self.redact(reason), None, exchange,
                                            stream=times)
        text = session.text or ""
        return clients.TranscribeResult(clients.SUCCESS, elapsed, status, "", clients.Transcription(
            text=transport.safe_text(text[:clients.MAX_TEXT_CHARS]),
            language=clients.language_code(session.language)), exchange, stream=times)

    def _describe_fields(self, language: Optional[str]) -> dict[str, str]:
        return {"language": language or "not given", "pace": f"{self.pace:g}"}

    async def _run(self, pcm: Pcm, language: Optional[str], session: _Session) -> None:
        import aiohttp  # only a setup that streams pays for it (it is the web server's too)

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as http:
            async with http.ws_connect(self.ws_url(language), headers=self._headers_out(),
                                       max_msg_size=MAX_MESSAGE_BYTES, autoping=True) as ws:
                await self._converse(ws, pcm, language, session)

    async def _converse(self, ws: Any, pcm: Pcm, language: Optional[str], session: _Session) -> None:
        raise NotImplementedError

    async def _read(self, ws: Any, session: _Session) -> Optional[Any]:
        """The next message's JSON; None when the server closed. Bounded in size and in total."""
        import aiohttp

        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return None
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise _Failed(clients.BAD_RESPONSE, f"the WebSocket failed: {type(ws.exception()).__name__}: "
                          f"{str(ws.exception())[:120]}")
        raw = msg.data.encode("utf-8", "replace") if isinstance(msg.data, str) else bytes(msg.data)
        session.received += len(raw)
        session.last_message = raw[:2000]
        if session.received > MAX_RECEIVED_BYTES:
            raise _Failed(clients.BAD_RESPONSE, f"the server sent more than {MAX_RECEIVED_BYTES} bytes")
        if msg.type != aiohttp.WSMsgType.TEXT:
            return {}  # a binary message: nothing these protocols send to a client
        try:
            return json.loads(msg.data)
        except ValueError:
            raise _Failed(clients.BAD_RESPONSE, f"a message is not JSON: {clients._excerpt(raw)[:80]!r}") from None
        except RecursionError:
            raise _Failed(clients.BAD_RESPONSE, "a message's JSON is nested too deep") from None

    async def _paced(self, session: _Session, chunks: list[tuple[float, bytes]], send: Any,
                     stop: asyncio.Event) -> None:
        """Send each chunk when it is due (`chunks` hold the offset of each one's end: a microphone client
        sends a chunk once it has been spoken), at real time / pace; stops early when `stop` is set."""
        session.first_audio = time.perf_counter()
        loop = asyncio.get_running_loop()
        begun = loop.time()
        for offset, chunk in chunks:
            delay = begun + send_time(offset, self.pace) - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if stop.is_set():
                return
            await send(chunk)


def _classify(err: BaseException) -> tuple[str, str, Optional[int]]:
    """(outcome, reason, HTTP status) of an aiohttp failure."""
    import aiohttp

    if isinstance(err, aiohttp.WSServerHandshakeError):
        return clients.HTTP_ERROR, f"the WebSocket handshake was refused: HTTP {err.status}", err.status
    if isinstance(err, aiohttp.ClientConnectorError):
        errno = getattr(err.os_error, "errno", None)  # asyncio words it "Connect call failed (...)"
        why = os.strerror(errno).lower() if isinstance(errno, int) and errno > 0 else \
            transport.connection_reason(err.os_error)
        return clients.CONNECTION_ERROR, f"cannot connect: {why}", None
    if isinstance(err, (aiohttp.ClientError, OSError)):
        return clients.CONNECTION_ERROR, f"the connection broke: {type(err).__name__}", None
    if isinstance(err, ValueError):
        return clients.CONNECTION_ERROR, f"invalid URL: {err}", None
    raise err


def _text(value: Any, limit: int = 200) -> str:
    return transport.safe_text(str(value)[:limit])


class RealtimeClient(WebSocketClient):
    """OpenAI Realtime transcription (speaches' /v1/realtime): base64 PCM16 24 kHz, manual commit."""

    api = "openai-realtime"
    path = "/v1/realtime"
    RATE = 24000  # the Realtime API's pcm16 rate

    def endpoint_url(self) -> str:
        base = self._url[: -len("/v1")] if self._url.endswith("/v1") else self._url
        return base + self.path

    def _query(self, language):
        query = {"model": self.model, "intent": "transcription"}
        if language:
            query["language"] = language
        return urlencode(query)

    def _headers_out(self):
        return {"OpenAI-Beta": "realtime=v1", **super()._headers_out()}

    async def _converse(self, ws, pcm, language, session):
        audio = mono16(pcm, self.RATE)
        step = int(self.RATE * CHUNK_SECONDS) * 2
        chunks = [((i + len(audio[i:i + step])) / (2.0 * self.RATE), audio[i:i + step])
                  for i in range(0, len(audio), step)]
        transcription: dict[str, Any] = {"model": self.model}
        if language:
            transcription["language"] = language
        await ws.send_json({"type": "session.update", "session": {
            "input_audio_transcription": transcription, "turn_detection": None}})
        done = asyncio.Event()

        async def send(chunk: bytes) -> None:
            await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})

        async def sender() -> None:
            await self._paced(session, chunks, send, done)
            if not done.is_set():
                await ws.send_json({"type": "input_audio_buffer.commit"})
                session.audio_end = time.perf_counter()

        task = asyncio.ensure_future(sender())
        try:
            while session.text is None:
                event = await self._read(ws, session)
                if event is None:
                    break
                kind = event.get("type") if isinstance(event, dict) else None
                if kind == "conversation.item.input_audio_transcription.delta":
                    session.partial()
                elif kind == "conversation.item.input_audio_transcription.completed":
                    transcript = event.get("transcript")
                    if not isinstance(transcript, str):
                        raise _Failed(clients.BAD_RESPONSE, 'the completed event has no "transcript" string')
                    session.text, session.final_at = transcript, time.perf_counter()
                    session.audio_end = session.audio_end or session.final_at
                elif kind == "conversation.item.input_audio_transcription.failed":
                    error = event.get("error") if isinstance(event.get("error"), dict) else {}
                    raise _Failed(clients.BAD_RESPONSE, f"the transcription failed: {_text(error.get('message'))}")
                elif kind == "error":
                    error = event.get("error") if isinstance(event.get("error"), dict) else {}
                    raise _Failed(clients.BAD_RESPONSE, f"the server reported an error: "
                                  f"{_text(error.get('type', ''))}: {_text(error.get('message', ''))}")
        finally:
            done.set()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class WhisperLiveClient(WebSocketClient):
    """collabora/WhisperLive: options JSON, SERVER_READY, float32 16 kHz frames, END_OF_AUDIO."""

    api = "whisperlive"
    RATE = 16000
    END_OF_AUDIO = b"END_OF_AUDIO"

    def endpoint_url(self) -> str:
        return self._url

    def _describe_fields(self, language):
        return {**super()._describe_fields(language), "model": self.model, "use_vad": "false"}

    async def _converse(self, ws, pcm, language, session):
        uid = str(uuid.uuid4())
        await ws.send_str(json.dumps({"uid": uid, "language": language, "task": "transcribe", "model": self.model,
                                      "use_vad": False}))
        while not session.ready_at:
            message = await self._read(ws, session)
            if message is None:
                raise _Failed(clients.CONNECTION_ERROR, "the server closed the session before SERVER_READY")
            if not isinstance(message, dict):
                continue
            if message.get("status") == "WAIT":  # the server is full: its estimate of minutes to wait
                raise _Failed(clients.CONNECTION_ERROR, f"the server is full (WAIT, about "
                              f"{_text(message.get('message'), 20)} minutes)")
            if message.get("status") == "ERROR":
                raise _Failed(clients.BAD_RESPONSE, f"the server reported an error: {_text(message.get('message'))}")
            if message.get("message") == "SERVER_READY":
                session.ready_at = time.perf_counter()
        audio = float32(mono16(pcm, self.RATE))
        step = int(self.RATE * CHUNK_SECONDS) * 4
        chunks = [((i + len(audio[i:i + step])) / (4.0 * self.RATE), audio[i:i + step])
                  for i in range(0, len(audio), step)]
        completed: dict[float, str] = {}  # by start time: the server resends its last segments
        last_partial: list[str] = []
        sent = {"seconds": 0.0}
        done = asyncio.Event()

        async def send(chunk: bytes) -> None:
            await ws.send_bytes(chunk)
            sent["seconds"] += len(chunk) / (4.0 * self.RATE)

        async def sender() -> None:
            await self._paced(session, chunks, send, done)
            if done.is_set():
                return
            session.transcript_lag = max(0.0, sent["seconds"] - max(ends_seen)) if ends_seen else sent["seconds"]
            session.audio_end = time.perf_counter()
            # END_OF_AUDIO once the server has caught up: it drops what it has not transcribed yet.
            while not done.is_set():
                now = time.perf_counter()
                quiet = now - max(heard["at"], session.audio_end)
                left = min(SETTLE_SECONDS - quiet, session.audio_end + SETTLE_MAX - now)
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(done.wait(), left)
                except asyncio.TimeoutError:
                    pass
            if not done.is_set():
                await ws.send_bytes(self.END_OF_AUDIO)

        ends_seen: list[float] = []
        heard = {"at": 0.0, "segments": 0.0}  # when the last message, and the last segments, came
        task = asyncio.ensure_future(sender())
        try:
            while True:
                message = await self._read(ws, session)
                if message is None or (isinstance(message, dict) and message.get("message") == "DISCONNECT"):
                    break
                heard["at"] = time.perf_counter()
                segments = message.get("segments") if isinstance(message, dict) else None
                if not isinstance(segments, list) or not segments:  # an empty list says nothing (as in the tap)
                    continue
                heard["segments"] = heard["at"]
                session.partial()
                partial = ""
                for seg in segments[:MAX_SEGMENTS]:
                    if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
                        continue
                    start = clients._number(seg.get("start"))
                    end = clients._number(seg.get("end"))
                    if seg.get("completed") and start is not None and len(completed) < MAX_SEGMENTS:
                        completed[start] = seg["text"]
                        if end is not None:
                            ends_seen.append(end)
                    elif not seg.get("completed"):
                        partial = seg["text"]
                last_partial[:] = [partial]
        finally:
            done.set()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not session.audio_end:
            raise _Failed(clients.CONNECTION_ERROR, "the server closed the session before the audio ended")
        # The final transcript came with the last segments, not at the close after the wait for quiet
        # (none, as for a negative canary: it was final when the audio ended).
        session.final_at = max(heard["segments"], session.audio_end)
        texts = [completed[k].strip() for k in sorted(completed)]
        tail = (last_partial or [""])[0].strip()
        if tail and (not texts or texts[-1] != tail):
            texts.append(tail)
        session.text = " ".join(t for t in texts if t)
