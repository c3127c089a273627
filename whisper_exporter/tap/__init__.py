"""The request tap: an audio-aware reverse proxy in front of an unmodified Whisper server.

No prometheus_client here (collectors/tap.py renders the metrics). `config` imports
nothing heavy; `Tap` (aiohttp) is imported on first use.
"""
from __future__ import annotations

from typing import Any

from whisper_exporter.tap.config import TapConfig
from whisper_exporter.tap.record import TapRecord, TapStats

__all__ = ["Tap", "TapConfig", "TapRecord", "TapStats"]


def __getattr__(name: str) -> Any:
    if name == "Tap":  # aiohttp only when a tap is built
        from whisper_exporter.tap.proxy import Tap

        return Tap
    raise AttributeError(name)
