"""A fleet of three real exporter processes scraped by one real Prometheus with the shipped rules
(issues 14 and 15): the job-level (fleet) records equal the sum of the per-replica parts, and with
a fault injected into one replica the pages and the fleet dashboard name that replica and why.

Each exporter follows its own JSON request log (as beside its own Whisper server); the test
appends requests to the three logs while Prometheus scrapes every second. Replica 1 answers a
quarter of its requests with 500.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml
from helpers import free_port, http_ok, read_log, stop_process, wait_started
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted(str(p) for p in (ROOT / "rules").glob("*.yml"))
WORK = re.compile(r"^(?!(/|/docs|/openapi\.json|/health|/healthz|/ready|/metrics|/v1/models)$)")
ROUNDS = 10
PER_ROUND = 20  # requests per replica per round
BAD = 1  # the replica with the fault
BAD_SHARE = 0.25


def request_line(status: int, n: int) -> str:
    return json.dumps({
        "time": "2025-06-02T09:14:03.512Z", "level": "INFO" if status < 500 else "ERROR", "msg": "request",
        "method": "POST", "path": "/v1/audio/transcriptions", "status": status,
        "duration_ms": 900.0 + n % 7, "queue_ms": 12.0, "inference_ms": 800.0, "audio_seconds": 6.0,
        "language": "en", "model": "large-v3", "error": "CUDA out of memory" if status >= 500 else None,
    })


def exporter_command() -> str:
    """The installed console script, beside this interpreter (a virtual environment) or on PATH."""
    beside = Path(sys.executable).parent / "whisper-exporter"
    found = str(beside) if beside.exists() else shutil.which("whisper-exporter")
    if found is None:
        pytest.fail("the whisper-exporter console script is not installed (pip install -e .)")
    return found


class Replica:
    """One whisper-exporter process, following its own log."""

    def __init__(self, folder: Path, index: int):
        self.index = index
        self.log = folder / f"replica-{index}.jsonl"
        self.log.write_text("")
        self.address = f"127.0.0.1:{free_port()}"
        config = folder / f"replica-{index}.yml"
        config.write_text(yaml.safe_dump({
            "listen": self.address,
            "collectors": {
                "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                "logs": {"enabled": True, "interval": "200ms", "start_at": "beginning",
                         "files": [{"path": str(self.log), "format": "json-request"}]},
            },
        }))
        self.output = open(folder / f"replica-{index}.out", "w")
        self.proc = subprocess.Popen([exporter_command(), "--config", str(config)],
                                     stdout=self.output, stderr=subprocess.STDOUT)
        self.sent = 0

    def write_round(self) -> None:
        bad = int(PER_ROUND * BAD_SHARE) if self.index == BAD else 0
        with self.log.open("a") as f:
            for n in range(PER_ROUND):
                f.write(request_line(500 if n < bad else 200, n) + "\n")
        self.sent += PER_ROUND

    def work_requests(self) -> float:
        """The replica's own count of work requests, read from its /metrics."""
        text = requests.get(f"http://{self.address}/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "whisper_requests_total" and WORK.match(s.labels["endpoint"]))

    def stop(self) -> None:
        stop_process(self.proc, self.output)


@contextlib.contextmanager
def running_replicas(folder: Path, count: int = 3) -> Iterator[list[Replica]]:
    """`count` replicas, each answering /metrics; all stopped at the end."""
    replicas = [Replica(folder, i) for i in range(count)]
    try:
        for r in replicas:
            wait_started(f"exporter replica {r.index}", r.proc, http_ok(f"http://{r.address}/metrics"),
                         lambda r=r: read_log(folder / f"replica-{r.index}.out"))
        yield replicas
    finally:
        for r in replicas:
            r.stop()


@pytest.fixture
def fleet(tmp_path):
    with running_replicas(tmp_path) as replicas:
        yield replicas


def values(result: list[dict], label: str = "instance") -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def dashboard_expr(uid: str, title: str, ref: str = "A") -> str:
    for path in (ROOT / "dashboards").glob("*.json"):
        d = json.loads(path.read_text())
        if d["uid"] == uid:
            for panel in d["panels"]:
                if panel["title"] == title:
                    expr = next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
                    return expr.replace('=~"$job"', '=~".*"').replace('=~"$instance"', '=~".*"')
    raise AssertionError(f"no panel {title!r} in {uid}")


def test_fleet_of_three_sums_up_and_names_the_faulty_replica(prometheus, fleet):
    prom = prometheus([r.address for r in fleet], rule_files=RULE_FILES)
    prom.wait_for('count(up{job="whisper"} == 1) == 3')
    # Traffic while Prometheus scrapes every second: ten rounds, one a second.
    for _ in range(ROUNDS):
        for r in fleet:
            r.write_round()
        time.sleep(1)
    bad = fleet[BAD].address
    prom.wait_for(f'job_instance:whisper_requests_errors:ratio_rate5m{{instance="{bad}"}} > 0')
    expected_total = sum(r.sent for r in fleet)
    prom.wait_for(f'sum(whisper_requests_total{{job="whisper"}}) == {expected_total}')
    time.sleep(2)  # a few more rule evaluations over the complete counts

    def query_at(expr: str, at: float) -> list[dict]:
        response = requests.get(prom.url + "/api/v1/query", params={"query": expr, "time": at}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    # One evaluation of the service's recording group for every query below: the timestamp of
    # a job-level record, at which the per-replica records of the same group must sit too (a
    # query between the group's first and last rule would mix two evaluations).
    group = ("job:whisper_requests:rate5m", "job:whisper_requests_errors:rate5m",
             "job:whisper_requests_errors:ratio_rate5m", "job_instance:whisper_requests:rate5m",
             "job_instance:whisper_requests_errors:rate5m", "job_instance:whisper_requests_errors:ratio_rate5m")
    # It must also come after the last scrape of the complete counts.
    complete = f'sum(whisper_requests_total{{job="whisper"}}) == {expected_total}'
    for _ in range(60):
        at = float(query_at("timestamp(job:whisper_requests:rate5m)", time.time() - 2)[0]["value"][1])
        stamps = {float(r["value"][1]) for name in group for r in query_at(f"timestamp({name})", at)}
        if stamps == {at} and query_at(complete, at):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no evaluation with every record of the group over complete counts: {stamps}")

    def query(expr: str) -> list[dict]:
        return query_at(expr, at)

    # 1. The parts: each replica's own count, read from its own /metrics, is what Prometheus holds;
    #    and the fleet's total is their sum.
    own = {r.address: r.work_requests() for r in fleet}
    assert own == {r.address: float(r.sent) for r in fleet}
    stored = values(query('sum by (instance) (whisper_requests_total{job="whisper"})'))
    assert stored == own
    assert values(query('sum by (job) (whisper_requests_total{job="whisper"})'), "job") == {"whisper": sum(own.values())}

    # 2. The job-level records are the sums of the per-replica records of the same evaluation.
    for fleet_record, part in (("job:whisper_requests:rate5m", "job_instance:whisper_requests:rate5m"),
                               ("job:whisper_requests_errors:rate5m", "job_instance:whisper_requests_errors:rate5m")):
        whole = values(query(fleet_record), "job")["whisper"]
        parts = values(query(part))
        assert set(parts) == {r.address for r in fleet}
        assert whole > 0 and whole == pytest.approx(sum(parts.values()), rel=1e-9), fleet_record
    # The service's error ratio is failed over all requests of all replicas, not a mean of ratios.
    ratio = values(query("job:whisper_requests_errors:ratio_rate5m"), "job")["whisper"]
    errors = values(query("job:whisper_requests_errors:rate5m"), "job")["whisper"]
    total = values(query("job:whisper_requests:rate5m"), "job")["whisper"]
    assert ratio == pytest.approx(errors / total, rel=1e-9)
    # (A rate over series younger than its window is extrapolated, so the 5-minute ratio is near,
    # not exactly, the share of failed lines; the stored counts give that exactly.)
    assert 0.5 * BAD_SHARE / 3 < ratio < 1.5 * BAD_SHARE / 3
    counted = query('sum(whisper_requests_total{job="whisper",status_code=~"5.."}) / sum(whisper_requests_total{job="whisper"})')
    assert float(counted[0]["value"][1]) == pytest.approx(BAD_SHARE / 3, rel=1e-9)
    # The fleet's p95 comes from the summed buckets, so it is there for the job as a whole.
    assert values(query("job:whisper_request_duration_seconds:p95_5m"), "job")["whisper"] > 0

    # 3. The dashboards find the outlier: the fleet dashboard's stat and its table.
    outlier = query(dashboard_expr("whisper-fleet", "Worst replica: errors above the fleet"))
    assert list(values(outlier)) == [bad]
    side_by_side = values(query(dashboard_expr("whisper-fleet", "Replicas side by side", "B")))
    assert set(side_by_side) == {r.address for r in fleet}
    assert max(side_by_side, key=side_by_side.get) == bad
    assert 0.5 * BAD_SHARE < side_by_side[bad] < 1.5 * BAD_SHARE
    assert sorted(side_by_side.values())[:2] == [0, 0]
    assert values(outlier)[bad] == pytest.approx(side_by_side[bad] - ratio, rel=1e-9)
    shares = values(query(dashboard_expr("whisper-fleet", "Replicas side by side", "A")))
    assert sum(shares.values()) == pytest.approx(1, rel=1e-9)

    # 4. The alerts say which replica and why (pending: their `for:` outlasts the test). The page
    #    is the service's burn rate, naming the worst replica; the replica's own ticket names it.
    deadline = time.monotonic() + 30
    while True:
        alerts = requests.get(prom.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        names = {(a["labels"]["alertname"], a["labels"]["severity"]) for a in alerts}
        if {("WhisperErrorBudgetBurn", "critical"), ("WhisperErrorRatioHigh", "warning")} <= names:
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(1)
    page = next(a for a in alerts if a["labels"]["alertname"] == "WhisperErrorBudgetBurn"
                and a["labels"]["severity"] == "critical")
    assert "instance" not in page["labels"] and page["labels"]["job"] == "whisper"
    assert re.search(rf"worst replica now: {re.escape(bad)} failing \d+(\.\d+)?%\.$",
                     page["annotations"]["description"]), page
    tickets = [a for a in alerts if a["labels"]["alertname"] == "WhisperErrorRatioHigh"]
    assert [a["labels"]["instance"] for a in tickets] == [bad]
    assert re.match(rf"\d+(\.\d+)?% of the requests to {re.escape(bad)} answered 5xx",
                    tickets[0]["annotations"]["description"]), tickets
    # Nothing pages per replica: every critical alert is the service's.
    assert all("instance" not in a["labels"] for a in alerts if a["labels"]["severity"] == "critical")
