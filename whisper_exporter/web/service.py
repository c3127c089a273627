"""The status page's Service section: is the Whisper service healthy, from the exporter's own state.

A collector that runs is "up" even while the server it watches is down, so the page
answers the user's question first, from three things the exporter already measures:
the canaries' last results (collectors/probe.py), real traffic's error ratio and p95
over the last minutes (runtime/recent.py over the shared request metrics), and the
tap's 502s. The verdict is one of healthy, degraded, down or unknown, with the reasons
in words. Thresholds are the alert rules' (rules/service.yml, rules/latency.yml).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from html import escape
from typing import Any, Optional

from whisper_exporter.runtime.recent import Window
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.tap.record import UPSTREAM_REASONS

ERROR_RATIO = 0.05  # WhisperErrorRatioHigh: over 5% of requests failing
P95_SECONDS = 3.0  # WhisperLatencyHigh: p95 end to end above 3 s
MIN_STALE = 60.0  # a canary result older than 3 probe intervals (and this) says nothing about now
# Probe results that mean no transcript came back at all (collectors/probe.py, whisper/clients.py).
NO_ANSWER = ("connection_error", "timeout", "http_error", "bad_response")
VERDICTS = ("healthy", "degraded", "down", "unknown")


@dataclass
class Service:
    """The section as data: the verdict, why, and the rows behind it."""

    verdict: str  # one of VERDICTS
    reasons: list[str] = field(default_factory=list)
    canaries: list[dict[str, Any]] = field(default_factory=list)
    requests: Optional[dict[str, Any]] = None  # None: no source feeds the request metrics
    tap: Optional[dict[str, Any]] = None  # None: the tap is off


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _entry(scheduler: Scheduler, name: str) -> Optional[tuple[Any, Any]]:
    for collector, state in scheduler.entries:
        if state.name == name:
            return collector, state
    return None


def canary_rows(scheduler: Scheduler, now: Optional[float] = None) -> list[dict[str, Any]]:
    """Per canary, its last probe: result, age, whether it is speech or non-speech, fresh or stale."""
    shared = scheduler.shared
    view = shared.probe_view if shared is not None else None
    if view is None:
        return []
    now = time.time() if now is None else now
    entry = _entry(scheduler, "probe")
    stale_after = max(MIN_STALE, 3 * entry[1].interval) if entry is not None else MIN_STALE
    rows = []
    for name, records in sorted(view.recent_probes().items()):
        if not records:
            continue
        last = records[0]
        age = now - last.started
        rows.append({
            "name": name,
            "kind": "non-speech" if not str(getattr(last, "reference", "x")).strip() else "speech",
            "result": last.result, "ok": bool(last.success), "age": age, "ago": _ago(age) + " ago",
            "stale": age > stale_after, "reason": (last.reason or "")[:200],
        })
    return rows


def _requests_row(window: Window) -> dict[str, Any]:
    return {
        "span": _ago(window.seconds) + (" (since start-up)" if window.since_start else ""),
        "total": window.total, "ok": window.ok, "server_errors": window.server_errors,
        "client_errors": window.client_errors, "bad_gateway": window.bad_gateway,
        "error_ratio": window.error_ratio, "client_error_ratio": window.client_error_ratio, "p95": window.p95,
    }


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def _ok(window: Optional[Window]) -> int:
    """Requests answered 2xx in the window."""
    return window.ok if window is not None else 0


def _tap_row(scheduler: Scheduler, window: Optional[Window]) -> Optional[dict[str, Any]]:
    entry = _entry(scheduler, "tap")
    tap = getattr(entry[0], "tap", None) if entry is not None else None
    if tap is None:
        return None
    stats = tap.stats.snapshot()
    errors = {reason: stats["errors"].get(reason, 0) for reason in UPSTREAM_REASONS}
    recent_502 = window.bad_gateway if window is not None else None
    if recent_502:
        upstream = "unreachable: every recent request got 502" if not _ok(window) else \
            f"502 on {recent_502} of {window.total if window is not None else 0} recent requests"
    elif _ok(window):
        upstream = "answering"
    else:
        upstream = "no recent traffic"
    return {"bad_gateway_total": errors["connect"] + errors["closed"] + errors["protocol"],
            "timeouts_total": errors["timeout"], "errors": errors, "recent_502": recent_502,
            "in_flight": stats["in_flight"], "requests_total": stats["requests"], "upstream": upstream}


def assess(scheduler: Scheduler, now: Optional[float] = None) -> Service:
    """The verdict from the canaries, the recent requests and the tap, with the reasons."""
    shared = scheduler.shared
    service = Service("unknown", canaries=canary_rows(scheduler, now))
    down: list[str] = []
    degraded: list[str] = []
    good: list[str] = []

    fresh = [c for c in service.canaries if not c["stale"]]
    for c in service.canaries:
        if c["stale"]:
            degraded.append(f"canary {c['name']}: its last result is {c['ago']} (the probe is not running)")
    # The speech canaries say whether the service transcribes; without one, the non-speech ones
    # still say whether it answers at all.
    judged = [c for c in fresh if c["kind"] == "speech"] or fresh
    unanswered = [c for c in judged if c["result"] in NO_ANSWER]
    for c in fresh:
        what = f"canary {c['name']}: {c['result']} {c['ago']}" + (f" ({c['reason']})" if c["reason"] else "")
        if c["ok"]:
            good.append(f"canary {c['name']} succeeded {c['ago']}")
        elif c in unanswered:
            (down if len(unanswered) == len(judged) else degraded).append(what)
        else:
            degraded.append(what)

    window = None
    if shared is not None and shared.requests.in_use:
        window = shared.recent_requests.window()
        service.requests = _requests_row(window)
        span = service.requests["span"]
        if window.total:
            ratio = window.error_ratio or 0.0
            failed = f"{window.server_errors} of {_requests(window.total)} failed (5xx) over the last {span}"
            if window.server_errors and not window.ok:
                down.append(failed + ", none succeeded")
            elif ratio > ERROR_RATIO:
                degraded.append(f"{failed}: {ratio:.1%}, above {ERROR_RATIO:.0%}")
            else:
                good.append(f"{_requests(window.total)} over the last {span}, {ratio:.1%} failed")
            if window.p95 is not None and window.p95 > P95_SECONDS:
                degraded.append(f"p95 latency {window.p95:.2f} s over the last {span}, above {P95_SECONDS:g} s")
    service.tap = _tap_row(scheduler, window)
    if service.tap is not None and service.tap["recent_502"]:
        line = f"the tap answered {_requests(service.tap['recent_502'])} with 502 (the server failed or is unreachable)"
        (down if not _ok(window) else degraded).append(line)

    if down:
        service.verdict, service.reasons = "down", down + degraded
    elif degraded:
        service.verdict, service.reasons = "degraded", degraded
    elif good:
        service.verdict, service.reasons = "healthy", good
    else:
        service.reasons = ["no canary result and no request yet: nothing says how the service is"]
    return service


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1%}"


def render(scheduler: Scheduler) -> str:
    """The Service section's HTML."""
    service = assess(scheduler)
    parts = ["<h2>Service</h2>",
             f"<p class=\"verdict\">Verdict: <span class=\"{service.verdict}\">{service.verdict}</span>.</p>",
             "<ul>" + "".join(f"<li>{escape(r)}</li>" for r in service.reasons) + "</ul>"]
    if service.canaries:
        parts.append("<table><tr><th>canary</th><th>kind</th><th>last result</th><th>when</th><th>reason</th></tr>")
        for c in service.canaries:
            css = "up" if c["ok"] else "down"
            when = c["ago"] + (" (stale)" if c["stale"] else "")
            parts.append(f"<tr><td>{escape(c['name'])}</td><td>{c['kind']}</td>"
                         f"<td class=\"{css}\">{escape(c['result'])}</td><td>{escape(when)}</td>"
                         f"<td>{escape(c['reason'])}</td></tr>")
        parts.append("</table>")
    r = service.requests
    if r is not None:
        p95 = "" if r["p95"] is None else f"{r['p95']:.3f} s"
        parts.append("<table><tr><th>requests, last " + escape(r["span"]) + "</th><th>succeeded (2xx)</th>"
                     "<th>failed (5xx)</th><th>error ratio</th><th>client errors (4xx)</th><th>4xx ratio</th>"
                     "<th>502</th><th>p95 latency</th></tr>"
                     f"<tr><td>{r['total']}</td><td>{r['ok']}</td><td>{r['server_errors']}</td>"
                     f"<td>{_ratio(r['error_ratio'])}</td><td>{r['client_errors']}</td>"
                     f"<td>{_ratio(r['client_error_ratio'])}</td><td>{r['bad_gateway']}</td><td>{p95}</td></tr></table>")
    t = service.tap
    if t is not None:
        errors = ", ".join(f"{k} {v}" for k, v in t["errors"].items())
        recent = "" if t["recent_502"] is None else str(t["recent_502"])
        parts.append("<table><tr><th>tap upstream</th><th>502, recent</th><th>502 since start</th>"
                     "<th>504 since start</th><th>upstream errors by reason</th><th>in flight</th></tr>"
                     f"<tr><td>{escape(t['upstream'])}</td><td>{recent}</td><td>{t['bad_gateway_total']}</td>"
                     f"<td>{t['timeouts_total']}</td><td>{escape(errors)}</td><td>{t['in_flight']}</td></tr></table>")
    return "\n".join(parts) + "\n"
