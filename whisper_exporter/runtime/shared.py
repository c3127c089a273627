"""State shared between collectors, built once in the wiring and handed to each factory.

Nothing here is a module-level singleton: two exporters in one process (tests,
a reload) each have their own `Shared`. What several collectors feed is
rendered once, by the runtime, so a family never appears twice in a scrape and
never vanishes because one of its feeders is overdue.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol

from prometheus_client.core import Metric

from whisper_exporter.config import Config, config_dir, resolve_path
from whisper_exporter.runtime.hallucination_counters import HallucinationCounters
from whisper_exporter.runtime.language_id_counters import LanguageIdCounters
from whisper_exporter.runtime.quality_counters import QualityCounters, review_queue_families
from whisper_exporter.runtime.recent import RecentRequests
from whisper_exporter.runtime.requests import Labels, RequestMetrics
from whisper_exporter.runtime.review_counters import ReviewCounters

if TYPE_CHECKING:
    from whisper_exporter.quality.sampling import ProductionSampler, ReviewQueue


class ProbeView(Protocol):
    """What the status page reads of the probe collector."""

    def recent_probes(self) -> dict[str, list[Any]]: ...


class QualityView(Protocol):
    """What the status page reads of the quality collector."""

    def worst_items(self) -> dict[str, list[Any]]: ...


class ProcessWatch:
    """The Whisper server's pids, as the process collector last found them (the GPU collector
    reads them to pick out the server's GPU memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: Optional[frozenset[int]] = None
        self.updated: Optional[float] = None  # time.monotonic() of the last publish

    def publish(self, pids: Iterable[int]) -> None:
        with self._lock:
            self._pids = frozenset(pids)
            self.updated = time.monotonic()

    def pids(self) -> set[int]:
        """The last set published; empty before the first scan."""
        with self._lock:
            return set(self._pids or ())


@dataclass
class Shared:
    config: Config
    quality: QualityCounters = field(default_factory=QualityCounters)
    requests: RequestMetrics = field(default_factory=RequestMetrics)
    process_watch: ProcessWatch = field(default_factory=ProcessWatch)
    review_queue: Optional["ReviewQueue"] = None
    reviews: ReviewCounters = field(default_factory=ReviewCounters)  # the review page's and the quality collector's
    quality_in_use: bool = False
    hallucinations: HallucinationCounters = field(default_factory=HallucinationCounters)
    hallucinations_in_use: bool = False
    language_id: LanguageIdCounters = field(default_factory=LanguageIdCounters)
    language_id_in_use: bool = False
    # Typed handles for the status page, set by the factories that build these collectors.
    probe_view: Optional[ProbeView] = None
    quality_view: Optional[QualityView] = None
    page_authenticated: bool = False  # the status page requires auth: it may show production text
    # Which collectors (by section name) hold a part a reload may replace ("requests", "sampler"),
    # noted while `building` names the collector whose factory runs: a reload that replaces a part
    # builds its holders anew, and only them.
    building: Optional[str] = None
    holders: dict[str, set[str]] = field(default_factory=dict)
    # What a collector's counters add up to across the reloads that build it anew, by section name
    # (the tap's: collectors/tap.py TapTotals); the same dict in every renewed() state, so they carry on.
    carried: dict[str, Any] = field(default_factory=dict)
    # The last minutes of the request metrics, for the status page's Service section; sampled on
    # each scrape and each page view.
    recent_requests: RecentRequests = field(init=False)

    def __post_init__(self) -> None:
        self.recent_requests = RecentRequests(self.requests)

    @classmethod
    def build(cls, config: Config) -> "Shared":
        """Everything shared, from the configuration: label bounds come from the logs section."""
        return cls(config, requests=_request_metrics(config), review_queue=_review_queue(config))

    def renewed(self, new: Config) -> tuple["Shared", set[str]]:
        """For a reload: the shared state for `new`, keeping every part whose inputs did not change
        (counters and all), and the collectors that hold a replaced part (to be built anew).
        `self` is left as it is, so a reload that fails keeps running on it."""
        parts: dict[str, Any] = {}
        rebuild: set[str] = set()
        if _request_inputs(new) != _request_inputs(self.config):
            parts["requests"] = _request_metrics(new)
            rebuild |= self.holders.get("requests", set())
        if _queue_inputs(new) != _queue_inputs(self.config):
            parts["review_queue"] = _review_queue(new)
        if _queue_inputs(new) != _queue_inputs(self.config) or _fraction(new) != _fraction(self.config):
            rebuild |= self.holders.get("sampler", set())
        renewed = dataclasses.replace(self, config=new, building=None,
                                      holders={part: set(names) for part, names in self.holders.items()}, **parts)
        if "requests" not in parts:
            renewed.recent_requests = self.recent_requests  # the same metrics: their recent history holds
        return renewed, rebuild

    def _hold(self, part: str) -> None:
        if self.building is not None:
            self.holders.setdefault(part, set()).add(self.building)

    def use_requests(self) -> RequestMetrics:
        """The request metrics, for a collector that feeds them (they are rendered from now on)."""
        self.requests.in_use = True
        # the capacity model (docs/capacity.md), for whichever source measures busy time: tap or log
        self.requests.max_concurrency = self.config.service.max_concurrency
        self._hold("requests")
        return self.requests

    def use_quality(self) -> QualityCounters:
        """The quality counters, for a collector that scores transcripts."""
        self.quality_in_use = True
        return self.quality

    def use_hallucinations(self) -> HallucinationCounters:
        """The hallucination counters, for a collector that sees transcripts."""
        self.hallucinations_in_use = True
        return self.hallucinations

    def use_language_id(self) -> LanguageIdCounters:
        """The language identification counters, for a collector that asks the server to detect."""
        self.language_id_in_use = True
        return self.language_id

    def production_sampler(self) -> Optional["ProductionSampler"]:
        """A sampler of real requests into the review queue, when `quality.production.queue` is set."""
        self._hold("sampler")  # asked for, even when there is none: a reload that adds a queue gives it one
        if self.review_queue is None:
            return None
        from whisper_exporter.quality.sampling import ProductionSampler

        return ProductionSampler(self.review_queue, self.config.collectors.quality.production.fraction)

    def families(self) -> Iterable[Metric]:
        """The families fed by several collectors, each rendered once."""
        if self.requests.in_use:
            self.recent_requests.sample()
            yield from self.requests.families()
        if self.quality_in_use:
            yield from self.quality.families()
        if self.hallucinations_in_use:
            yield from self.hallucinations.families()
        if self.language_id_in_use:
            yield from self.language_id.families()
        if self.review_queue is not None:
            yield from review_queue_families(self.review_queue)
            yield from self.reviews.families(self.review_queue)


def _request_inputs(config: Config) -> tuple:
    """What the request metrics are built from: the logs section's label bounds."""
    logs = getattr(config.collectors, "logs", None)
    return (logs.endpoints, logs.status_codes, logs.languages, logs.max_series) if logs else ()


def _request_metrics(config: Config) -> RequestMetrics:
    logs = getattr(config.collectors, "logs", None)
    labels = Labels(logs.endpoints, logs.status_codes, logs.languages) if logs else Labels(None, None, None)
    return RequestMetrics(labels, logs.max_series if logs else 5000)


def _queue_inputs(config: Config) -> tuple:
    """What the review queue is built from: its file and size."""
    quality = getattr(config.collectors, "quality", None)
    if quality is None:
        return ()
    return resolve_path(quality.production.queue, config_dir(config.source)), quality.production.max_queue


def _fraction(config: Config) -> Optional[float]:
    quality = getattr(config.collectors, "quality", None)
    return quality.production.fraction if quality is not None else None


def _review_queue(config: Config) -> Optional["ReviewQueue"]:
    path = _queue_inputs(config)[0] if _queue_inputs(config) else None
    if not path:
        return None
    from whisper_exporter.quality.sampling import ReviewQueue

    return ReviewQueue(path, config.collectors.quality.production.max_queue)
