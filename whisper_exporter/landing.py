"""The landing page: plain server-rendered HTML, no external assets, everything escaped."""
from __future__ import annotations

import time
from html import escape
from typing import Optional

import yaml

from whisper_exporter import __version__
from whisper_exporter.config import Config, masked
from whisper_exporter.scheduler import Scheduler

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.up{color:#060;font-weight:bold}.down{color:#b00;font-weight:bold}
.starting{color:#a60}pre{background:#f7f7f7;padding:1em;overflow:auto}
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
    disabled = [name for name, section in vars(config.collectors).items() if not section.enabled]
    effective = yaml.safe_dump(masked(config), sort_keys=False)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>whisper-exporter</title>
<style>{_STYLE}</style></head><body>
<h1>whisper-exporter</h1>
<p>Version {escape(__version__)}. Watching <code>{escape(config.service.url)}</code>.
Metrics at <a href="metrics">/metrics</a>; health at <a href="-/healthy">/-/healthy</a>,
readiness at <a href="-/ready">/-/ready</a>.</p>
<h2>Collectors</h2>
<table><tr><th>collector</th><th>state</th><th>detail</th><th>interval</th><th>last run</th>
<th>took</th><th>errors</th><th>last error</th></tr>
{''.join(rows)}
</table>
<p>Disabled: {escape(', '.join(disabled) or 'none')}.</p>
<h2>Effective configuration</h2>
<p>From {escape(config.source)}; secrets are shown by name only.</p>
<pre>{escape(effective)}</pre>
</body></html>
"""
