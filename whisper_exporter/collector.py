"""The one small interface every collector implements, and the registry by name.

A collector owns its state. The scheduler calls `update()` in the background on
the collector's interval; `update()` does the slow work (NVML, /proc, HTTP) and
raises on failure. At scrape time the exporter calls `families()`, which only
turns the latest state into metric families: no I/O, no waiting.

A collector whose `update()` fails must not keep serving stale readings: it
drops (or keeps, for counters) its state as befits its metrics, then raises.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

from prometheus_client.core import Metric


class Collector(Protocol):
    name: str

    def start(self) -> None:
        """Acquire long-lived resources (threads, handles). May raise."""

    def update(self) -> None:
        """Refresh state. Runs in a scheduler thread; raising marks the collector down."""

    def families(self) -> Iterable[Metric]:
        """Metric families from the latest state. Called at scrape time; must be cheap."""

    def stop(self) -> None:
        """Release resources. Must not raise."""


# name -> factory(section_config, exporter_config) -> Collector
Factory = Callable[[Any, Any], Collector]
_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a collector factory available under `name` in the config."""

    def wrap(factory: Factory) -> Factory:
        _FACTORIES[name] = factory
        return factory

    return wrap


def factories() -> dict[str, Factory]:
    # Importing the package registers every bundled collector.
    import collectors  # noqa: F401

    return dict(_FACTORIES)
