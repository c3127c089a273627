"""Autoscaling (issue 25 part 3): deploy/kubernetes/keda-scaledobject.yaml validates against KEDA's own
ScaledObject CRD schema (tests/data/keda, from kedacore/keda v2.20.2), and its query, run against a
real Prometheus scraping 1 and 3 real exporters whose taps hold known transcriptions in flight, returns
exactly one sample, the mean number in flight from whisper_requests_in_flight_seconds_total, whose value
gives the replica count the HPA will set. The legacy
prometheus-adapter rule and its HPA ask for the same metric.
"""
from __future__ import annotations

import asyncio
import copy
import math
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml
from helpers import free_port, http_ok, read_log, sample, stop_process, wait_started
from tap_helpers import Upstream
from test_fleet import exporter_command

ROOT = Path(__file__).resolve().parent.parent
# The integral of the transcriptions in flight (docs/capacity.md): its rate is the mean number in flight.
COUNTER = "whisper_requests_in_flight_seconds_total"
SCALED_OBJECT = ROOT / "deploy" / "kubernetes" / "keda-scaledobject.yaml"
ADAPTER = ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml"
CRD = ROOT / "tests" / "data" / "keda" / "keda.sh_scaledobjects.yaml"
# The prometheus scaler's settings: the `keda:"name=..."` tags of prometheusMetadata in
# pkg/scalers/prometheus_scaler.go (kedacore/keda v2.20.2), plus authModes read from the same map.
PROMETHEUS_SCALER_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                          "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
                          "identityOwner", "authModes"}


def scaled_object() -> dict:
    return yaml.safe_load(SCALED_OBJECT.read_text())


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as the API server's strict field validation (kubectl
    apply's default) refuses them; the CRD alone would let a misspelt field be pruned in silence."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def keda_validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # a missing test dependency fails, never skips (helpers.require_tool's policy)
        pytest.fail("jsonschema is not installed: pip install -e '.[test]'", pytrace=False)
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI v3.0 schemas are (nearly) draft 4
    return jsonschema.Draft4Validator(schema), f'{crd["spec"]["group"]}/{version["name"]}'


def test_scaled_object_validates_against_kedas_own_crd_schema():
    validator, api_version = keda_validator()
    doc = scaled_object()
    assert doc["apiVersion"] == api_version and doc["kind"] == "ScaledObject"
    assert [e.message for e in validator.iter_errors(doc)] == []
    # The validation can fail: a misspelt field, a number where KEDA takes a string, a missing trigger.
    typo = copy.deepcopy(doc)
    behavior = typo["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["stabilisationWindowSeconds"] = behavior["scaleDown"].pop("stabilizationWindowSeconds")
    number = copy.deepcopy(doc)
    number["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    empty = copy.deepcopy(doc)
    empty["spec"]["triggers"] = []
    for bad in (typo, number, empty):
        assert list(validator.iter_errors(bad)), bad


def test_scaled_object_settings_are_the_prometheus_scalers_and_say_what_is_asked():
    """The CRD takes any string map as trigger metadata: the names must be the scaler's own."""
    spec = scaled_object()["spec"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_SCALER_KEYS, set(metadata) - PROMETHEUS_SCALER_KEYS
    assert float(metadata["threshold"]) > 0
    assert 0 < float(metadata["activationThreshold"]) < float(metadata["threshold"])
    # An empty answer is "target may be lost" (an error, then the fallback), not zero load.
    assert metadata["ignoreNullValues"] == "false" and spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    # KEDA's CheckFallbackValid: a fallback needs an AverageValue trigger.
    assert trigger["metricType"] == "AverageValue"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert spec["minReplicaCount"] >= 1  # the metric comes from the pods: at zero nothing measures demand


def test_prometheus_adapter_rule_and_hpa_ask_for_the_same_metric():
    config_map, hpa = yaml.safe_load_all(ADAPTER.read_text())
    [rule] = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    keda_query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    assert rule["seriesQuery"].startswith(COUNTER + '{job="speech/whisper",') and COUNTER in keda_query
    # Both read the counter's rate over the same window: the mean in flight, per pod and in total.
    assert "rate(<<.Series>>{<<.LabelMatchers>>}[2m])" in rule["metricsQuery"] and "[2m]" in keda_query
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "whisper"
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    keda = scaled_object()["spec"]
    assert metric["pods"]["target"]["averageValue"] == keda["triggers"][0]["metadata"]["threshold"]
    assert hpa["spec"]["behavior"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


class Gate:
    """An upstream that holds every request until released: a known number stays in flight."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None
        self.upstream = Upstream({"/v1/audio/transcriptions": self._handle})

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        if self.event is None:
            self.event = asyncio.Event()
        await asyncio.wait_for(self.event.wait(), 120)
        return web.json_response({"text": "held"})

    def release(self) -> None:
        def open_gate() -> None:
            if self.event is None:
                self.event = asyncio.Event()
            self.event.set()
        self.upstream.loop.call_soon_threadsafe(open_gate)


class TapReplica:
    """One whisper-exporter process whose tap forwards to the gate."""

    def __init__(self, folder: Path, index: int, upstream: str):
        self.address = f"127.0.0.1:{free_port()}"
        self.tap = f"http://127.0.0.1:{free_port()}"
        config = folder / f"tap-replica-{index}.yml"
        config.write_text(yaml.safe_dump({
            "listen": self.address, "service": {"url": upstream},
            "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
                           "tap": {"enabled": True, "listen": self.tap.removeprefix("http://"), "upstream": upstream}},
        }))
        self.log = folder / f"tap-replica-{index}.out"
        self.output = open(self.log, "w")
        self.proc = subprocess.Popen([exporter_command(), "--config", str(config)],
                                     stdout=self.output, stderr=subprocess.STDOUT)
        self.clients: list[threading.Thread] = []

    def metrics(self) -> str:
        return requests.get(f"http://{self.address}/metrics", timeout=10).text

    def wait_started(self) -> None:
        wait_started("exporter", self.proc, http_ok(f"http://{self.address}/metrics"), lambda: read_log(self.log))
        wait_started("tap", self.proc, http_ok(self.tap + "/health", None), lambda: read_log(self.log))  # any status

    def hold(self, n: int) -> None:
        """Send n uploads that stay in flight until the gate opens, and wait until the tap counts them."""
        for _ in range(n):
            t = threading.Thread(target=requests.post, args=(self.tap + "/v1/audio/transcriptions",),
                                 kwargs={"files": {"file": ("a.wav", b"RIFF....")}, "timeout": 150}, daemon=True)
            t.start()
            self.clients.append(t)
        deadline = time.monotonic() + 30
        while sample(self.metrics(), "whisper_tap_requests_in_flight") != n:
            assert time.monotonic() < deadline, self.metrics()
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, self.output)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release()
    g.upstream.stop()


def keda_value(result: list[dict]) -> float:
    """What KEDA's Prometheus scaler makes of a query's answer (ExecutePromQuery, ignoreNullValues false)."""
    assert len(result) == 1, f"KEDA refuses this: 'returned multiple elements' or 'the result is empty': {result}"
    value = float(result[0]["value"][1])
    assert math.isfinite(value)
    return value


def desired_replicas(value: float, spec: dict) -> int:
    """The HPA's answer for an AverageValue external metric: ceil(total / target), within min and max."""
    target = float(spec["triggers"][0]["metadata"]["threshold"])
    return max(spec["minReplicaCount"], min(spec["maxReplicaCount"], math.ceil(value / target)))


@pytest.mark.integration
@pytest.mark.parametrize("held, replicas_wanted", [((3,), 2), ((1, 2, 2), 3)], ids=["1-replica", "3-replicas"])
def test_the_keda_query_is_one_sample_giving_the_replica_count(prometheus, gate, tmp_path, held, replicas_wanted):
    spec = scaled_object()["spec"]
    committed = spec["triggers"][0]["metadata"]["query"]
    # The committed query: the counter's rate, summed to one element, for the PodMonitor's job only.
    assert committed == f'sum(rate({COUNTER}{{job="speech/whisper"}}[2m]))', committed
    # The same query over 10 s (ten scrapes at 1 s) instead of 2 minutes, so that the held load
    # fills the window within seconds; the window changes how fast it follows, not what it says.
    query = committed.replace("[2m]", "[10s]")
    replicas = [TapReplica(tmp_path, i, gate.upstream.url) for i in range(len(held))]
    try:
        for r in replicas:
            r.wait_started()
        # The PodMonitor's job label, as the query names it.
        prom = prometheus([r.address for r in replicas], job="speech/whisper")
        prom.wait_for(f'count(up{{job="speech/whisper"}} == 1) == {len(replicas)}')
        # Idle: one sample, 0, under the activation threshold; the HPA keeps the minimum.
        idle = keda_value(prom.wait_for(f"({query}) == 0"))
        assert idle < float(spec["triggers"][0]["metadata"]["activationThreshold"])
        assert desired_replicas(idle, spec) == spec["minReplicaCount"]
        # The adapter's series exist under the name its rule matches.
        assert sample(replicas[0].metrics(), COUNTER) == 0
        for r, n in zip(replicas, held):
            r.hold(n)
        total = sum(held)
        # Once the window holds only the held load, the mean in flight is its count (to the few
        # milliseconds between a scrape's timestamp and the exporter's reading).
        prom.wait_for(f"abs(({query}) - {total}) < 0.05", timeout=90)
        loaded = keda_value(prom.query(query))
        assert loaded == pytest.approx(total, abs=0.05)
        assert desired_replicas(loaded, spec) == replicas_wanted
        # Per-pod answers are what breaks KEDA (vLLM production-stack's example): without sum()
        # the same selector gives one element per replica.
        per_pod = prom.query(query.removeprefix("sum(").removesuffix(")"))
        assert len(per_pod) == len(replicas)
    finally:
        gate.release()
        for r in replicas:
            r.stop()


@pytest.mark.integration
def test_the_keda_query_with_no_replica_scraped_is_empty_so_keda_falls_back(prometheus):
    """No data is not no load: the query gives nothing, KEDA errors and holds the fallback count."""
    spec = scaled_object()["spec"]
    prom = prometheus([f"127.0.0.1:{free_port()}"], job="speech/whisper")  # nothing listens there
    prom.wait_for('up{job="speech/whisper"} == 0')
    query = spec["triggers"][0]["metadata"]["query"].replace("[2m]", "[10s]")
    prom.wait_for('count_over_time(up{job="speech/whisper"}[10s]) >= 3')  # the window has scrapes
    assert prom.query(query) == []
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]

