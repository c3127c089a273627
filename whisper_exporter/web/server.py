"""HTTP: /metrics, the landing page /, /-/healthy and /-/ready, served by a threading WSGI server.

WSGI rather than prometheus_client's start_http_server so that one app can
carry the landing page and, later, an authentication layer in front of all of it.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from whisper_exporter.web import status as landing
from whisper_exporter.config import Config
from whisper_exporter.runtime.scheduler import Scheduler

StartResponse = Callable[..., object]
log = logging.getLogger("whisper_exporter.web.server")

REQUEST_TIMEOUT = 30  # seconds a client may take to send its request (slow clients hold a thread)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            # The TLS handshake runs here, in the request's own thread, so a slow or
            # hostile client cannot stall accept() for everyone else.
            self.request.do_handshake()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per scrape on stderr is noise


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections from concurrent scrapers, which
    # the client's TCP then retries after 1, 3, 7 s: multi-second tail latencies for nothing.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A failed handshake or a dropped connection is the client's problem: one debug line,
        # not a traceback on stderr.
        log.debug("connection from %s failed", client_address, exc_info=True)


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def make_app(config: Config, scheduler: Scheduler, registry: CollectorRegistry) -> Callable:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/-/healthy":
            return _text(start_response, "200 OK", "Healthy.\n")
        if path == "/-/ready":
            if scheduler.ready():
                return _text(start_response, "200 OK", "Ready.\n")
            return _text(start_response, "503 Service Unavailable", "Not ready: collectors have not run yet.\n")
        if path in ("/", "/index.html"):
            body = landing.render(config, scheduler).encode("utf-8")
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return _text(start_response, "404 Not Found", "Not found. Try /metrics.\n")

    return app


def _text(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def serve(
    host: str, port: int, app: Callable, ssl_context: Optional[ssl.SSLContext] = None
) -> tuple[WSGIServer, threading.Thread]:
    """Bind now (so a taken port fails at start-up) and serve in a background thread."""
    server_class = _ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer
    server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True)
    thread.start()
    return server, thread
