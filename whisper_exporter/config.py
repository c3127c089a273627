"""Configuration: one YAML file merged over built-in defaults, validated into dataclasses.

Every problem is a ConfigError that names the file, the key path
(`collectors.gpu.interval`) and what was expected; the CLI turns it into exit 2.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import reprlib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import yaml

DEFAULT_PORT = 10111  # see README "Why port 10111"
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


MASK = "<masked>"
# A header or key whose name suggests a credential: its value is never shown (status page,
# probe debug output, error messages). Over-masking a harmless header costs nothing.
SECRET_NAME = re.compile(
    r"auth|token|key|secret|cookie|session|pass(word|wd|phrase)?\b|passwd|signature|credential|"
    r"bearer|private|csrf|xsrf|jwt|sig\b", re.I)
# Key names whose values are names of secrets (a file, a variable), not secrets.
_NAMES_A_SECRET = re.compile(r"_(file|env|path|type)$")
MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few KiB; /dev/zero is not one
MAX_YAML_NODES = 100_000  # values after aliases are expanded (an alias bomb expands to billions)
MAX_YAML_DEPTH = 100  # nesting of mappings and lists


class ConfigError(Exception):
    def __init__(self, source: str, key: str, expected: str, got: Any = dataclasses.MISSING):
        self.source, self.key, self.expected = source, key, expected
        shown = "" if got is dataclasses.MISSING else f", got {_show(got, key)}"
        super().__init__(f"{source}: {key or '<top>'}: expected {expected}{shown}")


class ConfigErrors(ConfigError):
    """Every problem the walker found in one file, one per line; otherwise it reads as the first."""

    def __init__(self, errors: list[ConfigError]):
        self.__dict__.update(errors[0].__dict__)
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))


def each_error(err: ConfigError) -> list[ConfigError]:
    """The single problems in `err`: itself, or those a ConfigErrors holds."""
    return list(getattr(err, "errors", [err]))


def _raise_all(errors: list[ConfigError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 80, 80


def secret_name(name: Any) -> bool:
    """Whether a header or key called `name` holds a credential (X-Auth-Token, Proxy-Authorization ...)."""
    return bool(SECRET_NAME.search(str(name))) and not _NAMES_A_SECRET.search(str(name))


def _show(value: Any, key: str = "") -> str:
    """A value for an error message: short whatever its size (an expanded alias bomb is not
    rendered), credentials never (a header value, a key named like a secret, a URL's user info)."""
    parts = re.split(r"[.\[]", key)
    if any(secret_name(p) for p in parts[-1:]) or "headers" in parts:
        return MASK
    if isinstance(value, str):
        if "@" in value:  # user info of a URL, well-formed or not
            value = masked_url(value) if "://" in value else f"{MASK}@{value.rpartition('@')[2]}"
        text = repr(value[:80])
    else:
        text = _REPR.repr(value)
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


@dataclass(frozen=True)
class KeyPath:
    """Where a value sits in the configuration, for errors: the file and the dotted key path."""

    source: str
    key: str

    def child(self, name: str) -> "KeyPath":
        return KeyPath(self.source, f"{self.key}.{name}" if self.key else name)

    def error(self, name: str, expected: str, got: Any = dataclasses.MISSING) -> ConfigError:
        """A ConfigError about `name` under this path ("" for the path itself)."""
        key = self.child(name).key if name else self.key
        return ConfigError(self.source, key, expected, got)


def one_of(at: KeyPath, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise at.error(name, "one of " + ", ".join(choices), value)


def positive(at: KeyPath, name: str, value: float, what: str = "a duration greater than 0") -> None:
    """Raise unless `value` > 0."""
    if not value > 0:
        raise at.error(name, what, value)


def valid_regex(at: KeyPath, name: str, value: Optional[str]) -> None:
    """Raise unless `value` is None or compiles as a Python regular expression."""
    if value is None:
        return
    try:
        re.compile(value)
    except re.error as err:
        raise at.error(name, f"a valid regular expression ({err})", value) from None


# The Whisper server APIs, one client class each (whisper/clients.py); config, CLI and clients read this.
APIS = ("openai", "asr-webservice", "whispercpp", "wyoming", "openai-realtime", "whisperlive")
# Spoken to over a connection, the canary paced (whisper/wyoming.py, whisper/streaming_clients.py).
STREAMING_APIS = ("wyoming", "openai-realtime", "whisperlive")


@dataclass
class ServiceConfig:
    url: str = "http://127.0.0.1:8000"
    api: str = "openai"
    model: str = "whisper-1"
    timeout: Duration = Duration(60)
    api_key_env: Optional[str] = None
    api_key_file: Optional[str] = None
    headers: dict[str, str] = field(default_factory=dict)
    # Requests a batching server (vLLM) processes together at full speed; null: one at a time,
    # so capacity is throughput while busy (docs/capacity.md).
    max_concurrency: Optional[int] = None

    def check(self, at: KeyPath) -> None:
        one_of(at, "api", self.api, APIS)
        if self.api == "wyoming":  # a Wyoming server listens on TCP, not HTTP (port 10300 by default)
            if not re.fullmatch(r"tcp://[^/\s@]+(:\d+)?/?", self.url):
                raise at.error("url", "a tcp://host:port URL (api wyoming)", masked_url(self.url))
        elif self.api in STREAMING_APIS:  # WebSocket servers: ws:// as given, http:// turned into it
            if not re.match(r"^(https?|wss?)://[^/\s]+", self.url):
                raise at.error("url", f"an http(s):// or ws(s):// URL (api {self.api})", masked_url(self.url))
        elif not re.match(r"^https?://[^/\s]+", self.url):
            raise at.error("url", "an http:// or https:// URL", self.url)
        positive(at, "timeout", self.timeout)
        if self.max_concurrency is not None:
            positive(at, "max_concurrency", self.max_concurrency, "a whole number of requests, 1 or more, or null")


class Sections(types.SimpleNamespace):
    """The `collectors:` mapping: one validated section per installed collector plugin, by name."""

    def items(self) -> list[tuple[str, Any]]:
        return list(vars(self).items())

    def __getitem__(self, name: str) -> Any:
        return vars(self)[name]


# Collector name -> its section dataclass. The runtime knows the plugins and hands their sections
# over (runtime/collector.py): configuration never imports the runtime.
SectionTypes = Mapping[str, type]
_installed: Optional[Callable[[], SectionTypes]] = None


def provide_sections(source: Callable[[], SectionTypes]) -> None:
    """Set where the sections come from when a loader is not given them (the runtime's plugins)."""
    global _installed
    _installed = source


def section_types(sections: Optional[SectionTypes] = None) -> SectionTypes:
    """`sections` when given, else those the runtime provided."""
    if sections is not None:
        return sections
    if _installed is None:
        raise RuntimeError("no collector sections: pass sections= or import whisper_exporter.runtime.collector")
    return _installed()


def default_sections(sections: Optional[SectionTypes] = None) -> Sections:
    """Every collector's section with its built-in defaults."""
    return Sections(**{name: make() for name, make in section_types(sections).items()})


@dataclass
class Config:
    listen: Union[str, int] = DEFAULT_LISTEN  # an int only to say what is wrong with `listen: 10111`
    log_level: str = "info"
    service: ServiceConfig = field(default_factory=ServiceConfig)
    collectors: Sections = field(default_factory=default_sections)
    source: str = "<defaults>"  # where it came from, for messages; not a config key

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(str(self.listen))

    def check(self, at: KeyPath) -> None:
        one_of(at, "log_level", self.log_level, ("debug", "info", "warning", "error"))
        try:
            parse_listen(str(self.listen))
        except ValueError:
            raise at.error("listen", "an address HOST:PORT with a port from 0 (any free port) to 65535"
                           + listen_hint(self.listen), self.listen) from None
        self.listen = str(self.listen)
        # The one rule across sections: the tap's samples go to the quality collector's review queue.
        tap, quality = getattr(self.collectors, "tap", None), getattr(self.collectors, "quality", None)
        if tap is not None and tap.sample_dir and not (quality is not None and quality.production.queue):
            raise at.error("collectors.quality.production.queue",
                           "the review queue that collectors.tap.sample_dir's samples are listed in")
        # collectors.probe.via_tap sends the canaries to the tap, which must then be there.
        probe = getattr(self.collectors, "probe", None)
        if probe is not None and probe.enabled and getattr(probe, "via_tap", False):
            if self.service.api == "wyoming":
                raise at.error("collectors.probe.via_tap", "false with service.api wyoming (the tap "
                               "proxies HTTP; a Wyoming server is spoken to over TCP)", True)
            if tap is None or not tap.enabled:
                raise at.error("collectors.probe.via_tap", "false, or the request tap on to send the canaries "
                               "through (collectors.tap.enabled: true)", True)
            if tap.listen_address[1] == 0:
                raise at.error("collectors.probe.via_tap", "false, or a fixed port in collectors.tap.listen "
                               "for the canaries to be sent to (not 0)", True)


def listen_hint(value: Any) -> str:
    """What to write instead of a bare port number given as an address; "" otherwise."""
    text = str(value).strip()
    if text.isdigit():
        return f" (a bare number is not an address: write ':{text}' for every interface or '127.0.0.1:{text}')"
    return ""


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(source, key, tp, value)
    if tp is Duration:
        try:
            return Duration(parse_duration(value))
        except ValueError:
            raise ConfigError(source, key, "a duration such as 500ms, 15s, 2m or 1h", value) from None
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


def _build(source: str, prefix: str, cls: type, data: Any, sections: Optional[SectionTypes] = None) -> Any:
    """`cls` from the mapping `data`. Every problem is collected: one error raises a ConfigError,
    several a ConfigErrors. `sections` are the collector sections a `Sections` field holds."""
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, "a mapping of keys", data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    errors: list[ConfigError] = []
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else str(name)
            errors.append(ConfigError(source, where, "a known key (one of " + ", ".join(sorted(known)) + ")"))
    values = {}
    for name in [f.name for f in dataclasses.fields(cls) if f.name in known]:  # in field order
        key = f"{prefix}.{name}" if prefix else name
        try:
            if hints[name] is Sections:
                values[name] = _build_sections(source, key, data.get(name, {}), section_types(sections))
            elif name in data:
                values[name] = _convert(source, key, hints[name], data[name])
        except ConfigError as err:
            errors.extend(each_error(err))
    obj = cls(**values)  # the fields that failed keep their defaults, so check() can still look
    check = getattr(obj, "check", None)
    if check is not None:  # config types validate themselves, next to their fields
        try:
            check(KeyPath(source, prefix))
        except ConfigError as err:
            # A check tripping over a field that already failed would say the same thing again.
            failed = {e.key for e in errors}
            errors.extend(e for e in each_error(err) if e.key not in failed)
    _raise_all(errors)
    return obj


def _build_sections(source: str, key: str, data: Any, available: SectionTypes) -> Sections:
    """`collectors:`: each collector's section, validated like any other section."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, key, "a mapping of collector names to their settings", data)
    errors: list[ConfigError] = []
    for name in data:
        if name not in available:
            errors.append(ConfigError(source, f"{key}.{name}",
                                      "a known key (one of " + ", ".join(sorted(available)) + ")"))
    sections = Sections()
    for name, make in available.items():
        where = f"{key}.{name}"
        try:
            section = _build(source, where, make, data.get(name) or {}) if name in data else make()
            # What every section has, by the plugin contract (runtime/collector.py).
            at = KeyPath(source, where)
            positive(at, "interval", section.interval)
            positive(at, "timeout", section.timeout)
        except ConfigError as err:
            errors.extend(each_error(err))
            section = make()
        setattr(sections, name, section)
    _raise_all(errors)
    return sections


def from_dict(data: Any, source: str = "<config>", sections: Optional[SectionTypes] = None) -> Config:
    """The configuration in `data`, with the collector `sections` the caller knows (default: the runtime's)."""
    if data is None:
        data = {}
    config = _build(source, "", Config, data, sections)
    config.source = source
    return config


def warning(at: KeyPath, name: str, message: str) -> str:
    """One warning about `name` under `at`, placed as ConfigError places an error."""
    return f"{at.source}: {at.child(name).key if name else at.key}: {message}"


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but cannot work or do nothing, one sentence each: what `check-config`
    prints (and `--strict` fails on) and what `run` logs at start. Sections add theirs through an
    optional `warnings(self, at, config)` method."""
    at = KeyPath(config.source, "")
    out = []
    service = config.service
    if service.api_key_env and not os.environ.get(service.api_key_env, "").strip():
        out.append(warning(at.child("service"), "api_key_env",
                           f"the environment variable {service.api_key_env} is not set or empty here: "
                           "probe and the quality collector refuse to run without it"))
    if service.api_key_file and not service.api_key_env and not Path(service.api_key_file).expanduser().is_file():
        out.append(warning(at.child("service"), "api_key_file", f"{service.api_key_file}: no such file"))
    for name, section in config.collectors.items():
        hook = getattr(section, "warnings", None)
        if section.enabled and callable(hook):
            out.extend(hook(at.child("collectors").child(name), config))
    return out


class _BoundedLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing documents that expand (through aliases) or nest beyond bounds."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Counted here, before yaml's own recursion could reach Python's limit.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_bounds(node)
        return node


def _check_bounds(root: Any) -> None:
    """Raise yaml.YAMLError when the node graph, aliases expanded, has more than MAX_YAML_NODES
    values, nests deeper than MAX_YAML_DEPTH, or refers to itself. Linear in the graph, not
    in its expansion: each node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nesting deeper than {MAX_YAML_DEPTH} levels")
        known = sizes.get(id(node))
        if known is not None:
            return known
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            if id(node) in active:
                raise yaml.YAMLError("an alias that refers to itself")
            active.add(id(node))
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_YAML_NODES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values once aliases are expanded")
            active.discard(id(node))
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root, 0)


def read_yaml(path: str) -> Any:
    """The YAML document in the file at `path`. Raises ConfigError naming the file.

    Hostile files are refused, never read to exhaustion: only a regular file of at most
    MAX_CONFIG_BYTES (not /dev/zero, not a FIFO that never ends), and no document that
    expands through aliases to more than MAX_YAML_NODES values or nests deeper than
    MAX_YAML_DEPTH."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ConfigError(path, "", f"a readable file ({err.strerror})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(path, "", "a regular file (not a device, FIFO or directory)")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(path, "", f"a readable file ({err.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, "", f"a file of at most {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise ConfigError(path, "", f"YAML nested at most {MAX_YAML_DEPTH} levels deep") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, "", f"valid YAML{where} ({getattr(err, 'problem', None) or err})") from None


def load(path: Optional[str], sections: Optional[SectionTypes] = None) -> Config:
    """Built-in defaults, overridden by the YAML file at `path` when given."""
    if path is None:
        return Config(collectors=default_sections(sections))
    return from_dict(read_yaml(path), source=path, sections=sections)


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration for display. Holds only the names of secrets."""
    data = _plain(dataclasses.asdict(dataclasses.replace(config, collectors=Sections())))
    data.pop("source", None)
    data["collectors"] = {name: _plain(dataclasses.asdict(section)) for name, section in config.collectors.items()}
    data["service"]["url"] = masked_url(config.service.url)
    data["service"]["headers"] = masked_headers(config.service.headers)
    for section in data["collectors"].values():  # tap.upstream: the rule service.url has
        if isinstance(section, dict) and isinstance(section.get("upstream"), str):
            section["upstream"] = masked_url(section["upstream"])
    return data


def masked_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers with the value of every credential-like one (see SECRET_NAME) replaced."""
    return {name: MASK if secret_name(name) else value for name, value in headers.items()}


def masked_url(url: str) -> str:
    """The URL with its user info masked: http://user:<masked>@host, or http://<masked>@host for
    user info without a password (a token used as the user name)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unusable URL (a broken IPv6 literal): show none of it past the scheme
        scheme = url.partition("://")[0] if "://" in url else ""
        return f"{scheme}://{MASK}" if "@" in url else url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    shown = f"{user}:{MASK}" if colon and user else MASK
    return urlunsplit(parts._replace(netloc=f"{shown}@{hostport}"))


def _plain(value: Any) -> Any:
    """Durations back to the way users write them, so the result dumps as YAML."""
    if isinstance(value, Duration):
        return f"{value:g}s"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
