"""Generate the Grafana dashboards in this folder: python dashboards/generate.py

The JSON files are committed (import them as they are); this script is where they are written
from, and tests/test_dashboards.py checks that the committed files are what it writes.

Conventions (design.md, "Ecosystem conventions to follow"):
- one `datasource` template variable of type datasource (query prometheus), used by every
  panel and every target as {"type": "prometheus", "uid": "${datasource}"}: it works for import
  in the UI and for file provisioning alike, and no datasource uid is hard-coded;
- variables job and instance (and language, gpu where they apply), multi-valued, matched with
  =~ so that "All" (.*) and several values work;
- $__rate_interval in every rate(); a unit on every panel; an explicit uid per dashboard;
- histograms as heatmaps (format heatmap, legend {{le}});
- the design's thresholds drawn on the panels they belong to.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["whisper", "whisper-exporter"]

# Selectors. Every variable is matched with =~ (multi-value and All = .*).
JI = 'job=~"$job",instance=~"$instance"'
LANG = 'language=~"$language"'
GPU = 'gpu=~"$gpu"'
# Requests that are work: not health checks, docs or model listings (as in rules/recording.yml).
WORK = 'endpoint!~"/|/docs|/openapi.json|/health|/healthz|/ready|/metrics|/v1/models"'
RI = "$__rate_interval"

# Thresholds from the design ("Where this comes from").
LATENCY_TARGET = 1.5  # s, end to end for a 10 s clip
LATENCY_ALERT = 3.0  # s, p95 for 5 minutes
RTF_LIMIT = 0.8
QUEUE_LIMIT = 0.2  # s
GPU_MEMORY_WARN = 0.90
GPU_MEMORY_CRIT = 0.95
ERROR_RATE_ALERT = 0.15  # accuracy < 85%
MANDARIN_TARGET = 0.08  # accuracy > 92% for Mandarin
ERROR_RATIO_ALERT = 0.05  # rules/service.yml WhisperErrorRatioHigh
GPU_TEMPERATURE = 85
FIRST_PARTIAL_TARGET = 1.5  # s, rules/streaming.yml WhisperStreamingFirstPartialSlow
LOG_STALLED = 600
# rules/slo.yml: burn rates that page (1h and 6h windows) and open a ticket (1d).
BURN_PAGE_FAST = 14.4
BURN_PAGE_SLOW = 6
BURN_TICKET = 3
SET = 'set=~"$set"'
# The speech canaries' success: a negative canary answered with text (tiny.en says "You" to the
# bundled silence) is a fact about the server with its own panel and alert, not the server failing.
SPEECH = 'and on (job, instance, probe) whisper_probe_info{kind="speech"}'


# -- building blocks ----------------------------------------------------------------------------

# What a panel says when its query returns nothing, by the first metric family it reads: absent
# data has a reason, and the reason says what to check.
LOG_TIMINGS = ("No timings from the server's log: queue wait and inference time come only from a log "
               "that has them (collectors.logs fields queue_wait, inference); the request tap cannot see them")
# Issue 21: the WER panels said "collectors.quality off, or no reference set" for set=production
# while verified production items had been scored; say what feeds each set.
QUALITY_EMPTY = ("No utterance of this set scored in this range (reference: collectors.quality with a manifest; "
                 "production: items verified in production.references; canary: the probe)")
# Punctuation is scored only where a reference keeps its marks (docs/quality.md).
# Every set can feed it, so naming only collectors.quality (as it did) sent production users the wrong way.
PUNCTUATION_NONE = ("No punctuation scored in this range: no scored reference of this language and set keeps "
                    ". , ? ! (reference: collectors.quality with a manifest; production: verified items; canary: "
                    "the probe)")
NO_LANGUAGE_ID = ("No item sent without a language in this range (collectors.quality.language: given, probe "
                  "language: given, or no reviewer named a language); load rules/recording.yml")
# The review queue (docs/quality.md, "A person verifies"): only production sampling with a queue feeds it.
REVIEW_EMPTY = ("No review queue: production sampling is off (collectors.quality.production.queue and "
                "references; the tap or a log with transcripts samples requests)")
# The detector against reviewers: only reviewed production items with text feed it.
HALLUCINATION_REVIEW_EMPTY = ("No reviewed transcript with text in this range (or nothing suspected, for precision, "
                              "or confirmed, for recall): reviewers' verdicts come from /review and review import "
                              "of production samples (collectors.quality.production.queue)")
REVIEWS_EMPTY = ("No review in this range: nobody verified, flagged or skipped a sample on /review or by review "
                 "import (or no collectors.quality.production.queue)")
# Capacity and efficiency (rules/capacity.yml, docs/capacity.md).
CAPACITY_EMPTY = ("No busy time measured: capacity needs the request tap (collectors.tap) or a server log with "
                  "inference times, a replica that served in the last hour, and rules/capacity.yml")
EFFICIENCY_EMPTY = ("No audio completed or no GPU readings in the last hour: needs the tap (or a log with audio "
                    "durations), the gpu collector and rules/capacity.yml")
NO_DATA_BY_PREFIX = (
    ("ALERTS", "No Whisper alert pending or firing"),
    ("slo:", "No SLO records: load rules/slo.yml into Prometheus"),
    # Queue wait and inference time: only a server log that has them feeds these (the tap cannot
    # see inside the server), so "enable the request tap" would send people the wrong way.
    ("job_instance:whisper_queue_wait", LOG_TIMINGS + "; load rules/recording.yml"),
    ("job:whisper_queue_wait", LOG_TIMINGS + "; load rules/recording.yml"),
    ("job_instance_language:whisper_inference", LOG_TIMINGS + "; load rules/recording.yml"),
    ("whisper_queue_wait", LOG_TIMINGS),
    ("whisper_inference", LOG_TIMINGS),
    ("job:whisper_hallucination", "No transcripts checked: enable the request tap (collectors.tap) or log transcripts"),
    ("job:whisper_realtime_factor", "No request timings: enable the request tap (collectors.tap), or a log with durations"),
    *((prefix, CAPACITY_EMPTY) for prefix in (
        "job:whisper_audio_capacity", "job:whisper_audio_headroom", "job:whisper_server_", "job_instance:whisper_server_",
        "job_instance:whisper_audio_headroom", "job_instance:whisper_audio_capacity",
        "job_instance:whisper_audio_seconds_per", "job_instance:whisper_requests_in_flight")),
    *((prefix, EFFICIENCY_EMPTY) for prefix in ("job:whisper_gpu_", "job_instance:whisper_gpu_", "job_name:whisper_gpu_")),
    ("job:", "No requests in this range: enable the request tap (collectors.tap) or a log; load rules/recording.yml and rules/slo.yml"),
    ("job_instance", "No requests in this range: enable the request tap (collectors.tap) or a log; load rules/recording.yml"),
    ("whisper_request", "No request timings: enable the request tap (collectors.tap), or a log with durations"),
    ("whisper_realtime_factor", "No request timings: enable the request tap (collectors.tap), or a log with durations"),
    ("whisper_audio", "No request timings: enable the request tap (collectors.tap), or a log with durations"),
    ("whisper_tap", "The request tap is off (collectors.tap)"),
    ("whisper_hallucination_confirmed", HALLUCINATION_REVIEW_EMPTY),
    ("whisper_hallucination", "No transcripts checked: enable the request tap (collectors.tap) or log transcripts"),
    ("language:whisper_quality_language_id", NO_LANGUAGE_ID),
    ("language_detected:", NO_LANGUAGE_ID),
    ("language:whisper_quality_punctuation", PUNCTUATION_NONE + "; load rules/recording.yml"),
    ("whisper_quality_punctuation", PUNCTUATION_NONE),
    ("language:whisper_hallucination_review", HALLUCINATION_REVIEW_EMPTY + "; load rules/recording.yml"),
    ("language:", QUALITY_EMPTY + "; load rules/recording.yml"),
    ("instance_gpu", "No GPU readings (no NVIDIA driver, or the gpu collector is off)"),
    ("whisper_gpu", "No GPU readings (no NVIDIA driver, or the gpu collector is off)"),
    ("whisper_probe", "No canary result (probe off, not run yet, or stale: see WhisperProbeStale)"),
    ("whisper_quality_reviews", REVIEWS_EMPTY),  # before its prefix, whisper_quality_review
    ("whisper_quality_review", REVIEW_EMPTY),
    ("whisper_quality", QUALITY_EMPTY),
    ("whisper_process", "No server process watched (process collector off, or nothing matched)"),
    ("whisper_exporter_log", "No log followed (logs collector off, or no files)"),
    ("whisper_", "No data from the exporter in this range"),
)


def no_data(tgts: list[dict]) -> str:
    """The noValue text for a panel whose first query is tgts[0]."""
    expr = tgts[0]["expr"] if tgts else ""
    names = re.findall(r"\b(ALERTS|[a-z_]+:[a-z_0-9]+:[a-z_0-9]+|whisper_[a-z_0-9]+|up|process_[a-z_]+|scrape_[a-z_]+)\b",
                       expr)
    first = names[0] if names else ""
    for prefix, text in NO_DATA_BY_PREFIX:
        if first.startswith(prefix):
            return text
    return "No data: is Prometheus scraping the exporter?"


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict:
    t = {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend or "__auto",
         "range": True, "refId": ref}
    t.update(extra)
    return t


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def steps(*levels: tuple[float, str], base: str = "green") -> dict:
    return {"mode": "absolute",
            "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for v, c in levels]}


def timeseries(title: str, tgts: list[dict], unit: str, description: str = "", *,
               thresholds: Optional[dict] = None, min_: Optional[float] = None,
               max_: Optional[float] = None, stack: bool = False, bars: bool = False,
               width: int = 12, height: int = 8, no_value: str = "") -> dict:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else (25 if stack else 10),
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "line+area" if thresholds else "off"},
    }
    defaults: dict[str, Any] = {"custom": custom, "unit": unit, "noValue": no_value or no_data(tgts),
                                "thresholds": thresholds or steps(), "color": {"mode": "palette-classic"}}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": tgts, "_size": (width, height),
    }


def stat(title: str, tgts: list[dict], unit: str, description: str = "", *,
         thresholds: Optional[dict] = None, mappings: Optional[list] = None,
         decimals: Optional[int] = None, width: int = 3, height: int = 4, no_value: str = "",
         text_mode: str = "auto") -> dict:
    defaults: dict[str, Any] = {"unit": unit, "noValue": no_value or no_data(tgts), "thresholds": thresholds or steps(),
                                "mappings": mappings or [], "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"colorMode": "background", "graphMode": "area", "justifyMode": "auto",
                    "orientation": "auto", "textMode": text_mode,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": tgts, "_size": (width, height),
    }


def bargauge(title: str, tgts: list[dict], unit: str, description: str = "", *,
             thresholds: Optional[dict] = None, max_: Optional[float] = None,
             width: int = 12, height: int = 8, no_value: str = "") -> dict:
    defaults: dict[str, Any] = {"unit": unit, "noValue": no_value or no_data(tgts),
                                "thresholds": thresholds or steps(), "min": 0,
                                "color": {"mode": "thresholds"}}
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "bargauge", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": tgts, "_size": (width, height),
    }


def heatmap(title: str, metric: str, selector: str, unit: str, description: str = "", *,
            width: int = 12, height: int = 8) -> dict:
    """A histogram as a heatmap: rate of each bucket, Grafana turns the cumulative buckets into bands."""
    expr = f"sum by (le) (rate({metric}_bucket{{{selector}}}[{RI}]))"
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "noValue": no_data([{"expr": expr}]),
                                     "custom": {"hideFrom": {"legend": False,
                                                                           "tooltip": False, "viz": False},
                                                              "scaleDistribution": {"type": "linear"}}},
                        "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential",
                      "exponent": 0.5, "steps": 64, "reverse": False},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
        },
        "targets": [target(expr, "{{le}}", format="heatmap", interval="")],
        "_size": (width, height),
    }


def table(title: str, tgts: list[dict], unit: str, description: str = "", *,
          width: int = 12, height: int = 8, hide: tuple[str, ...] = ("Time",), no_value: str = "",
          rename: Optional[dict[str, str]] = None, sort: Optional[str] = None) -> dict:
    transformations: list[dict] = []
    if len(tgts) > 1:
        transformations.append({"id": "merge", "options": {}})
    transformations.append({"id": "organize", "options": {"excludeByName": {h: True for h in hide},
                                                          "renameByName": rename or {}}})
    if sort:
        transformations.append({"id": "sortBy", "options": {"sort": [{"field": sort, "desc": True}]}})
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "noValue": no_value or no_data(tgts),
                                     "custom": {"align": "auto"}}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        "transformations": transformations,
        "targets": tgts, "_size": (width, height),
    }


def instant(t: dict) -> dict:
    t = dict(t)
    t.update({"instant": True, "range": False, "format": "table"})
    return t


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


UP_DOWN = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red", "index": 0},
                                         "1": {"text": "UP", "color": "green", "index": 1}}}]
OK_FAILING = [{"type": "value", "options": {"0": {"text": "FAILING", "color": "red", "index": 0},
                                            "1": {"text": "OK", "color": "green", "index": 1}}}]


def layout(panels: list[dict]) -> list[dict]:
    """Place panels left to right, top to bottom on Grafana's 24-column grid; number them."""
    x = y = row_height = 0
    out = []
    for pid, panel in enumerate(panels, start=1):
        width, height = panel.pop("_size")
        if x + width > 24 or panel["type"] == "row":
            x, y = 0, y + row_height
            row_height = 0
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        panel["id"] = pid
        x += width
        row_height = max(row_height, height)
        if panel["type"] == "row":
            x, y, row_height = 0, y + height, 0
        out.append(panel)
    return out


def datasource_variable() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [],
            "refresh": 1, "regex": "", "skipUrlSync": False}


def query_variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query, "query": query, "refresh": 2, "regex": "", "sort": 1,
            "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0,
            "options": [], "skipUrlSync": False}


JOB_VAR = query_variable("job", "Job", "label_values(whisper_exporter_build_info, job)")
INSTANCE_VAR = query_variable("instance", "Instance",
                              'label_values(whisper_exporter_build_info{job=~"$job"}, instance)')
GPU_VAR = query_variable("gpu", "GPU", f"label_values(whisper_gpu_info{{{JI}}}, gpu)")
REQUEST_LANGUAGE_VAR = query_variable("language", "Language",
                                      f"label_values(whisper_requests_total{{{JI}}}, language)")
QUALITY_LANGUAGE_VAR = query_variable("language", "Language",
                                      f"label_values(whisper_quality_reference_units_total{{{JI}}}, language)")
# WER, CER and the canary's single utterance on one scale mislead: pick the set.
SET_VAR = query_variable("set", "Set", f"label_values(whisper_quality_reference_units_total{{{JI}}}, set)")


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict],
              time_from: str = "now-6h") -> dict:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
             "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
             "type": "dashboard"},
            # The start time itself, as the event's time ("Series value as timestamp", in ms): a
            # restart shows at the moment the server started, however long it was down before.
            # changes(...[$__rate_interval]) missed any restart after more than a minute down,
            # since the series is absent while no server process runs.
            {"datasource": DS, "enable": True, "hide": False, "iconColor": "orange",
             "name": "Whisper server restarts", "titleFormat": "Whisper server started",
             "textFormat": "{{instance}}", "step": "60s", "useValueForTime": True,
             "expr": f"whisper_process_start_time_seconds{{{JI}}} * 1000"},
        ]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"asDropdown": True, "icon": "external link", "includeVars": True, "keepTime": True,
                   "tags": ["whisper"], "targetBlank": False, "title": "Whisper dashboards",
                   "type": "dashboards"}],
        "panels": layout(panels),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": TAGS,
        "templating": {"list": [datasource_variable()] + variables},
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# -- the dashboards ----------------------------------------------------------------------------

def burn(sli: str, objective: str, window: str) -> str:
    """The burn rate of a job-level SLI over a window (rules/slo.yml)."""
    return (f"job:{sli}:ratio_rate{window}{{job=~\"$job\"}} / on () group_left () "
            f"(1 - slo:{objective}:objective)")


BURN_STEPS = steps((1, "yellow"), (BURN_TICKET, "orange"), (BURN_PAGE_FAST, "red"))
J = 'job=~"$job"'


def overview() -> dict:
    q6 = f'{J},set!="canary"'
    panels = [
        row("Health"),
        stat("Exporter", targets((f"min(up{{{JI}}})", "")), "none",
             "Whether Prometheus can scrape every exporter (alerts: WhisperExporterDown, WhisperTargetAbsent).",
             mappings=UP_DOWN, thresholds=steps((1, "green"), base="red"),
             no_value="No target: the pod is gone or discovery lost it (WhisperTargetAbsent)"),
        stat("Server process", targets((f"min(whisper_process_up{{{JI}}})", "")), "none",
             "Whether the Whisper server's process is found (alert: WhisperServerProcessDown, a ticket).",
             mappings=UP_DOWN, thresholds=steps((1, "green"), base="red")),
        stat("Canary probe", targets((f"min(whisper_probe_success{{{JI}}} {SPEECH})", "")), "none",
             "Whether the last probe of every speech canary got the right transcript back (alerts: "
             "WhisperProbeFailing, WhisperCanaryTranscriptWrong). Negative canaries answered with text are "
             "on the quality dashboard (WhisperCanaryHallucinating). No value: the probe has no current "
             "result (WhisperProbeStale).",
             mappings=OK_FAILING, thresholds=steps((1, "green"), base="red")),
        stat("Success ratio (5m)",
             targets((f"1 - sum(job:whisper_requests_errors:rate5m{{{J}}}) / sum(job:whisper_requests:rate5m{{{J}}})",
                      "")),
             "percentunit", "The service's requests that did not fail (5xx) over 5 minutes, all replicas "
             "together, from the servers' logs (not one minus the worst replica: see the fleet dashboard). "
             "The availability objective is 99.5%.",
             thresholds=steps((1 - ERROR_RATIO_ALERT, "yellow"), (0.995, "green"), base="red"), decimals=2),
        stat("Error budget burn (1h)",
             targets((f"max({burn('whisper_requests_errors', 'whisper_availability', '1h')})", "")), "x",
             f"How fast the last hour spent the availability error budget (1 = it lasts 30 days). "
             f"Pages above {BURN_PAGE_FAST} (with the 5-minute window), ticket above {BURN_TICKET} over a day "
             "(WhisperErrorBudgetBurn).", thresholds=BURN_STEPS, decimals=1),
        stat("Requests/s", targets((f"sum(job:whisper_requests:rate5m{{{J}}})", "")), "reqps",
             "Transcription requests per second over 5 minutes, all replicas, from the servers' logs."),
        stat("p95 latency (5m)",
             targets((f"max(job:whisper_request_duration_seconds:p95_5m{{{J}}})", "")), "s",
             f"End-to-end p95 of the service (all replicas' buckets together). Target {LATENCY_TARGET} s for "
             f"a 10 s clip; per-replica ticket above {LATENCY_ALERT} s with a real-time factor above {RTF_LIMIT}.",
             thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), decimals=2),
        stat("Canary RTF", targets((f"max(whisper_probe_realtime_factor{{{JI}}})", "")), "none",
             f"Canary processing time / audio duration. Alert above {RTF_LIMIT}.",
             thresholds=steps((RTF_LIMIT, "yellow"), (1, "red")), decimals=2),
        stat("GPU memory",
             targets((f"max(instance_gpu:whisper_gpu_memory_used_bytes:ratio{{{JI},{GPU}}})", "")),
             "percentunit", f"Most used GPU's memory. Servers that pre-allocate sit at {GPU_MEMORY_WARN:.0%}; "
             f"above {GPU_MEMORY_CRIT:.0%} for 15 minutes is information (WhisperGpuMemoryHigh), never a page.",
             thresholds=steps((GPU_MEMORY_WARN, "orange"), (GPU_MEMORY_CRIT, "red")), decimals=1),
        table("Whisper alerts",
              [instant(target('sum by (alertname, severity, alertstate, instance, window, language, set, '
                              'probe, gpu, xid) (ALERTS{alertname=~"Whisper.*",job=~"$job"})', ""))],
              "none", "Whisper alerts pending or firing now (all severities, info included), with the "
              "labels that say what: replica, burn-rate window, language and set, canary, GPU and XID.",
              width=24, height=6, hide=("Time", "Value")),
        row("Quality"),
        stat("Worst language against its threshold",
             targets((f"topk(1, language:whisper_quality_error_rate:ratio_rate6h{{{q6}}} "
                      f"/ on (job, language) group_left () language:whisper_quality_max_error_rate:threshold)",
                      "{{language}} {{unit}} ({{set}})")),
             "percentunit", "The language whose 6-hour error rate is closest to (or most over) its own "
             "threshold, as a share of it: 100% is at the threshold (WhisperQualityErrorRateHigh). The "
             "canary set is left out.", thresholds=steps((0.8, "yellow"), (1, "red")), decimals=0,
             width=6, height=8, text_mode="value_and_name"),
        table("Change against 7 days ago",
              [instant(target(f"language:whisper_quality_error_rate:ratio_rate6h{{{q6}}}", "", "A")),
               instant(target(f"language:whisper_quality_error_rate:ratio_rate6h_offset1w{{{q6}}}", "", "B")),
               instant(target(f"language:whisper_quality_error_rate:ratio_rate6h{{{q6}}} "
                              f"- language:whisper_quality_error_rate:ratio_rate6h_offset1w", "", "C"))],
              "percentunit", "Each language's error rate over the last 6 hours, the same 6 hours a week "
              "ago, and the change (WhisperQualityRegressed: 1.5 times and 2 points more).",
              width=18, height=8, hide=("Time", "job"),
              rename={"Value #A": "last 6h", "Value #B": "a week ago", "Value #C": "change"}, sort="change"),
        row("Requests and latency"),
        timeseries("Requests by status code",
                   targets((f"sum by (status_code) (rate(whisper_requests_total{{{JI},{WORK}}}[{RI}]))",
                            "{{status_code}}")),
                   "reqps", "Transcription requests per second by HTTP status, from the server's log.",
                   stack=True),
        timeseries("Success ratio",
                   targets((f"1 - job:whisper_requests_errors:ratio_rate5m{{{J}}}", "service {{job}}"),
                           (f"1 - job_instance:whisper_requests_errors:ratio_rate5m{{{JI}}}", "{{instance}}")),
                   "percentunit", "1 - the 5-minute error ratio (5xx and failed lines), of the service and "
                   "of each replica. The red band is a replica's WhisperErrorRatioHigh ticket (below 95%).",
                   thresholds=steps((1 - ERROR_RATIO_ALERT, "transparent"), base="red"), max_=1),
        timeseries("p95 latency",
                   targets((f"job:whisper_request_duration_seconds:p95_5m{{{J}}}", "service {{job}}"),
                           (f"job_instance:whisper_request_duration_seconds:p95_5m{{{JI}}}", "p95 {{instance}}"),
                           (f"whisper_probe_duration_seconds{{{JI}}}", "canary {{probe}} {{instance}}")),
                   "s", f"End-to-end p95 from the servers' logs, of the service and of each replica, and the "
                   f"canary's duration. Lines: {LATENCY_TARGET} s target (10 s clip), {LATENCY_ALERT} s alert.",
                   thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), min_=0),
        timeseries("Error budget burn rate",
                   targets((burn("whisper_requests_errors", "whisper_availability", "1h"), "errors 1h"),
                           (burn("whisper_requests_errors", "whisper_availability", "6h"), "errors 6h"),
                           (burn("whisper_realtime_factor_slow", "whisper_latency", "1h"), "latency 1h"),
                           (burn("whisper_realtime_factor_slow", "whisper_latency", "6h"), "latency 6h")),
                   "x", f"Burn rates of the availability (99.5%) and latency (99% at RTF 0.8) objectives. "
                   f"Lines: {BURN_TICKET} (ticket over a day), {BURN_PAGE_SLOW} (page over 6 h), "
                   f"{BURN_PAGE_FAST} (page over 1 h). docs/runbook.md#slo.",
                   thresholds=steps((BURN_TICKET, "yellow"), (BURN_PAGE_SLOW, "orange"), (BURN_PAGE_FAST, "red")),
                   min_=0),
        timeseries("GPU memory used",
                   targets((f"instance_gpu:whisper_gpu_memory_used_bytes:ratio{{{JI},{GPU}}}",
                            "GPU {{gpu}} {{instance}}")),
                   "percentunit", f"Used / total per GPU. Lines: {GPU_MEMORY_WARN:.0%} (where pre-allocating "
                   f"servers sit), {GPU_MEMORY_CRIT:.0%} (information after 15 minutes).",
                   thresholds=steps((GPU_MEMORY_WARN, "orange"), (GPU_MEMORY_CRIT, "red")), min_=0, max_=1,
                   width=24),
    ]
    return dashboard("whisper-overview", "Whisper / Overview",
                     "The service's health, SLO burn rates, requests, latency, quality against each "
                     "language's threshold, and what is alerting.",
                     panels, [JOB_VAR, INSTANCE_VAR, GPU_VAR])


def fleet() -> dict:
    """Replicas side by side, and which one is the outlier."""
    by_instance = "{{instance}}"
    panels = [
        row("Service (all replicas)"),
        stat("Replicas up", targets((f"sum(up{{{J}}})", "")), "short",
             "Replicas Prometheus scrapes now (WhisperTargetAbsent pages at none).",
             thresholds=steps((1, "green"), base="red"), width=4,
             no_value="No target: the pods are gone or discovery lost them (WhisperTargetAbsent)"),
        stat("Requests/s", targets((f"sum(job:whisper_requests:rate5m{{{J}}})", "")), "reqps",
             "All replicas' work requests per second, the sum of the parts.", width=4),
        stat("Success ratio (5m)",
             targets((f"1 - sum(job:whisper_requests_errors:rate5m{{{J}}}) / sum(job:whisper_requests:rate5m{{{J}}})",
                      "")),
             "percentunit", "The service's ratio: failed requests of all replicas over all their requests.",
             thresholds=steps((1 - ERROR_RATIO_ALERT, "yellow"), (0.995, "green"), base="red"), decimals=2,
             width=4),
        stat("Error budget burn (1h)",
             targets((f"max({burn('whisper_requests_errors', 'whisper_availability', '1h')})", "")), "x",
             f"Availability budget burn over the last hour; pages above {BURN_PAGE_FAST}.",
             thresholds=BURN_STEPS, decimals=1, width=4),
        stat("Latency budget burn (1h)",
             targets((f"max({burn('whisper_realtime_factor_slow', 'whisper_latency', '1h')})", "")), "x",
             f"Latency budget burn (transcriptions slower than RTF {RTF_LIMIT}) over the last hour.",
             thresholds=BURN_STEPS, decimals=1, width=4),
        stat("p95 latency (5m)", targets((f"max(job:whisper_request_duration_seconds:p95_5m{{{J}}})", "")), "s",
             "The service's end-to-end p95, from all replicas' buckets together.",
             thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), decimals=2, width=4),
        row("The outlier"),
        stat("Worst replica: errors above the fleet",
             targets((f"topk(1, job_instance:whisper_requests_errors:ratio_rate5m{{{JI}}} "
                      f"- on (job) group_left () job:whisper_requests_errors:ratio_rate5m)", by_instance)),
             "percentunit", "The replica whose 5-minute error ratio is furthest above the service's, "
             "and by how much (percentage points).",
             thresholds=steps((0.01, "yellow"), (ERROR_RATIO_ALERT, "red")), decimals=1, width=6, height=6,
             text_mode="value_and_name"),
        stat("Slowest replica against the fleet",
             targets((f"topk(1, job_instance:whisper_realtime_factor:p95_5m{{{JI}}} "
                      f"/ on (job) group_left () quantile by (job) (0.5, job_instance:whisper_realtime_factor:p95_5m{{{JI}}}))",
                      by_instance)),
             "percentunit", "The replica with the highest p95 real-time factor, as a share of the median "
             "replica's (100%: like the others).", thresholds=steps((1.2, "yellow"), (1.5, "red")),
             decimals=0, width=6, height=6, text_mode="value_and_name"),
        table("Replicas side by side",
              [instant(target(f"job_instance:whisper_requests:rate5m{{{JI}}} "
                              f"/ on (job) group_left () job:whisper_requests:rate5m", "", "A")),
               instant(target(f"job_instance:whisper_requests_errors:ratio_rate5m{{{JI}}}", "", "B")),
               instant(target(f"job_instance:whisper_request_duration_seconds:p95_5m{{{JI}}}", "", "C")),
               instant(target(f"job_instance:whisper_realtime_factor:p95_5m{{{JI}}}", "", "D")),
               instant(target(f"min by (job, instance) (whisper_probe_success{{{JI}}} {SPEECH})", "", "E")),
               instant(target(f"max by (job, instance) (instance_gpu:whisper_gpu_memory_used_bytes:ratio{{{JI}}})",
                              "", "F"))],
              "none", "One row per replica, worst error ratio first: its share of the traffic, error "
              "ratio, p95 latency, p95 real-time factor, speech canaries (1 ok, 0 failing) and GPU memory. A replica "
              "with little traffic and many errors is being failed over by the load balancer.",
              width=12, height=6, hide=("Time",),
              rename={"Value #A": "traffic share", "Value #B": "error ratio", "Value #C": "p95 latency s",
                      "Value #D": "p95 RTF", "Value #E": "canary", "Value #F": "GPU memory"},
              sort="error ratio"),
        row("Replicas over time"),
        timeseries("Traffic share",
                   targets((f"job_instance:whisper_requests:rate5m{{{JI}}} "
                            f"/ on (job) group_left () job:whisper_requests:rate5m", by_instance)),
                   "percentunit", "Each replica's share of the service's requests: the load balancer's view.",
                   min_=0, max_=1, width=8),
        timeseries("Error ratio",
                   targets((f"job:whisper_requests_errors:ratio_rate5m{{{J}}}", "service {{job}}"),
                           (f"job_instance:whisper_requests_errors:ratio_rate5m{{{JI}}}", by_instance)),
                   "percentunit", f"Each replica's 5-minute error ratio beside the service's. Line: "
                   f"{ERROR_RATIO_ALERT:.0%} (WhisperErrorRatioHigh, a ticket per replica).",
                   thresholds=steps((ERROR_RATIO_ALERT, "red")), min_=0, width=8),
        timeseries("p95 latency",
                   targets((f"job:whisper_request_duration_seconds:p95_5m{{{J}}}", "service {{job}}"),
                           (f"job_instance:whisper_request_duration_seconds:p95_5m{{{JI}}}", by_instance)),
                   "s", f"End to end, per replica and for the service. Lines: {LATENCY_TARGET} s, {LATENCY_ALERT} s.",
                   thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), min_=0, width=8),
        timeseries("Real-time factor p95",
                   targets((f"job_instance:whisper_realtime_factor:p95_5m{{{JI}}}", by_instance)),
                   "none", f"Processing time / audio duration, all languages of a replica. Line: {RTF_LIMIT}.",
                   thresholds=steps((RTF_LIMIT, "orange"), (1, "red")), min_=0, width=8),
        timeseries("Queue wait p95",
                   targets((f"job_instance:whisper_queue_wait_seconds:p95_5m{{{JI}}}", by_instance)),
                   "s", f"Time requests waited for a worker. Line: {QUEUE_LIMIT * 1000:.0f} ms.",
                   thresholds=steps((QUEUE_LIMIT, "red")), min_=0, width=8),
        timeseries("Canary",
                   targets((f"min by (instance) (whisper_probe_success{{{JI}}} {SPEECH})", by_instance)),
                   "short", "1 when the replica's last speech canaries succeeded, 0 when one failed; a gap is a "
                   "stale canary (WhisperProbeStale).", min_=0, max_=1, width=8),
    ]
    panels += capacity_panels()
    return dashboard("whisper-fleet", "Whisper / Fleet",
                     "The replicas of a Whisper service side by side: the service's totals, the outlier, "
                     "each replica's traffic, errors, latency and canary, and the service's capacity, "
                     "headroom, energy and cost per audio hour.",
                     panels, [JOB_VAR, INSTANCE_VAR, GPU_HOUR_COST_VAR])


# The price of one GPU-hour, typed in on the dashboard: cost per audio hour is GPU-hours per audio hour times it.
GPU_HOUR_COST_VAR = {"name": "gpu_hour_cost", "label": "Cost per GPU-hour", "type": "textbox", "query": "2.50",
                     "current": {"selected": False, "text": "2.50", "value": "2.50"},
                     "options": [{"selected": True, "text": "2.50", "value": "2.50"}], "hide": 0,
                     "skipUrlSync": False}


def capacity_panels() -> list[dict]:
    """Capacity, headroom and efficiency (rules/capacity.yml; the model is in docs/capacity.md)."""
    by_instance = "{{instance}}"
    return [
        row("Capacity and efficiency"),
        timeseries("Demand and measured capacity",
                   targets((f"job:whisper_audio_capacity_seconds:rate1h{{{J}}}", "capacity {{job}}"),
                           (f"job:whisper_audio_processed_seconds:rate5m{{{J}}}", "demand {{job}}")),
                   "none", "Audio seconds per second: done (demand) and what the replicas that served in the "
                   "last hour can do (capacity). WhisperCapacityRunningOut warns when demand's 6-hour trend "
                   "crosses capacity within 4 hours.", min_=0, width=8),
        timeseries("Headroom",
                   targets((f"job:whisper_audio_headroom_seconds:rate1m{{{J}}}", "service {{job}}"),
                           (f"job_instance:whisper_audio_headroom_seconds:rate1m{{{JI}}}", by_instance)),
                   "none", "Audio seconds per second each replica can still take at its measured capacity.",
                   min_=0, width=8),
        timeseries("Saturation",
                   targets((f"job_instance:whisper_server_saturation:ratio_rate1m{{{JI}}}", by_instance)),
                   "percentunit", "Busy ratio (time with a transcription in flight), or for a batching server "
                   "with service.max_concurrency the mean in flight over it.", min_=0, width=8),
        timeseries("Throughput while busy",
                   targets((f"job_instance:whisper_audio_seconds_per_busy_second:ratio_rate1h{{{JI}}}", by_instance)),
                   "none", "Audio seconds done per busy second over the last hour: a one-at-a-time server's "
                   "capacity. For a batching server it rises with concurrency: read it beside the next panel.",
                   min_=0, width=8),
        timeseries("Mean requests in flight",
                   targets((f"job_instance:whisper_requests_in_flight:avg_rate1m{{{JI}}}", by_instance)),
                   "short", "Requests in flight, averaged over the last minute: the concurrency the "
                   "throughput was measured at (queued requests included).", min_=0, width=8),
        timeseries("Energy per audio hour",
                   targets((f"job_instance:whisper_gpu_energy_joules_per_audio_hour:ratio_rate1h{{{JI}}}",
                            "total " + by_instance),
                           (f"job_instance:whisper_gpu_active_energy_joules_per_audio_hour:ratio_rate1h{{{JI}}}",
                            "active " + by_instance)),
                   "joule", "GPU energy over audio done, per audio hour. Active: above the idle floor (the "
                   "power of minutes with nothing in flight, over a day), as Kepler splits it.", min_=0, width=8),
        timeseries("Energy per audio hour by GPU model",
                   targets((f"job_name:whisper_gpu_energy_joules_per_audio_hour:ratio_rate1h{{{J}}}", "{{name}}")),
                   "joule", "Each replica's audio credited to its GPUs' model.", min_=0, width=8),
        stat("GPU-seconds per audio hour",
             targets((f"job:whisper_gpu_seconds_per_audio_hour:ratio_rate1h{{{J}}}", "{{job}}")), "s",
             "GPU utilisation over audio throughput, over the last hour.", width=4),
        stat("Cost per audio hour",
             targets((f"job:whisper_gpu_hours_per_audio_hour:ratio_rate1h{{{J}}} * $gpu_hour_cost", "{{job}}")),
             "short", "GPUs held (busy or not) over audio hours done per hour, times the cost per GPU-hour "
             "typed in above.", decimals=3, width=4),
    ]


def performance() -> dict:
    q = "histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{sel}}}[" + RI + "])))"
    panels = [
        row("End-to-end latency"),
        timeseries("Latency by endpoint",
                   targets(*[(q.format(q=p, by=", endpoint", metric="whisper_request_duration_seconds",
                                       sel=f"{JI},{WORK}"), f"p{int(p * 100)} {{{{endpoint}}}}")
                             for p in (0.5, 0.95, 0.99)]),
                   "s", f"From the server's log (needs a log with durations). Lines: {LATENCY_TARGET} s "
                   f"target for a 10 s clip, {LATENCY_ALERT} s p95 alert.",
                   thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), min_=0),
        heatmap("Latency distribution", "whisper_request_duration_seconds", f"{JI},{WORK}", "s",
                "Requests per second in each latency bucket."),
        timeseries("Inference time p95 by language",
                   targets((q.format(q=0.95, by=", language", metric="whisper_inference_duration_seconds",
                                     sel=f"{JI},{LANG}"), "{{language}}")),
                   "s", "Time spent transcribing, as the server logged it.", min_=0),
        heatmap("Inference time distribution", "whisper_inference_duration_seconds", f"{JI},{LANG}", "s",
                "Requests per second in each inference-time bucket."),
        timeseries("Canary probe duration",
                   targets((f"whisper_probe_duration_seconds{{{JI}}}", "{{probe}} {{instance}}")),
                   "s", "End to end time of the last canary probe (request sent to transcript read).",
                   thresholds=steps((LATENCY_TARGET, "yellow"), (LATENCY_ALERT, "red")), min_=0, width=24),
        row("Real-time factor"),
        timeseries("Real-time factor p95 by language",
                   targets((q.format(q=0.95, by=", language", metric="whisper_realtime_factor",
                                     sel=f"{JI},{LANG}"), "{{language}}")),
                   "none", f"Processing time / audio duration (smaller is faster). Line: {RTF_LIMIT} "
                   "(alert WhisperRealtimeFactorHigh); above 1 the server falls behind.",
                   thresholds=steps((RTF_LIMIT, "orange"), (1, "red")), min_=0),
        heatmap("Real-time factor distribution", "whisper_realtime_factor", f"{JI},{LANG}", "none",
                "Requests per second in each real-time factor bucket."),
        timeseries("Canary real-time factor",
                   targets((f"whisper_probe_realtime_factor{{{JI}}}", "{{probe}} {{instance}}")),
                   "none", f"Canary duration / its audio's duration. Line: {RTF_LIMIT}.",
                   thresholds=steps((RTF_LIMIT, "orange"), (1, "red")), min_=0),
        timeseries("Audio processed",
                   targets((f"sum by (language) (rate(whisper_audio_processed_seconds_total{{{JI},{LANG}}}[{RI}]))",
                            "{{language}}")),
                   "suffix: s audio/s", "Seconds of audio transcribed per second, by language.", stack=True),
        row("Queue and load"),
        timeseries("Queue wait",
                   targets((q.format(q=0.5, by="", metric="whisper_queue_wait_seconds", sel=JI), "p50"),
                           (q.format(q=0.95, by="", metric="whisper_queue_wait_seconds", sel=JI), "p95")),
                   "s", f"Time requests waited for a worker. Line: {QUEUE_LIMIT * 1000:.0f} ms "
                   "(alert WhisperQueueWaitHigh).",
                   thresholds=steps((QUEUE_LIMIT, "red")), min_=0),
        heatmap("Queue wait distribution", "whisper_queue_wait_seconds", JI, "s",
                "Requests per second in each queue-wait bucket."),
        timeseries("Requests by language",
                   targets((f"sum by (language) (rate(whisper_requests_total{{{JI},{LANG},{WORK}}}[{RI}]))",
                            "{{language}}")),
                   "reqps", "Transcription requests per second by language (unknown: the log does not say).",
                   stack=True),
        timeseries("Error ratio by replica",
                   targets(("job:whisper_requests_errors:ratio_rate5m{job=~\"$job\"}", "service {{job}}"),
                           (f"job_instance:whisper_requests_errors:ratio_rate5m{{{JI}}}", "{{instance}}")),
                   "percentunit", f"5xx and failed requests over 5 minutes, of the service and per replica. Line: "
                   f"{ERROR_RATIO_ALERT:.0%}. Not by language: a request that fails is logged before its language "
                   "is known, so failures land in language=\"unknown\".",
                   thresholds=steps((ERROR_RATIO_ALERT, "red")), min_=0),
        timeseries("Failed requests by endpoint and status",
                   targets((f"sum by (endpoint, status_code) (rate(whisper_requests_total{{{JI},{WORK},"
                            f"status_code=~\"5..|error\"}}[{RI}]))", "{{status_code}} {{endpoint}}")),
                   "reqps", "Failed requests per second: which endpoint, which status.", stack=True, min_=0,
                   no_value="No failed request in this range"),
        timeseries("429 rejections",
                   targets((f"job_instance:whisper_requests_rejected:rate1m{{{JI}}}", "{{instance}}")),
                   "reqps", "Requests answered 429 Too Many Requests per second. Line: 0.1/s.",
                   thresholds=steps((0.1, "red")), min_=0),
        timeseries("429 share of requests",
                   targets((f"job_instance:whisper_requests_rejected:ratio_rate5m{{{JI}}}", "{{instance}}")),
                   "percentunit", "Share of a replica's requests answered 429 over 5 minutes. Line: 5% "
                   "(WhisperRequestsRejected).", thresholds=steps((0.05, "red")), min_=0),
        heatmap("Audio duration distribution", "whisper_audio_duration_seconds", f"{JI},{LANG}", "s",
                "Requests per second in each audio-length bucket: longer audio, longer requests."),
        row("Streaming"),
        timeseries("Canary lag behind the speech",
                   targets((f"whisper_probe_finalisation_lag_seconds{{{JI}}}", "finalisation {{probe}} {{instance}}"),
                           (f"whisper_probe_transcript_lag_seconds{{{JI}}}", "transcript {{probe}} {{instance}}")),
                   "s", "Streaming canaries (service.api wyoming, openai-realtime, whisperlive): finalisation, "
                   "from the end of the canary's audio to its final transcript (what a speaker waits after "
                   "they stop talking); transcript (WhisperLive), the audio sent minus the end of the last "
                   "completed segment when the audio ended. Alert WhisperStreamingLagGrowing: twice the day "
                   "before's median.", min_=0, width=10,
                   no_value="No streaming canary (service.api wyoming, openai-realtime, whisperlive), or none answered"),
        timeseries("Canary first partial",
                   targets((f"whisper_probe_first_partial_seconds{{{JI}}}", "{{probe}} {{instance}}")),
                   "s", f"From the canary's first audio to its first partial transcript. Line: "
                   f"{FIRST_PARTIAL_TARGET} s (alert WhisperStreamingFirstPartialSlow).",
                   thresholds=steps((FIRST_PARTIAL_TARGET, "red")), min_=0, width=10,
                   no_value="No partial transcripts: the server answers once (wyoming-faster-whisper does)"),
        stat("Wyoming describe",
             targets((f"whisper_wyoming_up{{{JI}}}", "{{instance}}")),
             "none", "The Wyoming server's own health check (its Docker HEALTHCHECK): describe answered "
             "with an info listing a speech-to-text program (alert WhisperWyomingDown).",
             mappings=UP_DOWN, thresholds=steps((1, "green"), base="red"), width=4, height=8,
             no_value="No Wyoming server probed (service.api wyoming)"),
        # Users' own sessions, from the tap's WebSocket relay (docs/streaming.md).
        timeseries("Streaming sessions through the tap",
                   targets((f"sum by (protocol) (whisper_stream_sessions_in_flight{{{JI}}})", "in flight {{protocol}}"),
                           (f"sum by (protocol) (rate(whisper_stream_rejections_total{{{JI}}}[{RI}]))",
                            "rejected/s {{protocol}}")),
                   "short", "Users' WebSocket sessions through the request tap now, by protocol, and sessions "
                   "the server turned away (WhisperLive WAIT: all its clients busy).", min_=0, width=6,
                   no_value="No WebSocket session through the tap (collectors.tap, docs/streaming.md)"),
        timeseries("Users' first partial p95",
                   targets((q.format(q=0.95, by=", protocol", metric="whisper_stream_first_partial_seconds",
                                     sel=JI), "{{protocol}}")),
                   "s", f"Users' sessions: from a turn's first audio to its first partial transcript, as the tap "
                   f"relayed them. Line: {FIRST_PARTIAL_TARGET} s, the canaries' alert.",
                   thresholds=steps((FIRST_PARTIAL_TARGET, "red")), min_=0, width=6,
                   no_value="No streaming turn through the tap in this range"),
        timeseries("Users' lag behind the speech p95",
                   targets((q.format(q=0.95, by=", protocol", metric="whisper_stream_finalisation_lag_seconds",
                                     sel=JI), "finalisation {{protocol}}"),
                           (q.format(q=0.95, by=", protocol", metric="whisper_stream_transcript_lag_seconds",
                                     sel=JI), "transcript {{protocol}}")),
                   "s", "Users' sessions: finalisation, from the end of a turn to its completed transcript; "
                   "transcript (WhisperLive), the audio sent minus the end of the last completed segment. A "
                   "transcript lag that keeps growing is a server falling behind.", min_=0, width=6,
                   no_value="No streaming turn through the tap in this range"),
        timeseries("Streaming errors",
                   targets((f"sum by (protocol, type) (rate(whisper_stream_errors_total{{{JI}}}[{RI}]))",
                            "{{type}} {{protocol}}")),
                   "short", "Error events per second in users' sessions: OpenAI Realtime error.type, failed "
                   "transcriptions and responses; WhisperLive status ERROR.", min_=0, width=6,
                   no_value="No error event in this range"),
    ]
    return dashboard("whisper-performance", "Whisper / Performance",
                     "Latency and real-time factor by language, histograms, queue wait.",
                     panels, [JOB_VAR, INSTANCE_VAR, REQUEST_LANGUAGE_VAR])


def language_id_panels(ql: str) -> list[dict]:
    """Language identification: accuracy per language, and which language is taken for which."""
    accuracy = f"language:whisper_quality_language_id_accuracy:ratio_rate6h{{{ql}}}"
    confusion = table("Which language is taken for which (1d)",
                      [instant(target(f"sum by (language, detected) "
                                      f"(language_detected:whisper_quality_language_identified:increase1d{{{ql}}})",
                                      ""))],
                      "short", "Items of each labelled language (rows) by the language the server detected "
                      "(columns) over the last day, sent without a language: the diagonal is right, the rest "
                      "is what it was mistaken for (unknown: the answer named none).", width=16)
    confusion["transformations"] = [{"id": "groupingToMatrix", "options": {
        "columnField": "detected", "rowField": "language", "valueField": "Value", "emptyValue": "zero"}}]
    return [
        row("Language identification"),
        bargauge("Language identified correctly (6h)",
                 [instant(target(accuracy, "{{language}} ({{set}})"))],
                 "percentunit", "Share of each language's items (sent without a language) that the server "
                 "identified as that language, over 6 hours (whisper_quality_language_identified_total).",
                 thresholds=steps((0.9, "yellow"), (0.98, "green"), base="red"), max_=1, width=8),
        confusion,
        timeseries("Language identified correctly (6h window)", targets((accuracy, "{{language}} ({{set}})")),
                   "percentunit", "The 6-hour identification accuracy per language and set, over time: a "
                   "model or detection-threshold change shows as a step.", min_=0, max_=1, width=24),
    ]


def quality() -> dict:
    ql = f'job=~"$job",{LANG},{SET}'  # recorded corpus rates are per job (summed over instances)
    qsel = f"{JI},{LANG},{SET}"
    wer_steps = steps((MANDARIN_TARGET, "yellow"), (ERROR_RATE_ALERT, "red"))
    panels = [
        row("Each language against its own threshold"),
        bargauge("Error rate against its threshold (6h)",
                 [instant(target(f"language:whisper_quality_error_rate:ratio_rate6h{{{ql}}} "
                                 f"/ on (job, language) group_left () language:whisper_quality_max_error_rate:threshold",
                                 "{{language}} {{unit}} ({{set}})"))],
                 "percentunit", "Each language's error rate over 6 hours as a share of its own threshold "
                 "(collectors.quality.thresholds, 15% where none): 100% is the threshold "
                 "(WhisperQualityErrorRateHigh, with at least 500 reference units).",
                 thresholds=steps((0.8, "yellow"), (1, "red")), max_=2, width=8),
        timeseries("Error rate and threshold (6h window)",
                   targets((f"language:whisper_quality_error_rate:ratio_rate6h{{{ql}}}",
                            "{{language}} {{unit}} ({{set}})"),
                           (f"language:whisper_quality_max_error_rate:threshold{{job=~\"$job\",{LANG}}}",
                            "threshold {{language}}")),
                   "percentunit", "The 6-hour corpus error rate the alert judges, beside each language's "
                   "threshold.", min_=0, width=8),
        table("Change against 7 days ago",
              [instant(target(f"language:whisper_quality_error_rate:ratio_rate6h{{{ql}}}", "", "A")),
               instant(target(f"language:whisper_quality_error_rate:ratio_rate6h_offset1w{{{ql}}}", "", "B")),
               instant(target(f"language:whisper_quality_error_rate:ratio_rate6h{{{ql}}} "
                              f"- language:whisper_quality_error_rate:ratio_rate6h_offset1w", "", "C"))],
              "percentunit", "The last 6 hours against the same 6 hours a week ago (WhisperQualityRegressed: "
              "1.5 times and 2 points more).", width=8, hide=("Time", "job"),
              rename={"Value #A": "last 6h", "Value #B": "a week ago", "Value #C": "change"}, sort="change"),
        row("Error rate by language"),
        bargauge("Error rate by language, last hour",
                 [instant(target(f"language:whisper_quality_error_rate:ratio_rate1h{{{ql}}}",
                                 "{{language}} {{unit}} ({{set}})"))],
                 "percentunit", "Corpus error rate (errors / reference units) over the last hour: WER, or "
                 f"CER for unit=char. Yellow from {MANDARIN_TARGET:.0%} (Mandarin accuracy target 92%), "
                 f"red from {ERROR_RATE_ALERT:.0%} (alert WhisperQualityErrorRateHigh).",
                 thresholds=wer_steps, max_=0.5),
        timeseries("Error rate by language (1h window)",
                   targets((f"language:whisper_quality_error_rate:ratio_rate1h{{{ql}}}",
                            "{{language}} {{unit}} ({{set}})")),
                   "percentunit", f"Corpus error rate over a sliding hour. Lines: {MANDARIN_TARGET:.0%}, "
                   f"{ERROR_RATE_ALERT:.0%} (alert).", thresholds=wer_steps, min_=0),
        timeseries("Error rate trend (1d window)",
                   targets((f"language:whisper_quality_error_rate:ratio_rate1d{{{ql}}}",
                            "{{language}} {{unit}} ({{set}})")),
                   "percentunit", "Corpus error rate over a sliding day: the trend.",
                   thresholds=wer_steps, min_=0),
        timeseries("Character error rate (zh, yue, ja, ko, th, ...)",
                   targets((f'language:whisper_quality_error_rate:ratio_rate1h{{{ql},unit="char"}}',
                            "{{language}} ({{set}})")),
                   "percentunit", f"Languages scored in characters. Line: {MANDARIN_TARGET:.0%} "
                   "(accuracy > 92% for Mandarin).",
                   thresholds=steps((MANDARIN_TARGET, "yellow"), (ERROR_RATE_ALERT, "red")), min_=0),
        timeseries("Errors by type",
                   targets((f"sum by (language, type) (rate(whisper_quality_errors_total{{{qsel}}}[{RI}])) "
                            f"/ ignoring (type) group_left () "
                            f"sum by (language) (rate(whisper_quality_reference_units_total{{{qsel}}}[{RI}]))",
                            "{{language}} {{type}}")),
                   "percentunit", "Substitutions, deletions and insertions per reference unit; stacked, "
                   "they add up to the error rate. Insertions jump with hallucinations.", stack=True, min_=0),
        timeseries("Last evaluation round",
                   targets((f"whisper_quality_error_rate{{{qsel}}}", "{{language}} {{unit}} ({{set}})")),
                   "percentunit", "Error rate of the last evaluation round of each language and set.",
                   thresholds=wer_steps, min_=0),
        timeseries("Utterances evaluated",
                   targets((f"sum by (set, result) (rate(whisper_quality_utterances_total{{{qsel}}}[{RI}]))",
                            "{{set}} {{result}}")),
                   "cps", "Utterances scored (a transcript was compared) or failed (none came back).",
                   stack=True),
        stat("Evaluation age",
             targets((f"time() - max by (set) (whisper_quality_last_evaluation_timestamp_seconds{{{JI}}})",
                      "{{set}}")),
             "s", "Time since the newest evaluation round of each set ended (alert after 3 hours).",
             thresholds=steps((3 * 3600, "red")), width=6, height=8),
        row("Punctuation"),
        timeseries("Punctuation error rate (1h window)",
                   targets((f"language:whisper_quality_punctuation_error_rate:ratio_rate1h{{{ql}}}",
                            "{{language}} ({{set}})")),
                   "percentunit", "PER as LibriSpeech-PC defines it: substituted, deleted and inserted marks "
                   "(. , ? !) over all marks, on the utterances whose reference keeps punctuation. WER ignores "
                   "punctuation, so a model that drops every full stop shows here only.", min_=0, max_=1, width=12),
        timeseries("Punctuation marks by mark and result",
                   targets((f'sum by (mark, result) (rate(whisper_quality_punctuation_marks_total{{{qsel},'
                            f'result!="correct"}}[{RI}])) / ignoring (result) group_left () '
                            f"(sum by (mark) (rate(whisper_quality_punctuation_marks_total{{{qsel}}}[{RI}])) > 0)",
                            "{{mark}} {{result}}")),
                   "percentunit", "Per mark, the share of its marks substituted (on the reference's mark), "
                   "deleted or inserted: which mark the server loses or adds.", stack=True, min_=0, width=12),
        *language_id_panels(ql),
        row("Hallucinations"),
        timeseries("Suspected hallucinations (1h)",
                   targets(('job:whisper_hallucination_suspected:ratio_rate1h{job=~"$job"}', "{{source}}")),
                   "percentunit", "Share of the transcripts checked in the last hour that look like text nobody "
                   "said, by source (traffic: the tap or a log with transcripts; reference; canary). Line: 2%, "
                   "WhisperHallucinationRatioHigh (with at least 200 checked).",
                   thresholds=steps((0.02, "red")), min_=0, width=8),
        timeseries("Suspects by reason",
                   targets((f"sum by (source, reason) (rate(whisper_hallucination_suspects_total{{{JI}}}[{RI}]))",
                            "{{source}} {{reason}}")),
                   "cps", "Suspected transcripts per second by reason: repetition (a decoding loop), known_phrase "
                   "(\"Thanks for watching\", subtitle credits), no_speech (text where Whisper said nobody spoke), "
                   "too_much_text (more text than the audio holds).", stack=True, width=8),
        timeseries("Negative canaries answered with text",
                   targets((f'sum by (probe) (rate(whisper_probe_runs_total{{{JI},result="hallucination"}}[{RI}]))',
                            "{{probe}}")),
                   "cps", "Probes per second where a non-speech canary (silence, noise, a tone; expected "
                   "transcript empty) came back with text (WhisperCanaryHallucinating).", min_=0, width=8),
        row("Review of production samples"),
        stat("Samples waiting for review",
             targets((f"sum by (instance) (whisper_quality_review_pending_items{{{JI}}})", "{{instance}}")),
             "short", "Production samples in the review queue that no reviewer has verified or flagged yet "
             "(verify them on the exporter's /review page, or in Label Studio).", width=6, height=8),
        stat("Oldest waiting sample",
             targets((f"max by (instance) (whisper_quality_review_oldest_pending_age_seconds{{{JI}}})",
                      "{{instance}}")),
             "s", "How long the oldest pending sample has waited for review on /review (0 when none waits). "
             "Red from 3 days (WhisperReviewBacklogStale): the tap deletes kept audio after "
             "collectors.tap.sample_retention, 7 days by default.",
             thresholds=steps((86400, "yellow"), (3 * 86400, "red")), width=6, height=8),
        timeseries("Reviews per hour against samples queued",
                   targets((f"sum by (result) (rate(whisper_quality_reviews_total{{{JI}}}[{RI}])) * 3600",
                            "{{result}}"),
                           (f"sum (rate(whisper_quality_review_queue_added_total{{{JI}}}[{RI}])) * 3600",
                            "queued")),
                   "short", "Reviews per hour by result (verified: scored; flagged: once per flag; skipped), "
                   "from /review and review import, beside the samples added to the queue per hour: while "
                   "queued stays above verified plus flagged, the backlog grows. Verified and flagged count at "
                   "the quality collector's next run.", min_=0, width=12),
        timeseries("Hallucination detector against reviewers (7 days)",
                   targets((f'language:whisper_hallucination_review_precision:ratio_rate7d{{job=~"$job",{LANG}}}',
                            "precision {{language}}"),
                           (f'language:whisper_hallucination_review_recall:ratio_rate7d{{job=~"$job",{LANG}}}',
                            "recall {{language}}")),
                   "percentunit", "The hallucination detector's verdicts on reviewed production transcripts with "
                   "text, against the reviewers' (no speech flagged: a confirmed hallucination). Precision: of "
                   "the transcripts it suspected, the share reviewers confirmed. Recall: of those confirmed, the "
                   "share it suspected. Low precision makes its alerts noise; low recall means users see "
                   "hallucinations it misses.", min_=0, max_=1, width=12),
        timeseries("Confirmed hallucinations per day",
                   targets((f"sum by (language) (rate(whisper_hallucination_confirmed_total{{{JI},{LANG}}}[{RI}])) "
                            "* 86400", "{{language}}")),
                   "short", "Reviewed production transcripts with text on audio a reviewer flagged as no speech, "
                   "per day at the rate of each interval: text nobody said that reached users. Counted when "
                   "the quality collector takes the review.", min_=0, width=12),
        row("Canary"),
        stat("Canary success (1h)",
             targets((f"job_instance_probe:whisper_probe_runs_success:ratio_rate1h{{{JI}}}", "{{probe}}")),
             "percentunit", "Share of the last hour's canary probes that succeeded.",
             thresholds=steps((0.9, "yellow"), (0.99, "green"), base="red"), width=6, height=8),
        timeseries("Canary transcript error rate",
                   targets((f"whisper_probe_word_error_rate{{{JI}}}", "{{probe}} {{instance}}")),
                   "percentunit", "WER (CER for char languages) of the last canary transcript against its "
                   f"reference. Line: {ERROR_RATE_ALERT:.0%}.",
                   thresholds=steps((ERROR_RATE_ALERT, "red")), min_=0, width=9),
        timeseries("Canary probes by result",
                   targets((f"sum by (result) (rate(whisper_probe_runs_total{{{JI}}}[{RI}]))", "{{result}}")),
                   "cps", "Canary probes per second by result: success, wrong_transcript, http_error, "
                   "timeout, connection_error, bad_response.", stack=True, bars=True, width=9),
        timeseries("Canary avg_logprob (worst segment)",
                   targets((f"whisper_probe_avg_logprob{{{JI}}}", "{{probe}} {{instance}}")),
                   "none", "Lowest average log probability of the transcript's segments; Whisper fails a "
                   "segment below -1.", thresholds=steps((-1, "green"), base="red"), width=6),
        timeseries("Canary compression ratio (worst segment)",
                   targets((f"whisper_probe_compression_ratio{{{JI}}}", "{{probe}} {{instance}}")),
                   "none", "Highest compression ratio of the transcript's segments; above 2.4 the text is "
                   "repetitive (a hallucination loop).", thresholds=steps((2.4, "red")), min_=0, width=6),
        timeseries("Canary no_speech_prob (worst segment)",
                   targets((f"whisper_probe_no_speech_prob{{{JI}}}", "{{probe}} {{instance}}")),
                   "percentunit", "Highest no-speech probability; above 0.6 with a low logprob Whisper "
                   "takes the segment for silence.", thresholds=steps((0.6, "red")), min_=0, max_=1, width=6),
        timeseries("Canary fallback segments",
                   targets((f"whisper_probe_fallback_segments{{{JI}}}", "{{probe}} {{instance}}")),
                   "short", "Segments decoded at a temperature above 0: Whisper's checks failed at 0.",
                   thresholds=steps((1, "orange")), min_=0, width=6),
        table("Canaries",
              [instant(target(f"whisper_probe_info{{{JI}}}", ""))], "none",
              "The configured canaries, their language and scoring unit.", width=24, height=5,
              hide=("Time", "Value", "__name__")),
    ]
    return dashboard("whisper-quality", "Whisper / Quality",
                     "Transcription error rate (WER/CER) by language and its trend, and the canary's results.",
                     panels, [JOB_VAR, INSTANCE_VAR, QUALITY_LANGUAGE_VAR, SET_VAR], time_from="now-24h")


def resources() -> dict:
    g = f"{JI},{GPU}"
    legend = "GPU {{gpu}} {{instance}}"
    panels = [
        row("GPU"),
        timeseries("GPU utilisation", targets((f"whisper_gpu_utilization_ratio{{{g}}}", legend)),
                   "percentunit", "Time a kernel was running on the GPU.", min_=0, max_=1, width=8),
        timeseries("GPU memory used",
                   targets((f"instance_gpu:whisper_gpu_memory_used_bytes:ratio{{{g}}}", legend)),
                   "percentunit", f"Used / total. Lines: {GPU_MEMORY_WARN:.0%} (sustained 5 min: warning), "
                   f"{GPU_MEMORY_CRIT:.0%} (10 min: critical).",
                   thresholds=steps((GPU_MEMORY_WARN, "orange"), (GPU_MEMORY_CRIT, "red")), min_=0, max_=1,
                   width=8),
        timeseries("GPU memory",
                   targets((f"whisper_gpu_memory_used_bytes{{{g}}}", "used " + legend),
                           (f"whisper_gpu_memory_total_bytes{{{g}}}", "total " + legend),
                           (f"whisper_gpu_memory_reserved_bytes{{{g}}}", "reserved " + legend)),
                   "bytes", "Used (as nvidia-smi shows it), total, and driver-reserved memory.", min_=0,
                   width=8),
        timeseries("GPU memory by server process",
                   targets((f"whisper_gpu_process_memory_used_bytes{{{g}}}", "pid {{pid}} " + legend)),
                   "bytes", "Memory of the watched Whisper server's processes (needs matching pids).",
                   min_=0, width=8),
        timeseries("GPU memory bandwidth utilisation",
                   targets((f"whisper_gpu_memory_utilization_ratio{{{g}}}", legend)),
                   "percentunit", "Time device memory was being read or written.", min_=0, max_=1, width=8),
        timeseries("Power",
                   targets((f"whisper_gpu_power_watts{{{g}}}", "draw " + legend),
                           (f"rate(whisper_gpu_energy_joules_total{{{g}}}[{RI}])", "mean " + legend),
                           (f"whisper_gpu_power_limit_watts{{{g}}}", "limit " + legend)),
                   "watt", "Sampled power draw, mean power from the energy counter, and the enforced limit.",
                   min_=0, width=8),
        timeseries("Temperature", targets((f"whisper_gpu_temperature_celsius{{{g}}}", legend)),
                   "celsius", f"Line: {GPU_TEMPERATURE} °C (alert WhisperGpuTemperatureHigh).",
                   thresholds=steps((GPU_TEMPERATURE, "red")), width=8),
        timeseries("SM clock", targets((f"whisper_gpu_sm_clock_hertz{{{g}}}", legend)), "hertz",
                   "Streaming multiprocessor clock; it drops when the GPU throttles.", min_=0, width=8),
        timeseries("Clock slowdown reasons active",
                   targets((f"whisper_gpu_clock_event_active{{{g}}} == 1", "{{reason}} " + legend)),
                   "short", "Reasons holding the clocks down now. gpu_idle and sw_power_cap under load are "
                   "normal; thermal and hardware slowdowns alert (WhisperGpuThrottled).",
                   bars=True, width=8),
        timeseries("XID errors",
                   targets((f"whisper_gpu_xid_errors_total{{{g}}}", "XID {{xid}} " + legend)),
                   "short", "XID errors counted per code since the exporter started.", bars=True, width=8),
        timeseries("ECC errors",
                   targets((f"whisper_gpu_ecc_errors_total{{{g}}}", "{{type}} " + legend)),
                   "short", "Volatile ECC error counts since the driver loaded.", width=8),
        timeseries("GPU compute processes",
                   targets((f"whisper_gpu_processes{{{g}}}", "matched={{matched}} " + legend)),
                   "short", "Compute processes that are (true) or are not (false) the watched server's.",
                   width=8),
        row("Whisper server process"),
        timeseries("Server CPU (cores)",
                   targets((f"sum by (instance, mode) (rate(whisper_process_cpu_seconds_total{{{JI}}}[{RI}]))",
                            "{{mode}} {{instance}}")),
                   "short", "CPU seconds per second used by the server's processes (1 = one core).",
                   stack=True, min_=0, width=8),
        timeseries("Server resident memory",
                   targets((f"whisper_process_resident_memory_bytes{{{JI}}}", "{{instance}}")),
                   "bytes", "Sum of the RSS of the server's processes.", min_=0, width=8),
        timeseries("Server threads and open files",
                   targets((f"whisper_process_threads{{{JI}}}", "threads {{instance}}"),
                           (f"whisper_process_open_fds{{{JI}}}", "open fds {{instance}}")),
                   "short", "Threads and open file descriptors of the server's processes.", min_=0, width=8),
        stat("Server uptime",
             targets((f"time() - whisper_process_start_time_seconds{{{JI}}}", "{{instance}}")), "s",
             "Since the oldest server process started.", width=12),
        stat("Server processes", targets((f"whisper_process_processes{{{JI}}}", "{{instance}}")), "short",
             "Processes watched (roots and children).", thresholds=steps((1, "green"), base="red"), width=12),
    ]
    return dashboard("whisper-resources", "Whisper / Resources",
                     "GPU utilisation, memory, power, temperature, clocks and errors; the server's CPU and memory.",
                     panels, [JOB_VAR, INSTANCE_VAR, GPU_VAR])


def exporter() -> dict:
    c = JI
    panels = [
        row("Exporter"),
        stat("Scrape", targets((f"min(up{{{c}}})", "")), "none", "Whether Prometheus can scrape the exporter.",
             mappings=UP_DOWN, thresholds=steps((1, "green"), base="red"), width=4),
        table("Build", [instant(target(f"whisper_exporter_build_info{{{c}}}", ""))], "none",
              "Version of each exporter.", width=8, height=4, hide=("Time", "Value", "__name__")),
        stat("Collectors down", targets((f"count(whisper_exporter_collector_up{{{c}}} == 0) or vector(0)", "")),
             "short", "Collectors whose last run failed or is overdue.",
             thresholds=steps((1, "red")), width=4),
        stat("Scrape duration", targets((f"max(scrape_duration_seconds{{{c}}})", "")), "s",
             "How long the last scrape took (it only reads cached results).",
             thresholds=steps((0.5, "yellow"), (1, "red")), width=4),
        stat("Samples per scrape", targets((f"max(scrape_samples_scraped{{{c}}})", "")), "short",
             "Series in one scrape: watch for label cardinality.", width=4),
        row("Collectors"),
        timeseries("Collector up", targets((f"whisper_exporter_collector_up{{{c}}}", "{{collector}} {{instance}}")),
                   "short", "1 when the collector's last run succeeded and none is overdue.",
                   min_=0, max_=1, width=8),
        timeseries("Collector run duration",
                   targets((f"whisper_exporter_collector_duration_seconds{{{c}}}", "{{collector}} {{instance}}")),
                   "s", "Duration of each collector's last run.", min_=0, width=8),
        timeseries("Collector errors",
                   targets((f"sum by (collector) (rate(whisper_exporter_collector_errors_total{{{c}}}[{RI}]))",
                            "{{collector}}")),
                   "cps", "Failed runs, timeouts and render failures per second.", min_=0, width=8),
        timeseries("Time since last run",
                   targets((f"time() - whisper_exporter_collector_last_run_timestamp_seconds{{{c}}}",
                            "{{collector}} {{instance}}")),
                   "s", "Seconds since each collector's last finished run began.", min_=0, width=12),
        timeseries("Canary probe last run",
                   targets((f"time() - whisper_probe_last_run_timestamp_seconds{{{c}}}", "{{probe}} {{instance}}")),
                   "s", "Seconds since each canary was last probed.", min_=0, width=12),
        row("Log following"),
        timeseries("Lines read", targets((f"sum by (path) (rate(whisper_exporter_log_lines_total{{{c}}}[{RI}]))",
                                          "{{path}}")),
                   "cps", "Complete lines read per second from each log path.", min_=0, width=8),
        timeseries("Bad lines by reason",
                   targets((f"sum by (path, reason) (rate(whisper_exporter_log_parse_errors_total{{{c}}}[{RI}]))",
                            "{{reason}} {{path}}")),
                   "cps", "Lines skipped as bad, per second.", min_=0, stack=True, width=8),
        timeseries("Lines ignored",
                   targets((f"sum by (path) (rate(whisper_exporter_log_lines_ignored_total{{{c}}}[{RI}]))",
                            "{{path}}")),
                   "cps", "Lines that are not about a request (start-up messages, ...).", min_=0, width=8),
        timeseries("Bytes read", targets((f"sum by (path) (rate(whisper_exporter_log_read_bytes_total{{{c}}}[{RI}]))",
                                          "{{path}}")),
                   "Bps", "Bytes read per second from each log path.", min_=0, width=8),
        timeseries("Seconds since the last line",
                   targets((f"whisper_exporter_log_seconds_since_last_line{{{c}}}", "{{path}} {{instance}}")),
                   "s", f"Line: {LOG_STALLED // 60} minutes (alert WhisperLogStalled while the canary succeeds).",
                   thresholds=steps((LOG_STALLED, "red")), min_=0, width=8),
        timeseries("Files open", targets((f"whisper_exporter_log_files{{{c}}}", "{{path}} {{instance}}")),
                   "short", "Files open for each configured path (0: the file is not there).", min_=0, width=8),
        timeseries("Rotations and read errors",
                   targets((f"sum by (path) (rate(whisper_exporter_log_rotations_total{{{c}}}[{RI}]))",
                            "rotations {{path}}"),
                           (f"sum by (path, reason) (rate(whisper_exporter_log_read_errors_total{{{c}}}[{RI}]))",
                            "read errors {{reason}} {{path}}")),
                   "cps", "Rotations seen (rename, re-create, truncation) and read errors per second.",
                   min_=0, width=12),
        timeseries("Label values folded into \"other\"",
                   targets((f"sum by (label) (rate(whisper_exporter_log_label_folded_total{{{c}}}[{RI}]))",
                            "{{label}}")),
                   "cps", "Values outside a label's allowed set, counted as other.", min_=0, width=12),
        row("Exporter process"),
        timeseries("Exporter CPU (cores)",
                   targets((f"rate(process_cpu_seconds_total{{{c}}}[{RI}])", "{{instance}}")),
                   "short", "CPU seconds per second of the exporter itself.", min_=0, width=8),
        timeseries("Exporter resident memory",
                   targets((f"process_resident_memory_bytes{{{c}}}", "{{instance}}")),
                   "bytes", "The exporter's own RSS: it must stay flat under log floods.", min_=0, width=8),
        timeseries("Exporter open files",
                   targets((f"process_open_fds{{{c}}}", "{{instance}}")),
                   "short", "The exporter's own open file descriptors.", min_=0, width=8),
    ]
    return dashboard("whisper-exporter", "Whisper / Exporter",
                     "The exporter's own health: scrapes, collectors, log following, its process.",
                     panels, [JOB_VAR, INSTANCE_VAR])


DASHBOARDS = {
    "whisper-overview.json": overview,
    "whisper-fleet.json": fleet,
    "whisper-performance.json": performance,
    "whisper-quality.json": quality,
    "whisper-resources.json": resources,
    "whisper-exporter.json": exporter,
}


def render() -> dict[str, str]:
    """File name -> the JSON text to commit."""
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, text in render().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
