"""The Grafana dashboards: current with their generator, import-ready (one datasource variable
used everywhere, no hard-coded uid), conventions (variables, $__rate_interval, units, heatmaps,
thresholds), every query parses (promtool), and every metric name a query or a rule uses is in
the exposition of a real exporter running all its collectors."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml
from helpers import require_tool, samples
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "dashboards"
RULES = ROOT / "rules"
DS = {"type": "prometheus", "uid": "${datasource}"}
EXPECTED = {"whisper-overview.json", "whisper-fleet.json", "whisper-performance.json", "whisper-quality.json",
            "whisper-resources.json", "whisper-exporter.json"}
# Series that Prometheus makes itself, not the exporter.
PROMETHEUS_NAMES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped",
                    "scrape_samples_post_metric_relabeling", "scrape_series_added"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan", "Inf", "NaN"}

pytest_plugins = ["whisper_server"]


# -- reading dashboards and queries (also used by tests/test_stack.py) ---------------------------

def load_dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def label_values_selector(query: str) -> str:
    """label_values(selector, label) -> selector (what Grafana asks Prometheus for)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip(), re.S)
    assert m, f"not a label_values() query: {query!r}"
    return m.group(1).strip()


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query in a dashboard: panel targets, variables, annotations."""
    out = []
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            out.append((f"{dashboard['uid']} / {panel['title']} / {t['refId']}", t["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"{dashboard['uid']} / variable {var['name']}", label_values_selector(var["query"])))
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"{dashboard['uid']} / annotation {ann['name']}", ann["expr"]))
    return out


def all_dashboard_queries() -> list[tuple[str, str]]:
    return [q for d in load_dashboards().values() for q in queries(d)]


def rule_queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((f"{path.name} / {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def recorded_names() -> set[str]:
    return {rule["record"] for path in sorted(RULES.glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
            if "record" in rule}


# Dashboard variables that stand for a number typed in (a textbox), not a label matcher.
NUMBER_VARIABLES = {"gpu_hour_cost": "2.50"}


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """Grafana's variables -> values Prometheus can run: $__rate_interval -> a duration, the
    template variables -> .* (what "All" sends)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in NUMBER_VARIABLES.items():
        expr = re.sub(r"\$\{?" + name + r"\b\}?", value, expr)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a lexer's view, enough for our queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)  # numbers
    names = set()
    for m in re.finditer(r"(?<![\w:$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_helper():
    assert metric_names('sum by (le) (rate(a_bucket{x="y",le=~"1"}[$__rate_interval]))') == {"a_bucket"}
    assert metric_names("x:y:z / ignoring (type) group_left () w offset 15m > 0.5e3") == {"x:y:z", "w"}
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(m[5m]))) and on (job) up == 1') == {"m", "up"}
    assert metric_names('label_replace(v, "dst", "$1", "src", "(.*)")') == {"v"}


# -- the generator and the files -----------------------------------------------------------------

def generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARD_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_is_what_the_generator_writes():
    rendered = generator().render()
    assert set(rendered) == EXPECTED
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name} is out of date: run python dashboards/generate.py"
    assert {p.name for p in DASHBOARD_DIR.glob("*.json")} == EXPECTED


def test_uids_and_titles_are_unique_and_explicit():
    dashboards = load_dashboards()
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert all(re.fullmatch(r"[a-z0-9-]{1,40}", u) for u in uids), uids
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for name, d in dashboards.items():
        assert d["uid"] == name.removesuffix(".json")
        assert d["id"] is None, "an id ties the dashboard to one Grafana database"
        ids = [p["id"] for p in panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"


def test_one_datasource_variable_and_no_hard_coded_datasource():
    for name, d in load_dashboards().items():
        variables = d["templating"]["list"]
        ds_vars = [v for v in variables if v["type"] == "datasource"]
        assert len(ds_vars) == 1 and ds_vars[0]["name"] == "datasource" and ds_vars[0]["query"] == "prometheus"
        assert "__inputs" not in d, "${DS_...} inputs break file provisioning"
        text = json.dumps(d)
        assert "DS_PROMETHEUS" not in text
        # every datasource reference anywhere is the variable, or Grafana's built-in annotations
        for ref in re.findall(r'"datasource": (\{[^{}]*\})', text):
            ref = json.loads(ref)
            assert ref == DS or ref == {"type": "grafana", "uid": "-- Grafana --"}, f"{name}: {ref}"


def test_every_panel_and_target_uses_the_datasource_variable():
    for name, d in load_dashboards().items():
        for panel in panels(d):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DS, f"{name} / {panel['title']}"
            assert panel["targets"], f"{name} / {panel['title']} has no query"
            for t in panel["targets"]:
                assert t["datasource"] == DS, f"{name} / {panel['title']} / {t['refId']}"
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"] == DS
        for ann in d["annotations"]["list"]:
            if "expr" in ann:
                assert ann["datasource"] == DS


def test_variables():
    wanted = {
        "whisper-overview": {"datasource", "job", "instance", "gpu"},
        "whisper-performance": {"datasource", "job", "instance", "language"},
        "whisper-quality": {"datasource", "job", "instance", "language", "set"},
        "whisper-fleet": {"datasource", "job", "instance", "gpu_hour_cost"},
        "whisper-resources": {"datasource", "job", "instance", "gpu"},
        "whisper-exporter": {"datasource", "job", "instance"},
    }
    for d in load_dashboards().values():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert set(variables) == wanted[d["uid"]], d["uid"]
        for v in variables.values():
            if v["type"] == "query":
                assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", v["name"]
                label_values_selector(v["query"])
        # every variable a query uses is defined, and used as a regex matcher (multi-value, All)
        for where, expr in queries(d):
            for name in re.findall(r"\$\{?(\w+)\}?", expr):
                if name.startswith("__"):
                    continue
                assert name in variables, f"{where}: ${name} is not defined"
            bare = re.sub(r'\w+=~"\$\w+"', "", expr)
            bare = re.sub(r"\$\{?(" + "|".join(NUMBER_VARIABLES) + r")\b\}?", "", bare)  # a number, not a matcher
            assert not re.search(r"\$(?!__rate_interval)", bare), f"{where}: a variable outside a =~ matcher: {expr}"
        # each defined variable is used
        used = " ".join(expr for _, expr in queries(d))
        for name in set(variables) - {"datasource"}:
            assert f"${name}" in used, f"{d['uid']}: ${name} is never used"


def test_every_range_is_the_rate_interval():
    found = 0
    for where, expr in all_dashboard_queries():
        for _call in re.finditer(r"\b(rate|irate|increase|changes|delta|deriv)\(", expr):
            found += 1
        ranges = re.findall(r"\[([^\]]+)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{where}: {ranges}"
        if re.search(r"\b(rate|irate|increase)\(", expr):
            assert ranges, f"{where}: rate() without a range"
    assert found > 20


def test_every_panel_has_a_unit():
    for d in load_dashboards().values():
        for panel in panels(d):
            if panel["type"] == "row":
                continue
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert unit, f"{d['uid']} / {panel['title']}: no unit"
            if panel["type"] == "heatmap":
                assert panel["options"]["yAxis"]["unit"] == unit


def test_histograms_are_heatmaps():
    seen = set()
    for d in load_dashboards().values():
        for panel in panels(d):
            if panel["type"] != "heatmap":
                continue
            (t,) = panel["targets"]
            assert t["format"] == "heatmap" and t["legendFormat"] == "{{le}}", panel["title"]
            m = re.fullmatch(r"sum by \(le\) \(rate\((whisper_\w+)_bucket\{.*\}\[\$__rate_interval\]\)\)", t["expr"])
            assert m, t["expr"]
            assert panel["options"]["calculate"] is False  # Prometheus buckets, not Grafana's own
            seen.add(m.group(1))
    assert seen == {"whisper_request_duration_seconds", "whisper_queue_wait_seconds",
                    "whisper_inference_duration_seconds", "whisper_audio_duration_seconds",
                    "whisper_realtime_factor"}


def threshold_values(panel: dict) -> set[float]:
    return {s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None}


def test_design_thresholds_are_drawn():
    """The design's healthy thresholds and alert levels, on the panels they belong to."""
    wanted = {
        ("whisper-overview", "p95 latency"): {1.5, 3.0},
        ("whisper-overview", "GPU memory used"): {0.9, 0.95},
        ("whisper-overview", "Success ratio"): {0.95},
        ("whisper-overview", "GPU memory"): {0.9, 0.95},
        ("whisper-overview", "Canary RTF"): {0.8},
        ("whisper-performance", "Latency by endpoint"): {1.5, 3.0},
        ("whisper-performance", "Real-time factor p95 by language"): {0.8},
        ("whisper-performance", "Canary real-time factor"): {0.8},
        ("whisper-performance", "Queue wait"): {0.2},
        ("whisper-performance", "429 rejections"): {0.1},
        ("whisper-quality", "Error rate by language (1h window)"): {0.15},
        ("whisper-quality", "Error rate by language, last hour"): {0.15},
        ("whisper-quality", "Character error rate (zh, yue, ja, ko, th, ...)"): {0.08},
        ("whisper-quality", "Canary compression ratio (worst segment)"): {2.4},
        ("whisper-quality", "Canary avg_logprob (worst segment)"): {-1},
        ("whisper-resources", "GPU memory used"): {0.9, 0.95},
        ("whisper-resources", "Temperature"): {85},
        ("whisper-exporter", "Seconds since the last line"): {600},
    }
    found = {}
    for d in load_dashboards().values():
        for panel in panels(d):
            if (d["uid"], panel["title"]) in wanted:
                found[(d["uid"], panel["title"])] = panel
    assert set(found) == set(wanted), set(wanted) - set(found)
    for key, values in wanted.items():
        panel = found[key]
        assert values <= threshold_values(panel), f"{key}: {threshold_values(panel)}"
        if panel["type"] == "timeseries":
            assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off", key


def test_every_panel_says_something_when_data_is_absent():
    """Issue 15: a panel with no data says why (the collector off, no requests, rules not loaded)."""
    for d in load_dashboards().values():
        for panel in panels(d):
            if panel["type"] == "row":
                continue
            text = panel["fieldConfig"]["defaults"].get("noValue")
            assert text and len(text) > 10, f"{d['uid']} / {panel['title']}: no noValue text"


# Metrics only a server's log with timings feeds: the tap cannot see them (docs/tap.md).
LOG_ONLY = re.compile(r"whisper_(queue_wait|inference_duration)_seconds")


def test_empty_panels_of_log_only_timings_say_they_need_the_log():
    """Issue 21: with the tap on, queue wait and inference time stay empty; their panels said
    "enable the request tap" or only "No data from the exporter". They need a server log with timings."""
    seen = []
    for d in load_dashboards().values():
        for panel in panels(d):
            exprs = [t["expr"] for t in panel.get("targets", [])]
            if not exprs or not all(LOG_ONLY.search(e) for e in exprs):
                continue
            seen.append(f"{d['uid']} / {panel['title']}")
            text = panel["fieldConfig"]["defaults"]["noValue"]
            assert "enable the request tap" not in text, f"{seen[-1]}: {text!r}"
            assert "log" in text and "timings" in text and "tap" in text, f"{seen[-1]}: {text!r}"
    assert {"whisper-fleet / Queue wait p95", "whisper-performance / Inference time p95 by language",
            "whisper-performance / Queue wait"} <= set(seen), seen


def test_heatmaps_say_what_feeds_them():
    """A request-duration heatmap is fed by the tap too: its empty text names both; the log-only
    ones name the log with timings."""
    for d in load_dashboards().values():
        for panel in panels(d):
            if panel["type"] != "heatmap":
                continue
            text = panel["fieldConfig"]["defaults"]["noValue"]
            if LOG_ONLY.search(panel["targets"][0]["expr"]):
                assert "timings" in text, f"{panel['title']}: {text!r}"
            else:
                assert "collectors.tap" in text, f"{panel['title']}: {text!r}"


def panel_by_title(uid: str, title: str) -> dict:
    (d,) = [d for d in load_dashboards().values() if d["uid"] == uid]
    found = [p for p in panels(d) if p["title"] == title]
    assert len(found) == 1, f"{uid}: {len(found)} panels titled {title!r}"
    return found[0]


def test_overview_names_what_is_wrong():
    """The alert table keeps the labels that say what; the success ratio is the service's (its
    failed requests over all its requests), not one minus the worst replica; quality is there."""
    alerts = panel_by_title("whisper-overview", "Whisper alerts")["targets"][0]["expr"]
    by = set(re.search(r"sum by \(([^)]*)\)", alerts).group(1).replace(" ", "").split(","))
    assert by >= {"alertname", "severity", "instance", "language", "set", "probe", "gpu", "xid", "window"}
    success = panel_by_title("whisper-overview", "Success ratio (5m)")["targets"][0]["expr"]
    assert "job:whisper_requests_errors:rate5m" in success and "max(" not in success
    worst = panel_by_title("whisper-overview", "Worst language against its threshold")["targets"][0]["expr"]
    assert "language:whisper_quality_max_error_rate:threshold" in worst and 'set!="canary"' in worst
    change = panel_by_title("whisper-overview", "Change against 7 days ago")
    assert any("ratio_rate6h_offset1w" in t["expr"] for t in change["targets"])


def test_fleet_dashboard_shows_replicas_side_by_side_and_the_outlier():
    table = panel_by_title("whisper-fleet", "Replicas side by side")
    assert len(table["targets"]) >= 5 and all(t["instant"] for t in table["targets"])
    assert any(t["id"] == "merge" for t in table["transformations"])
    outlier = panel_by_title("whisper-fleet", "Worst replica: errors above the fleet")["targets"][0]
    assert outlier["expr"].startswith("topk(1,") and outlier["legendFormat"] == "{{instance}}"
    for title in ("Error ratio", "p95 latency"):
        exprs = [t["expr"] for t in panel_by_title("whisper-fleet", title)["targets"]]
        assert any(e.startswith("job:") for e in exprs) and any(e.startswith("job_instance:") for e in exprs), title


def test_grid_has_no_overlaps():
    for d in load_dashboards().values():
        taken = set()
        for panel in d["panels"]:
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
            cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & taken, f"{d['uid']} / {panel['title']} overlaps"
            taken |= cells


def grafana_annotation_events(annotation: dict, matrix: list[dict]) -> list[tuple[float, float]]:
    """(time, timeEnd) in ms of the events Grafana's Prometheus data source makes from a range
    query's result: the grouping of public/app/plugins/datasource/prometheus (processAnnotationResponse),
    re-told: a series' points with a value above 0 (every point, with "Series value as timestamp",
    whose value is then the time) make one event while they are at most `step` apart."""
    step = parse_duration(annotation.get("step", "60s")) * 1000
    events = []
    for series in matrix:
        if annotation.get("useValueForTime"):
            stamps = [float(v) for _, v in series["values"]]
        else:
            stamps = [t * 1000 for t, v in series["values"] if float(v) > 0]
        latest: list[float] = []
        for stamp in stamps:
            if latest and latest[1] + step >= stamp:
                latest[1] = stamp
                continue
            if latest:
                events.append((latest[0], latest[1]))
            latest = [stamp, stamp]
        if latest:
            events.append((latest[0], latest[1]))
    return events


def parse_duration(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", text))


def test_restart_annotation_marks_restarts_after_any_downtime(tmp_path, prometheus):
    """Issue 21: the restart annotation used changes(...[$__rate_interval]) and missed a restart with
    more than about a minute of downtime (the series is absent while the server is down). Against a
    real Prometheus holding a server's start time with restarts after 5 and 40 minutes down, and an
    exporter restart (a gap, the same start time) that is no restart, the annotation's query as
    Grafana runs it marks each restart at the time it happened, and nothing else."""
    promtool = require_tool("promtool")
    (d,) = [d for d in load_dashboards().values() if d["uid"] == "whisper-overview"]
    (annotation,) = [a for a in d["annotations"]["list"] if a.get("name") == "Whisper server restarts"]
    for other in load_dashboards().values():  # every dashboard carries the same annotation
        assert annotation in other["annotations"]["list"], other["uid"]
    base = (int(time.time()) - 6 * 3600) // 60 * 60  # old enough to be a block, not the head
    start0, restart1, restart2 = base - 86400, base + 1800, base + 5400
    lines = ["# TYPE whisper_process_start_time_seconds gauge"]
    for t in range(base, base + 7200, 15):
        down = restart1 - 300 <= t < restart1 or restart2 - 2400 <= t < restart2
        exporter_down = base + 6000 <= t < base + 6600  # the exporter restarts; the server does not
        if down or exporter_down:
            continue
        value = start0 if t < restart1 else restart1 if t < restart2 else restart2
        lines.append(f'whisper_process_start_time_seconds{{job="whisper",instance="a:10111"}} {value} {t}')
    lines.append("# EOF")
    source = tmp_path / "series.om"
    source.write_text("\n".join(lines) + "\n")
    made = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    server = prometheus([])

    def query_range(query: str) -> list[dict]:
        response = requests.get(server.url + "/api/v1/query_range", timeout=30, params={
            "query": query, "start": base, "end": base + 7200, "step": parse_duration(annotation["step"])})
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    (stored,) = query_range("whisper_process_start_time_seconds")  # the history is there
    assert {float(v) for _, v in stored["values"]} == {start0, restart1, restart2}
    # Grafana's $__rate_interval at a 60 s step and a 15 s scrape interval: max(4 x 15 s, 60 s + 15 s).
    expr = substitute(annotation["expr"], "75s")
    result = query_range(expr)
    assert result, f"{expr}: no series"
    events = grafana_annotation_events(annotation, result)
    step_ms = parse_duration(annotation["step"]) * 1000
    for restart in (restart1, restart2):
        near = [e for e in events if restart * 1000 <= e[0] <= restart * 1000 + step_ms]
        assert len(near) == 1, f"restart at {restart - base} s into the range: events {events} ({expr})"
    inside = [e for e in events if base * 1000 <= e[0]]
    assert len(inside) == 2, f"events beyond the two restarts: {inside}"


CANARY_HEALTH = [("whisper-overview", "Canary probe"), ("whisper-fleet", "Canary"),
                 ("whisper-fleet", "Replicas side by side")]


def promtool_cases(tmp_path: Path, series: list[dict], cases: list[dict], rule_files: tuple[str, ...] = (),
                   interval: str = "1m") -> None:
    """Evaluate dashboard queries with promtool (promql_expr_test) over hand-made series sampled and
    evaluated every `interval`, with these rule files (none: an empty one, as promtool needs one)."""
    promtool = require_tool("promtool")
    if not rule_files:
        (tmp_path / "empty.yml").write_text("groups: []\n")
        rule_files = ("empty.yml",)
    test = {"rule_files": list(rule_files), "evaluation_interval": interval,
            "tests": [{"interval": interval, "input_series": series, "promql_expr_test": cases}]}
    (tmp_path / "panel_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "panel_test.yml"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_canary_health_panels_judge_the_speech_canaries(tmp_path):
    """Issue 21: on a default install tiny.en answers the silence canary with "You", so its
    whisper_probe_success is 0; min() over every canary showed the healthy server FAILING. The
    health panels judge the speech canaries (the negative ones have their own panel and alert):
    evaluated by promtool over a healthy server whose silence canary hallucinates (1), and one
    whose speech canary fails (0)."""
    exprs = []
    for uid, title in CANARY_HEALTH:
        exprs += [t["expr"] for t in panel_by_title(uid, title)["targets"] if "whisper_probe_success" in t["expr"]]
    assert len(exprs) == 3, exprs
    info = 'whisper_probe_info{{job="whisper",instance="{i}",probe="{p}",language="en",unit="word",kind="{k}"}}'
    success = 'whisper_probe_success{{job="whisper",instance="{i}",probe="{p}"}}'
    series = []
    for instance, speech_ok in (("healthy:10111", 1), ("broken:10111", 0)):
        series += [{"series": success.format(i=instance, p="en-short"), "values": f"{speech_ok}x10"},
                   {"series": success.format(i=instance, p="silence"), "values": "0x10"},
                   {"series": info.format(i=instance, p="en-short", k="speech"), "values": "1x10"},
                   {"series": info.format(i=instance, p="silence", k="negative"), "values": "1x10"}]
    cases = []
    for expr in exprs:
        text = substitute(expr)
        for instance, want in (("healthy:10111", 1), ("broken:10111", 0)):
            scoped = text.replace('instance=~".*"', f'instance=~"{instance}"')
            cases.append({"expr": f"max({scoped})", "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": want}]})
    promtool_cases(tmp_path, series, cases)


def test_every_query_parses(tmp_path):
    """promtool parses each query (Grafana variables substituted) as a recording rule."""
    promtool = require_tool("promtool")
    rules = [{"record": f"dashboard:query_{i}:check", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(all_dashboard_queries())]
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_recorded_names_in_dashboards_are_recorded():
    recorded = recorded_names()
    for where, expr in all_dashboard_queries():
        for name in metric_names(expr):
            if ":" in name:
                assert name in recorded, f"{where}: {name} is not a recording rule in rules/"


# -- against a real exporter ----------------------------------------------------------------------

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
            "gauge": ("",), "info": ("_info",), "unknown": ("",)}


def exposed_names(text: str) -> set[str]:
    """Sample names in an exposition, and the sample names of families it declares (HELP and
    TYPE) without a sample yet, such as an error counter before the first error."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def exposition(whisper_server, tmp_path_factory) -> set[str]:
    """Metric names a real exporter exposes with every collector working: the GPU through the
    fake NVML (real H100 readings, an XID injected), the process collector watching a real
    process, the logs collector reading a JSON request log and the server's uvicorn log, and
    the probe against the real faster-whisper-server."""
    from fake_nvml import FakeNVML

    from whisper_exporter import wiring as daemon
    from whisper_exporter.collectors import gpu
    from whisper_exporter.config import from_dict
    from whisper_exporter.runtime.collector import plugins
    from whisper_exporter.runtime.scheduler import Scheduler
    from whisper_exporter.runtime.shared import Shared

    folder = tmp_path_factory.mktemp("exposition")
    log = folder / "requests.jsonl"
    shutil.copy(ROOT / "tests" / "data" / "logs" / "json-request.jsonl", log)
    # A process the exporter may watch: not its own child (the exporter never watches its family),
    # so started through a shell that exits; argv[0] is a marker with no path in it.
    marker = f"whisper-dashboard-test-{uuid.uuid4().hex[:8]}"
    started = subprocess.run(["bash", "-c", f"(exec -a {marker} sleep 300) >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    pid = int(started.stdout.strip())
    # The quality collector with thresholds, so that whisper_quality_max_error_rate (which the
    # per-language quality alerts read) is exposed; its one manifest line has no audio, so no
    # evaluation runs.
    manifest = folder / "manifest.jsonl"
    manifest.write_text('{"audio": "missing.wav", "reference": "hello", "language": "en"}\n')
    config = from_dict({
        "listen": "127.0.0.1:0",
        "service": {"url": whisper_server.url, "model": whisper_server.model, "max_concurrency": 1},
        "collectors": {
            "gpu": {"interval": "200ms"},
            # the tap: busy time and requests in flight (rules/capacity.yml), no client needed
            "tap": {"enabled": True, "listen": "127.0.0.1:0"},
            "process": {"interval": "200ms", "match": marker},
            "probe": {"interval": "1s"},
            "quality": {"enabled": True, "interval": "1h", "manifest": str(manifest),
                        "thresholds": {"en": 0.1, "default": 0.2},
                        # a review queue: the review metrics (rules/review.yml)
                        "production": {"queue": str(folder / "queue.jsonl"),
                                       "references": str(folder / "verified.jsonl")}},
            "logs": {"enabled": True, "interval": "200ms", "start_at": "beginning", "files": [
                {"path": str(log), "format": "json-request"},
                {"path": str(whisper_server.log_path), "format": "uvicorn-access"},
            ]},
        },
    })
    fake = FakeNVML()
    available = plugins()
    shared = Shared.build(config)
    entries = []
    for name, section in config.collectors.items():
        if name == "gpu":
            collector = gpu.GpuCollector(section, nvml=fake, watched_pids=lambda: {424})  # the fixture's pid
            collector.xid_wait_ms = 50
        elif section.enabled:
            collector = available[name].factory(section, shared)
        else:
            continue
        entries.append((collector, section.interval, section.timeout))
    running = daemon.start(config, scheduler=Scheduler(entries, shared=shared))
    try:
        fake.inject_xid(0, 79)
        wanted = {"whisper_probe_word_error_rate", "whisper_gpu_xid_errors_total", "whisper_process_open_fds",
                  "whisper_request_duration_seconds_bucket", "whisper_quality_errors_total",
                  "whisper_quality_max_error_rate"}
        deadline = time.monotonic() + 60
        while True:
            text = requests.get(running.url + "/metrics", timeout=10).text
            names = {name for name, _ in samples(text)}
            if wanted <= names or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert wanted <= names, f"missing {wanted - names}; status: {requests.get(running.url + '/').text[:3000]}"
        yield exposed_names(text)
    finally:
        running.close()
        os.kill(pid, signal.SIGTERM)


def test_every_metric_in_every_dashboard_query_is_exposed(exposition):
    recorded = recorded_names()
    used = set()
    for where, expr in all_dashboard_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            used.add(name)
            if ":" in name:
                assert name in recorded, f"{where}: {name} is not recorded"
            elif name not in PROMETHEUS_NAMES:
                assert name in exposition, f"{where}: the exporter does not expose {name}"
    # the dashboards cover the contract's families
    for family in ("whisper_requests_total", "whisper_gpu_utilization_ratio", "whisper_gpu_power_watts",
                   "whisper_process_resident_memory_bytes", "whisper_probe_success",
                   "whisper_quality_errors_total", "whisper_exporter_collector_up"):
        assert family in used, f"no dashboard shows {family}"


def test_every_metric_in_every_rule_is_exposed(exposition):
    recorded = recorded_names()
    for where, expr in rule_queries():
        for name in metric_names(expr):
            if ":" in name:
                assert name in recorded, f"{where}: {name} is not recorded"
            elif name not in PROMETHEUS_NAMES:
                assert name in exposition, f"{where}: the exporter does not expose {name}"


def test_empty_wer_panels_say_what_feeds_each_set():
    """Issue 21, defect 5: with set=production the WER panels said "collectors.quality off, or no
    reference set" while verified production items had been scored."""
    seen = []
    for d in load_dashboards().values():
        for panel in panels(d):
            exprs = [t["expr"] for t in panel.get("targets", [])]
            if not exprs or not re.search(r"\b(language:)?whisper_quality_(error|reference_units)", exprs[0]):
                continue
            seen.append(f"{d['uid']} / {panel['title']}")
            text = panel["fieldConfig"]["defaults"]["noValue"]
            assert "no reference set" not in text, f"{seen[-1]}: {text!r}"
            assert all(word in text for word in ("reference", "production", "canary")), f"{seen[-1]}: {text!r}"
    assert any(s.startswith("whisper-quality / ") for s in seen), seen


def test_quality_dashboard_shows_which_language_is_taken_for_which():
    quality = load_dashboards()["whisper-quality.json"]
    panel = next(p for p in panels(quality) if p["title"].startswith("Which language is taken for which"))
    assert panel["transformations"][0]["id"] == "groupingToMatrix"
    options = panel["transformations"][0]["options"]
    assert (options["rowField"], options["columnField"]) == ("language", "detected")
    expr = panel["targets"][0]["expr"]
    assert "by (language, detected)" in expr and "whisper_quality_language_identified" in expr
    accuracy = [p for p in panels(quality) if "language_id_accuracy" in json.dumps(p.get("targets", []))]
    assert accuracy, "no panel shows the identification accuracy per language"


def test_fleet_dashboard_shows_capacity_efficiency_and_cost():
    """Issue 25: capacity, headroom and efficiency from rules/capacity.yml; cost per audio hour is
    GPU-hours per audio hour times the cost per GPU-hour typed into the dashboard."""
    fleet = load_dashboards()["whisper-fleet.json"]
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in fleet["panels"]}
    assert any("job:whisper_audio_capacity_seconds:rate1h" in e for e in exprs["Demand and measured capacity"])
    assert any("job_instance:whisper_audio_headroom_seconds:rate1m" in e for e in exprs["Headroom"])
    assert any("job_name:whisper_gpu_energy_joules_per_audio_hour" in e
               for e in exprs["Energy per audio hour by GPU model"])
    assert any("active_energy" in e for e in exprs["Energy per audio hour"])
    assert exprs["Cost per audio hour"] == ['job:whisper_gpu_hours_per_audio_hour:ratio_rate1h{job=~"$job"} * $gpu_hour_cost']
    cost = next(v for v in fleet["templating"]["list"] if v["name"] == "gpu_hour_cost")
    assert cost["type"] == "textbox" and float(cost["query"]) > 0


def test_quality_dashboard_shows_the_review_queue_and_review_throughput():
    """The review page's queue had alerts (rules/review.yml) and no panel: how many samples wait,
    how long the oldest has, and reviews per hour against samples queued per hour."""
    quality = load_dashboards()["whisper-quality.json"]
    by_family = {}
    for panel in panels(quality):
        for t in panel.get("targets", []):
            for name in ("whisper_quality_review_pending_items", "whisper_quality_review_oldest_pending_age_seconds",
                         "whisper_quality_reviews_total", "whisper_quality_review_queue_added_total"):
                if name in t["expr"]:
                    by_family.setdefault(name, panel)
    assert set(by_family) == {"whisper_quality_review_pending_items", "whisper_quality_review_oldest_pending_age_seconds",
                              "whisper_quality_reviews_total", "whisper_quality_review_queue_added_total"}, by_family
    age = by_family["whisper_quality_review_oldest_pending_age_seconds"]
    assert age["fieldConfig"]["defaults"]["unit"] == "s"
    assert 3 * 86400 in threshold_values(age)  # WhisperReviewBacklogStale
    throughput = by_family["whisper_quality_reviews_total"]
    assert by_family["whisper_quality_review_queue_added_total"] is throughput  # inflow beside outflow
    assert any("by (result)" in t["expr"] for t in throughput["targets"])
    for panel in by_family.values():
        text = panel["fieldConfig"]["defaults"]["noValue"]
        assert "production.queue" in text, f"{panel['title']}: {text!r}"  # not the WER panels' text
        assert "/review" in panel["description"], panel["title"]


def test_punctuation_marks_panel_is_empty_not_nan_when_nothing_was_scored(tmp_path):
    """The per-mark panel divided raw rates: its series are exported at 0 before anything is
    scored, so it gave 0/0 = NaN (an empty graph) instead of its no-data text. Evaluated by promtool:
    nothing scored gives no sample; scored marks give each mark's share by result."""
    (expr,) = [t["expr"] for t in panel_by_title("whisper-quality", "Punctuation marks by mark and result")["targets"]]
    expr = substitute(expr, "1h")
    marks = 'whisper_quality_punctuation_marks_total{{job="whisper",instance="w:10111",language="en",set="{s}",mark="{m}",result="{r}"}}'
    series = [{"series": marks.format(s="reference", m=m, r=r), "values": "0x10"}
              for m in (".", "?") for r in ("correct", "deleted", "inserted")]
    # production: 8 full stops an hour, 4 correct and 4 deleted; no question mark scored at all
    series += [{"series": marks.format(s="production", m=".", r=r), "values": f"0+{n}x10"}
               for r, n in (("correct", 4), ("deleted", 4), ("inserted", 0))]
    series += [{"series": marks.format(s="production", m="?", r=r), "values": "0x10"}
               for r in ("correct", "deleted", "inserted")]
    scoped = {s: expr.replace('set=~".*"', f'set=~"{s}"') for s in ("reference", "production")}
    assert scoped["reference"] != expr
    promtool_cases(tmp_path, series, [
        {"expr": scoped["reference"], "eval_time": "5h", "exp_samples": []},
        {"expr": scoped["production"], "eval_time": "5h", "exp_samples": [
            {"labels": '{mark=".",result="deleted"}', "value": 0.5},
            {"labels": '{mark=".",result="inserted"}', "value": 0}]},
    ], interval="1h")


def test_quality_dashboard_shows_the_hallucination_detector_against_reviewers(tmp_path):
    """Issue 23: the detector's precision and recall on reviewed traffic were PromQL in docs only.
    The Review row reads the shipped records (rules/recording.yml), evaluated by promtool over a
    week of reviews: per language, precision 1/4 and recall 1/2 for en; de, never suspected, has no
    precision (its text shows, not NaN) and recall 0. Confirmed hallucinations per day beside it."""
    panel = panel_by_title("whisper-quality", "Hallucination detector against reviewers (7 days)")
    precision, recall = (substitute(t["expr"]) for t in panel["targets"])
    assert "precision" in precision and "recall" in recall
    assert "/review" in panel["fieldConfig"]["defaults"]["noValue"]
    confirmed = panel_by_title("whisper-quality", "Confirmed hallucinations per day")
    (per_day,) = (substitute(t["expr"], "1h") for t in confirmed["targets"])
    assert "/review" in confirmed["fieldConfig"]["defaults"]["noValue"]
    review = 'whisper_hallucination_review_total{{job="whisper",instance="w:10111",language="{l}",suspected="{s}",confirmed="{c}"}}'
    per_hour = {("en", "true", "true"): 1, ("en", "true", "false"): 3, ("en", "false", "true"): 1,
                ("en", "false", "false"): 10, ("de", "true", "true"): 0, ("de", "true", "false"): 0,
                ("de", "false", "true"): 2, ("de", "false", "false"): 5}
    series = [{"series": review.format(l=l, s=s, c=c), "values": f"0+{n}x200"} for (l, s, c), n in per_hour.items()]
    series += [{"series": f'whisper_hallucination_confirmed_total{{job="whisper",instance="w:10111",language="{l}"}}',
                "values": f"0+{n}x200"} for l, n in (("en", 2), ("de", 2))]
    promtool_cases(tmp_path, series, [
        {"expr": precision, "eval_time": "8d", "exp_samples": [
            {"labels": 'language:whisper_hallucination_review_precision:ratio_rate7d{job="whisper",language="en"}',
             "value": 0.25}]},
        {"expr": recall, "eval_time": "8d", "exp_samples": [
            {"labels": f'language:whisper_hallucination_review_recall:ratio_rate7d{{job="whisper",language="{l}"}}',
             "value": v} for l, v in (("en", 0.5), ("de", 0))]},
        {"expr": per_day, "eval_time": "8d", "exp_samples": [
            {"labels": f'{{language="{l}"}}', "value": 48} for l in ("en", "de")]},
    ], rule_files=(str(RULES / "recording.yml"),), interval="1h")  # hourly: a week of every record each minute took 25 s
