"""Clients for the Whisper servers' HTTP APIs, seen from outside like any user would.

Three HTTP API shapes (`service.api`), and `wyoming` (whisper/wyoming.py: the
Wyoming protocol over TCP, Home Assistant's, with the same `transcribe()`):

- `openai`: `POST {url}/v1/audio/transcriptions`, multipart `file` with form
  fields `model`, `language` and `response_format` (json or verbose_json):
  faster-whisper-server, speaches, vLLM. faster-whisper-server reads the model
  from the form field `model_name`, so both `model` and `model_name` are sent
  (the others ignore a field they do not know).
- `asr-webservice` (whisper-asr-webservice): `POST {url}/asr?output=json&task=transcribe&language=..`
  with multipart `audio_file`. It labels every answer text/plain, JSON or not,
  so the body decides; a body that is not JSON but labelled text/plain is its
  plain-text transcript. The model is chosen when that server starts.
- `whispercpp` (whisper.cpp's server): `POST {url}/inference`, multipart `file`
  with `response_format` and `language`. It answers `language` as a full name
  ("english"), has no `compression_ratio`, and reports its own failures as
  HTTP 200 with `{"error": ...}`. The model is chosen when that server starts.

`transcribe()` never raises for what the server does: it returns a
`TranscribeResult` whose `outcome` is success, http_error, timeout,
connection_error or bad_response, with the measured time and a reason.
It raises `ClientSetupError` for what is wrong on our side (an API key that
cannot be read).

Timing covers sending the request and reading the whole answer (the multipart
body is built before the clock starts). `timeout` is a total deadline for the
connection, the answer's headers and its body together: a server that drips a
byte at a time is cut off when it passes (requests' own timeout bounds each
read, not the request; whisper/transport.py).

A hostile answer under MAX_BODY_BYTES is bounded too: too many JSON objects or
values, or nesting too deep, is `bad_response`; the text is clipped to
MAX_TEXT_CHARS and the segments to MAX_SEGMENTS before anyone scores them, and
made safe to encode (a lone surrogate becomes "?").

Secrets: the API key (from `service.api_key_env` or `service.api_key_file`,
sent as `Authorization: Bearer ...`), the values of credential-like headers and
the password of a URL with user info are replaced by `<masked>` in every
reason, excerpt, URL and repr this module produces.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit, urlunsplit

import requests

from whisper_exporter.config import APIS, MASK, masked_headers, masked_url, secret_name
from whisper_exporter.whisper import languages, marker, transport

if TYPE_CHECKING:
    from whisper_exporter.whisper.streaming_clients import StreamTimes

SUCCESS = "success"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
OUTCOMES = (SUCCESS, HTTP_ERROR, TIMEOUT, CONNECTION_ERROR, BAD_RESPONSE)

RESPONSE_FORMATS = ("json", "verbose_json")
MAX_BODY_BYTES = 8 * 1024 * 1024  # a transcript of a canary is a few KiB
EXCERPT_CHARS = 300
USER_AGENT = "whisper-exporter"
# A hostile answer under MAX_BODY_BYTES must not cost the exporter what it costs to build and score
# it: 2.8 M empty segments took 690 MB, a 7.9 MB transcript 372 MB and 2.9 s (issue 12).
MAX_JSON_CONTAINERS = 100_000  # objects and arrays in one answer (words with timestamps: ~10k an hour)
MAX_JSON_VALUES = 1_000_000  # values in one answer, told by its commas
MAX_SEGMENTS = 10_000  # segments kept (a few hundred an hour)
MAX_TEXT_CHARS = 100_000  # of a transcript (an hour of speech is ~50k), clipped before scoring

# Whisper's language names (whisper/tokenizer.py) for answers that give a name, not a code.


class ClientSetupError(Exception):
    """Something on the exporter's side keeps the request from being made (never the server)."""


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__


def load_api_key(api_key_env: Optional[str], api_key_file: Optional[str]) -> Optional[Secret]:
    """The API key from the named environment variable, else from the file; None when neither
    is configured. Raises ClientSetupError naming the variable or file, never its content."""
    if api_key_env:
        value = os.environ.get(api_key_env, "").strip()
        if not value:
            raise ClientSetupError(f"service.api_key_env: environment variable {api_key_env} is not set or empty")
        return Secret(value)
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                value = f.read(64 * 1024).strip()
        except OSError as err:
            raise ClientSetupError(f"service.api_key_file: cannot read {api_key_file} ({err.strerror or type(err).__name__})") from None
        except UnicodeDecodeError:
            raise ClientSetupError(f"service.api_key_file: {api_key_file} is not UTF-8 text") from None
        if not value:
            raise ClientSetupError(f"service.api_key_file: {api_key_file} is empty")
        return Secret(value)
    return None


def language_code(value: Any) -> Optional[str]:
    """The answer's language as a Whisper code; an unknown two- or three-letter code is kept as sent."""
    code = languages.language_code(value)
    if code is None and isinstance(value, str) and re.fullmatch(r"[a-z]{2,3}", value.strip().lower()):
        return value.strip().lower()
    return code


def _number(value: Any) -> Optional[float]:
    """A finite float from a JSON number or numeric string (vLLM sends `duration` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class Segment:
    text: str = ""
    start: Optional[float] = None
    end: Optional[float] = None
    temperature: Optional[float] = None
    avg_logprob: Optional[float] = None
    compression_ratio: Optional[float] = None
    no_speech_prob: Optional[float] = None


@dataclass(frozen=True)
class Transcription:
    text: str
    language: Optional[str] = None  # a code, as the server reported it (None if it did not)
    duration: Optional[float] = None  # audio seconds, as the server reported it
    segments: tuple[Segment, ...] = ()


@dataclass
class Exchange:
    """What went over the wire, for the debug output. Secrets are masked."""

    method: str = "POST"
    url: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    file_field: str = "file"
    file_name: str = ""
    file_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # sent, credential-like ones masked
    status_code: Optional[int] = None
    content_type: Optional[str] = None
    body_bytes: int = 0
    body_excerpt: str = ""


@dataclass
class TranscribeResult:
    outcome: str  # one of OUTCOMES
    elapsed: float  # seconds from sending to the whole answer read (or to the failure)
    status_code: Optional[int] = None  # None when no answer came back
    reason: str = ""  # why it failed, "" on success
    transcription: Optional[Transcription] = None
    exchange: Exchange = field(default_factory=Exchange)
    stream: Optional["StreamTimes"] = None  # the streaming APIs' timings (whisper/streaming_clients.py)

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS


class _BadResponse(Exception):
    pass


def _excerpt(body: bytes) -> str:
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


class WhisperClient:
    """Base: one transcription request per call, a fresh connection each time."""

    api = ""
    endpoint = ""
    file_field = "file"

    def __init__(
        self,
        url: str,
        model: str = "whisper-1",
        timeout: float = 30.0,
        headers: Optional[dict[str, str]] = None,
        api_key: Optional[Secret] = None,
        response_format: str = "verbose_json",
    ):
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}")
        self.model = model
        self.timeout = float(timeout)
        self.response_format = response_format
        self._headers = dict(headers or {})
        self._api_key = api_key
        self._secrets: list[str] = []
        parts = urlsplit(url.rstrip("/"))
        if parts.password:
            self._secrets.append(parts.password)
        if parts.username and parts.password is None:  # a user name alone (http://TOKEN@host) is a token
            self._secrets.append(parts.username)
        self._url = urlunsplit(parts)
        for name, value in self._headers.items():
            if secret_name(name) and value:
                self._secrets.append(value)
        if "@" in parts.netloc and (api_key is not None or any(n.lower() == "authorization" for n in self._headers)):
            # requests would send the user info as Basic auth in place of the Bearer key or the
            # configured Authorization header, silently: one of them would never reach the server.
            raise ClientSetupError("service.url has user info (user:password@) and an API key or an "
                                   "Authorization header is configured too: both would be sent as the "
                                   "Authorization header; keep one")
        if api_key is not None:
            self._secrets.append(api_key.reveal())
        self._secrets.append(marker.VALUE)  # the canary token: whoever holds it passes as the exporter
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in self._secrets if len(s) >= 3}, key=len, reverse=True)

    @property
    def url(self) -> str:
        """The base URL, user info masked."""
        return self.redact(masked_url(self._url))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r}, timeout={self.timeout:g})"

    def endpoint_url(self) -> str:
        base = self._url
        # A base URL given as ".../v1" (the OpenAI client habit) must not become ".../v1/v1/...".
        if self.endpoint.startswith("/v1/") and base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + self.endpoint

    # -- what each API differs in --------------------------------------------------

    def _form(self, language: Optional[str]) -> tuple[dict[str, str], dict[str, str]]:
        """(query parameters, form fields) of the request."""
        raise NotImplementedError

    def _parse(self, body: bytes, content_type: str) -> Transcription:
        # Counted before parsing: json.loads would build every one of them first.
        containers = body.count(b"{") + body.count(b"[")
        if containers > MAX_JSON_CONTAINERS or body.count(b",") > MAX_JSON_VALUES:
            raise _BadResponse(f"the answer has more than {MAX_JSON_CONTAINERS} JSON objects and arrays "
                               f"or {MAX_JSON_VALUES} values")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _BadResponse(f"the answer is not JSON (Content-Type {content_type or 'none'})") from None
        except RecursionError:
            raise _BadResponse("the answer's JSON is nested too deep") from None
        return self._parse_json(data)

    def _parse_json(self, data: Any) -> Transcription:
        if not isinstance(data, dict):
            raise _BadResponse(f"the answer is JSON but not an object ({type(data).__name__})")
        text = data.get("text")
        if not isinstance(text, str):
            error = data.get("error") or data.get("detail")
            if error:
                message = error.get("message", error) if isinstance(error, dict) else error
                raise _BadResponse(f"the server reported an error: {transport.safe_text(str(message)[:200])}")
            raise _BadResponse('the answer has no "text" string')
        segments = []
        raw_segments = data.get("segments")
        if isinstance(raw_segments, list):
            for raw in raw_segments[:MAX_SEGMENTS]:
                if not isinstance(raw, dict):  # e.g. a faster-whisper Segment dumped as a list
                    continue
                segments.append(Segment(
                    text=transport.safe_text(raw["text"][:MAX_TEXT_CHARS]) if isinstance(raw.get("text"), str) else "",
                    start=_number(raw.get("start")),
                    end=_number(raw.get("end")),
                    temperature=_number(raw.get("temperature")),
                    avg_logprob=_number(raw.get("avg_logprob")),
                    compression_ratio=_number(raw.get("compression_ratio")),
                    no_speech_prob=_number(raw.get("no_speech_prob")),
                ))
        return Transcription(
            text=transport.safe_text(text[:MAX_TEXT_CHARS]),
            language=language_code(data.get("language")),
            duration=_number(data.get("duration")),
            segments=tuple(segments),
        )

    # -- the request -----------------------------------------------------------------

    def transcribe(self, audio: bytes, filename: str = "audio.wav", language: Optional[str] = None) -> TranscribeResult:
        params, fields = self._form(language)
        # Marked as the exporter's own: the tap reads the header, access logs print the query.
        params = {**params, marker.QUERY: marker.VALUE}
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **self._headers, marker.HEADER: marker.VALUE}
        if self._api_key is not None:
            headers["Authorization"] = "Bearer " + self._api_key.reveal()
        url = self.endpoint_url()
        exchange = Exchange(
            url=self.redact(masked_url(requests.Request("GET", url, params=params).prepare().url or url)),
            fields={k: self.redact(v) for k, v in fields.items()},
            file_field=self.file_field,
            file_name=os.path.basename(filename),
            file_bytes=len(audio),
            headers={k: self.redact(v) for k, v in masked_headers(headers).items()},
        )
        session = requests.Session()
        session.trust_env = False  # no proxies or .netrc credentials from the environment
        session.mount("http://", transport.DeadlineAdapter())
        session.mount("https://", transport.DeadlineAdapter())
        try:
            prepared = session.prepare_request(requests.Request(
                "POST", url, params=params, data=fields, headers=headers,
                files={self.file_field: (os.path.basename(filename), audio, "application/octet-stream")},
            ))
        except requests.RequestException as err:  # an unusable URL: nothing was sent
            session.close()
            return TranscribeResult(CONNECTION_ERROR, 0.0, reason=self.redact(f"invalid request: {err}"), exchange=exchange)
        started = time.perf_counter()
        deadline = started + self.timeout
        try:
            with transport.Watchdog(deadline) as dog:
                return self._send(session, prepared, started, dog, exchange)
        finally:
            session.close()

    def _send(self, session: requests.Session, prepared: requests.PreparedRequest, started: float,
              dog: transport.Watchdog, exchange: Exchange) -> TranscribeResult:
        def failed(outcome: str, reason: str, status: Optional[int] = None) -> TranscribeResult:
            return TranscribeResult(outcome, time.perf_counter() - started, status, self.redact(reason), exchange=exchange)

        try:
            response = session.send(prepared, timeout=(self.timeout, self.timeout), stream=True, allow_redirects=False)
        except requests.Timeout:
            return failed(TIMEOUT, f"no answer within {self.timeout:g}s")
        except requests.ConnectionError as err:
            if dog.expired:
                return failed(TIMEOUT, f"the answer did not arrive in full within {self.timeout:g}s")
            if transport.is_read_timeout(err):
                return failed(TIMEOUT, f"no answer within {self.timeout:g}s")
            return failed(CONNECTION_ERROR, f"cannot connect: {transport.connection_reason(err)}")
        except requests.RequestException as err:
            if dog.expired:
                return failed(TIMEOUT, f"the answer did not arrive in full within {self.timeout:g}s")
            return failed(CONNECTION_ERROR, f"request failed: {type(err).__name__}")
        with response:
            status = response.status_code
            exchange.status_code = status
            exchange.content_type = response.headers.get("Content-Type")
            chunks, size = [], 0
            try:
                for chunk in response.iter_content(64 * 1024):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        exchange.body_bytes = size
                        return failed(BAD_RESPONSE, f"the answer is larger than {MAX_BODY_BYTES} bytes", status)
            except (requests.RequestException, OSError) as err:
                exchange.body_bytes = size
                if dog.expired:
                    return failed(TIMEOUT, f"the answer did not arrive in full within {self.timeout:g}s", status)
                if transport.is_read_timeout(err):
                    return failed(TIMEOUT, f"the answer stopped arriving for {self.timeout:g}s", status)
                return failed(CONNECTION_ERROR, f"the connection broke while reading the answer: {transport.connection_reason(err)}", status)
            if dog.expired:  # the shutdown may read as a short body
                exchange.body_bytes = size
                return failed(TIMEOUT, f"the answer did not arrive in full within {self.timeout:g}s", status)
        elapsed = time.perf_counter() - started
        body = b"".join(chunks)
        exchange.body_bytes = len(body)
        exchange.body_excerpt = self.redact(_excerpt(body))
        content_type = (exchange.content_type or "").split(";")[0].strip().lower()
        if not 200 <= status < 300:
            reason = f"HTTP {status}"
            if 300 <= status < 400 and response.headers.get("Location"):
                reason += f", redirected to {response.headers['Location']} (redirects are not followed)"
            elif exchange.body_excerpt:
                reason += f": {exchange.body_excerpt[:200]}"
            return TranscribeResult(HTTP_ERROR, elapsed, status, self.redact(reason), exchange=exchange)
        try:
            transcription = self._parse(body, content_type)
        except _BadResponse as err:
            reason = str(err)
            if exchange.body_excerpt and "server reported" not in reason:
                reason += f": {exchange.body_excerpt[:120]}"
            return TranscribeResult(BAD_RESPONSE, elapsed, status, self.redact(reason), exchange=exchange)
        return TranscribeResult(SUCCESS, elapsed, status, "", transcription, exchange)


class OpenAIClient(WhisperClient):
    api = "openai"
    endpoint = "/v1/audio/transcriptions"

    def _form(self, language):
        fields = {"model": self.model, "model_name": self.model, "response_format": self.response_format}
        if language:
            fields["language"] = language
        return {}, fields


class AsrWebserviceClient(WhisperClient):
    api = "asr-webservice"
    endpoint = "/asr"
    file_field = "audio_file"

    def _form(self, language):
        params = {"task": "transcribe", "output": "json", "encode": "true"}
        if language:
            params["language"] = language
        return params, {}

    def _parse(self, body, content_type):
        try:
            return super()._parse(body, content_type)
        except _BadResponse:
            # Its answers are all labelled text/plain; one that is not JSON is the txt output.
            stripped = body.lstrip()[:1]
            if content_type == "text/plain" and stripped not in (b"{", b"[", b"<"):
                try:
                    return Transcription(text=body.decode("utf-8").strip()[:MAX_TEXT_CHARS])
                except UnicodeDecodeError:
                    pass
            raise


class WhisperCppClient(WhisperClient):
    api = "whispercpp"
    endpoint = "/inference"

    def _form(self, language):
        fields = {"response_format": self.response_format}
        if language:
            fields["language"] = language
        return {}, fields


_CLIENTS = {c.api: c for c in (OpenAIClient, AsrWebserviceClient, WhisperCppClient)}
# The streaming APIs' clients live in their own modules, which import this one (module:class).
_STREAMING_CLIENTS = {"wyoming": "whisper_exporter.whisper.wyoming:WyomingClient",
                      "openai-realtime": "whisper_exporter.whisper.streaming_clients:RealtimeClient",
                      "whisperlive": "whisper_exporter.whisper.streaming_clients:WhisperLiveClient"}


def make_client(service: Any, *, url: Optional[str] = None, timeout: Optional[float] = None,
                response_format: str = "verbose_json", pace: Optional[float] = None) -> WhisperClient:
    """The client for `service` (a ServiceConfig). `url` and `timeout` override its own; `pace`
    is the streaming APIs' (1.0: real time). Reads the API key now; raises ClientSetupError when it cannot."""
    if service.api in _STREAMING_CLIENTS:  # imported here: only a setup that uses one pays for it
        module, name = _STREAMING_CLIENTS[service.api].split(":")
        streaming = getattr(importlib.import_module(module), name)
        try:
            return streaming(url or service.url, model=service.model,
                             timeout=service.timeout if timeout is None else timeout,
                             headers=service.headers, api_key=load_api_key(service.api_key_env, service.api_key_file),
                             pace=1.0 if pace is None else pace)
        except ValueError as err:
            raise ClientSetupError(f"service.url: expected {err}, got {masked_url(url or service.url)!r}") from None
    cls = _CLIENTS.get(service.api)
    if cls is None:
        raise ClientSetupError(f"service.api: unknown API {service.api!r} (one of {', '.join(APIS)})")
    return cls(
        url=url or service.url,
        model=service.model,
        timeout=service.timeout if timeout is None else timeout,
        headers=service.headers,
        api_key=load_api_key(service.api_key_env, service.api_key_file),
        response_format=response_format,
    )
