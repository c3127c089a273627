"""The framework: a failing, hanging or slow collector never breaks or slows a scrape."""
import threading
import time

import pytest
import requests
from helpers import samples, wait_for
from prometheus_client.core import GaugeMetricFamily

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict
from whisper_exporter.runtime.scheduler import Scheduler


class ScriptedCollector:
    """A collector whose update() does what the test says: succeed, raise, or block."""

    def __init__(self, name, behaviour="ok", families_raise=False):
        self.name = name
        self.behaviour = behaviour
        self.families_raise = families_raise
        self.release = threading.Event()
        self.updates = 0
        self.stopped = False

    def start(self):
        if self.behaviour == "start-fails":
            raise RuntimeError("no such device")

    def update(self):
        self.updates += 1
        if self.behaviour == "raise":
            raise ValueError("reading failed")
        if self.behaviour == "hang":
            self.release.wait(30)

    def families(self):
        if self.families_raise:
            raise KeyError("broken state")
        g = GaugeMetricFamily(f"test_{self.name}_value", "A test value.")
        g.add_metric([], float(self.updates))
        yield g

    def stop(self):
        self.stopped = True


def scrape(url, **headers):
    response = requests.get(url + "/metrics", headers=headers, timeout=5)
    response.raise_for_status()
    return response


def up(values, name):
    return values[("whisper_exporter_collector_up", (("collector", name),))]


def errors(values, name):
    return values[("whisper_exporter_collector_errors_total", (("collector", name),))]


@pytest.fixture
def exporter():
    started = []

    def start(collectors, interval=0.2, timeout=0.5):
        config = from_dict({"listen": "127.0.0.1:0"})
        scheduler = Scheduler([(c, interval, timeout) for c in collectors])
        running = daemon.start(config, scheduler)
        started.append(running)
        return running

    yield start
    for running in started:
        for collector, _ in running.scheduler.entries:
            getattr(collector, "release", threading.Event()).set()
        running.close()


def test_good_collector_is_up_and_its_metrics_are_served(exporter):
    good = ScriptedCollector("good")
    running = exporter([good])
    state = running.scheduler.entries[0][1]
    assert wait_for(lambda: state.runs >= 1)  # finished: up is set when update() returns
    values = samples(scrape(running.url).text)
    assert up(values, "good") == 1
    assert errors(values, "good") == 0
    assert values[("test_good_value", ())] >= 1
    assert values[("whisper_exporter_build_info", (("python_version", __import__("platform").python_version()), ("version", "0.1.0")))] == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in values)


def test_raising_collector_is_down_counted_and_others_unaffected(exporter):
    good, bad = ScriptedCollector("good"), ScriptedCollector("bad", "raise")
    running = exporter([good, bad])
    good_state, bad_state = (state for _, state in running.scheduler.entries)
    # errors are counted when update() has raised, after it counted the call
    assert wait_for(lambda: bad_state.errors_total >= 3 and good_state.runs >= 1)
    values = samples(scrape(running.url).text)
    assert up(values, "bad") == 0
    assert errors(values, "bad") >= 3
    assert up(values, "good") == 1
    page = requests.get(running.url + "/", timeout=5).text
    assert "ValueError: reading failed" in page


def test_collector_that_cannot_start_is_down_and_retried(exporter):
    nogpu = ScriptedCollector("nogpu", "start-fails")
    running = exporter([nogpu])
    state = running.scheduler.entries[0][1]
    assert wait_for(lambda: state.errors_total >= 2)  # retried on later intervals
    values = samples(scrape(running.url).text)
    assert up(values, "nogpu") == 0
    assert ("test_nogpu_value", ()) not in values  # never started: nothing stale to show
    assert "RuntimeError: no such device" in requests.get(running.url, timeout=5).text


def test_hanging_collector_never_slows_a_scrape(exporter):
    hung, good = ScriptedCollector("hung", "hang"), ScriptedCollector("good")
    running = exporter([hung, good], timeout=0.3)
    good_state = running.scheduler.entries[1][1]
    assert wait_for(lambda: hung.updates == 1 and good_state.runs >= 1)
    time.sleep(0.5)  # past its timeout
    began = time.monotonic()
    values = samples(scrape(running.url).text)
    took = time.monotonic() - began
    # A scrape that waited for the hung run would take its 30 s; the margin is for a loaded machine.
    assert took < 10.0, f"scrape took {took:.2f}s while a collector hangs"
    assert up(values, "hung") == 0
    assert errors(values, "hung") == 1  # one wedged run counts once
    assert ("test_hung_value", ()) not in values  # no stale readings from a wedged run
    assert up(values, "good") == 1
    assert "still in progress" in requests.get(running.url, timeout=5).text
    # Once the call returns, the collector recovers by itself.
    hung.behaviour = "ok"
    hung.release.set()
    assert wait_for(lambda: up(samples(scrape(running.url).text), "hung") == 1)


def test_families_that_raise_do_not_fail_the_scrape(exporter):
    broken, good = ScriptedCollector("broken", families_raise=True), ScriptedCollector("good")
    running = exporter([broken, good])
    assert wait_for(lambda: broken.updates >= 1 and good.updates >= 1)
    response = scrape(running.url)
    values = samples(response.text)
    assert up(values, "broken") == 0
    assert errors(values, "broken") >= 1
    assert values[("test_good_value", ())] >= 1


def test_openmetrics_when_prometheus_asks_for_it(exporter):
    running = exporter([ScriptedCollector("good")])
    response = scrape(running.url, Accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    plain = scrape(running.url)
    assert plain.headers["Content-Type"].startswith("text/plain")


def test_health_readiness_and_unknown_paths(exporter):
    slow = ScriptedCollector("slow", "hang")
    running = exporter([slow], timeout=5)
    assert requests.get(running.url + "/-/healthy", timeout=5).status_code == 200
    assert requests.get(running.url + "/-/ready", timeout=5).status_code == 503  # no run finished yet
    slow.behaviour = "ok"
    slow.release.set()
    assert wait_for(lambda: requests.get(running.url + "/-/ready", timeout=5).status_code == 200)
    assert requests.get(running.url + "/nope", timeout=5).status_code == 404


def test_stop_calls_each_started_collector(exporter):
    good = ScriptedCollector("good")
    running = exporter([good])
    assert wait_for(lambda: good.updates >= 1)
    running.scheduler.stop()
    assert good.stopped
