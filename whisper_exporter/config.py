"""Configuration: one YAML file merged over built-in defaults, validated into dataclasses.

Every problem is a ConfigError that names the file, the key path
(`collectors.gpu.interval`) and what was expected; the CLI turns it into exit 2.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from whisper_exporter.tap.config import TapConfig

DEFAULT_PORT = 10111  # see README "Why port 10111"
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


class ConfigError(Exception):
    def __init__(self, source: str, key: str, expected: str, got: Any = dataclasses.MISSING):
        self.source, self.key, self.expected = source, key, expected
        shown = "" if got is dataclasses.MISSING else f", got {_show(got)}"
        super().__init__(f"{source}: {key or '<top>'}: expected {expected}{shown}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Duration(float):
    """Seconds, written in YAML as 15s, 500ms, 2m, 1h or a bare number of seconds."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' -> (host, port). Raises ValueError."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(value)
    host = host.strip("[]") or "0.0.0.0"
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
        ipaddress.ip_address(host)  # IPv6 literal; raises ValueError when invalid
    return host, int(port)


@dataclass
class ServiceConfig:
    url: str = "http://127.0.0.1:8000"
    api: str = "openai"
    model: str = "whisper-1"
    timeout: Duration = Duration(60)
    api_key_env: Optional[str] = None
    api_key_file: Optional[str] = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class GpuConfig:
    enabled: bool = True
    interval: Duration = Duration(5)
    timeout: Duration = Duration(3)
    devices: Union[str, list[int]] = "all"  # "all" or a list of indices
    xid_events: bool = True


@dataclass
class ProcessConfig:
    enabled: bool = True
    interval: Duration = Duration(5)
    timeout: Duration = Duration(3)
    match: Optional[str] = "faster-whisper|whisper|uvicorn"
    pid: Optional[int] = None
    pid_file: Optional[str] = None
    children: bool = True


@dataclass
class LogField:
    """Where a record field is in a log line: a dotted JSON path or a regex group, and its unit."""

    field: str = ""
    unit: str = "s"  # s | ms | us, for durations


@dataclass
class LogFile:
    path: str = ""  # a file or a glob; required
    format: str = "json"  # json | regex | a preset (see whisper_exporter/logparse.py PRESETS)
    pattern: Union[str, list[str], None] = None  # format regex: Python regular expression(s) with named groups
    # record field -> log field; overrides the format's defaults per field, null drops one
    fields: dict[str, Union[str, LogField, None]] = field(default_factory=dict)


@dataclass
class LogsConfig:
    enabled: bool = False
    interval: Duration = Duration(1)  # how often the files are polled
    timeout: Duration = Duration(10)
    start_at: str = "end"  # end | beginning: where files present at start-up are read from
    files: list[LogFile] = field(default_factory=list)
    # Allowed label values; anything else is counted as "other". null: the built-in sets.
    endpoints: Optional[list[str]] = None
    status_codes: Optional[list[int]] = None
    languages: Optional[list[str]] = None
    max_series: int = 5000  # endpoint x status x language combinations of whisper_requests_total
    max_line_bytes: int = 1048576  # longer lines are skipped and counted


@dataclass
class Canary:
    """One canary: audio with a known transcript, sent to the service as a user would."""

    audio: str = ""  # path; relative paths are relative to the config file's folder; required
    reference: str = ""  # what is said in it; required
    language: str = "en"  # a Whisper language code; also picks the normaliser and the unit
    name: Optional[str] = None  # the `probe` label; default: the audio file's name without suffix


@dataclass
class ProbeConfig:
    enabled: bool = True
    interval: Duration = Duration(60)
    timeout: Duration = Duration(30)  # for one canary's request (connect, answer, body)
    response_format: str = "verbose_json"  # json | verbose_json (openai and whispercpp APIs)
    max_error_rate: float = 0.5  # a transcript with a higher WER/CER counts as wrong_transcript
    canaries: list[Canary] = field(default_factory=list)  # empty: the bundled English canary

    @property
    def run_timeout(self) -> float:
        """The scheduler's watchdog for one run of every canary, one after another.

        A request may take up to three timeouts in the worst case (connecting, waiting for
        the answer, a body that stops arriving), plus reading the audio and scoring."""
        return max(1, len(self.canaries)) * (3 * self.timeout + 1.0) + 5.0


def canary_name(canary: Canary) -> str:
    return canary.name or Path(canary.audio).stem


@dataclass
class ProductionConfig:
    """Production sampling (docs/quality.md): the log collector queues, reviewers verify, we score."""

    queue: Optional[str] = None  # review queue (JSON lines) the log collector appends to; null: off
    references: Optional[str] = None  # verified references (JSON lines {"id", "reference"}) by reviewers
    fraction: float = 0.01  # of logged requests with audio path and transcript, per language x duration band
    max_queue: int = 1000  # items waiting; samples drawn while full are dropped and counted


@dataclass
class QualityConfig:
    enabled: bool = False
    interval: Duration = Duration(3600)
    timeout: Duration = Duration(60)  # for one utterance's request
    manifest: Optional[str] = None  # the labeled reference set (JSON lines or CSV)
    per_run: int = 50  # utterances per run, stratified by language and strata tags
    max_server_share: float = 0.1  # at most this share of wall time busy with our requests
    state_file: Optional[str] = None  # keeps the sampling cursor across restarts; null: in memory
    thresholds: dict[str, float] = field(default_factory=dict)  # language (or "default") -> max error rate
    production: ProductionConfig = field(default_factory=ProductionConfig)

    @property
    def run_budget(self) -> float:
        """A run stops sending new utterances after this long (the rest wait for the next run)."""
        return 0.9 * self.interval

    @property
    def run_timeout(self) -> float:
        """The scheduler's watchdog for one run: the budget, one request that began just before
        it ran out (up to three timeouts), and loading the manifest."""
        return self.run_budget + 3 * self.timeout + 60.0


@dataclass
class CollectorsConfig:
    gpu: GpuConfig = field(default_factory=GpuConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    tap: TapConfig = field(default_factory=TapConfig)


@dataclass
class Config:
    listen: str = DEFAULT_LISTEN
    log_level: str = "info"
    service: ServiceConfig = field(default_factory=ServiceConfig)
    collectors: CollectorsConfig = field(default_factory=CollectorsConfig)
    source: str = "<defaults>"  # where it came from, for messages; not a config key

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


# Checks beyond the type, by key path: (predicate, what was expected).
_CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "service.api": ("openai", "asr-webservice", "whispercpp"),
    "collectors.logs.start_at": ("end", "beginning"),
    "collectors.probe.response_format": ("json", "verbose_json"),
}


def _check_value(source: str, key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(source, key, "one of " + ", ".join(_CHOICES[key]), value)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "interval" and value <= 0:
        raise ConfigError(source, key, "a duration greater than 0", value)
    if key == "listen":
        try:
            parse_listen(value)
        except ValueError:
            raise ConfigError(source, key, "an address HOST:PORT with a port from 0 (any free port) to 65535", value)
    if key == "service.url" and not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(source, key, "an http:// or https:// URL", value)
    if key.endswith(".match") and value is not None:
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(source, key, f"a valid regular expression ({err})", value)
    if key.endswith(".devices") and isinstance(value, str) and value != "all":
        raise ConfigError(source, key, '"all" or a list of GPU indices', value)
    if key.startswith("collectors.logs."):
        _check_logs(source, key, value)
    if key.startswith("collectors.probe."):
        _check_probe(source, key, value)
    if key == "collectors.quality" or key.startswith("collectors.quality."):
        _check_quality(source, key, value)
    if key == "collectors.tap":
        try:
            value.check()
        except ValueError as err:  # "field: expected ..., got ..."
            name, _, expected = str(err).partition(": ")
            raise ConfigError(source, f"{key}.{name}", expected.removeprefix("expected "))


def config_dir(source: str) -> Path:
    """The folder relative paths in a configuration resolve against: the config file's own,
    or the working directory for the built-in defaults."""
    return Path(source).resolve().parent if source and not source.startswith("<") else Path.cwd()


def resolve_path(path: Optional[str], base: Path) -> Optional[str]:
    """`path` (with ~ expanded) made absolute against `base`; None and "" stay None."""
    if not path:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _canary_audio_problem(source: str, audio: str) -> Optional[str]:
    """Why the canary's audio cannot be used, or None. Relative paths are relative to the
    config file's folder, as the probe collector resolves them."""
    from whisper_exporter.audio import AudioError, duration_seconds  # mutagen only when canaries are set

    path = Path(resolve_path(audio, config_dir(source)))
    try:
        duration_seconds(path)
    except AudioError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


def _check_probe(source: str, key: str, value: Any) -> None:
    if key == "collectors.probe.timeout" and value <= 0:
        raise ConfigError(source, key, "a duration greater than 0", value)
    if key == "collectors.probe.max_error_rate" and value < 0:
        raise ConfigError(source, key, "an error rate of 0 or more (0.5 = one error in two words)", value)
    if key == "collectors.probe.canaries":
        names: dict[str, int] = {}
        for i, canary in enumerate(value):
            where = f"{key}[{i}]"
            if not canary.audio:
                raise ConfigError(source, f"{where}.audio", "the path of an audio file (WAV, FLAC, MP3, OGG)")
            if not canary.reference.strip():
                raise ConfigError(source, f"{where}.reference", "the text spoken in the audio")
            if not re.fullmatch(r"[a-z]{2,3}", canary.language):
                raise ConfigError(source, f"{where}.language", "a Whisper language code such as en, de, zh or yue",
                                  canary.language)
            problem = _canary_audio_problem(source, canary.audio)
            if problem:
                raise ConfigError(source, f"{where}.audio", f"a readable audio file ({problem})", canary.audio)
            name = canary_name(canary)
            if name in names:
                raise ConfigError(source, f"{where}.name",
                                  f"a name no other canary has ({key}[{names[name]}] is also {name!r})", name)
            names[name] = i


def _check_quality(source: str, key: str, value: Any) -> None:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "timeout" and value <= 0:
        raise ConfigError(source, key, "a duration greater than 0", value)
    if leaf in ("per_run", "max_queue") and value < 1:
        raise ConfigError(source, key, "a number greater than 0", value)
    if leaf == "max_server_share" and not 0 < value <= 1:
        raise ConfigError(source, key, "a share of the server's time above 0 and at most 1 (0.1 = 10%)", value)
    if leaf == "fraction" and not 0 <= value <= 1:
        raise ConfigError(source, key, "a fraction from 0 to 1 (0.01 = 1% of requests)", value)
    if key == "collectors.quality.thresholds":
        from whisper_exporter.manifest import language_code  # mutagen only when quality is configured

        for name, rate in value.items():
            if name != "default" and language_code(name) != name:
                raise ConfigError(source, f"{key}.{name}", "a Whisper language code (en, zh, yue ...) or default",
                                  name)
            if not 0 <= rate < float("inf"):
                raise ConfigError(source, f"{key}.{name}", "an error rate of 0 or more (0.1 = 10%)", rate)
    if key == "collectors.quality.production" and value.references and not value.queue:
        raise ConfigError(source, f"{key}.queue", "the review queue whose ids the references file names")
    if key == "collectors.quality" and value.enabled:
        if not value.manifest and not value.production.references:
            raise ConfigError(source, f"{key}.manifest",
                              "the labeled reference set to evaluate (or production.references to score)")
        if value.manifest:
            path = Path(resolve_path(value.manifest, config_dir(source)))
            if not path.is_file():
                raise ConfigError(source, f"{key}.manifest", f"a readable manifest file ({path} is not a file)",
                                  value.manifest)


def _check_logs(source: str, key: str, value: Any) -> None:
    from whisper_exporter import logparse  # no import cycle: logparse imports nothing of ours

    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("max_series", "max_line_bytes") and value < 1:
        raise ConfigError(source, key, "a number greater than 0", value)
    if leaf == "endpoints" and value is not None:
        for i, path in enumerate(value):
            if not path.startswith("/"):
                raise ConfigError(source, f"{key}[{i}]", "a path starting with /", path)
    if leaf == "status_codes" and value is not None:
        for i, code in enumerate(value):
            if not 100 <= code <= 599:
                raise ConfigError(source, f"{key}[{i}]", "an HTTP status code from 100 to 599", code)
    if leaf == "languages" and value is not None:
        for i, name in enumerate(value):
            if logparse.language_code(name) is None:
                raise ConfigError(source, f"{key}[{i}]", "a Whisper language code or name (en, english, yue)", name)
    if key == "collectors.logs.files":
        for i, entry in enumerate(value):
            where = f"{key}[{i}]"
            if not entry.path:
                raise ConfigError(source, f"{where}.path", "a file or glob to follow")
            if entry.format not in logparse.FORMATS:
                raise ConfigError(source, f"{where}.format", "one of " + ", ".join(logparse.FORMATS), entry.format)
            if entry.format == "regex" and not entry.pattern:
                raise ConfigError(source, f"{where}.pattern", "a regular expression with named groups (format regex)")
            for name, spec in entry.fields.items():
                if name not in logparse.RECORD_FIELDS:
                    raise ConfigError(source, f"{where}.fields.{name}",
                                      "a record field (one of " + ", ".join(logparse.RECORD_FIELDS) + ")")
                if isinstance(spec, LogField) and spec.unit not in logparse.UNITS:
                    raise ConfigError(source, f"{where}.fields.{name}.unit",
                                      "one of " + ", ".join(logparse.UNITS), spec.unit)
            try:
                logparse.make_parser(entry.format, entry.pattern, entry.fields)
            except ValueError as err:
                about_pattern = entry.format == "regex" and any(w in str(err) for w in ("pattern", "regular", "group"))
                raise ConfigError(source, f"{where}.{'pattern' if about_pattern else 'fields'}",
                                  f"a usable {entry.format} setting, but: {err}")


def _convert(source: str, key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`, converting durations and sections."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(source, key, option, value)
            except ConfigError as err:
                if err.key != key:  # the value had this option's shape; its inner error says more
                    raise
                errors.append(err.expected)
        raise ConfigError(source, key, " or ".join(errors), value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(source, key, "null", value)
    if dataclasses.is_dataclass(tp):
        return _build(source, key, tp, value)
    if tp is Duration:
        try:
            return Duration(parse_duration(value))
        except ValueError:
            raise ConfigError(source, key, "a duration such as 500ms, 15s, 2m or 1h", value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, "a list", value)
        (item_tp,) = typing.get_args(tp)
        return [_convert(source, f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, "a mapping", value)
        _, value_tp = typing.get_args(tp)
        return {str(k): _convert(source, f"{key}.{k}", value_tp, v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build(source: str, prefix: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, "a mapping of keys", data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(source, where, "a known key (one of " + ", ".join(sorted(known)) + ")")
    values = {}
    for name in known:
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(source, key, hints[name], data[name])
            _check_value(source, key, values[name])
    return cls(**values)


def from_dict(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    config = _build(source, "", Config, data)
    config.source = source
    return config


def read_yaml(path: str) -> Any:
    """The YAML document in the file at `path`. Raises ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(path, "", f"a readable file ({err.strerror})")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "UTF-8 text")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, "", f"valid YAML{where} ({getattr(err, 'problem', err)})")


def load(path: Optional[str]) -> Config:
    """Built-in defaults, overridden by the YAML file at `path` when given."""
    if path is None:
        return Config()
    return from_dict(read_yaml(path), source=path)


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration for display. Holds only the names of secrets."""
    data = _plain(dataclasses.asdict(config))
    data.pop("source", None)
    data["service"]["url"] = masked_url(config.service.url)
    headers = data["service"]["headers"]
    for name in headers:
        if name.lower() in ("authorization", "x-api-key", "api-key", "cookie"):
            headers[name] = "<masked>"
    return data


def masked_url(url: str) -> str:
    """The URL with the password of its user info (http://user:pw@host) replaced."""
    return re.sub(r"^([a-z]+://[^/@:\s]*):[^/@\s]*@", r"\1:<masked>@", url, flags=re.I)


def _plain(value: Any) -> Any:
    """Durations back to the way users write them, so the result dumps as YAML."""
    if isinstance(value, Duration):
        return f"{value:g}s"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
