"""The one small interface every collector implements, and the plugins that provide them.

A collector owns its state. The scheduler calls `update()` in the background on
the collector's interval; `update()` does the slow work (NVML, /proc, HTTP) and
raises on failure. At scrape time the exporter calls `families()`, which only
turns the latest state into metric families: no I/O, no waiting.

A collector whose `update()` fails must not keep serving stale readings: it
drops (or keeps, for counters) its state as befits its metrics, then raises.

Bundled and third-party collectors are found the same way: a `Plugin` named in
the entry-point group `whisper_exporter.collectors` (docs/plugins.md). Nothing
here imports a collector, so the import graph has no cycle. Their config sections are handed
to the configuration loader from here (`plugin_sections`), which imports nothing of the runtime.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol

from prometheus_client.core import Metric

from whisper_exporter import config

if TYPE_CHECKING:
    from whisper_exporter.runtime.shared import Shared

log = logging.getLogger("whisper_exporter.plugins")

GROUP = "whisper_exporter.collectors"
# The order sections are shown and started in: the bundled ones in a fixed order, then
# third-party plugins by name (entry points come in no order worth keeping).
BUNDLED_ORDER = ("gpu", "process", "logs", "probe", "quality", "tap")


def _ordered(names: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(names))
    rank = {name: i for i, name in enumerate(BUNDLED_ORDER)}
    return sorted(unique, key=lambda n: (rank.get(n, len(rank)), n))


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

    # Optional: stop_for_reload(), called instead of stop() when a reload replaces the collector
    # (the tap finishes its queued work then, bounded). Not in the Protocol: plugins need not have it.


@dataclass(frozen=True)
class Plugin:
    """What a collector module exports as `PLUGIN`: its name, its config section and its factory.

    `config` is a dataclass with defaults for every field and at least `enabled`,
    `interval` and `timeout`; it may define `check(self, where)` (see config.py).
    `factory(section, shared)` builds the collector from its validated section and
    the state shared by all collectors (runtime/shared.py).
    """

    name: str
    config: type
    factory: Callable[[Any, "Shared"], Collector]
    help: str = ""

    def run_timeout(self, section: Any) -> float:
        """The scheduler's watchdog for one run: the section's own `run_timeout`, else its timeout."""
        return float(getattr(section, "run_timeout", section.timeout))


def section_active(section: Any) -> bool:
    """Whether a section's collector runs: the section's own `active()` when it has one (gpu's
    `enabled: auto` looks for its library there), else its `enabled`."""
    active = getattr(section, "active", None)
    return bool(active()) if callable(active) else bool(section.enabled)


_plugins: Optional[dict[str, Plugin]] = None


def plugin_names() -> list[str]:
    """Names in the entry-point group, without importing any collector (for CLI flags)."""
    return _ordered(ep.name for ep in entry_points(group=GROUP))


def plugins() -> dict[str, Plugin]:
    """Every installed collector plugin by name, loaded once. A plugin that fails to load is
    logged and left out: one broken third-party package must not stop the exporter."""
    global _plugins
    if _plugins is None:
        found: dict[str, Plugin] = {}
        by_name = {ep.name: ep for ep in reversed(list(entry_points(group=GROUP)))}  # the first one wins
        for name in _ordered(by_name):
            ep = by_name[name]
            try:
                plugin = ep.load()
            except Exception:  # noqa: BLE001 - any import error of a third-party module
                log.exception("collector plugin %s (%s) failed to load; left out", ep.name, ep.value)
                continue
            if not isinstance(plugin, Plugin) or plugin.name != ep.name:
                log.error("collector plugin %s (%s) is not a Plugin named %r; left out", ep.name, ep.value, ep.name)
                continue
            found[ep.name] = plugin
        _plugins = found
    return _plugins


def plugin_sections() -> dict[str, type]:
    """Each installed plugin's config section by name: what the configuration loader validates."""
    return {name: plugin.config for name, plugin in plugins().items()}


config.provide_sections(plugin_sections)  # config.load/from_dict without sections= use these
