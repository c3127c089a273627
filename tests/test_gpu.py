"""GPU collector against the fake NVML (tests/fake_nvml.py), whose answers are real H100 readings."""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import defaultdict

import pynvml
import pytest
from fake_nvml import FakeNVML, load_fixture
from helpers import wait_for

import whisper_exporter.collectors.gpu as gpu
from whisper_exporter.collectors.gpu import GpuConfig
from whisper_exporter.collectors.process import ProcessConfig
from whisper_exporter.config import Config
from whisper_exporter.runtime.collector import plugins

FIXTURE = load_fixture()
LOAD_PID = 424  # the one compute process in the fixture's under_load state

GPU_READINGS = (
    "whisper_gpu_utilization_ratio", "whisper_gpu_memory_utilization_ratio", "whisper_gpu_memory_used_bytes",
    "whisper_gpu_memory_total_bytes", "whisper_gpu_memory_reserved_bytes", "whisper_gpu_temperature_celsius",
    "whisper_gpu_power_watts", "whisper_gpu_power_limit_watts", "whisper_gpu_energy_joules_total",
    "whisper_gpu_sm_clock_hertz", "whisper_gpu_clock_event_active", "whisper_gpu_ecc_errors_total",
    "whisper_gpu_info", "whisper_gpu_processes",
)


def ok(state: str, key: str):
    return FIXTURE[state][key]["ok"]


def samples(collector) -> dict[str, list[tuple[dict, float]]]:
    out = defaultdict(list)
    for family in collector.families():
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def value(collector, name: str, **labels) -> float:
    found = [v for l, v in samples(collector)[name] if all(l.get(k) == str(x) for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def make():
    """make(fake=None, watched=(), **section) -> started collector; everything is stopped afterwards."""
    made = []

    def factory(fake=None, watched=(), **section):
        fake = fake or FakeNVML()
        collector = gpu.GpuCollector(GpuConfig(**section), nvml=fake, watched_pids=lambda: set(watched))
        collector.xid_wait_ms = 20  # stop() is heard within one wait
        collector.xid_retry_s = 0.05
        made.append((collector, fake))
        collector.start()
        return collector

    yield factory
    for collector, fake in made:
        for event in fake._hangs.values():
            event.set()
        collector.stop()


# -- readings and units ------------------------------------------------------------

@pytest.mark.parametrize("state", ["idle", "under_load"])
def test_every_reading_equals_the_fixture_in_base_units(make, state):
    c = make(FakeNVML(state))
    c.update()
    mem = ok(state, "memory_v2")
    util = ok(state, "utilization")
    assert value(c, "whisper_gpu_memory_used_bytes") == mem["used"]
    assert value(c, "whisper_gpu_memory_total_bytes") == mem["total"] == 85520809984
    assert value(c, "whisper_gpu_memory_reserved_bytes") == mem["reserved"]
    assert value(c, "whisper_gpu_utilization_ratio") == util["gpu"] / 100
    assert value(c, "whisper_gpu_memory_utilization_ratio") == util["memory"] / 100
    assert value(c, "whisper_gpu_temperature_celsius") == ok(state, "temperature_gpu")
    assert value(c, "whisper_gpu_power_watts") == pytest.approx(ok(state, "power_usage_mw") / 1000)
    assert value(c, "whisper_gpu_power_limit_watts") == 700.0
    assert value(c, "whisper_gpu_energy_joules_total") == pytest.approx(ok(state, "total_energy_mj") / 1000)
    assert value(c, "whisper_gpu_sm_clock_hertz") == ok(state, "clock_sm") * 1e6
    assert value(c, "whisper_gpu_ecc_errors_total", type="corrected") == 0
    assert value(c, "whisper_gpu_ecc_errors_total", type="uncorrected") == 0
    info = samples(c)["whisper_gpu_info"]
    assert info == [({"gpu": "0", "uuid": ok(state, "uuid"), "name": "NVIDIA H100 80GB HBM3",
                      "pci_bus_id": "00000000:00:06.0", "driver_version": "580.159.04"}, 1.0)]


def test_under_load_figures_by_hand(make):
    c = make(FakeNVML("under_load"))
    c.update()
    # v2's used, not v1's (which adds the 480 MiB the driver reserves)
    assert value(c, "whisper_gpu_memory_used_bytes") == 6602686464 != ok("under_load", "memory_v1")["used"]
    assert value(c, "whisper_gpu_power_watts") == pytest.approx(131.17)
    assert value(c, "whisper_gpu_temperature_celsius") == 37
    assert value(c, "whisper_gpu_sm_clock_hertz") == 1.98e9
    assert value(c, "whisper_gpu_utilization_ratio") == pytest.approx(0.09)
    assert value(c, "whisper_gpu_energy_joules_total") == pytest.approx(8571.907)
    assert all(v == 0 for _, v in samples(c)["whisper_gpu_clock_event_active"])


def test_clock_event_reasons_bitmask(make):
    c = make(FakeNVML("idle"))  # bitmask 1: the GPU is idle
    c.update()
    active = {l["reason"]: v for l, v in samples(c)["whisper_gpu_clock_event_active"]}
    assert active == {"gpu_idle": 1, "applications_clocks_setting": 0, "sw_power_cap": 0, "hw_slowdown": 0,
                      "sync_boost": 0, "sw_thermal_slowdown": 0, "hw_thermal_slowdown": 0,
                      "hw_power_brake_slowdown": 0, "display_clock_setting": 0}
    c.nvml.override("clocks_event_reasons", ok=0x4 | 0x40)
    c.update()
    active = {l["reason"]: v for l, v in samples(c)["whisper_gpu_clock_event_active"]}
    assert {r for r, v in active.items() if v} == {"sw_power_cap", "hw_thermal_slowdown"}


def test_matches_nvidia_smi_at_the_same_instant(make):
    """The fixture's side-by-side reading: what we export is what nvidia-smi shows."""
    block = FIXTURE["nvml_vs_nvidia_smi_same_instant"]
    smi, nv = block["nvidia_smi_query"], block["nvml"]
    fake = FakeNVML("idle")
    fake.override("memory_v2", ok={"version": pynvml.nvmlMemory_v2, "total": nv["memory_v2.total"],
                                   "reserved": nv["memory_v2.reserved"], "free": 0, "used": nv["memory_v2.used"]})
    fake.override("utilization", ok={"gpu": nv["util.gpu"], "memory": 0})
    fake.override("temperature_gpu", ok=nv["temperature"])
    fake.override("power_usage_mw", ok=nv["power_mw"])
    fake.override("power_limit_mw", ok=nv["power_limit_mw"])
    fake.override("clock_sm", ok=nv["sm_clock_mhz"])
    fake.override("clocks_event_reasons", ok=nv["clocks_event_reasons"])
    c = make(fake)
    c.update()
    mib = 2**20
    assert round(value(c, "whisper_gpu_memory_used_bytes") / mib) == int(smi["memory.used"])
    assert round(value(c, "whisper_gpu_memory_total_bytes") / mib) == int(smi["memory.total"])
    assert round(value(c, "whisper_gpu_memory_reserved_bytes") / mib) == int(smi["memory.reserved"])
    # v1's "used" would not match nvidia-smi: it counts the reserved part
    assert round(ok("idle", "memory_v1")["used"] / mib) != int(smi["memory.used"])
    assert round(value(c, "whisper_gpu_utilization_ratio") * 100) == int(smi["utilization.gpu"])
    assert value(c, "whisper_gpu_temperature_celsius") == int(smi["temperature.gpu"])
    assert value(c, "whisper_gpu_power_limit_watts") == float(smi["power.limit"])
    # power was sampled a moment apart (the fixture says so): same unit, within a watt
    assert abs(value(c, "whisper_gpu_power_watts") - float(smi["power.draw"])) < 1.0
    assert value(c, "whisper_gpu_sm_clock_hertz") / 1e6 == int(smi["clocks.sm"])
    active = {l["reason"]: v for l, v in samples(c)["whisper_gpu_clock_event_active"]}
    bitmask = sum(bit for reason, bit in gpu.CLOCK_EVENT_REASONS if active[reason])
    assert bitmask == int(smi["clocks_event_reasons.active"], 16)


# -- Not Supported and other errors --------------------------------------------------

def test_not_supported_readings_are_absent_not_zero(make):
    fake = FakeNVML("under_load")
    fake.override("power_usage_mw", error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    fake.override("temperature_gpu", error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    fake.override("utilization", error=pynvml.NVML_ERROR_NOT_SUPPORTED)  # as on a MIG-enabled GPU
    c = make(fake)
    c.update()
    got = samples(c)
    for name in ("whisper_gpu_power_watts", "whisper_gpu_temperature_celsius",
                 "whisper_gpu_utilization_ratio", "whisper_gpu_memory_utilization_ratio"):
        assert got[name] == [], name
    assert got["whisper_gpu_memory_used_bytes"] and got["whisper_gpu_power_limit_watts"]
    assert got["whisper_gpu_read_errors_total"] == []  # Not Supported is an answer, not an error
    # only the V call was made: Not Supported is not a reason to try the deprecated one
    assert fake.calls["nvmlDeviceGetTemperature"] == 0


def test_other_errors_on_optional_readings_are_absent_and_counted(make):
    fake = FakeNVML("under_load")
    fake.override("power_usage_mw", error=pynvml.NVML_ERROR_NO_PERMISSION)
    fake.override("total_energy_mj", error=pynvml.NVML_ERROR_UNKNOWN)
    c = make(fake)
    c.update()
    c.update()
    got = samples(c)
    assert got["whisper_gpu_power_watts"] == [] and got["whisper_gpu_energy_joules_total"] == []
    assert value(c, "whisper_gpu_read_errors_total", call="nvmlDeviceGetPowerUsage") == 2
    assert value(c, "whisper_gpu_read_errors_total", call="nvmlDeviceGetTotalEnergyConsumption") == 2
    assert got["whisper_gpu_temperature_celsius"]  # the rest is still read


def test_ecc_off_means_no_ecc_series(make):
    fake = FakeNVML("under_load")
    fake.override("ecc_mode", ok=[0, 0])
    c = make(fake)
    c.update()
    assert samples(c)["whisper_gpu_ecc_errors_total"] == []
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 0


def test_ecc_counts_by_type(make):
    fake = FakeNVML("under_load")
    fake.override("ecc_corrected_volatile", ok=12)
    fake.override("ecc_uncorrected_volatile", ok=1)
    c = make(fake)
    c.update()
    assert value(c, "whisper_gpu_ecc_errors_total", type="corrected") == 12
    assert value(c, "whisper_gpu_ecc_errors_total", type="uncorrected") == 1


def test_temperature_falls_back_only_when_the_v_call_is_absent(make):
    fake = FakeNVML("under_load")
    fake.errors["nvmlDeviceGetTemperatureV"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND  # older driver
    c = make(fake)
    c.update()
    c.update()
    assert value(c, "whisper_gpu_temperature_celsius") == 37
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1  # remembered as absent
    assert fake.calls["nvmlDeviceGetTemperature"] == 2
    assert samples(c)["whisper_gpu_read_errors_total"] == []

    older = FakeNVML("idle")
    older.make_absent("nvmlDeviceGetTemperatureV")  # older bindings
    c = make(older)
    c.update()
    assert value(c, "whisper_gpu_temperature_celsius") == 35


def test_clock_reasons_fall_back_to_the_throttle_call_when_absent(make):
    fake = FakeNVML("idle")
    fake.make_absent("nvmlDeviceGetCurrentClocksEventReasons")
    c = make(fake)
    c.update()
    assert value(c, "whisper_gpu_clock_event_active", reason="gpu_idle") == 1
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


# -- per-process memory ----------------------------------------------------------------

def test_process_memory_only_for_watched_pids(make):
    c = make(FakeNVML("under_load"), watched={LOAD_PID, 999})
    c.update()
    assert samples(c)["whisper_gpu_process_memory_used_bytes"] == [
        ({"gpu": "0", "uuid": ok("under_load", "uuid"), "name": "NVIDIA H100 80GB HBM3", "pid": "424"},
         6593445888.0)]
    assert value(c, "whisper_gpu_processes", matched="true") == 1
    assert value(c, "whisper_gpu_processes", matched="false") == 0


def test_unmatched_processes_are_counted_not_exported(make):
    # NVML reporting host pids (or no shared pid namespace): nothing matches, nothing fails
    c = make(FakeNVML("under_load"), watched={7})
    c.update()
    assert samples(c)["whisper_gpu_process_memory_used_bytes"] == []
    assert value(c, "whisper_gpu_processes", matched="true") == 0
    assert value(c, "whisper_gpu_processes", matched="false") == 1


def test_several_processes_some_watched(make):
    fake = FakeNVML("under_load")
    procs = [{"pid": 424, "usedGpuMemory": 100}, {"pid": 425, "usedGpuMemory": 50},
             {"pid": 5000, "usedGpuMemory": 70}, {"pid": 426, "usedGpuMemory": None}]
    fake.override("compute_procs", ok=[repr(p) for p in procs])
    c = make(fake, watched={424, 425, 426})
    c.update()
    mem = {l["pid"]: v for l, v in samples(c)["whisper_gpu_process_memory_used_bytes"]}
    assert mem == {"424": 100, "425": 50}  # 426's memory is not available: no series
    assert value(c, "whisper_gpu_processes", matched="true") == 3
    assert value(c, "whisper_gpu_processes", matched="false") == 1


def test_idle_gpu_has_no_processes(make):
    c = make(FakeNVML("idle"), watched={LOAD_PID})
    c.update()
    assert value(c, "whisper_gpu_processes", matched="true") == 0
    assert value(c, "whisper_gpu_processes", matched="false") == 0


def test_watched_pids_failing_is_an_empty_set(make):
    fake = FakeNVML("under_load")
    c = gpu.GpuCollector(GpuConfig(xid_events=False), nvml=fake, watched_pids=lambda: 1 / 0)
    c.start()
    try:
        c.update()
        assert value(c, "whisper_gpu_processes", matched="false") == 1
        assert samples(c)["whisper_gpu_memory_used_bytes"]
    finally:
        c.stop()


# -- devices ------------------------------------------------------------------------

def test_several_devices(make):
    c = make(FakeNVML("under_load", devices=3))
    c.update()
    used = samples(c)["whisper_gpu_memory_used_bytes"]
    assert [l["gpu"] for l, _ in used] == ["0", "1", "2"]
    assert len({l["uuid"] for l, _ in used}) == 3
    assert len({l["pci_bus_id"] for l, _ in samples(c)["whisper_gpu_info"]}) == 3


def test_device_subset(make):
    c = make(FakeNVML("under_load", devices=2), devices=[1])
    c.update()
    info = samples(c)["whisper_gpu_info"]
    assert [l["gpu"] for l, _ in info] == ["1"]
    assert info[0][0]["uuid"].endswith("01") and info[0][0]["pci_bus_id"] == "00000000:01:06.0"
    assert [l["gpu"] for l, _ in samples(c)["whisper_gpu_power_watts"]] == ["1"]


def test_device_index_that_does_not_exist(make):
    fake = FakeNVML(devices=2)
    with pytest.raises(ValueError, match=r"GPU index 5 does not exist .*2 GPU\(s\), indices 0\.\.1"):
        make(fake, devices=[0, 5])
    assert fake.init_count == 0  # nvmlInit was balanced by nvmlShutdown


# -- NVML missing, GPU lost, hangs ----------------------------------------------------------

def test_missing_library_gives_one_clear_message_and_start_can_be_retried(make):
    fake = FakeNVML()
    fake.library_missing = True
    c = gpu.GpuCollector(GpuConfig(), nvml=fake)
    for _ in range(2):  # the scheduler retries start() on later intervals
        with pytest.raises(gpu.GpuUnavailable) as err:
            c.start()
        assert str(err.value) == (
            "NVML unavailable: NVML Shared Library Not Found (no NVIDIA driver on this machine?)")
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert list(c.families())[0].name == "whisper_gpu_xid_errors" and not list(c.families())[0].samples
    fake.library_missing = False  # driver installed meanwhile
    c.start()
    c.update()
    assert value(c, "whisper_gpu_temperature_celsius") == 37
    c.stop()
    assert fake.init_count == 0


def test_no_gpu_is_unavailable(make):
    with pytest.raises(gpu.GpuUnavailable, match="NVML unavailable: no NVIDIA GPU found"):
        make(FakeNVML(devices=0))


def test_real_nvml_on_a_machine_without_a_driver():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    c = gpu.GpuCollector(GpuConfig())  # the real pynvml, imported in start()
    with pytest.raises(gpu.GpuUnavailable, match=r"^NVML unavailable: "):
        c.start()
    c.stop()


def test_start_twice_does_not_leak_nvml_or_threads(make):
    fake = FakeNVML()
    c = make(fake)
    c.start()
    assert fake.init_count == 1
    assert sum(not s["freed"] for s in fake.event_sets) == 1
    assert sum(t.name == "gpu-xid" and t.is_alive() for t in threading.enumerate()) >= 1
    c.stop()
    assert fake.init_count == 0 and all(s["freed"] for s in fake.event_sets)


def test_gpu_lost_raises_and_leaves_no_stale_readings(make):
    fake = FakeNVML("under_load")
    c = make(fake)
    c.update()
    assert samples(c)["whisper_gpu_memory_used_bytes"]
    fake.lost.add(0)
    with pytest.raises(gpu.GpuReadError, match="GPU is lost"):
        c.update()
    names = {n for n, got in samples(c).items() if got}
    assert not names & set(GPU_READINGS)
    assert {f.name for f in c.families()} == {"whisper_gpu_xid_errors"}
    fake.lost.clear()  # GPU back (reset, driver reload): the next update re-initialises
    inits = fake.calls["nvmlInit"]
    c.update()
    assert fake.calls["nvmlInit"] == inits + 1
    assert value(c, "whisper_gpu_memory_used_bytes") == 6602686464


def test_unknown_error_on_memory_raises(make):
    fake = FakeNVML("under_load")
    c = make(fake)
    c.update()
    fake.override("memory_v2", error=pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(gpu.GpuReadError, match="nvmlDeviceGetMemoryInfo: Unknown Error"):
        c.update()
    assert samples(c)["whisper_gpu_memory_used_bytes"] == []


def test_scrape_never_waits_on_a_hung_nvml_call(make):
    fake = FakeNVML("under_load")
    c = make(fake)
    c.update()
    release = fake.hang("nvmlDeviceGetMemoryInfo")
    worker = threading.Thread(target=c.update, daemon=True)
    worker.start()
    assert wait_for(lambda: fake.calls["nvmlDeviceGetMemoryInfo"] == 2)
    began = time.monotonic()
    got = samples(c)
    # The hung call waits until released: any bound proves samples() did not wait; a wide one
    # holds on a loaded machine.
    assert time.monotonic() - began < 5.0 and worker.is_alive()
    assert got["whisper_gpu_memory_used_bytes"]  # the last reading; the scheduler's watchdog hides it
    release.set()
    worker.join(10)
    assert not worker.is_alive()


def test_scheduler_watchdog_marks_a_wedged_gpu_down(make):
    from whisper_exporter.runtime.exporter import ExporterCollector
    from whisper_exporter.runtime.scheduler import Scheduler

    fake = FakeNVML("under_load")
    c = make(fake)
    scheduler = Scheduler([(c, 5.0, 0.2)])
    _, state = scheduler.entries[0]
    scheduler.run_once(c, state)
    release = fake.hang("nvmlDeviceGetMemoryInfo")
    worker = threading.Thread(target=scheduler.run_once, args=(c, state), daemon=True)
    worker.start()
    # past the 0.2 s timeout, counted from when the run began (a thread may start late)
    assert wait_for(lambda: state.overrun() is not None)
    got = defaultdict(list)
    for family in ExporterCollector(scheduler).collect():
        for s in family.samples:
            got[s.name].append((s.labels, s.value))
    assert got["whisper_exporter_collector_up"] == [({"collector": "gpu"}, 0.0)]
    assert got["whisper_gpu_memory_used_bytes"] == []
    release.set()
    worker.join(2)


# -- XID events ---------------------------------------------------------------------------

def test_xid_events_counted_per_xid_and_surviving_update_failures(make):
    fake = FakeNVML("under_load", devices=2)
    c = make(fake)
    c.update()
    assert wait_for(lambda: fake.calls["nvmlEventSetWait_v2"] >= 3)  # idle: the waits time out, and loop
    for device, xid in ((0, 79), (0, 79), (0, 13), (1, 79)):
        fake.inject_xid(device, xid)
    assert wait_for(lambda: len([v for _, v in samples(c)["whisper_gpu_xid_errors_total"] if v]) == 3)
    assert value(c, "whisper_gpu_xid_errors_total", gpu=0, xid=79) == 2
    assert value(c, "whisper_gpu_xid_errors_total", gpu=0, xid=13) == 1
    assert value(c, "whisper_gpu_xid_errors_total", gpu=1, xid=79) == 1
    uuid0 = ok("under_load", "uuid")
    assert value(c, "whisper_gpu_xid_errors_total", gpu=0, xid=79, uuid=uuid0) == 2

    fake.lost.add(0)  # XID 79 "fallen off the bus", then the reads fail
    with pytest.raises(gpu.GpuReadError):
        c.update()
    assert value(c, "whisper_gpu_xid_errors_total", gpu=0, xid=79) == 2
    fake.lost.clear()
    c.update()  # re-initialises NVML and a new event thread; the counts carry on
    fake.inject_xid(0, 79)
    assert wait_for(lambda: value(c, "whisper_gpu_xid_errors_total", gpu=0, xid=79) == 3)
    assert value(c, "whisper_gpu_xid_errors_total", gpu=1, xid=79) == 1


def test_tracked_xids_start_at_zero_so_increase_sees_the_first(make):
    """Issue 15: a counter born with the value 1 looks like no change to increase(); the XIDs
    the alerts page on exist at 0 from the start on every GPU with XID events."""
    fake = FakeNVML("under_load", devices=2)
    c = make(fake)
    c.update()
    xids = samples(c)["whisper_gpu_xid_errors_total"]
    assert {(l["gpu"], int(l["xid"])) for l, _ in xids} == {
        (str(g), x) for g in (0, 1) for x in gpu.TRACKED_XIDS}
    assert all(v == 0 for _, v in xids)
    assert {48, 79, 95, 119} <= set(gpu.TRACKED_XIDS)


def test_xid_thread_survives_unexpected_errors_and_logs_once(make, caplog):
    fake = FakeNVML("under_load")
    c = make(fake)
    with caplog.at_level(logging.ERROR, logger="whisper_exporter.gpu"):
        fake.inject_event_error(pynvml.NVML_ERROR_UNKNOWN)
        fake.inject_event_error(pynvml.NVML_ERROR_UNKNOWN)
        fake.inject_xid(0, 48)
        assert wait_for(lambda: any(v for _, v in samples(c)["whisper_gpu_xid_errors_total"]))
    assert value(c, "whisper_gpu_xid_errors_total", xid=48) == 1
    assert len([r for r in caplog.records if "XID event thread" in r.getMessage()]) == 1


def test_stop_ends_the_xid_thread_and_frees_the_set(make):
    fake = FakeNVML("under_load")
    c = make(fake)
    thread = c._xid_thread
    assert thread is not None and thread.is_alive()
    c.stop()
    assert not thread.is_alive()
    assert fake.event_sets and all(s["freed"] for s in fake.event_sets)
    assert fake.init_count == 0


def test_no_xid_thread_when_disabled_or_unsupported(make):
    fake = FakeNVML("under_load")
    c = make(fake, xid_events=False)
    assert c._xid_thread is None and fake.event_sets == []
    unsupported = FakeNVML("under_load")
    unsupported.override("xid_event_supported", ok=0x1)  # single-bit ECC only, no XID
    c = make(unsupported)
    assert c._xid_thread is None and all(s["freed"] for s in unsupported.event_sets)
    c.update()
    assert samples(c)["whisper_gpu_memory_used_bytes"]
    no_events = FakeNVML("under_load")
    no_events.errors["nvmlEventSetCreate"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    c = make(no_events)
    assert c._xid_thread is None
    c.update()
    assert samples(c)["whisper_gpu_memory_used_bytes"]


# -- wiring ---------------------------------------------------------------------------------

def test_factory_is_a_plugin_and_reads_the_process_watch():
    from whisper_exporter.runtime.shared import Shared

    assert plugins()["gpu"] is gpu.PLUGIN
    config = Config()
    shared = Shared.build(config)
    c = gpu.make(config.collectors.gpu, shared)
    assert c.name == "gpu" and c.section is config.collectors.gpu
    assert c.watched_pids() == set()  # the process collector has not scanned yet
    shared.process_watch.publish({LOAD_PID})
    assert c.watched_pids() == {LOAD_PID}

    config.collectors.process = ProcessConfig(enabled=False)
    assert gpu.make(config.collectors.gpu, shared).watched_pids() == set()


def test_fake_has_only_real_nvml_functions():
    """The fake must not drift from the bindings: same names, same leading parameters."""
    for name, method in inspect.getmembers(FakeNVML, inspect.isfunction):
        if not name.startswith("nvml"):
            continue
        real = getattr(pynvml, name)
        fake_params = list(inspect.signature(method).parameters)[1:]
        real_params = list(inspect.signature(real).parameters)
        shared = min(len(fake_params), len(real_params))
        assert fake_params[:shared] == real_params[:shared], name
        assert len(fake_params) >= len([p for p in inspect.signature(real).parameters.values()
                                        if p.default is inspect.Parameter.empty]), name


# -- enabled: auto -----------------------------------------------------------------------------

def _names(scheduler) -> list[str]:
    return [state.name for _, state in scheduler.entries]


def test_auto_is_the_default_and_other_words_are_refused():
    from whisper_exporter.config import ConfigError, from_dict

    assert GpuConfig().enabled == "auto" and Config().collectors.gpu.enabled == "auto"
    for word in (True, False, "auto"):
        assert from_dict({"collectors": {"gpu": {"enabled": word}}}).collectors.gpu.enabled == word
    with pytest.raises(ConfigError, match=r"collectors\.gpu\.enabled: expected true, false or auto, got 'yes'"):
        from_dict({"collectors": {"gpu": {"enabled": "yes"}}})


def test_auto_without_the_driver_library_is_off_with_one_info_line(monkeypatch, caplog):
    from whisper_exporter.wiring import build_scheduler

    fake = FakeNVML()
    fake.library_missing = True
    monkeypatch.setattr(gpu, "load_nvml", lambda: fake)
    with caplog.at_level(logging.INFO, logger="whisper_exporter"):
        scheduler = build_scheduler(Config())
    assert "gpu" not in _names(scheduler)
    lines = [r for r in caplog.records if r.name == "whisper_exporter.gpu"]
    assert [(r.levelname, r.getMessage()) for r in lines] == [(
        "INFO", "gpu: collector off: no NVIDIA driver library (libnvidia-ml) on this machine "
                "(collectors.gpu.enabled: auto; true runs it anyway)")]
    # enabled: true is a promise that there is a GPU: then the missing library is an error.
    config = Config()
    config.collectors.gpu.enabled = True
    assert "gpu" in _names(build_scheduler(config))


def test_auto_with_a_failing_driver_stays_on_down_and_counted(monkeypatch):
    from whisper_exporter.wiring import build_scheduler

    fake = FakeNVML()
    fake.errors["nvmlInit"] = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    monkeypatch.setattr(gpu, "load_nvml", lambda: fake)
    monkeypatch.setattr(gpu, "nvml_library_loads", lambda: True)  # the library is there, the driver is not
    scheduler = build_scheduler(Config())
    (collector, state), = [(c, s) for c, s in scheduler.entries if s.name == "gpu"]
    scheduler.run_once(collector, state)
    assert not state.ok and state.errors_total == 1
    assert "is the NVIDIA kernel module loaded?" in state.last_error
    collector.stop()


def test_auto_with_a_working_driver_is_on_and_leaves_nvml_as_it_found_it():
    fake = FakeNVML()
    assert GpuConfig().active(fake) and fake.init_count == 0 and fake.calls["nvmlInit"] == 1


def test_auto_on_this_machine_agrees_with_the_real_library():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        present = err.value != pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    else:
        pynvml.nvmlShutdown()
        present = True
    assert GpuConfig().active() is present
