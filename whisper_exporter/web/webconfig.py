"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit web-config.yml format.

The same file node_exporter or blackbox_exporter take works here:

    tls_server_config: {cert_file, key_file, client_auth_type, client_ca_file, min_version, max_version}
    http_server_config: {headers: {Name: value}}
    basic_auth_users: {user: <bcrypt hash>}

Mistakes are ConfigErrors naming the file and key, like the main configuration.
"""
from __future__ import annotations

import hashlib
import hmac
import ssl
import threading
from base64 import b64decode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from whisper_exporter.config import ConfigError, read_yaml

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's client_auth_type values -> (verify mode, needs a client CA)
_CLIENT_AUTH = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_OPTIONAL, False),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, True),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
             "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}
# bcrypt reads at most 72 bytes of a password; the bcrypt package raises ValueError beyond that
# (and Go's, in exporter-toolkit, refuses them), so a longer one is checked clipped, then refused.
BCRYPT_MAX_PASSWORD = 72


@dataclass
class WebConfig:
    ssl_context: Optional[ssl.SSLContext] = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)


def _mapping(path: str, key: str, value: Any, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, key, "a mapping", value)
    for name in value:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(path, where, "a known key (one of " + ", ".join(sorted(allowed)) + ")")
    return value


def _file(path: str, key: str, value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, key, "a file path", value)
    resolved = base / value
    if not resolved.is_file():
        raise ConfigError(path, key, f"an existing file ({resolved} not found)")
    return str(resolved)


def _tls_context(path: str, tls: dict, base: Path) -> ssl.SSLContext:
    prefix = "tls_server_config"
    cert = _file(path, f"{prefix}.cert_file", tls.get("cert_file"), base)
    key = _file(path, f"{prefix}.key_file", tls.get("key_file"), base)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(path, f"{prefix}.cert_file", f"a PEM certificate matching key_file ({err})") from None
    for name in ("min_version", "max_version"):
        if tls.get(name) is not None:
            if tls[name] not in _TLS_VERSIONS:
                raise ConfigError(path, f"{prefix}.{name}", "one of " + ", ".join(_TLS_VERSIONS), tls[name])
            setattr(context, "minimum_version" if name == "min_version" else "maximum_version",
                    _TLS_VERSIONS[tls[name]])
    if tls.get("min_version") is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth not in _CLIENT_AUTH:
        raise ConfigError(path, f"{prefix}.client_auth_type", "one of " + ", ".join(_CLIENT_AUTH), auth)
    mode, needs_ca = _CLIENT_AUTH[auth]
    if tls.get("client_ca_file") is not None:
        ca = _file(path, f"{prefix}.client_ca_file", tls["client_ca_file"], base)
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(path, f"{prefix}.client_ca_file", f"a PEM CA bundle ({err})") from None
    elif needs_ca:
        raise ConfigError(path, f"{prefix}.client_ca_file", f"a CA file, required by client_auth_type {auth}")
    context.verify_mode = mode
    if tls.get("cipher_suites"):
        # Go's suite names do not map onto OpenSSL's; refusing beats silently ignoring.
        raise ConfigError(path, f"{prefix}.cipher_suites", "to be left out (OpenSSL's defaults apply here)")
    return context


def load_web_config(path: str) -> WebConfig:
    data = _mapping(path, "", read_yaml(path), {"tls_server_config", "http_server_config", "basic_auth_users"})
    base = Path(path).resolve().parent  # relative file names are relative to the web config
    web = WebConfig()
    tls = _mapping(path, "tls_server_config", data.get("tls_server_config"), _TLS_KEYS)
    if tls:
        web.ssl_context = _tls_context(path, tls, base)
    http = _mapping(path, "http_server_config", data.get("http_server_config"), {"http2", "headers"})
    headers = http.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(path, "http_server_config.headers", "a mapping of header names to strings", headers)
    web.headers = {str(k): v for k, v in headers.items()}
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ConfigError(path, "basic_auth_users", "a mapping of user names to bcrypt hashes")
    for user, hashed in users.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            # Never echo what was there: it might be a plain-text password.
            raise ConfigError(path, key, "a bcrypt hash ($2y$..., 60 characters), not a plain password")
        web.users[str(user)] = hashed.encode()
    return web


class BasicAuth:
    """WSGI middleware: HTTP basic auth against bcrypt hashes, with exporter-toolkit's habits.

    Successful checks are cached (bcrypt costs ~60 ms at cost 10, every scrape would pay it),
    keyed by a keyed hash of user, password and hash, so the cache holds no password.
    A failure says only 401 Unauthorized, whichever part was wrong.
    """

    def __init__(self, app: Callable, users: dict[str, bytes], open_paths: Iterable[str] = ()):
        import bcrypt  # only needed when auth is configured

        self._bcrypt = bcrypt
        self.app = app
        self.users = users
        self.open_paths = set(open_paths)
        self._secret = hashlib.sha256(repr(sorted(users.items())).encode() + b"whisper-exporter").digest()
        self._cache: set[bytes] = set()
        self._lock = threading.Lock()
        # Unknown users are checked against a dummy hash of a cost the configured users have, picked
        # by a keyed hash of the name: a made-up name then costs what some real user's check costs,
        # instead of a fixed cost that tells every user of another cost apart by timing.
        self._dummies: list[bytes] = []
        by_cost: dict[bytes, bytes] = {}
        for hashed in sorted(users.values()):
            cost = hashed[4:6]
            if cost not in by_cost:
                by_cost[cost] = bcrypt.hashpw(self._secret, bcrypt.gensalt(int(cost)))
            self._dummies.append(by_cost[cost])

    def _dummy(self, user: str) -> bytes:
        if not self._dummies:
            return self._bcrypt.hashpw(b"x", self._bcrypt.gensalt(4))
        pick = hmac.new(self._secret, user.encode("utf-8", "surrogateescape"), "sha256").digest()
        return self._dummies[int.from_bytes(pick[:4], "big") % len(self._dummies)]

    def _authorized(self, header: str) -> bool:
        return self.user(header) is not None

    def user(self, header: str) -> Optional[str]:
        """The user an Authorization header proves to be, else None."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        hashed = self.users.get(user)
        key = hmac.new(self._secret, f"{user}\0{password}\0".encode() + (hashed or b""), "sha256").digest()
        if hashed is not None and key in self._cache:
            return user
        secret = password.encode()
        too_long = len(secret) > BCRYPT_MAX_PASSWORD
        ok = (self._bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD], hashed or self._dummy(user))
              and hashed is not None and not too_long)
        if ok:
            with self._lock:
                if len(self._cache) > 1000:  # bounded: a flood of valid logins cannot grow it
                    self._cache.clear()
                self._cache.add(key)
        return user if ok else None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in self.open_paths:
            return self.app(environ, start_response)
        user = self.user(environ.get("HTTP_AUTHORIZATION", ""))
        if user is not None:
            return self.app(dict(environ, REMOTE_USER=user), start_response)  # who reviewed, for the review page
        body = b"Unauthorized\n"
        start_response("401 Unauthorized", [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("WWW-Authenticate", 'Basic realm="whisper-exporter"'),
        ])
        return [body]


def with_headers(app: Callable, headers: dict[str, str]) -> Callable:
    """WSGI middleware adding the configured response headers (HSTS, CSP, ...)."""
    if not headers:
        return app

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        def start(status: str, response_headers: list, exc_info: Any = None) -> Any:
            return start_response(status, list(response_headers) + list(headers.items()), exc_info)

        return app(environ, start)

    return wrapped
