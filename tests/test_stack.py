"""The whole stack, for real: faster-whisper-server (tiny.en) <- the exporter (its own process,
as deployed) <- Prometheus (Debian's) loading the shipped rules, scraping every second.

- every PromQL query of every dashboard panel, variable and annotation, and every rule, parses
  in that Prometheus, and returns data wherever its metrics exist in this setup (no GPU here:
  the GPU queries parse but have nothing to show);
- every rule evaluates without error;
- a healthy stack has only the alerts it should (the canary given a wrong reference);
- provoked faults show their alerts pending or firing: the server stopped (probe failing, process
  down), requests rejected with 429, failing and slow (from the server's log).

The rules keep their real `for:` durations: "pending" proves the expression matches.

Also checked here, without a Prometheus: the deployment examples in deploy/ (promtool check
config, amtool check-config, the Kubernetes manifests' wiring, the systemd unit)."""
from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from helpers import free_port, require_tool
from test_dashboards import all_dashboard_queries, metric_names, rule_queries, substitute

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "rules").glob("*.yml"))
DEPLOY = ROOT / "deploy"
CANARY_WAV = ROOT / "whisper_exporter" / "canary" / "en.wav"
CANARY_TEXT = (ROOT / "whisper_exporter" / "canary" / "en.txt").read_text().strip()
RATE_INTERVAL = "15s"  # what $__rate_interval becomes: 15 scrapes at 1 s

# Queries whose metrics exist here but that are empty by design in this setup.
EMPTY_HERE = {
    "whisper-quality / Character error rate (zh, yue, ja, ko, th, ...) / A":
        "no canary here is scored in characters (tiny.en is English only)",
    "whisper-overview / Worst language against its threshold / A":
        "only the canary set is evaluated here, and the overview's quality row leaves it out",
    "whisper-overview / Change against 7 days ago / A":
        "only the canary set is evaluated here, and the overview's quality row leaves it out",
    "whisper-performance / Failed requests by endpoint and status / A": "nothing fails before the faults",
}


class TrafficLog:
    """A structured request log (the json-request preset) written while the test runs: the
    exporter's logs collector reads it like the log of a server that records durations."""

    HEALTHY = [
        {"status": 200, "duration_ms": 420, "queue_ms": 15, "inference_ms": 300, "audio_seconds": 4.0},
        {"status": 200, "duration_ms": 900, "queue_ms": 40, "inference_ms": 700, "audio_seconds": 11.0},
    ]
    FAULTY = [
        {"status": 429},
        {"status": 500, "duration_ms": 5200, "queue_ms": 900},
        {"status": 200, "duration_ms": 5400, "queue_ms": 900, "inference_ms": 4500, "audio_seconds": 4.0},
    ]

    def __init__(self, path: Path):
        self.path = path
        self.path.write_text("")
        self.faulty = False
        self._stop = threading.Event()
        self._languages = itertools.cycle(["en", "de", "zh", "yue"])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            lines = []
            for fields in (self.FAULTY if self.faulty else self.HEALTHY):
                lines.append(json.dumps({"msg": "request", "method": "POST", "path": "/v1/audio/transcriptions",
                                         "language": next(self._languages), **fields}))
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def api(prom, path: str, **params) -> dict:
    response = requests.get(prom.url + path, params=params, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


def present_names(prom) -> set[str]:
    """Metric names with a live series now (raw and recorded)."""
    result = api(prom, "/api/v1/query", query='group by (__name__) ({__name__=~".+"})')["result"]
    return {r["metric"]["__name__"] for r in result}


def active_alerts(prom) -> list[dict]:
    return [a for a in api(prom, "/api/v1/alerts")["alerts"] if a["state"] in ("pending", "firing")]


def wait_until(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g}s. {detail()}")
        time.sleep(0.5)


@pytest.fixture
def stack(prometheus, tmp_path):
    from whisper_server import start_server

    server = start_server(tmp_path / "server")
    traffic = TrafficLog(tmp_path / "requests.jsonl")
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "service": {"url": server.url, "model": server.model, "timeout": "30s"},
        "collectors": {
            "gpu": {"interval": "1s"},  # no GPU in CI: down, and nothing else breaks
            # the server's own config file path is unique to this test run
            "process": {"interval": "1s", "match": re.escape(str(server.workdir))},
            # a generous timeout: on a loaded machine tiny.en may take many seconds per canary
            "probe": {"interval": "2s", "timeout": "60s", "canaries": [
                {"name": "en-short", "audio": str(CANARY_WAV), "reference": CANARY_TEXT, "language": "en"},
                {"name": "wrong-reference", "audio": str(CANARY_WAV), "language": "en",
                 "reference": "The quick brown fox jumps over the lazy dog near the river bank."},
            ]},
            "logs": {"enabled": True, "interval": "200ms", "start_at": "beginning", "files": [
                {"path": str(server.log_path), "format": "uvicorn-access"},
                {"path": str(traffic.path), "format": "json-request"},
            ]},
        },
    }
    config_path = tmp_path / "exporter.yml"
    config_path.write_text(yaml.safe_dump(config))
    exporter_log = open(tmp_path / "exporter.log", "w")
    exporter = subprocess.Popen([sys.executable, "-m", "whisper_exporter", "run", "--config", str(config_path)],
                                stdout=exporter_log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"

        def probed():
            assert exporter.poll() is None, (tmp_path / "exporter.log").read_text()
            try:
                return "whisper_probe_success{" in requests.get(url + "/metrics", timeout=5).text
            except requests.ConnectionError:
                return False

        wait_until(probed, 180, "the exporter's first probe", lambda: (tmp_path / "exporter.log").read_text())
        prom = prometheus([f"127.0.0.1:{port}"], rule_files=[str(p) for p in RULE_FILES])
        yield {"prom": prom, "server": server, "traffic": traffic, "exporter_url": url,
               "exporter_log": tmp_path / "exporter.log"}
    finally:
        traffic.stop()
        exporter.terminate()
        try:
            exporter.wait(timeout=15)
        except subprocess.TimeoutExpired:
            exporter.kill()
        exporter_log.close()
        server.stop()


def test_the_stack(stack):
    prom, server, traffic = stack["prom"], stack["server"], stack["traffic"]

    # -- data flows: raw series, recording rules, both canaries probed -------------------------
    def probe_runs():
        return "; ".join(f"{r['metric']['probe']} {r['metric']['result']}: {r['value'][1]}"
                         for r in prom.query("whisper_probe_runs_total > 0"))

    # Limits for a loaded machine; each wait ends as soon as its event happens.
    wait_until(lambda: len(prom.query("whisper_probe_word_error_rate")) == 2, 180, "both canaries scored",
               lambda: f"probe runs: {probe_runs()}")
    wait_until(lambda: prom.query("job_instance:whisper_request_duration_seconds:p95_5m")
               and prom.query("language:whisper_quality_error_rate:ratio_rate1h")
               and prom.query("job_instance_probe:whisper_probe_runs_success:ratio_rate1h"),
               120, "recording rules evaluated")

    # -- every dashboard query parses, and has data wherever its metrics exist ------------------
    def dashboard_gaps() -> list[str]:
        present = present_names(prom)
        missing = []
        for where, expr in all_dashboard_queries():
            query = substitute(expr, RATE_INTERVAL)
            result = api(prom, "/api/v1/query", query=query)["result"]
            names = metric_names(expr)
            if not names <= present or any(key in where for key in EMPTY_HERE):
                continue
            if not result:
                missing.append(f"{where}: {query}")
            elif "histogram_quantile" in expr and all(math.isnan(float(r["value"][1])) for r in result):
                missing.append(f"{where}: only NaN: {query}")
        return missing

    # A rate() window needs a few scrapes, more or fewer of them in a given time on a loaded
    # machine: wait until every query has data rather than a fixed time.
    gaps: list[list[str]] = []
    wait_until(lambda: not gaps.append(dashboard_gaps()) and not gaps[-1], 60, "data for every dashboard query",
               lambda: "no data for:\n" + "\n".join(gaps[-1]))
    present = present_names(prom)
    assert "whisper_requests_total" in present and "whisper_realtime_factor_bucket" in present
    gpu_here = any(n.startswith("whisper_gpu_") for n in present)
    checked = [w for w, e in all_dashboard_queries() if metric_names(e) <= present]
    assert len(checked) >= (100 if gpu_here else 75), len(checked)

    # -- every rule loaded and evaluates without error (vector matching, templates); every rule
    # parses as a query, and recording rules have data wherever their inputs exist -----------
    groups = api(prom, "/api/v1/rules")["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rule_queries())
    for group in groups:
        for rule in group["rules"]:
            # the baselines' group runs every 5 minutes: it may not have run yet
            healthy = ("ok", "unknown") if group["interval"] > 60 else ("ok",)
            assert rule["health"] in healthy, f"{group['name']} / {rule['name']}: {rule.get('lastError')}"
    records = {rule["name"] for rule in loaded if rule["type"] == "recording"}
    for where, expr in rule_queries():
        result = api(prom, "/api/v1/query", query=expr)["result"]
        # (a record that looks a week back has no data in a Prometheus minutes old)
        if where.split(" / ")[1] in records and metric_names(expr) <= present and "offset 1w" not in expr:
            assert result, f"{where}: no data although {sorted(metric_names(expr))} exist"

    # -- healthy: only the alerts this setup calls for -------------------------------------------
    def alerts_by_name():
        found = {}
        for a in active_alerts(prom):
            found.setdefault(a["labels"]["alertname"], []).append(a)
        return found

    wrong = wait_until(lambda: [a for a in alerts_by_name().get("WhisperCanaryTranscriptWrong", [])], 30,
                       "WhisperCanaryTranscriptWrong pending", lambda: str(active_alerts(prom)))
    assert [a["labels"]["probe"] for a in wrong] == ["wrong-reference"]
    assert wrong[0]["labels"]["severity"] == "warning"
    assert float(wrong[0]["value"]) > 0.5  # the transcript's error rate against the wrong reference
    allowed = {
        "WhisperCanaryTranscriptWrong",
        # the canary set's corpus error rate includes the wrong canary's errors: high, truly
        "WhisperQualityErrorRateHigh",
        # no GPU on this machine
        "WhisperExporterCollectorDown",
        # a loaded machine transcribes the canary slower than 0.8 times real time: true, then
        "WhisperProbeRealtimeFactorHigh",
    }
    # A scrape that missed its 1 s timeout on a loaded machine makes WhisperExporterDown pending
    # until the next one: wait for the alerts to settle, and fail on any that stays.
    (healthy,) = wait_until(lambda: (lambda f: (f,) if set(f) <= allowed else None)(alerts_by_name()), 60,
                            "only the alerts this setup calls for",
                            lambda: str({k: [a["labels"] for a in v] for k, v in alerts_by_name().items()
                                         if k not in allowed}))
    for alert in healthy.get("WhisperExporterCollectorDown", []):
        assert alert["labels"]["collector"] == "gpu" and not gpu_here
    for alert in healthy.get("WhisperProbeRealtimeFactorHigh", []):
        assert float(alert["value"]) > 0.8  # only when the probe was that slow
    for alert in healthy.get("WhisperQualityErrorRateHigh", []):
        assert alert["labels"]["set"] == "canary"
    assert float(prom.query("whisper_process_up")[0]["value"][1]) == 1

    # -- faults: failing, rejected and slow requests in the log; the server stopped -------------
    traffic.faulty = True
    server.stop()
    wanted = {"WhisperProbeFailing", "WhisperRequestsRejected", "WhisperErrorRatioHigh", "WhisperLatencyHigh",
              "WhisperRealtimeFactorHigh", "WhisperQueueWaitHigh", "WhisperServerProcessDown"}
    canaries = {"en-short", "wrong-reference"}

    def all_faults_alerted():
        # Every alert, and WhisperProbeFailing for both canaries: a probe run that was in flight
        # when the server stopped may still have got en-short's transcript (uvicorn finishes the
        # requests it has), so wrong-reference can fail one run (2 s, plus a scrape and a rule
        # evaluation; longer on a loaded machine) before en-short does.
        f = alerts_by_name()
        if wanted <= set(f) and {a["labels"]["probe"] for a in f["WhisperProbeFailing"]} == canaries:
            return f
        return None

    # Waiting for the alerts costs only the time they take; the limit is for a loaded machine.
    found = wait_until(all_faults_alerted, 120,
                       f"alerts {sorted(wanted)} pending or firing, WhisperProbeFailing for {sorted(canaries)}",
                       lambda: f"active: { {k: [a['labels'].get('probe') for a in v] for k, v in alerts_by_name().items()} }; "
                               f"exporter log: "
                               f"{stack['exporter_log'].read_text()[-2000:]}")
    failing = found["WhisperProbeFailing"]
    assert {a["labels"]["probe"] for a in failing} == canaries
    for alert in failing:
        assert alert["labels"]["severity"] == "critical" and alert["state"] in ("pending", "firing")
        assert float(alert["value"]) == 0  # no answer at all: connection refused
        assert "the last answer was HTTP 0" in alert["annotations"]["description"]
    rejected = found["WhisperRequestsRejected"][0]
    # Above the rule's 5%, and at most the faulty mix's share (1 of 3 lines is a 429): when the
    # alert first shows, the 5 m window still holds healthy lines, so the share is still rising.
    assert 0.05 < float(rejected["value"]) <= 1 / 3 + 1e-9
    assert found["WhisperLatencyHigh"][0]["labels"]["severity"] == "warning"
    assert float(found["WhisperLatencyHigh"][0]["value"]) > 3
    # with no transcript coming back, the wrong-transcript alert goes away
    wait_until(lambda: "WhisperCanaryTranscriptWrong" not in alerts_by_name(), 60,
               "WhisperCanaryTranscriptWrong resolved")


# -- the deployment examples -----------------------------------------------------------------------

def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_prometheus_example_config_is_valid():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # it loads the shipped rules, all of them
    for rule_file in RULE_FILES:
        assert "SUCCESS: " in result.stdout and rule_file.name in result.stdout, result.stdout
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "whisper"]
    assert re.search(r"whisper", job["job_name"])  # matched by WhisperExporterDown's up{job=~".*whisper.*"}
    assert all(t.endswith(":10111") for sc in job["static_configs"] for t in sc["targets"])


def test_alertmanager_example_routes_by_severity_and_inhibits():
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes = config["route"]["routes"]
    by_severity = {}
    for route in routes:
        for matcher in route.get("matchers", []):
            m = re.fullmatch(r'severity\s*=~?\s*"?([\w|]+)"?', matcher)
            if m:
                for severity in m.group(1).split("|"):
                    by_severity[severity] = route["receiver"]
    assert set(by_severity) == {"critical", "warning", "info"}
    assert len({by_severity["critical"], by_severity["warning"]}) == 2
    assert set(by_severity.values()) <= receivers
    # a down service silences its latency alerts; critical silences warning of the same alert
    inhibit = config["inhibit_rules"]
    down = [r for r in inhibit if any("WhisperProbeFailing" in m for m in r["source_matchers"])]
    assert down, "no inhibition from a down service"
    targets = " ".join(" ".join(r["target_matchers"]) for r in down)
    alert_names = {rule["alert"] for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]
                   for rule in g["rules"] if "alert" in rule}
    for name in ("WhisperLatencyHigh", "WhisperRealtimeFactorHigh", "WhisperQueueWaitHigh",
                 "WhisperProbeRealtimeFactorHigh", "WhisperLatencyAboveBaseline"):
        assert name in targets and name in alert_names
    for r in down:
        assert {"job", "instance"} <= set(r["equal"])
    # every alert name the config mentions exists
    mentioned = set(re.findall(r"Whisper[A-Z]\w+", (DEPLOY / "alertmanager.yml").read_text()))
    assert mentioned <= alert_names, mentioned - alert_names
    severity = [r for r in inhibit if r["source_matchers"] == ['severity="critical"']]
    assert severity and "alertname" in severity[0]["equal"]


def test_alertmanager_example_passes_amtool():
    amtool = require_tool("amtool")
    result = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_kubernetes_example_runs_the_exporter_as_a_sidecar():
    from whisper_exporter.config import from_dict

    docs = load_all(DEPLOY / "kubernetes" / "whisper.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "Deployment", "Service", "PodMonitor"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["shareProcessNamespace"] is True  # the exporter sees the server's processes
    containers = {c["name"]: c for c in spec.get("containers", []) + spec.get("initContainers", [])}
    whisper, exporter = containers["whisper"], containers["whisper-exporter"]
    if exporter in spec.get("initContainers", []):
        assert exporter["restartPolicy"] == "Always"  # a native sidecar
    # the log volume: written by the server, read-only in the exporter, at the same path
    volumes = {v["name"]: v for v in spec["volumes"]}
    log_mount_w = [m for m in whisper["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
    log_mount_r = [m for m in exporter["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
    assert log_mount_w and log_mount_r
    assert log_mount_r[0]["readOnly"] is True and not log_mount_w[0].get("readOnly")
    assert log_mount_r[0]["name"] == log_mount_w[0]["name"]
    # a named metrics port, and a PodMonitor that selects the pod and scrapes it
    (port,) = [p for p in exporter["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == 10111
    monitor = kinds["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # the exporter's configuration is valid, probes the server in the pod, and reads the shared log
    (config_text,) = kinds["ConfigMap"]["data"].values()
    config = from_dict(yaml.safe_load(config_text), source="deploy/kubernetes/whisper.yaml")
    server_port = [p for p in whisper["ports"] if p["name"] == "http"][0]["containerPort"]
    assert config.service.url == f"http://127.0.0.1:{server_port}"
    mount = log_mount_r[0]["mountPath"]
    assert config.collectors.logs.enabled and all(f.path.startswith(mount) for f in config.collectors.logs.files)
    assert any(mount in arg for arg in whisper.get("args", []) + whisper.get("command", []))
    config_mounts = [m["mountPath"] for m in exporter["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert any(a.startswith(config_mounts[0]) for a in exporter["args"])
    # the job name Prometheus gives a PodMonitor target (namespace/name) matches WhisperExporterDown
    assert "whisper" in monitor["metadata"]["name"]
    # clients go through the exporter's request tap: the Service targets its port, which forwards
    # to the server in the pod
    (tap_port,) = [p for p in exporter["ports"] if p["name"] == "tap"]
    assert config.collectors.tap.enabled
    assert config.collectors.tap.listen_address[1] == tap_port["containerPort"]
    assert config.collectors.tap.upstream == f"http://127.0.0.1:{server_port}"
    (service_port,) = kinds["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == "tap"


def test_systemd_unit(tmp_path):
    unit = (DEPLOY / "systemd" / "whisper-exporter.service").read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/whisper-exporter run --config /etc/whisper-exporter/config.yml$",
                     unit, re.M)
    assert re.search(r"^User=whisper-exporter$", unit, re.M)
    assert re.search(r"^RestartPreventExitStatus=2$", unit, re.M)  # bad configuration: do not loop
    # it must see the server's processes and the GPU: no hidden /proc, no private /dev
    settings = [line for line in unit.splitlines() if line and not line.startswith("#")]
    for setting in ("ProtectProc=invisible", "PrivateDevices=yes", "PrivatePIDs=yes"):
        assert setting not in settings
    analyze = require_tool("systemd-analyze")
    # verified with the ExecStart pointing at this checkout's whisper-exporter
    binary = Path(sys.executable).with_name("whisper-exporter")
    assert binary.exists(), binary
    copy = tmp_path / "whisper-exporter.service"
    copy.write_text(unit.replace("/usr/local/bin/whisper-exporter", str(binary)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
