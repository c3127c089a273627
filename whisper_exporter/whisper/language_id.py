"""Language identification: what to send to ask the server to detect, and the bounded labels of its answer.

    mode = resolve_mode(section.language, service.api)   # given | detect | both
    fmt, send = DETECTION[service.api]                    # answer format, language field value
    detected_label(answer.language)                       # "de", "other" or "unknown"

given: items are sent with their language (no identification measured); detect: sent without it
and scored from that answer; both: sent with it (scored) and once more without it (identified only).
"""
from __future__ import annotations

from typing import Optional

from whisper_exporter.whisper.languages import NO_LANGUAGE, WHISPER_LANGUAGES, language_code

GIVEN, DETECT, BOTH = "given", "detect", "both"
MODES = (GIVEN, DETECT, BOTH)
OTHER = "other"  # a language outside Whisper's table
UNKNOWN = "unknown"  # the answer named no language

# API -> (response format whose answer names the language, what to send as `language` to ask for
# detection). OpenAI-style `json` and whisper.cpp's `json` carry the text alone; whisper.cpp uses
# the language it was started with (default en) unless the request says "auto".
DETECTION: dict[str, tuple[str, Optional[str]]] = {
    "openai": ("verbose_json", None),
    "asr-webservice": ("json", None),
    "whispercpp": ("verbose_json", "auto"),
}


def supports_detection(api: str) -> bool:
    """Whether answers of `api` name the language the server detected."""
    return api in DETECTION


def resolve_mode(mode: Optional[str], api: str) -> str:
    """The configured mode, or the default: both where the API reports a detected language."""
    if mode is not None:
        return mode
    return BOTH if supports_detection(api) else GIVEN


def response_format(mode: str, api: str) -> str:
    """The answer format to ask for: plain json unless the language must come back."""
    return DETECTION[api][0] if mode != GIVEN and api in DETECTION else "json"


def truth_label(language: str) -> str:
    """The `language` label of a labelled language: its Whisper code, else other."""
    code = language_code(language)
    return code if code is not None else OTHER


def detected_label(value: Optional[str]) -> str:
    """The `detected` label of an answer's language: a Whisper code, other, or unknown (none said)."""
    if value is None or value.strip().lower() in NO_LANGUAGE:
        return UNKNOWN
    code = language_code(value)
    return code if code in WHISPER_LANGUAGES else OTHER
