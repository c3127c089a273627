"""The landing page: plain server-rendered HTML, no external assets, everything escaped."""
from __future__ import annotations

import time
from html import escape
from typing import Callable, Optional

import yaml

from whisper_exporter import __version__
from whisper_exporter.config import Config, masked, masked_url
from whisper_exporter.runtime.quality_counters import QualityCounters
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.runtime.shared import ProbeView
from whisper_exporter.web import review, service
from whisper_exporter.whisper.transport import safe_text

# What production users said is shown only behind authentication (SECURITY.md).
HIDDEN = "(hidden: production text is shown only when the page requires authentication)"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.up{color:#060;font-weight:bold}.down{color:#b00;font-weight:bold}
.starting{color:#a60}pre{background:#f7f7f7;padding:1em;overflow:auto}
.verdict{font-size:1.3em}.healthy{color:#060;font-weight:bold}.degraded{color:#a60;font-weight:bold}
.unknown{color:#555;font-weight:bold}
"""


def _ago(when: Optional[float], now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def collector_rows(scheduler: Scheduler) -> list[dict]:
    """One dict per collector: what the page (and tests) show."""
    now = time.time()
    rows = []
    for collector, state in scheduler.entries:
        up = state.up()
        if state.runs == 0 and state.running_since is not None and not state.overrun():
            status = "starting"
        else:
            status = "up" if up else "down"
        rows.append({
            "name": state.name,
            "state": status,
            "interval": f"{state.interval:g}s",
            "last_run": _ago(state.last_run_time, now),
            "duration": "" if state.last_duration is None else f"{state.last_duration * 1000:.1f} ms",
            "errors": state.errors_total,
            "last_error": state.last_error or "",
            "last_error_at": _ago(state.last_error_time, now) if state.last_error_time else "",
            "detail": str(getattr(collector, "status", "") or ""),
        })
    return rows


def _probe_collector(scheduler: Scheduler) -> Optional[ProbeView]:
    return scheduler.shared.probe_view if scheduler.shared is not None else None


def _clip(text: Optional[str], limit: int = 200) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_rows(scheduler: Scheduler) -> dict[str, list[dict]]:
    """Per canary, its last probes (newest first) as the page shows them; {} without a probe collector."""
    collector = _probe_collector(scheduler)
    if collector is None:
        return {}
    now = time.time()
    out: dict[str, list[dict]] = {}
    for name, records in collector.recent_probes().items():
        out[name] = [{
            "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started)) + " UTC",
            "ago": _ago(r.started, now),
            "result": r.result,
            "ok": r.success,
            "duration": f"{r.duration:.3f} s",
            "rtf": "" if r.realtime_factor is None else f"{r.realtime_factor:.3f}",
            "error_rate": "" if r.error_rate is None else f"{r.error_rate:.3f} ({r.unit})",
            "status": "" if r.status_code is None else str(r.status_code),
            "transcript": _clip(r.transcript),
            "reason": _clip(r.reason, 300),
        } for r in records]
    return out


def _render_probes(scheduler: Scheduler) -> str:
    if _probe_collector(scheduler) is None:
        return ""
    parts = ["<h2>Recent probes</h2>"]
    rows_by_canary = probe_rows(scheduler)
    if not any(rows_by_canary.values()):
        parts.append("<p>No probe has run yet.</p>")
    for name, rows in rows_by_canary.items():
        if not rows:
            continue
        parts.append(f"<h3>Canary {escape(name)}</h3>")
        parts.append("<table><tr><th>when</th><th>result</th><th>took</th><th>RTF</th><th>error rate</th>"
                     "<th>HTTP</th><th>transcript</th><th>failure reason</th></tr>")
        for row in rows:
            css = "up" if row["ok"] else "down"
            parts.append(
                "<tr>"
                f"<td>{escape(row['when'])} <small>({escape(row['ago'])})</small></td>"
                f"<td class=\"{css}\">{escape(row['result'])}</td>"
                f"<td>{escape(row['duration'])}</td><td>{escape(row['rtf'])}</td>"
                f"<td>{escape(row['error_rate'])}</td><td>{escape(row['status'])}</td>"
                f"<td>{escape(row['transcript'])}</td><td>{escape(row['reason'])}</td>"
                "</tr>"
            )
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def _quality_counters(scheduler: Scheduler) -> Optional[QualityCounters]:
    """The exporter's QualityCounters, when a collector scores transcripts."""
    shared = scheduler.shared
    return shared.quality if shared is not None and shared.quality_in_use else None


def quality_rows(scheduler: Scheduler) -> dict[str, list[dict]]:
    """The page's Quality section as data: `rates` (latest error rate per language and set) and
    `worst` (the worst recent items of the quality collector); both empty without quality data."""
    counters = _quality_counters(scheduler)
    now = time.time()
    rates = []
    if counters is not None:
        for (language, set_, unit), v in sorted(counters.snapshot().items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if not v["scored"] and not v["failed"]:
                continue  # exported at 0 for Prometheus, nothing evaluated yet: nothing to show
            rates.append({
                "language": language, "set": set_, "unit": unit,
                "error_rate": "" if v["error_rate"] is None else f"{v['error_rate']:.4f}",
                "evaluated": _ago(v["evaluated"], now),
                "scored": v["scored"], "failed": v["failed"], "reference_units": v["reference_units"],
                "errors": v["substitution"] + v["deletion"] + v["insertion"],
            })
    worst = []
    view = scheduler.shared.quality_view if scheduler.shared is not None else None
    private = scheduler.shared is not None and scheduler.shared.page_authenticated
    if view is not None:
        for set_, results in view.worst_items().items():
            for r in results:
                if set_ == "production" and not private:
                    worst.append({
                        "set": set_, "id": r.id, "language": r.language, "unit": r.unit,
                        "error_rate": "" if r.error_rate is None else f"{r.error_rate:.3f}",
                        "result": r.result if r.score is not None else f"{r.result}: {r.outcome}",
                        "reference": HIDDEN, "transcript": HIDDEN, "when": _ago(r.started, now),
                    })
                    continue
                worst.append({
                    "set": set_, "id": r.id, "language": r.language, "unit": r.unit,
                    "error_rate": "" if r.error_rate is None else f"{r.error_rate:.3f}",
                    "result": r.result if r.score is not None else f"{r.result}: {r.outcome}",
                    "reference": _clip(r.reference),
                    "transcript": _clip(r.transcript) if r.transcript is not None else _clip(r.reason),
                    "when": _ago(r.started, now),
                })
    return {"rates": rates, "worst": worst}


def _render_quality(scheduler: Scheduler) -> str:
    rows = quality_rows(scheduler)
    if not rows["rates"] and not rows["worst"]:
        return ""
    parts = ["<h2>Quality</h2>"]
    if rows["rates"]:
        parts.append("<p>Error rate of the last evaluation round per language and set (WER; CER for unit "
                     "char), and the counts since start-up.</p>")
        parts.append("<table><tr><th>set</th><th>language</th><th>unit</th><th>error rate</th><th>evaluated</th>"
                     "<th>scored</th><th>failed</th><th>reference units</th><th>errors</th></tr>")
        for r in rows["rates"]:
            parts.append(
                f"<tr><td>{escape(r['set'])}</td><td>{escape(r['language'])}</td><td>{escape(r['unit'])}</td>"
                f"<td>{escape(r['error_rate'])}</td><td>{escape(r['evaluated'])}</td><td>{r['scored']}</td>"
                f"<td>{r['failed']}</td><td>{r['reference_units']}</td><td>{r['errors']}</td></tr>")
        parts.append("</table>")
    if rows["worst"]:
        parts.append("<h3>Worst recent items</h3>")
        parts.append("<table><tr><th>set</th><th>item</th><th>language</th><th>error rate</th><th>result</th>"
                     "<th>reference</th><th>transcript</th><th>when</th></tr>")
        for r in rows["worst"]:
            parts.append(
                f"<tr><td>{escape(r['set'])}</td><td>{escape(r['id'])}</td><td>{escape(r['language'])}</td>"
                f"<td>{escape(r['error_rate'])}</td><td>{escape(r['result'])}</td>"
                f"<td>{escape(r['reference'])}</td><td>{escape(r['transcript'])}</td>"
                f"<td>{escape(r['when'])}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def review_rows(scheduler: Scheduler) -> Optional[dict]:
    """The review queue as the page shows it; None without production sampling into a queue.
    `off` says why /review is off ("" when it is on), as the review page itself answers."""
    shared = scheduler.shared
    if shared is None or shared.review_queue is None:
        return None
    production = getattr(getattr(shared.config.collectors, "quality", None), "production", None)
    if production is None or not production.references:
        off = review.OFF_CONFIG.strip()
    elif not shared.page_authenticated:
        off = review.OFF_AUTH.strip()
    else:
        off = ""
    waiting, oldest = shared.review_queue.pending(shared.reviews.reviewed_ids())
    verified, flagged, skipped = shared.reviews.totals()
    return {"pending": waiting, "oldest": "" if oldest is None else review.waited(time.time() - oldest),
            "verified": verified, "flagged": {f: n for f, n in flagged.items() if n}, "skipped": skipped, "off": off}


def _render_review(scheduler: Scheduler) -> str:
    row = review_rows(scheduler)
    if row is None:
        return ""  # production sampling is off: docs/quality.md says how to turn it on
    flagged = ", ".join(f"{escape(f)} {n}" for f, n in sorted(row["flagged"].items())) or "none"
    waited = f" (the oldest for {escape(row['oldest'])})" if row["oldest"] else ""
    parts = ["<h2>Review</h2>",
             f'<p id="review-queue"><b>{row["pending"]}</b> production sample{"" if row["pending"] == 1 else "s"} '
             f"waiting for review{waited}. Since start-up: <b>{row['verified']}</b> verified, flagged {flagged}, "
             f"{row['skipped']} skipped (verified and flagged count at the quality collector's next run).</p>"]
    if row["off"]:
        parts.append(f'<p id="review-off">{escape(row["off"])}</p>')
    else:
        parts.append('<p><a id="review-link" href="review">Review them on /review</a>.</p>')
    return "\n".join(parts) + "\n"


def hallucination_rows(scheduler: Scheduler) -> list[dict]:
    """The last suspected hallucinations, newest first. Transcripts of real traffic are never shown
    (users' words on an unauthenticated page); canary and reference ones are the exporter's own."""
    shared = scheduler.shared
    if shared is None or not shared.hallucinations_in_use:
        return []
    now = time.time()
    return [{
        "when": _ago(s.when, now), "source": s.source, "language": s.language, "reasons": ", ".join(s.reasons),
        "transcript": "(real traffic: not shown)" if s.source == "traffic" else s.text,
    } for s in shared.hallucinations.recent()]


def _render_hallucinations(scheduler: Scheduler) -> str:
    rows = hallucination_rows(scheduler)
    if not rows:
        return ""
    parts = ["<h2>Suspected hallucinations</h2>",
             "<p>Transcripts that look like text nobody said (docs/hallucination.md), newest first.</p>",
             "<table><tr><th>when</th><th>source</th><th>language</th><th>reasons</th><th>transcript</th></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{escape(r['when'])}</td><td>{escape(r['source'])}</td><td>{escape(r['language'])}</td>"
                     f"<td>{escape(r['reasons'])}</td><td>{escape(r['transcript'])}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


# The page's sections, in order: a new section is a function here. The first ones come before the
# collector table: the page answers "is the service healthy" before "do the collectors run".
SECTIONS: list[Callable[[Scheduler], str]] = [service.render, _render_probes, _render_quality, _render_review,
                                              _render_hallucinations]
BEFORE_COLLECTORS = 1  # how many of SECTIONS come before the collector table


def render(config: Config, scheduler: Scheduler) -> str:
    rows = []
    for row in collector_rows(scheduler):
        error = escape(row["last_error"])
        if error:
            error += f" <small>({escape(row['last_error_at'])})</small>"
        rows.append(
            "<tr>"
            f"<td>{escape(row['name'])}</td>"
            f"<td class=\"{row['state']}\">{row['state']}</td>"
            f"<td>{escape(row['detail'])}</td>"
            f"<td>{row['interval']}</td><td>{row['last_run']}</td><td>{row['duration']}</td>"
            f"<td>{row['errors']}</td><td>{error}</td>"
            "</tr>"
        )
    disabled = [name for name, section in config.collectors.items() if not section.enabled]
    effective = yaml.safe_dump(masked(config), sort_keys=False)
    return safe_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>whisper-exporter</title>
<style>{_STYLE}</style></head><body>
<h1>whisper-exporter</h1>
<p>Version {escape(__version__)}. Watching <code>{escape(masked_url(config.service.url))}</code>.
Metrics at <a href="metrics">/metrics</a>; health at <a href="-/healthy">/-/healthy</a>,
readiness at <a href="-/ready">/-/ready</a>.</p>
{''.join(section(scheduler) for section in SECTIONS[:BEFORE_COLLECTORS])}<h2>Collectors</h2>
<p>A collector is up when it runs: whether the service works is the Service section above.</p>
<table><tr><th>collector</th><th>state</th><th>detail</th><th>interval</th><th>last run</th>
<th>took</th><th>errors</th><th>last error</th></tr>
{''.join(rows)}
</table>
<p>Disabled: {escape(', '.join(disabled) or 'none')}.</p>
{''.join(section(scheduler) for section in SECTIONS[BEFORE_COLLECTORS:])}<h2>Effective configuration</h2>
<p>From {escape(config.source)}; secrets are shown by name only.</p>
<pre>{escape(effective)}</pre>
</body></html>
""")  # a lone surrogate from any source must not make the page fail to encode
