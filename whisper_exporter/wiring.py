"""Wiring, the composition root: configuration -> shared state -> collectors -> scheduler -> registry -> HTTP server.

It sits above both the web side and the runtime, so imports run one way (wiring -> web ->
runtime -> config; tests/test_plugins.py checks it): nothing below imports it.

The one place where state shared between collectors is built (runtime/shared.py)
and handed down, as blackbox_exporter builds its probe history in main; and where
a reload (SIGHUP, POST /-/reload) swaps in a new configuration.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from whisper_exporter.config import Config, ConfigError
from whisper_exporter.runtime.collector import Collector, plugins, section_active
from whisper_exporter.runtime.exporter import ExporterCollector, ReloadStatus, make_registry
from whisper_exporter.runtime.scheduler import Scheduler, describe
from whisper_exporter.runtime.shared import Shared
from whisper_exporter.web.server import HttpServer, make_app, serve
from whisper_exporter.web.webconfig import BasicAuth, WebConfig, with_headers

log = logging.getLogger("whisper_exporter")


def build_scheduler(config: Config, shared: Optional[Shared] = None,
                    reuse: Optional[dict[str, Collector]] = None) -> Scheduler:
    """One scheduled entry per enabled collector section, in config order, over one shared state.
    `reuse` (on reload) maps a section name to a running collector to keep instead of building a
    new one."""
    shared = shared or Shared.build(config)
    available = plugins()
    entries = []
    for name, section in config.collectors.items():
        if not section_active(section):
            continue
        plugin = available[name]
        if reuse is not None and getattr(section, "start_at", None) == "beginning":
            # A reload is not a start-up: reading present files from the beginning again would
            # count their lines twice into counters that carry on.
            section = dataclasses.replace(section, start_at="end")
        collector = (reuse or {}).get(name) or plugin.factory(section, shared)
        entries.append((collector, section.interval, plugin.run_timeout(section)))
    return Scheduler(entries, shared=shared)


def _shared_inputs(config: Config) -> tuple:
    """What Shared.build reads from a configuration: when this changes, the shared state and so
    every collector (they hold it) are built anew."""
    logs = getattr(config.collectors, "logs", None)
    quality = getattr(config.collectors, "quality", None)
    return (
        (logs.endpoints, logs.status_codes, logs.languages, logs.max_series) if logs else None,
        quality.production if quality else None,
    )


@dataclass
class Running:
    config: Config
    scheduler: Scheduler
    server: HttpServer
    thread: threading.Thread
    exporter: Optional[ExporterCollector] = None
    reloads: ReloadStatus = field(default_factory=ReloadStatus)
    load_config: Optional[Callable[[], Config]] = None  # what a reload reads; None: reload refused
    load_web: Optional[Callable[[], WebConfig]] = None  # --web.config.file, read again on reload
    web_app: Optional["_Swappable"] = None
    health_open: bool = False
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{self.server.scheme}://{host}:{port}"

    def reload(self) -> Optional[str]:
        """Load the configuration again and apply it. Returns None, or why it was refused (the
        configuration now running then stays). Collectors whose section (and the service) did not
        change carry on, counters and all; the others are stopped and built anew."""
        with self._reload_lock:
            try:
                if self.load_config is None:
                    raise ConfigError(self.config.source, "", "a configuration file to reload")
                new = self.load_config()
                web = self.load_web() if self.load_web is not None else None
                self._apply(new)
                if web is not None:
                    self._apply_web(web)
            except Exception as err:  # a bad file, or a factory that fails: keep what runs
                self.reloads.record(False)
                reason = str(err) if isinstance(err, ConfigError) else describe(err)
                log.error("reload refused, the previous configuration stays: %s", reason)
                return reason
            self.reloads.record(True)
            return None

    def _apply(self, new: Config) -> None:
        old, old_scheduler = self.config, self.scheduler
        if new.listen != old.listen:
            log.warning("listen address changed to %s: that needs a restart; still serving on %s",
                        new.listen, old.listen)
            new.listen = old.listen
        shared = old_scheduler.shared
        reuse: dict[str, Collector] = {}
        if shared is not None and _shared_inputs(new) == _shared_inputs(old):
            running = {c.name: c for c, _ in old_scheduler.entries}
            for name, section in new.collectors.items():
                old_section = getattr(old.collectors, name, None)
                if name in running and section.enabled and section == old_section and new.service == old.service:
                    reuse[name] = running[name]
            # Factories read the new configuration through the shared state; put back if one fails.
            before = (shared.config, shared.probe_view, shared.quality_view)
            shared.config = new
            try:
                scheduler = build_scheduler(new, shared, reuse)
            except BaseException:
                shared.config, shared.probe_view, shared.quality_view = before
                raise
        else:
            shared = Shared.build(new)
            scheduler = build_scheduler(new, shared)
        kept = scheduler.adopt(old_scheduler)
        for view in ("probe_view", "quality_view"):  # a collector that is gone leaves no view behind
            if getattr(shared, view, None) is not None and all(getattr(shared, view) is not c
                                                               for c, _ in scheduler.entries):
                setattr(shared, view, None)
        old_scheduler.stop(keep=kept)
        self.config, self.scheduler = new, scheduler
        if self.exporter is not None:
            self.exporter.scheduler = scheduler
        scheduler.start()
        logging.getLogger().setLevel(new.log_level.upper())
        rebuilt = [c.name for c, _ in scheduler.entries if all(c is not k for k in kept)]
        log.info("configuration reloaded from %s: kept %s; (re)started %s", new.source,
                 ", ".join(c.name for c in kept) or "none", ", ".join(rebuilt) or "none")

    def _apply_web(self, web: WebConfig) -> None:
        """Users, headers and certificates from --web.config.file, for the requests and
        connections that come next (renewed certificates need no restart)."""
        if (web.ssl_context is None) != (self.server.ssl_context is None):
            log.warning("--web.config.file: turning TLS on or off needs a restart; users and headers reloaded")
        elif web.ssl_context is not None:
            self.server.set_ssl_context(web.ssl_context)
        if self.web_app is not None:
            self.web_app.app = _protect(self.web_app.inner, web, self.health_open)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.scheduler.stop()


HEALTH_PATHS = ("/-/healthy", "/-/ready")


class _Swappable:
    """The WSGI app behind a reference a reload can replace (new users, new headers)."""

    def __init__(self, inner: Callable, app: Callable):
        self.inner = inner  # the app without auth and headers
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        return self.app(environ, start_response)


def _protect(app: Callable, web: WebConfig, health_open: bool) -> Callable:
    """Basic auth (when users are configured) and the configured response headers around `app`."""
    if web.users:
        app = BasicAuth(app, web.users, open_paths=HEALTH_PATHS if health_open else ())
    return with_headers(app, web.headers)


def start(
    config: Config,
    scheduler: Optional[Scheduler] = None,
    web: Optional[WebConfig] = None,
    health_open: bool = False,
    load_config: Optional[Callable[[], Config]] = None,
    enable_lifecycle: bool = False,
    load_web: Optional[Callable[[], WebConfig]] = None,
) -> Running:
    """Start collectors and the HTTP server in background threads. Raises OSError when the port is taken.

    `web` (from --web.config.file) adds TLS, basic auth and response headers; with
    `health_open` the health endpoints answer without credentials. `load_config` reads the
    configuration again for a reload (and `load_web` the web config); `enable_lifecycle` lets
    POST /-/reload call it.
    """
    scheduler = scheduler or build_scheduler(config)
    reloads = ReloadStatus()
    exporter = ExporterCollector(scheduler, reloads)
    registry = make_registry(exporter)
    host, port = config.listen_address
    web = web or WebConfig()
    running: Any = None

    class _Current:  # what each request reads: the configuration and scheduler now running
        config = property(lambda self: running.config if running else config)
        scheduler = property(lambda self: running.scheduler if running else scheduler)

    inner = make_app(_Current(), registry, reload=(lambda: running.reload()) if enable_lifecycle else None)
    app = _Swappable(inner, _protect(inner, web, health_open))
    server = serve(host, port, app, web.ssl_context)
    registry.register(server)  # whisper_exporter_http_connections*
    if scheduler.shared is not None:
        # Production transcripts show on the status page only behind basic auth, or mutual TLS that
        # requires a client certificate.
        scheduler.shared.page_authenticated = bool(web.users) or (
            web.ssl_context is not None and web.ssl_context.verify_mode == ssl.CERT_REQUIRED)
    running = Running(config, scheduler, server, server.thread, exporter, reloads, load_config, load_web, app,
                      health_open)
    scheduler.start()
    return running


def run_until_signalled(config: Config, web: Optional[WebConfig] = None, health_open: bool = False,
                        load_config: Optional[Callable[[], Config]] = None, enable_lifecycle: bool = False,
                        load_web: Optional[Callable[[], WebConfig]] = None) -> None:
    """The main job: serve until SIGTERM or SIGINT, then stop cleanly. SIGHUP reloads the
    configuration; SIGUSR1 and SIGUSR2 are logged and ignored (their default action would kill)."""
    wake = threading.Event()
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)  # handled in the loop below, not inside the handler
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, note)
    running = start(config, web=web, health_open=health_open, load_config=load_config,
                    enable_lifecycle=enable_lifecycle, load_web=load_web)
    # Everything alive now (modules, config, collectors) lives as long as the process: take it
    # out of the cyclic GC's view, so the full collections that scrape garbage sets off do not
    # rescan it. At ~3,000 series this takes the render's p99 from ~24 ms to ~14 ms
    # (benchmarks/bench_scrape.py).
    gc.freeze()
    names = ", ".join(s.name for _, s in running.scheduler.entries) or "none"
    log.info("collectors enabled: %s", names)
    log.info("listening on %s/metrics", running.url)
    while True:
        wake.wait(1.0)  # a timed wait keeps the main thread responsive to signals
        wake.clear()
        signums, received[:] = list(received), []
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            break
        for signum in signums:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the configuration")
                if running.reload() is None:
                    gc.freeze()
            else:
                log.info("%s received and ignored (SIGHUP reloads; SIGTERM stops)", signal.Signals(signum).name)
    log.info("shutting down")
    running.close()
