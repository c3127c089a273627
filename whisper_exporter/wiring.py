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
        collector = (reuse or {}).get(name)
        if collector is None:
            shared.building = name  # what the factory takes from the shared state is noted under its name
            try:
                collector = plugin.factory(section, shared)
            finally:
                shared.building = None
        entries.append((collector, section.interval, plugin.run_timeout(section)))
    return Scheduler(entries, shared=shared)


def _reads(section: Any, config: Config) -> object:
    """What a collector takes from outside its own section (a section's `reads(config)`, e.g. the
    probe the tap's address): a reload that changes it builds the collector anew."""
    reads = getattr(section, "reads", None)
    return reads(config) if callable(reads) else None


def _port(section: Any) -> Optional[int]:
    """The port a section's collector listens on (its `listen_address`), if it listens."""
    address = getattr(section, "listen_address", None)
    return address[1] if isinstance(address, tuple) else None


class RequiredStartError(Exception):
    """A collector whose section says `required` could not start (the tap's port is taken)."""


def _required(config: Config, name: str) -> bool:
    return bool(getattr(getattr(config.collectors, name, None), "required", False))  # a section may not exist (tests)


def start_required(config: Config, scheduler: Scheduler) -> None:
    """Start the required collectors now, in this thread: one in the request path (the tap) must
    not leave the exporter serving without it. Raises RequiredStartError naming what to change."""
    for collector, state in scheduler.entries:
        if _required(config, state.name):
            _start_one(scheduler, collector, state.name)


def _start_one(scheduler: Scheduler, collector: Collector, name: str) -> None:
    try:
        scheduler.start_now(collector)
    except Exception as err:
        raise RequiredStartError(f"cannot start the {name} collector: {err}; "
                                 f"collectors.{name}.required: false runs the exporter without it") from err


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
    page_authenticated: bool = False  # the port requires authentication now (see authenticated())
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
                if self.scheduler.shared is not None:  # a new shared state starts at False
                    self.scheduler.shared.page_authenticated = self.page_authenticated
            except Exception as err:  # a bad file, or a factory that fails: keep what runs
                self.reloads.record(False)
                reason = str(err) if isinstance(err, (ConfigError, RequiredStartError)) else describe(err)
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
        if old_scheduler.shared is None:
            shared, rebuild = Shared.build(new), {name for name, _ in new.collectors.items()}
        else:
            # Parts of the shared state whose inputs did not change (request, canary, quality and
            # hallucination counters) carry on; a collector holding a part that did is built anew.
            shared, rebuild = old_scheduler.shared.renewed(new)
        running = {c.name: c for c, _ in old_scheduler.entries}
        reuse: dict[str, Collector] = {}
        for name, section in new.collectors.items():
            old_section = getattr(old.collectors, name, None)
            if (name in running and name not in rebuild and section.enabled and section == old_section
                    and new.service == old.service and _reads(section, new) == _reads(old_section, old)):
                reuse[name] = running[name]
        old_requests = old_scheduler.shared.requests if old_scheduler.shared is not None else None
        tap_on = old_requests.tap_on if old_requests is not None else False
        try:
            scheduler = build_scheduler(new, shared, reuse)
            kept = scheduler.adopt(old_scheduler)
            self._start_required(new, scheduler, kept)
        except BaseException:
            if old_requests is not None:
                old_requests.tap_on = tap_on  # a new tap's factory set it on the counts that run on
            raise
        if shared.requests.tap_on and all(c.name != "tap" for c, _ in scheduler.entries):
            shared.requests.tap_on = False  # kept request metrics: the log is their one source again
        for view in ("probe_view", "quality_view"):  # a collector that is gone leaves no view behind
            if getattr(shared, view, None) is not None and all(getattr(shared, view) is not c
                                                               for c, _ in scheduler.entries):
                setattr(shared, view, None)
        old_scheduler.stop(keep=kept, reload=True)  # a tap's queued records are drained (docs/tap.md)
        self.config, self.scheduler = new, scheduler
        if self.exporter is not None:
            self.exporter.scheduler = scheduler
        scheduler.start()
        logging.getLogger().setLevel(new.log_level.upper())
        rebuilt = [c.name for c, _ in scheduler.entries if all(c is not k for k in kept)]
        log.info("configuration reloaded from %s: kept %s; (re)started %s", new.source,
                 ", ".join(c.name for c in kept) or "none", ", ".join(rebuilt) or "none")

    def _start_required(self, new: Config, scheduler: Scheduler, kept: list[Collector]) -> None:
        """Start the new configuration's required collectors before the old ones stop, so a tap
        that cannot bind its new address refuses the reload while the old tap serves on. One on the
        port its predecessor holds takes over from it; if even then it cannot start, a new one on
        the old configuration takes its place, and the reload is refused."""
        old, old_scheduler = self.config, self.scheduler
        running = {c.name: c for c, _ in old_scheduler.entries if all(c is not k for k in kept)}
        started: list[Collector] = []
        halted: dict[str, Collector] = {}
        try:
            for collector, state in scheduler.entries:
                name = state.name
                if any(collector is k for k in kept) or not _required(new, name):
                    continue
                previous, old_section = running.get(name), getattr(old.collectors, name, None)
                if previous is not None and _port(old_section) == _port(new.collectors[name]):
                    # The same port (127.0.0.1:P, localhost:P, 0.0.0.0:P overlap): the old one's
                    # socket is in the new one's way, so it stops first.
                    old_scheduler.halt(previous)
                    halted[name] = previous
                _start_one(scheduler, collector, name)
                started.append(collector)
        except BaseException:
            scheduler.stop(keep=[c for c, _ in scheduler.entries if all(c is not s for s in started)])
            for name, previous in halted.items():
                self._restore(name, previous)
            raise

    def _restore(self, name: str, halted: Collector) -> None:
        """After a refused reload: a collector on the running configuration in place of the one
        halted for it (its counters start again; the shared ones carry on)."""
        old_scheduler = self.scheduler
        assert old_scheduler.shared is not None
        try:
            fresh = plugins()[name].factory(self.config.collectors[name], old_scheduler.shared)
            old_scheduler.put(halted, fresh)
            old_scheduler.start_now(fresh)
        except Exception as err:  # down, and retried every interval, as with required: false
            log.error("collector %s could not start again on the running configuration: %s", name, describe(err))
        old_scheduler.start()

    def _apply_web(self, web: WebConfig) -> None:
        """Users, headers and certificates from --web.config.file, for the requests and
        connections that come next (renewed certificates need no restart)."""
        if (web.ssl_context is None) != (self.server.ssl_context is None):
            log.warning("--web.config.file: turning TLS on or off needs a restart; users and headers reloaded")
        elif web.ssl_context is not None:
            self.server.set_ssl_context(web.ssl_context)
        if self.web_app is not None:
            self.web_app.app = _protect(self.web_app.inner, web, self.health_open)
        # What the review page and the status page's production text go by: the users just
        # swapped in, and the TLS settings the server now has (the old ones, if TLS cannot turn).
        was, self.page_authenticated = self.page_authenticated, authenticated(web.users, self.server.ssl_context)
        if was != self.page_authenticated:
            log.warning("--web.config.file: the port %s authentication now; the review page (/review) is %s",
                        "requires" if self.page_authenticated else "no longer requires",
                        "on" if self.page_authenticated else "off and the status page hides production text")

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


def authenticated(users: dict[str, bytes], context: Optional[ssl.SSLContext]) -> bool:
    """Whether every request proves who sent it: basic auth users, or mutual TLS that requires a
    client certificate. Only then may pages show production audio and text."""
    return bool(users) or (context is not None and context.verify_mode == ssl.CERT_REQUIRED)


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
    try:
        start_required(config, scheduler)  # before the port opens: never ready without the tap
        server = serve(host, port, app, web.ssl_context)
    except BaseException:
        scheduler.stop()
        raise
    registry.register(server)  # whisper_exporter_http_connections*
    protected = authenticated(web.users, web.ssl_context)
    if scheduler.shared is not None:
        # Production transcripts show on the status page only behind basic auth, or mutual TLS that
        # requires a client certificate.
        scheduler.shared.page_authenticated = protected
    running = Running(config, scheduler, server, server.thread, exporter, reloads, load_config, load_web, app,
                      health_open, protected)
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
