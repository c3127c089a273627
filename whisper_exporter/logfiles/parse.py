"""Log lines -> request records: the `json` and `regex` parsers, the presets, labels' value sets.

A parser turns one line (bytes, without its newline) into a `Record`, into None
for a line that is not about a request (a startup message, a debug line), or
raises `LineError(reason)` for a bad line. It keeps no state, and never raises
anything else for any input: the collector counts `LineError`s by reason.

The record's fields (what `fields:` in the configuration maps onto):

    endpoint        the request path (query string stripped later)
    status_code     HTTP status code
    language        Whisper language code or full name ("en", "english")
    duration        end-to-end request time          } seconds after the unit
    queue_wait      time spent waiting for a worker  } of the field is applied
    inference       time spent transcribing          } (s, ms or us)
    audio_duration  length of the audio              }
    model           model name (validated, not used as a label)
    error           a truthy value marks a failed request that has no status code
    audio_path      where the server kept the request's audio   } for production sampling
    transcript      the transcript it answered                  } (docs/quality.md)

A line is about a request when it has an endpoint or a status code (it is then
counted in whisper_requests_total), or any duration (observed, not counted);
other lines (startup messages; language, model or error alone) are not (None).

Durations must be finite numbers >= 0 (JSON numbers, or strings holding a
number: vLLM writes some durations as strings).
"""
from __future__ import annotations

import http
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

from whisper_exporter.whisper.languages import NO_LANGUAGE, WHISPER_LANGUAGES, language_code  # noqa: F401 (used by callers)

try:  # a third to a fifth of json.loads' cost on request-log lines; see benchmarks/bench_logs.py
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    JSON_LIBRARY = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    JSON_LIBRARY = "json"

RECORD_FIELDS = (
    "endpoint", "status_code", "language", "duration", "queue_wait",
    "inference", "audio_duration", "model", "error", "audio_path", "transcript",
)
DURATION_FIELDS = ("duration", "queue_wait", "inference", "audio_duration")
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}

# Why a line was rejected: the `reason` label of whisper_exporter_log_parse_errors_total.
REASONS = (
    "invalid_json",     # not JSON at all, or cut off
    "not_an_object",    # JSON, but not an object ({...})
    "invalid_utf8",
    "line_too_long",    # longer than max_line_bytes (counted by the follower)
    "wrong_type",       # a mapped field holds the wrong kind of value
    "negative_value",   # a negative duration
    "not_finite",       # NaN or infinite duration
)


class LineError(Exception):
    """A bad line. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Record(NamedTuple):
    endpoint: Optional[str]
    status_code: Union[int, str, None]
    language: Optional[str]
    duration: Optional[float]
    queue_wait: Optional[float]
    inference: Optional[float]
    audio_duration: Optional[float]
    model: Optional[str]
    error: Any
    audio_path: Optional[str] = None
    transcript: Optional[str] = None


_new = tuple.__new__  # Record(...) goes through a Python-level __new__; this does not
_INF = math.inf


def number(value: Any, scale: float) -> float:
    """A duration in seconds from a JSON value or a regex group. Raises LineError."""
    kind = type(value)
    if kind is float or kind is int:  # bool is its own type: rejected below
        x = value * scale
    elif kind is str:
        try:
            x = float(value) * scale
        except ValueError:
            raise LineError("wrong_type", f"not a number: {value[:40]!r}") from None
    else:
        raise LineError("wrong_type", f"a number expected, got {kind.__name__}")
    if 0.0 <= x < _INF:  # False for NaN too
        return x
    if x != x or x in (_INF, -_INF):
        raise LineError("not_finite", repr(value))
    raise LineError("negative_value", repr(value))


def check_label(value: Any, name: str) -> Any:
    """Label-like values are strings (the status code may also be an integer)."""
    kind = type(value)
    if kind is str or (kind is int and name == "status_code"):
        return value
    raise LineError("wrong_type", f"{name}: a string expected, got {kind.__name__}")


# ---------------------------------------------------------------------------
# Field mapping

@dataclass(frozen=True)
class FieldSpec:
    """Where a record field comes from: a dotted JSON path or a regex group, and its unit."""

    source: str
    unit: str = "s"

    @property
    def scale(self) -> float:
        return UNITS[self.unit]


def field_specs(mapping: Mapping[str, Any], defaults: Mapping[str, FieldSpec]) -> dict[str, FieldSpec]:
    """`defaults` overridden by `mapping` (config `fields:`): a string, an object with
    `field` and `unit`, or None to drop a default. Raises ValueError on unknown names."""
    specs = dict(defaults)
    for name, value in mapping.items():
        if name not in RECORD_FIELDS:
            raise ValueError(f"unknown record field {name!r} (one of {', '.join(RECORD_FIELDS)})")
        if value is None:
            specs.pop(name, None)
            continue
        source: Optional[str]
        if isinstance(value, str):
            source, unit = value, "s"  # a bare name is in seconds; {field, unit} for others
        else:  # LogField from the config, or a mapping in tests
            source = getattr(value, "field", None) or (value.get("field") if isinstance(value, dict) else None)
            unit = getattr(value, "unit", None) or (value.get("unit", "s") if isinstance(value, dict) else "s")
        if not source:
            raise ValueError(f"{name}: empty field name")
        if unit not in UNITS:
            raise ValueError(f"{name}: unit must be one of {', '.join(UNITS)}")
        if unit != "s" and name not in DURATION_FIELDS:
            raise ValueError(f"{name}: only durations have a unit")
        specs[name] = FieldSpec(source, unit)
    return specs


IDENTITY = {name: FieldSpec(name) for name in RECORD_FIELDS}


# ---------------------------------------------------------------------------
# JSON

class JsonParser:
    """One JSON object per line; record fields taken from (dotted) keys.

    The extraction function is generated once from the mapping, so a line costs
    one `loads` and a handful of dict lookups, with no per-field loop."""

    kind = "json"

    def __init__(self, fields: Mapping[str, FieldSpec]):
        self.fields = dict(fields)
        self._extract = _compile_json(self.fields)

    def parse(self, line: bytes) -> Optional[Record]:
        try:
            obj = _loads(line)
        except ValueError:  # orjson's and json's decode errors, UnicodeDecodeError
            if not line.strip():
                return None
            raise LineError(_json_failure(line)) from None
        if type(obj) is not dict:
            raise LineError("not_an_object", type(obj).__name__)
        return self._extract(obj)


def _json_failure(line: bytes) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


def _compile_json(fields: Mapping[str, FieldSpec]) -> Callable[[dict], Optional[Record]]:
    """Generate `extract(obj) -> Record | None` for this mapping.

    Key names enter the generated source only through repr(), so any string is safe."""
    lines = ["def extract(obj):"]
    present = []
    for i, name in enumerate(RECORD_FIELDS):
        spec = fields.get(name)
        var = f"v{i}"
        if spec is None:
            lines.append(f"    {var} = None")
            continue
        if name not in ("language", "model", "error", "audio_path", "transcript"):  # alone, not about a request
            present.append(var)
        parts = spec.source.split(".")
        if len(parts) == 1:
            lines.append(f"    {var} = obj.get({parts[0]!r})")
        else:
            lines.append(f"    {var} = obj.get({parts[0]!r})")
            for part in parts[1:]:
                lines.append(f"    {var} = {var}.get({part!r}) if type({var}) is dict else None")
        if name in DURATION_FIELDS:
            lines.append(f"    if {var} is not None: {var} = number({var}, {spec.scale!r})")
        elif name in ("endpoint", "status_code", "language", "model", "audio_path", "transcript"):
            lines.append(f"    if {var} is not None and type({var}) is not str: {var} = check_label({var}, {name!r})")
    if present:
        lines.append(f"    if {' is None and '.join(present)} is None: return None")
    values = ", ".join(f"v{i}" for i in range(len(RECORD_FIELDS)))
    lines.append(f"    return _new(Record, ({values}))")
    namespace = {"number": number, "check_label": check_label, "_new": _new, "Record": Record}
    exec(compile("\n".join(lines), "<json field mapping>", "exec"), namespace)  # noqa: S102 - see docstring
    extract: Callable[[dict], Optional[Record]] = namespace["extract"]  # type: ignore[assignment]
    return extract


# ---------------------------------------------------------------------------
# Regular expressions

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern
    constants: tuple[tuple[str, Any], ...] = ()  # record fields a match implies (a preset's endpoint)


class RegexParser:
    """Plain-text lines; the first pattern that matches (re.search) gives the record.

    A record field comes from the named group of the same name, or of the name
    `fields` maps it to. Lines no pattern matches are not request lines (None)."""

    kind = "regex"

    def __init__(self, patterns: list[Pattern], fields: Mapping[str, FieldSpec]):
        self.patterns = patterns
        self.fields = dict(fields)
        self._plans = []
        for p in patterns:
            groups = p.regex.groupindex
            plan = []
            for i, name in enumerate(RECORD_FIELDS):
                spec = self.fields.get(name)
                if spec is not None and spec.source in groups:
                    plan.append((i, spec.source, spec.scale if name in DURATION_FIELDS else None))
            consts = [(RECORD_FIELDS.index(k), v) for k, v in p.constants]
            self._plans.append((p.regex.search, tuple(plan), tuple(consts)))

    def parse(self, line: bytes) -> Optional[Record]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise LineError("invalid_utf8") from None
        if "\x1b" in text:  # colours, when the server's output went through a terminal
            text = _ANSI.sub("", text)
        for search, plan, consts in self._plans:
            m = search(text)
            if m is None:
                continue
            values: list[Any] = [None] * len(RECORD_FIELDS)
            for i, value in consts:
                values[i] = value
            for i, group, scale in plan:
                v = m.group(group)
                if v is None:
                    continue
                values[i] = number(v, scale) if scale is not None else v
            if values[0] is None and values[1] is None and all(v is None for v in values[3:7]):
                return None  # language, model or error alone: not about a request
            return _new(Record, values)
        return None


# ---------------------------------------------------------------------------
# Presets: formats of real servers' logs. Each has a sample under tests/data/logs/.

# uvicorn's access formatter: '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
#   INFO:     127.0.0.1:54321 - "POST /v1/audio/transcriptions HTTP/1.1" 200 OK
# (faster-whisper-server, speaches, whisper-asr-webservice, vLLM, most FastAPI servers;
# gunicorn with uvicorn workers prints the same after its own prefix).
UVICORN_ACCESS = (
    r'- "(?P<method>[A-Z]+) (?P<endpoint>\S+) HTTP/\d(?:\.\d)?" (?P<status_code>\d{3})\b'
)
# speaches (src/speaches/executors/whisper.py), after its log format
# '%(asctime)s:%(levelname)s:%(name)s:%(funcName)s:%(lineno)d:%(message)s':
#   ...:INFO:speaches.executors.whisper:handle_non_streaming_transcription_request:218:Transcribed 11.0 seconds of audio in 0.84 seconds
# The time covers the handler: VAD merge, model load when cold, transcription.
SPEACHES_TRANSCRIBED = (
    r":Transcribed (?P<audio_duration>[0-9.eE+-]+) seconds of audio in (?P<inference>[0-9.eE+-]+) seconds"
)
#   ...:VAD detected no speech in 3.2 seconds of audio, returning empty transcription
SPEACHES_NO_SPEECH = r":VAD detected no speech in (?P<audio_duration>[0-9.eE+-]+) seconds of audio"
# whisper.cpp's server (examples/server/server.cpp), once per request that decoded its audio:
#   operator(): processing 'jfk.wav' (176000 samples, 11.0 sec), 4 threads, 1 processors, lang = en, task = transcribe, timestamps = 1 ...
WHISPERCPP_PROCESSING = (
    r"processing '.*' \(\d+ samples, (?P<audio_duration>[0-9.]+) sec\), .*?lang = (?P<language>[A-Za-z_-]+)"
)
# ... and its answers to requests it could not process (HTTP 200 with an error body):
WHISPERCPP_FAILED = r"^error: (?:failed to read WAV file|no 'file' field in the request)|: failed to process audio$"


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # json | regex
    description: str
    patterns: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    fields: tuple[tuple[str, FieldSpec], ...] = ()


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "uvicorn-access", "regex",
            "uvicorn's access log: endpoint and status code of every request",
            patterns=((UVICORN_ACCESS, ()),),
            fields=tuple((n, FieldSpec(n)) for n in ("endpoint", "status_code")),
        ),
        Preset(
            "json-request", "json",
            "one JSON object per request, as the FastAPI middleware in docs/logs.md writes",
            fields=(
                ("endpoint", FieldSpec("path")),
                ("status_code", FieldSpec("status")),
                ("language", FieldSpec("language")),
                ("duration", FieldSpec("duration_ms", "ms")),
                ("queue_wait", FieldSpec("queue_ms", "ms")),
                ("inference", FieldSpec("inference_ms", "ms")),
                ("audio_duration", FieldSpec("audio_seconds", "s")),
                ("model", FieldSpec("model")),
                ("error", FieldSpec("error")),
            ),
        ),
        Preset(
            "speaches", "regex",
            "speaches' own log and uvicorn's access lines, as speaches prints them together: "
            "requests by endpoint and status, audio duration and processing time",
            patterns=((UVICORN_ACCESS, ()), (SPEACHES_TRANSCRIBED, ()), (SPEACHES_NO_SPEECH, ())),
            fields=tuple((n, FieldSpec(n)) for n in ("endpoint", "status_code", "audio_duration", "inference")),
        ),
        Preset(
            "whispercpp", "regex",
            "whisper.cpp's server output: one request per processed file, with audio duration and language",
            patterns=(
                (WHISPERCPP_PROCESSING, (("endpoint", "/inference"),)),
                (WHISPERCPP_FAILED, (("endpoint", "/inference"), ("error", "failed"))),
            ),
            fields=tuple((n, FieldSpec(n)) for n in ("audio_duration", "language")),
        ),
    )
}

FORMATS = ("json", "regex") + tuple(PRESETS)


def make_parser(format: str, pattern: Union[str, list[str], None] = None,
                fields: Optional[Mapping[str, Any]] = None) -> Union[JsonParser, RegexParser]:
    """The parser for one `logs.files[]` entry. Raises ValueError with what is wrong."""
    fields = fields or {}
    if format == "json":
        return JsonParser(field_specs(fields, IDENTITY))
    if format == "regex":
        sources = [pattern] if isinstance(pattern, str) else list(pattern or [])
        if not sources:
            raise ValueError("format regex needs a pattern")
        compiled = []
        for source in sources:
            try:
                compiled.append(Pattern(re.compile(source)))
            except re.error as err:
                raise ValueError(f"invalid regular expression {source!r}: {err}") from None
        specs = field_specs(fields, IDENTITY)
        groups = set().union(*(set(p.regex.groupindex) for p in compiled))
        if not any(spec.source in groups for spec in specs.values()):
            raise ValueError("the pattern has no named group for any record field "
                             f"(named groups: {', '.join(RECORD_FIELDS)}, or map them with fields)")
        return RegexParser(compiled, specs)
    preset = PRESETS.get(format)
    if preset is None:
        raise ValueError(f"unknown format {format!r} (one of {', '.join(FORMATS)})")
    if pattern:
        raise ValueError(f"format {format} is a preset: pattern is only for format regex")
    specs = field_specs(fields, dict(preset.fields))
    if preset.kind == "json":
        return JsonParser(specs)
    return RegexParser([Pattern(re.compile(p), consts) for p, consts in preset.patterns], specs)


# ---------------------------------------------------------------------------
# Bounded label values

OTHER = "other"
UNKNOWN = "unknown"  # the line did not say


# Paths of the Whisper servers' APIs (OpenAI-compatible, whisper-asr-webservice, whisper.cpp).
DEFAULT_ENDPOINTS = (
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech",
    "/v1/models", "/v1/realtime", "/v1/audio/transcriptions/stream",
    "/asr", "/detect-language", "/inference", "/load",
    "/health", "/healthz", "/ready", "/metrics", "/", "/docs", "/openapi.json",
)
DEFAULT_STATUS_CODES = tuple(int(s) for s in http.HTTPStatus)


def normalize_endpoint(value: str) -> str:
    path = value.split("?", 1)[0].split("#", 1)[0]
    if path.startswith(("http://", "https://")):  # an absolute-form request target
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path
