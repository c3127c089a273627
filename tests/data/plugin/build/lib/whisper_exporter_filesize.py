"""A whisper-exporter collector plugin: the size of one file, e.g. the model's weights."""
import os
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from whisper_exporter.config import Duration, KeyPath
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.shared import Shared


@dataclass
class FileSizeConfig:  # the `collectors.filesize` section; every field needs a default
    enabled: bool = False
    interval: Duration = Duration(30)
    timeout: Duration = Duration(5)
    path: str = ""

    def check(self, at: KeyPath) -> None:  # bad config: exit 2 naming collectors.filesize.path
        if self.enabled and not self.path:
            raise at.error("path", "the file whose size to export")


class FileSizeCollector:
    def __init__(self, section: FileSizeConfig):
        self.name, self.section, self.size = "filesize", section, None

    def start(self) -> None:
        """Nothing to open: update() reads the file each time."""

    def update(self) -> None:  # in a scheduler thread; raising marks the collector down
        self.size = None  # a failed run serves no stale reading
        self.size = os.stat(self.section.path).st_size

    def families(self) -> list[Metric]:  # at scrape time: no I/O
        family = GaugeMetricFamily("whisper_file_size_bytes", "Size of the watched file.", labels=["path"])
        if self.size is not None:
            family.add_metric([self.section.path], self.size)
        return [family]

    def stop(self) -> None:
        """Nothing to release."""


def make(section: FileSizeConfig, shared: Shared) -> FileSizeCollector:
    return FileSizeCollector(section)  # shared: state other collectors feed (unused here)


PLUGIN = Plugin("filesize", FileSizeConfig, make, "the size of one file")
