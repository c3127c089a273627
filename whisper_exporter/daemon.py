"""Wiring: configuration -> collectors -> scheduler -> registry -> HTTP server."""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Optional
from wsgiref.simple_server import WSGIServer

from whisper_exporter.collector import factories
from whisper_exporter.config import Config
from whisper_exporter.exporter import make_registry
from whisper_exporter.scheduler import Scheduler
from whisper_exporter.server import make_app, serve

log = logging.getLogger("whisper_exporter")


def build_scheduler(config: Config) -> Scheduler:
    """One scheduled entry per enabled collector section, in config order."""
    available = factories()
    entries = []
    for name, section in vars(config.collectors).items():
        if not section.enabled:
            continue
        collector = available[name](section, config)
        entries.append((collector, section.interval, section.timeout))
    return Scheduler(entries)


@dataclass
class Running:
    config: Config
    scheduler: Scheduler
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.scheduler.stop()


def start(config: Config, scheduler: Optional[Scheduler] = None) -> Running:
    """Start collectors and the HTTP server in background threads. Raises OSError when the port is taken."""
    scheduler = scheduler or build_scheduler(config)
    registry = make_registry(scheduler)
    host, port = config.listen_address
    server, thread = serve(host, port, make_app(config, scheduler, registry))
    scheduler.start()
    return Running(config, scheduler, server, thread)


def run_until_signalled(config: Config) -> None:
    """The main job: serve until SIGTERM or SIGINT, then stop cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    running = start(config)
    names = ", ".join(s.name for _, s in running.scheduler.entries) or "none"
    log.info("collectors enabled: %s", names)
    log.info("listening on %s/metrics", running.url)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    log.info("shutting down")
    running.close()
