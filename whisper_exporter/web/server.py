"""HTTP: /metrics, the landing page /, /-/healthy, /-/ready, /-/reload and the review page /review.

The app is WSGI (prometheus_client's make_wsgi_app renders /metrics, with its
name[] filter and gzip/OpenMetrics negotiation; basic auth and the configured
headers wrap it), run in a small thread pool. The sockets are aiohttp's
asyncio server (web/connections.py), not a thread per connection: a bounded
number of connections, a total deadline for a request's head, and accept()
backing off on EMFILE, so a slowloris attack cannot take /metrics down.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional, Protocol
from urllib.parse import parse_qs, urlencode

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric

from whisper_exporter.config import Config
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.web import review as review_page
from whisper_exporter.web import status as landing
from whisper_exporter.web.connections import HttpServer, serve

__all__ = ["HttpServer", "Current", "make_app", "serve"]

StartResponse = Callable[..., object]
log = logging.getLogger("whisper_exporter.web.server")

READ_METHODS = ("GET", "HEAD")
RELOAD_METHODS = ("POST", "PUT")  # as Prometheus' /-/reload
PAGES = ("/metrics", "/", "/index.html", "/-/healthy", "/-/ready")


class Current(Protocol):
    """What the app reads at each request: the configuration and scheduler now running
    (a reload swaps both)."""

    config: Config
    scheduler: Scheduler


def make_app(current: Current, registry: CollectorRegistry,
             reload: Optional[Callable[[], Optional[str]]] = None) -> Callable:
    """The WSGI app. `reload` (given with --web.enable-lifecycle) runs a reload and returns
    None, or the reason it was refused."""
    metrics_app = make_wsgi_app(registry)
    review = review_page.ReviewPage(current)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/-/reload":
            if method not in RELOAD_METHODS:
                return _text(start_response, "405 Method Not Allowed", "Use POST to reload.\n",
                             [("Allow", ", ".join(RELOAD_METHODS))])
            if reload is None:
                # Prometheus' answer without --web.enable-lifecycle: the endpoint exists and the
                # method is right, but the operator has not allowed it.
                return _text(start_response, "403 Forbidden",
                             "Lifecycle API is not enabled (start with --web.enable-lifecycle).\n")
            error = reload()
            if error is not None:
                return _text(start_response, "500 Internal Server Error", f"Reload failed: {error}\n")
            return _text(start_response, "200 OK", "Reloaded.\n")
        if path == review_page.PREFIX or path.startswith(review_page.PREFIX + "/"):
            return review(environ, start_response)
        if path not in PAGES:
            return _text(start_response, "404 Not Found", "Not found. Try /metrics.\n")
        if method not in READ_METHODS:
            return _text(start_response, "405 Method Not Allowed", f"{method} is not allowed here.\n",
                         [("Allow", ", ".join(READ_METHODS))])
        # HEAD is answered as GET; the server sends the headers only.
        if path == "/metrics":
            return _metrics(metrics_app, registry, environ, start_response)
        if path == "/-/healthy":
            return _text(start_response, "200 OK", "Healthy.\n")
        if path == "/-/ready":
            if current.scheduler.ready():
                return _text(start_response, "200 OK", "Ready.\n")
            return _text(start_response, "503 Service Unavailable", "Not ready: collectors have not run yet.\n")
        body = landing.render(current.config, current.scheduler).encode("utf-8")
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Only:
    """The registry's families cut down to the samples named (by sample or family name), as
    prometheus_client's name[] filter means to; its own finds only collectors that describe()
    themselves, and the exporter's collector does not (describing would mean collecting)."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str]):
        self.registry = registry
        self.names = set(names)

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.name in self.names:
                yield family
                continue
            kept = [s for s in family.samples if s.name in self.names]
            if kept:
                cut = Metric(family.name, family.documentation, family.type, family.unit)
                cut.samples = kept
                yield cut


class _Collected:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _metrics(metrics_app: Callable, registry: CollectorRegistry, environ: dict,
             start_response: StartResponse) -> Iterable[bytes]:
    """prometheus_client's exposition; a name[] filter that matches nothing is an error, not an
    empty scrape (which Prometheus would take as a healthy target without series)."""
    environ = dict(environ, REQUEST_METHOD="GET")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    names = query.pop("name[]", None)
    if not names:
        return metrics_app(environ, start_response)
    families = list(_Only(registry, names).collect())
    if not families:
        shown = ", ".join(n[:100] for n in names[:10])
        return _text(start_response, "400 Bad Request", f"No metric matches name[]: {shown}\n")
    environ["QUERY_STRING"] = urlencode(query, doseq=True)
    return make_wsgi_app(_Collected(families))(environ, start_response)


def _text(start_response: StartResponse, status: str, text: str,
          extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *extra])
    return [body]
