"""Which request series are exported at 0 before their first request (docs/quality.md, "New series start at 0").

Prometheus takes a new series' first sample as its baseline, so a series that
first appears already counted hides that count from rate() and increase(). The
series whose labels can be known in advance are seeded: each work endpoint of
the configured API, by the common status codes, by the known languages (the
logs section's `languages` when set, else the canaries' and the reference
set's languages) and `unknown` (a request that names none). At most
MAX_SEEDED series of whisper_requests_total, so a long language list stays cheap.
"""
from __future__ import annotations

from typing import Any

from whisper_exporter.logfiles.parse import UNKNOWN
from whisper_exporter.runtime.requests import RequestMetrics
from whisper_exporter.whisper.languages import language_code

# The paths that transcribe, per service.api (whisper/clients.py); health and model lists are
# left to appear when first requested.
WORK_ENDPOINTS = {
    "openai": ("/v1/audio/transcriptions", "/v1/audio/translations"),
    "asr-webservice": ("/asr",),
    "whispercpp": ("/inference",),
}
# Success, a bad request, overload, the server's own failure, and the tap's answers when the
# upstream is down (502), refusing (503) or too slow (504).
COMMON_STATUS_CODES = (200, 400, 429, 500, 502, 503, 504)
MAX_SEEDED = 256  # series of whisper_requests_total seeded at most
BUNDLED_CANARY_LANGUAGE = "en"  # the bundled canaries' language (collectors/probe.py)


def known_languages(config: Any) -> list[str]:
    """The languages the traffic is expected in: configured, else those the exporter tests with."""
    collectors = config.collectors
    logs = getattr(collectors, "logs", None)
    if logs is not None and logs.languages:
        return _codes(logs.languages)
    found: list[str] = []
    probe = getattr(collectors, "probe", None)
    if probe is not None and probe.enabled:
        found += [c.language for c in probe.canaries] if probe.canaries else [BUNDLED_CANARY_LANGUAGE]
    quality = getattr(collectors, "quality", None)
    if quality is not None and quality.enabled and quality.manifest:
        found += _manifest_languages(config, quality.manifest)
    return _codes(found)


def _codes(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        code = language_code(name)
        if code is not None and code not in out:
            out.append(code)
    return out


def _manifest_languages(config: Any, manifest: str) -> list[str]:
    from whisper_exporter.config import config_dir, resolve_path
    from whisper_exporter.quality.manifest import ManifestError, load

    path = resolve_path(manifest, config_dir(config.source))
    try:
        return load(path, check_audio=False).languages() if path else []
    except (ManifestError, OSError):
        return []  # the quality collector reports it


def seed_requests(requests: RequestMetrics, config: Any, audio: bool) -> None:
    """Seed the request series known from `config`; `audio`: the source measures every request's audio."""
    endpoints = WORK_ENDPOINTS.get(config.service.api, WORK_ENDPOINTS["openai"])
    per_language = len(endpoints) * len(COMMON_STATUS_CODES)
    languages = ([UNKNOWN] + known_languages(config))[:max(1, MAX_SEEDED // per_language)]
    requests.seed(endpoints, COMMON_STATUS_CODES, languages, audio=audio)
