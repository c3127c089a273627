"""The fleet's engines (issue 25 part 4): the shipped rules where fleets evaluate them. Three real
exporters (test_fleet's replicas, replica 1 failing a quarter of its requests) are scraped by a
Prometheus in agent mode that sends everything by remote_write to a single-node VictoriaMetrics;
vmalert evaluates rules/*.yml against it and notifies an Alertmanager stand-in. The service's page
fires there with exactly the labels it has on a plain Prometheus evaluating the same rules over the
same exporters, and names the same replica; the same alerts fire on both; every rule evaluates on
vmalert without an error, and every recording rule gives the same series on both engines.
docs/fleet.md says where the engines differ (values of long-window rates, delays, labels).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
import yaml
from helpers import LoopbackHTTP, free_port, http_ok, require_tool, stop_process, wait_started
from test_fleet import BAD, ROUNDS, RULE_FILES, Replica, running_replicas

ROOT = Path(__file__).resolve().parent.parent
HOLD = "2s"  # every alert's `for:` in the copy both engines evaluate (see shortened_rules)


def shortened_rules(folder: Path) -> list[str]:
    """The shipped rule files with every alert's `for:` set to HOLD, and nothing else changed: the
    shipped holds (2 minutes for the page) outlast a test, and mean the same on both engines."""
    folder.mkdir()
    paths = []
    for source in RULE_FILES:
        doc = yaml.safe_load(Path(source).read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "alert" in rule and "for" in rule:
                    rule["for"] = HOLD
        path = folder / Path(source).name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(str(path))
    return paths


class Notifications(LoopbackHTTP):
    """An Alertmanager stand-in: keeps every alert posted to /api/v2/alerts."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/v2/alerts":
                    received.extend(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)


class Processes:
    """The engines as real processes, each logging to its own file; all stopped at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], ready: str) -> None:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.started.append((name, proc))
        wait_started(name, proc, http_ok(ready), lambda: self.log(name))

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()[-3000:]

    def stop(self) -> None:
        for _, proc in reversed(self.started):
            stop_process(proc)


@pytest.fixture
def replicas(tmp_path) -> Iterator[list[Replica]]:
    with running_replicas(tmp_path) as started:
        yield started


@pytest.fixture
def engines(tmp_path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop()


def victoria_query(vm_url: str, expr: str) -> list[dict]:
    """An instant query to VictoriaMetrics' Prometheus API; its result list."""
    body = requests.get(vm_url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_vmalert_accepts_every_shipped_rule_file(tmp_path):
    """vmalert parses each rule file as it would load it: MetricsQL expressions and Go templates."""
    vmalert = require_tool("vmalert")
    checked = subprocess.run([vmalert, "-dryRun", f"-rule={ROOT / 'rules'}/*.yml"], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check can fail: an expression MetricsQL cannot parse.
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "sum(rate(x[5m]"}]}]}))
    refused = subprocess.run([vmalert, "-dryRun", f"-rule={bad}"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0


def page_of(alerts: list[dict]) -> list[dict]:
    return [a for a in alerts if a["labels"].get("alertname") == "WhisperErrorBudgetBurn"
            and a["labels"].get("severity") == "critical"]


@pytest.mark.integration
def test_agent_to_victoriametrics_with_vmalert_pages_as_prometheus_does(prometheus, replicas, engines, tmp_path):
    rules = shortened_rules(tmp_path / "rules")
    targets = [r.address for r in replicas]
    bad = replicas[BAD].address
    # The reference: a plain Prometheus scraping the same three exporters, with the same rules.
    reference = prometheus(targets, rule_files=rules)

    vm_url = f"http://127.0.0.1:{free_port()}"
    engines.start("victoria-metrics", [
        require_tool("victoria-metrics"), f"-storageDataPath={tmp_path / 'vm-data'}",
        f"-httpListenAddr={vm_url.removeprefix('http://')}", "-retentionPeriod=1d",
        # Data is visible to queries 1 s after it arrives, not the default 30 s: a shorter test.
        # A production vmalert sees samples that late (docs/fleet.md).
        "-search.latencyOffset=1s",
    ], vm_url + "/health")
    agent_url = f"http://127.0.0.1:{free_port()}"
    agent_config = tmp_path / "agent.yml"
    agent_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "whisper", "static_configs": [{"targets": targets}]}],
        "remote_write": [{"url": vm_url + "/api/v1/write", "queue_config": {"batch_send_deadline": "1s"}}],
    }))
    engines.start("prometheus-agent", [
        require_tool("prometheus"), "--enable-feature=agent", f"--config.file={agent_config}",
        f"--storage.agent.path={tmp_path / 'agent-data'}", f"--web.listen-address={agent_url.removeprefix('http://')}",
    ], agent_url + "/-/ready")
    notifications = Notifications()
    vmalert_url = f"http://127.0.0.1:{free_port()}"
    try:
        engines.start("vmalert", [
            require_tool("vmalert"), *(f"-rule={r}" for r in rules),
            f"-datasource.url={vm_url}", f"-remoteWrite.url={vm_url}", "-remoteWrite.flushInterval=1s",
            # A rule reads another's record from VictoriaMetrics, once vmalert has written it there
            # (about 2 s here): evaluated every 1 s, a chained record would find nothing.
            f"-notifier.url={notifications.url}", "-evaluationInterval=5s",
            f"-httpListenAddr={vmalert_url.removeprefix('http://')}",
            # vmalert adds an `alertgroup` label (the rule group's name) to every alert unless told
            # not to; without it the labels are Prometheus' exactly (docs/fleet.md).
            "-disableAlertgroupLabel",
        ], vmalert_url + "/health")

        # The agent keeps nothing to query: the samples are in VictoriaMetrics.
        def vm_query(expr: str) -> list[dict]:
            return victoria_query(vm_url, expr)

        deadline = time.monotonic() + 30
        while len(vm_query('up{job="whisper"} == 1')) < 3:
            assert time.monotonic() < deadline, engines.log("prometheus-agent")
            time.sleep(0.5)
        reference.wait_for('count(up{job="whisper"} == 1) == 3')

        for _ in range(ROUNDS):
            for r in replicas:
                r.write_round()
            time.sleep(1)
        expected_total = sum(r.sent for r in replicas)
        reference.wait_for(f'sum(whisper_requests_total{{job="whisper"}}) == {expected_total}')
        deadline = time.monotonic() + 30
        while not vm_query(f'sum(whisper_requests_total{{job="whisper"}}) == {expected_total}'):
            assert time.monotonic() < deadline, engines.log("prometheus-agent")
            time.sleep(0.5)

        def firing(url: str) -> list[dict]:
            alerts = requests.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"] or []  # vmalert: null for none
            return [a for a in alerts if a["state"] == "firing"]

        def labels(alerts: list[dict]) -> list[dict]:
            return sorted((a["labels"] for a in page_of(alerts)), key=lambda x: sorted(x.items()))

        # The page fires on each engine once per burn window that holds (1h, and 6h when it does too).
        deadline = time.monotonic() + 60
        while True:
            for r in replicas:  # traffic goes on while the engines catch up, as in production: the
                r.write_round()  # descriptions name the replica failing "now" (a loaded machine is slow)
            on_prometheus, on_vmalert = labels(firing(reference.url)), labels(firing(vmalert_url))
            if on_prometheus and on_prometheus == on_vmalert and labels(notifications.alerts):
                break
            assert time.monotonic() < deadline, (on_prometheus, on_vmalert, engines.log("vmalert"))
            time.sleep(1)
        assert {"alertname": "WhisperErrorBudgetBurn", "job": "whisper", "severity": "critical",
                "window": "1h"} in on_prometheus
        assert all(set(a) == {"alertname", "job", "severity", "window"} for a in on_prometheus)
        # Sent to the Alertmanager with those labels, and both descriptions name the faulty replica
        # (their percentages differ a little: VictoriaMetrics' rate() does not extrapolate).
        sent = page_of(notifications.alerts)
        known = {json.dumps(a, sort_keys=True) for a in on_vmalert + labels(firing(vmalert_url))}
        assert {json.dumps(a["labels"], sort_keys=True) for a in sent} <= known
        def names_bad(alerts: list[dict]) -> bool:
            return all(re.search(rf"worst replica now: {re.escape(bad)} failing \d+(\.\d+)?%\.$",
                                 a["annotations"]["description"]) for a in alerts)

        def sent_name_bad() -> bool:  # each page sent has, by now, a notification naming the replica
            sent = page_of(notifications.alerts)
            keys = {json.dumps(a["labels"], sort_keys=True) for a in sent}
            return all(any(names_bad([a]) for a in sent if json.dumps(a["labels"], sort_keys=True) == k)
                       for k in keys)

        # Each engine re-renders a firing alert's description at every evaluation: once its records
        # of the last minutes are in (a record of a record, read back from the store on vmalert),
        # it names the faulty replica.
        deadline = time.monotonic() + 60
        while not (names_bad(page_of(firing(reference.url))) and names_bad(page_of(firing(vmalert_url)))
                   and sent_name_bad()):
            assert time.monotonic() < deadline, (page_of(firing(reference.url)), page_of(firing(vmalert_url)))
            for r in replicas:
                r.write_round()
            time.sleep(1)
        # The faulty replica's own ticket, with its instance label, on both engines.
        deadline = time.monotonic() + 30
        while True:
            tickets = {engine: [a["labels"] for a in firing(url) if a["labels"]["alertname"] == "WhisperErrorRatioHigh"]
                       for engine, url in (("prometheus", reference.url), ("vmalert", vmalert_url))}
            if tickets["prometheus"] and tickets["vmalert"]:
                break
            assert time.monotonic() < deadline, tickets
            time.sleep(1)
        assert tickets["vmalert"] == tickets["prometheus"]
        assert [t["instance"] for t in tickets["vmalert"]] == [bad]
        # Whatever fires on one engine fires on the other, with the same labels. Save the capacity
        # forecast: the replicas' logs have inference times, so they measure capacity (docs/capacity.md),
        # and WhisperCapacityRunningOut's predict_linear over 6h reads minutes-old 5m rates here, which
        # Prometheus extrapolates and VictoriaMetrics does not (docs/fleet.md); with `for:` cut to 2 s
        # one engine fires first. test_capacity_rules_on_vmalert_give_promtools_figures_and_forecast
        # compares it on both engines over hours of data.
        young = ("WhisperCapacityRunningOut",)
        deadline = time.monotonic() + 30
        while True:
            both = [sorted(json.dumps(a["labels"], sort_keys=True) for a in firing(url)
                           if a["labels"]["alertname"] not in young)
                    for url in (reference.url, vmalert_url)]
            if both[0] == both[1]:
                break
            assert time.monotonic() < deadline, both
            time.sleep(1)
        # No rule fails on vmalert: each evaluates against VictoriaMetrics without an error.
        groups = requests.get(vmalert_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        evaluated = [(g["name"], r["name"], r["lastError"]) for g in groups for r in g["rules"]]
        shipped = sum(len(g["rules"]) for f in rules for g in yaml.safe_load(Path(f).read_text())["groups"])
        assert len(evaluated) == shipped
        assert [e for e in evaluated if e[2]] == []
        # Every recording rule gives the same series on both engines (values differ: see docs/fleet.md).
        # Left out: groups with an interval of their own (5 minutes), whose first evaluation
        # Prometheus spreads over that interval; and the capacity records, now that these replicas'
        # logs measure capacity (docs/capacity.md): their chains are up to five records deep, each read
        # back from the store on vmalert (about 30 s a level), so their job totals come minutes after
        # Prometheus's. test_capacity_rules_on_vmalert_give_promtools_figures_and_forecast compares
        # every capacity record's value with promtool's over hours of data.
        records = sorted({r["record"] for f in rules for g in yaml.safe_load(Path(f).read_text())["groups"]
                          if "interval" not in g and g["name"] != "whisper-capacity.recording"
                          for r in g["rules"] if "record" in r})
        assert len(records) > 50

        def series(query: Callable[[str], list[dict]], name: str) -> list[str]:
            return sorted(json.dumps(x["metric"], sort_keys=True) for x in query(name))

        deadline = time.monotonic() + 30
        while True:
            differ = {name: (series(reference.query, name), series(vm_query, name)) for name in records}
            differ = {name: pair for name, pair in differ.items() if pair[0] != pair[1]}
            if not differ:
                break
            assert time.monotonic() < deadline, differ
            time.sleep(1)
        assert series(vm_query, "job_instance:whisper_requests:rate5m") == sorted(
            json.dumps({"__name__": "job_instance:whisper_requests:rate5m", "instance": t, "job": "whisper"},
                       sort_keys=True) for t in targets)
    finally:
        notifications.close()


def expand(values: str) -> list[float]:
    """promtool's series notation: `a+bxn` is a, a+b, ... a+n*b; `axn` is a, n+1 times; `a` is a."""
    out: list[float] = []
    for token in values.split():
        m = re.fullmatch(r"(-?[\d.]+)(?:([+-][\d.]+)?x(\d+))?", token)
        assert m, token
        start, step, times = float(m[1]), float(m[2] or 0), int(m[3] or 0)
        out.extend(start + i * step for i in range(times + 1))
    return out


def promtool_series(test_file: str, name: str) -> tuple[list[tuple[str, list[float]]], int]:
    """One promtool rule test's input series (selector, values) and its interval in seconds."""
    doc = yaml.safe_load((ROOT / "rules" / "tests" / test_file).read_text())
    test = next(t for t in doc["tests"] if t["name"] == name)
    assert test["interval"].endswith("m")
    return [(s["series"], expand(s["values"])) for s in test["input_series"]], int(test["interval"][:-1]) * 60


def as_import_line(selector: str, values: list[float], start: float, step: int) -> str:
    """A series in VictoriaMetrics' JSON line import format (/api/v1/import)."""
    m = re.fullmatch(r"(\w+)\{(.*)\}", selector)
    assert m, selector
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
    return json.dumps({"metric": {"__name__": m[1], **labels}, "values": values,
                       "timestamps": [int((start + i * step) * 1000) for i in range(len(values))]})


@pytest.mark.integration
def test_three_failures_at_night_page_nobody_on_vmalert_either(engines, tmp_path):
    """rules/tests/slo_test.yml's night, on VictoriaMetrics: one request a minute, 3 of them failing,
    in series 45 minutes old. On Prometheus (promtool) nothing pages; vmalert must agree. The SLO
    alerts' minimum of 10 failed requests in the long window was a rate times the window, which
    MetricsQL (no extrapolation: the increase over the samples' own span) put at 24 for these 3."""
    rules = shortened_rules(tmp_path / "rules")
    series, step = promtool_series("slo_test.yml", "three failed requests at night page nobody")
    now = time.time()
    start = now - 45 * 60  # promtool's eval_time 45m is now; the samples after it are in the future
    vm_url = f"http://127.0.0.1:{free_port()}"
    engines.start("victoria-metrics", [
        require_tool("victoria-metrics"), f"-storageDataPath={tmp_path / 'vm-data'}",
        f"-httpListenAddr={vm_url.removeprefix('http://')}", "-retentionPeriod=1d", "-search.latencyOffset=1s",
    ], vm_url + "/health")
    imported = requests.post(vm_url + "/api/v1/import",
                             data="\n".join(as_import_line(sel, vals, start, step) for sel, vals in series), timeout=10)
    assert imported.status_code == 204, imported.text
    notifications = Notifications()
    vmalert_url = f"http://127.0.0.1:{free_port()}"
    try:
        engines.start("vmalert", [
            require_tool("vmalert"), *(f"-rule={r}" for r in rules),
            f"-datasource.url={vm_url}", f"-remoteWrite.url={vm_url}", "-remoteWrite.flushInterval=1s",
            f"-notifier.url={notifications.url}", "-evaluationInterval=5s", "-disableAlertgroupLabel",
            f"-httpListenAddr={vmalert_url.removeprefix('http://')}",
        ], vmalert_url + "/health")

        def query(expr: str) -> list[dict]:
            return victoria_query(vm_url, expr)

        # The records the page reads are there (the pipeline works), and say what promtool's test says:
        # 13.3 times the budget over the hour.
        deadline = time.monotonic() + 60
        while not query("job:whisper_requests_errors:ratio_rate1h"):
            assert time.monotonic() < deadline, engines.log("vmalert")
            time.sleep(1)
        burn = query("job:whisper_requests_errors:ratio_rate1h / on () group_left () (1 - slo:whisper_availability:objective)")
        assert float(burn[0]["value"][1]) == pytest.approx(13.3, abs=0.1)
        # Both windows of the 6x page say "page"; only the minimum of 10 failed requests holds it. Counted
        # as rate times window (as before) it read 24 here; increase() counts the 3 there are.
        windows = ("job:whisper_requests_errors:ratio_rate6h / on () group_left () (1 - slo:whisper_availability:objective) > 6"
                   " and on (job) job:whisper_requests_errors:ratio_rate30m / on () group_left () (1 - slo:whisper_availability:objective) > 6")
        deadline = time.monotonic() + 60
        while not query(windows):
            assert time.monotonic() < deadline, engines.log("vmalert")
            time.sleep(1)
        assert float(query("job:whisper_requests_errors:rate6h * 21600")[0]["value"][1]) > 10
        errors = 'whisper_requests_total{endpoint!~"/|/docs|/openapi.json|/health|/healthz|/ready|/metrics|/v1/models",status_code=~"5..|error"}'
        assert float(query(f"sum by (job) (increase({errors}[6h]))")[0]["value"][1]) == 3

        # Three more evaluations of the page over those records, each past its `for:` (HOLD): no page.
        def page_evaluated() -> str:
            groups = requests.get(vmalert_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            return max(r["lastEvaluation"] for g in groups for r in g["rules"] if r["name"] == "WhisperErrorBudgetBurn")

        seen = {page_evaluated()}
        deadline = time.monotonic() + 60
        while len(seen) < 4:
            assert time.monotonic() < deadline, engines.log("vmalert")
            time.sleep(1)
            seen.add(page_evaluated())
        alerts = requests.get(vmalert_url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"] or []
        assert [a["labels"] for a in alerts if a["labels"]["severity"] == "critical"] == []
        assert [a for a in notifications.alerts if a["labels"].get("severity") == "critical"] == []
    finally:
        notifications.close()


def at(vm_url: str, expr: str, when: float) -> list[dict]:
    """An instant query to VictoriaMetrics at Unix time `when`."""
    body = requests.get(vm_url + "/api/v1/query", params={"query": expr, "time": when}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def relabelled(series: list[tuple[str, list[float]]], job: str) -> list[tuple[str, list[float]]]:
    return [(sel.replace('job="whisper"', f'job="{job}"'), vals) for sel, vals in series]


def visible(vm_url: str, expr: str, when: float, count: int) -> None:
    """Wait until VictoriaMetrics answers `expr` at `when` with `count` series: what was just written
    is searched only once flushed (a replay that reads too early evaluates its first rules on nothing)."""
    deadline = time.monotonic() + 30
    while len(at(vm_url, expr, when)) < count:
        assert time.monotonic() < deadline, at(vm_url, expr, when)
        requests.get(vm_url + "/internal/force_flush", timeout=10)
        time.sleep(0.5)


@pytest.mark.integration
def test_capacity_rules_on_vmalert_give_promtools_figures_and_forecast(engines, tmp_path):
    """rules/capacity.yml where a fleet's ruler runs it. Two of rules/tests/capacity_test.yml's cases,
    imported into VictoriaMetrics with the timestamps promtool gives them, and vmalert's replay mode
    (it evaluates the rules over past data as it would have live, writing records and ALERTS back):
    the records equal promtool's expected values at 65m (replicas at 25% and 90% busy), and the
    forecast stays quiet at 3h30m and fires at 7h30m as promtool says (demand growing 1 audio-s/s an
    hour). The forecast is predict_linear over 6 hours of a record, which a live run could not fill."""
    test_file = "capacity_test.yml"
    busy, step = promtool_series(test_file, "one-at-a-time replicas at 25% and 90% busy, 10 audio seconds per busy second")
    growing, _ = promtool_series(test_file, "demand growing by 1 audio-s/s every hour crosses a capacity of 10 within 4 hours")
    start = (int(time.time()) // 60 - 8 * 60) * 60  # 7h30m is now less 30 minutes: in the past
    vm_url = f"http://127.0.0.1:{free_port()}"
    engines.start("victoria-metrics", [
        require_tool("victoria-metrics"), f"-storageDataPath={tmp_path / 'vm-data'}",
        f"-httpListenAddr={vm_url.removeprefix('http://')}", "-retentionPeriod=1d", "-search.latencyOffset=1s",
        "-search.disableCache",
    ], vm_url + "/health")
    lines = [as_import_line(sel, vals, start, step) for sel, vals in busy + relabelled(growing, "forecast")]
    imported = requests.post(vm_url + "/api/v1/import", data="\n".join(lines), timeout=10)
    assert imported.status_code == 204, imported.text
    visible(vm_url, "whisper_server_busy_seconds_total", start + 65 * 60, 3)  # before the replay reads it
    # The shipped file less the efficiency records, which read GPU series these cases do not have,
    # and less the alert's annotations: replay mode refuses the `query` template the description
    # uses (live vmalert runs it; `vmalert -dryRun` in test_vmalert_accepts_every_shipped_rule_file).
    doc = yaml.safe_load((ROOT / "rules" / "capacity.yml").read_text())
    for group in doc["groups"]:
        group["rules"] = [r for r in group["rules"] if "gpu" not in r.get("record", "")]
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "capacity.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    # rulesDelay: a record is searched only once VictoriaMetrics has flushed it, and the next rule
    # may read it (with 500 ms the chained records were evaluated on nothing and came out empty).
    replay = subprocess.run([
        require_tool("vmalert"), f"-rule={tmp_path / 'capacity.yml'}", f"-datasource.url={vm_url}",
        f"-remoteWrite.url={vm_url}", "-remoteWrite.flushInterval=200ms", "-replay.rulesDelay=3s",
        "-datasource.queryStep=0",  # replay's step: the rules' interval (by default 5m, and `for:` never held)
        "-evaluationInterval=1m", f"-replay.timeFrom={iso(start)}", f"-replay.timeTo={iso(start + 7 * 3600 + 31 * 60)}",
        "-replay.disableProgressBar",
    ], capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
    visible(vm_url, "job:whisper_server_saturation:ratio_rate1m", start + 65 * 60, 2)

    # The replicas at 25% and 90% busy: each of promtool's expected samples at 65m.
    doc = yaml.safe_load((ROOT / "rules" / "tests" / test_file).read_text())
    case = next(t for t in doc["tests"] if t["name"].startswith("one-at-a-time replicas"))
    checked = 0
    for check in case["promql_expr_test"]:
        when = start + int(check["eval_time"].removesuffix("m")) * 60
        got = {(r["metric"].get("instance"),): float(r["value"][1])
               for r in at(vm_url, check["expr"], when) if r["metric"].get("job") == "whisper"}
        want = {(dict(re.findall(r'(\w+)="([^"]*)"', s["labels"])).get("instance"),): float(s["value"])
                for s in check["exp_samples"]}
        assert got.keys() == want.keys(), (check["expr"], got, want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=0.01), (check["expr"], key, got[key], value)
            checked += 1
    assert checked >= 15

    # The forecast: quiet at 3h30m (demand under half the capacity), firing at 7h30m.
    firing = 'ALERTS{alertname="WhisperCapacityRunningOut",alertstate="firing",job="forecast"}'
    visible(vm_url, firing, start + 7 * 3600 + 30 * 60, 1)  # the last thing the replay wrote
    (alert,) = at(vm_url, firing, start + 7 * 3600 + 30 * 60)
    assert alert["metric"]["severity"] == "warning"
    assert at(vm_url, firing, start + 3 * 3600 + 30 * 60) == []
    # The flat replicas (demand 11.5 of a capacity of 20) never forecast running out.
    assert at(vm_url, 'ALERTS{alertname="WhisperCapacityRunningOut",job="whisper"}', start + 65 * 60) == []
