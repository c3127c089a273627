"""GPU collector: NVML readings per device, and XID errors counted from NVML events.

update() reads every device through NVML (microseconds per call, no subprocess)
into an immutable snapshot; families() only turns the latest snapshot into metric
families. See docs/gpu.md for what is read and why these calls.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.config import Duration, KeyPath, warning
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.shared import Shared

log = logging.getLogger("whisper_exporter.gpu")


@dataclass
class GpuConfig:
    # auto: on when NVIDIA's driver library (NVML) loads on this machine, off with one info line
    # when there is none (a CPU-only host). A library that loads but fails keeps it on, down and alerting.
    enabled: Union[bool, str] = "auto"
    interval: Duration = Duration(5)
    timeout: Duration = Duration(3)
    devices: Union[str, list[int]] = "all"  # "all" or a list of indices
    xid_events: bool = True

    def check(self, at: KeyPath) -> None:
        if isinstance(self.enabled, str) and self.enabled != "auto":
            raise at.error("enabled", "true, false or auto", self.enabled)
        if isinstance(self.devices, str) and self.devices != "all":
            raise at.error("devices", '"all" or a list of GPU indices', self.devices)

    def warnings(self, at: KeyPath, config: Any) -> list[str]:
        """enabled: true on a machine without the driver library: down from the start."""
        if self.enabled is True and not nvml_library_present():
            return [warning(at, "enabled", "true, but there is no NVIDIA driver library (libnvidia-ml) on this "
                                           "machine: the collector will be down (auto turns it off here)")]
        return []

    def reads(self, config: Any) -> object:
        """What else of the configuration the collector is built from (a reload that changes it
        rebuilds the collector): whether the process collector finds the server's pids."""
        return config.collectors.process.enabled

    def active(self, nvml: Any = None) -> bool:
        """Whether the collector runs: `enabled`, with auto settled by looking for the NVML library."""
        if self.enabled != "auto":
            return bool(self.enabled)
        present = nvml_library_present(nvml)
        if not present:
            log.info("gpu: collector off: no NVIDIA driver library (libnvidia-ml) on this machine "
                     "(collectors.gpu.enabled: auto; true runs it anyway)")
        return present


def load_nvml() -> Any:
    """The NVML bindings (pynvml, from nvidia-ml-py); imported on first use."""
    import pynvml

    return pynvml


def nvml_library_loads() -> bool:
    """Whether NVML's shared library loads, by the name pynvml loads it by on Linux (elsewhere
    pynvml looks in other places: leave it to pynvml)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def nvml_library_present(nvml: Any = None) -> bool:
    """False only when NVML's shared library is not there at all. A library that loads but fails
    (driver not loaded, no GPU, version mismatch) counts as present: that is a fault to report."""
    if nvml is None:
        if not nvml_library_loads():  # a CPU-only host: no need to import pynvml (~1.5 MB) to learn it
            return False
        nvml = load_nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return err.value != LIBRARY_NOT_FOUND
    except Exception:  # noqa: BLE001 - anything else is the driver's fault, for the collector to report
        return True
    try:
        nvml.nvmlShutdown()
    except Exception as err:  # noqa: BLE001
        log.debug("gpu: nvmlShutdown after the library probe failed: %s", err)
    return True

# NVML return codes (part of NVML's C ABI, the same as pynvml.NVML_ERROR_*).
UNINITIALIZED = 1
NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
UNKNOWN = 999

XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
# XIDs whose counters start at 0 on every GPU with XID events, so that increase() sees their first
# event (a series born with the value 1 looks to Prometheus like no change). Those the alert
# rules and docs/runbook.md#whispergpuxiderror name: application faults (13, 31, 43, 45, 68, 69),
# micro-controller (61, 62), ECC and row remapping (48, 63, 64, 92, 94, 95), NVLink (74), off
# the bus (79), GSP (119, 120). Others are still counted, from their first event.
TRACKED_XIDS = (13, 31, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120)

# nvmlClocksEventReason* bits, in the order of NVML's header; one series each.
CLOCK_EVENT_REASONS = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)

_HINTS = {
    LIBRARY_NOT_FOUND: "no NVIDIA driver on this machine?",
    DRIVER_NOT_LOADED: "is the NVIDIA kernel module loaded?",
}


class GpuUnavailable(RuntimeError):
    """NVML cannot be used here (no library, no driver, no GPU). One clear message."""


class GpuReadError(RuntimeError):
    """A basic reading failed (GPU lost, unknown error): the snapshot was dropped."""


@dataclass(frozen=True)
class Device:
    index: int
    handle: Any
    uuid: str
    name: str
    pci_bus_id: str

    @property
    def labels(self) -> list[str]:
        return [str(self.index), self.uuid, self.name]


@dataclass(frozen=True)
class GpuReading:
    """One device at one instant. None = not supported or failed: the series is left out."""

    device: Device
    memory_used_bytes: float
    memory_total_bytes: float
    memory_reserved_bytes: Optional[float] = None
    utilization_ratio: Optional[float] = None
    memory_utilization_ratio: Optional[float] = None
    temperature_celsius: Optional[float] = None
    power_watts: Optional[float] = None
    power_limit_watts: Optional[float] = None
    energy_joules: Optional[float] = None
    sm_clock_hertz: Optional[float] = None
    clock_event_reasons: Optional[int] = None
    ecc_errors: tuple[tuple[str, int], ...] = ()  # (type, count), only with ECC on
    process_memory: tuple[tuple[int, int], ...] = ()  # (pid, bytes), watched pids only
    processes: Optional[tuple[int, int]] = None  # (matched, unmatched)


@dataclass(frozen=True)
class Snapshot:
    driver_version: str
    gpus: tuple[GpuReading, ...]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _handle_key(handle: Any) -> Any:
    # Two ctypes pointers to one device are different objects; their address is the identity.
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


def _no_pids() -> set[int]:
    return set()


class GpuCollector:
    name = "gpu"
    xid_wait_ms = 1000  # how long one nvmlEventSetWait_v2 blocks; also how fast stop() is heard
    xid_retry_s = 5.0  # back-off after an unexpected error in the XID thread

    def __init__(
        self,
        section: GpuConfig,
        nvml: Any = None,
        watched_pids: Callable[[], set[int]] = _no_pids,
    ):
        self.section = section
        self.nvml = nvml  # None: the real pynvml, imported in start()
        self.watched_pids = watched_pids
        self._snapshot: Optional[Snapshot] = None
        self._devices: list[Device] = []
        self._driver = ""
        self._initialised = False
        self._reinit = False  # a basic call failed: handles may be stale, re-init before reading
        self._absent: set[str] = set()  # NVML calls the bindings or the driver turned out not to have
        self._lock = threading.Lock()  # guards the two counter dicts below
        self._xids: dict[tuple[str, ...], int] = {}  # (gpu, uuid, name, xid) -> count
        self._read_errors: dict[tuple[str, ...], int] = {}  # (gpu, uuid, name, call)
        self._event_set: Any = None
        self._xid_thread: Optional[threading.Thread] = None
        self._xid_stop = threading.Event()
        self._logged: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """nvmlInit, device handles, and the XID thread. Safe to call again (it stops first)."""
        self.stop()
        if self.nvml is None:
            self.nvml = load_nvml()
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            hint = _HINTS.get(err.value)
            raise GpuUnavailable(f"NVML unavailable: {err}" + (f" ({hint})" if hint else "")) from None
        self._initialised = True
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise GpuUnavailable("NVML unavailable: no NVIDIA GPU found")
            devices = self.section.devices
            wanted: list[int] = list(range(count)) if isinstance(devices, str) else list(dict.fromkeys(devices))
            for index in wanted:
                if not 0 <= index < count:
                    raise ValueError(
                        f"collectors.gpu.devices: GPU index {index} does not exist "
                        f"(this machine has {count} GPU(s), indices 0..{count - 1})"
                    )
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
            self._devices = [self._device(index) for index in wanted]
            if self.section.xid_events:
                self._start_xid_events()
        except Exception:
            self.stop()
            raise
        self._reinit = False

    def _device(self, index: int) -> Device:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return Device(
            index=index,
            handle=handle,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        )

    def stop(self) -> None:
        """Ends the XID thread, frees the event set, shuts NVML down. Never raises."""
        thread, self._xid_thread = self._xid_thread, None
        if thread is not None:
            self._xid_stop.set()
            thread.join(self.xid_wait_ms / 1000 + 1)
        if self._event_set is not None:
            # Freeing a set that a thread still waits on is undefined in NVML: leak it instead.
            if thread is None or not thread.is_alive():
                self._quietly("nvmlEventSetFree", self._event_set)
            self._event_set = None
        if self._initialised:
            self._initialised = False
            self._quietly("nvmlShutdown")
        self._devices = []

    def _quietly(self, call: str, *args: Any) -> None:
        try:
            getattr(self.nvml, call)(*args)
        except Exception as err:
            log.debug("gpu: %s failed: %s", call, err)

    # -- XID events ----------------------------------------------------------------

    def _start_xid_events(self) -> None:
        nvml = self.nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:  # XID counting is a bonus; the readings go on without it
            log.warning("gpu: XID events unavailable: %s", err)
            return
        by_handle: dict[Any, Device] = {}
        for dev in self._devices:
            try:
                if nvml.nvmlDeviceGetSupportedEventTypes(dev.handle) & XID_EVENT:
                    nvml.nvmlDeviceRegisterEvents(dev.handle, XID_EVENT, event_set)
                    by_handle[_handle_key(dev.handle)] = dev
            except nvml.NVMLError as err:
                log.warning("gpu %d: XID events unavailable: %s", dev.index, err)
        if not by_handle:
            self._quietly("nvmlEventSetFree", event_set)
            return
        with self._lock:
            for dev in by_handle.values():
                for xid in TRACKED_XIDS:
                    self._xids.setdefault((*dev.labels, str(xid)), 0)
        self._event_set = event_set
        self._xid_stop = threading.Event()
        self._xid_thread = threading.Thread(
            target=self._watch_xids, args=(event_set, by_handle, self._xid_stop), name="gpu-xid", daemon=True
        )
        self._xid_thread.start()

    def _watch_xids(self, event_set: Any, by_handle: dict[Any, Device], stop: threading.Event) -> None:
        nvml, seen = self.nvml, set()
        while not stop.is_set():
            try:
                event = nvml.nvmlEventSetWait_v2(event_set, self.xid_wait_ms)
                if event.eventType & XID_EVENT:
                    dev = by_handle.get(_handle_key(event.device))
                    labels = dev.labels if dev else ["unknown", "", ""]
                    key = (*labels, str(int(event.eventData)))
                    with self._lock:
                        self._xids[key] = self._xids.get(key, 0) + 1
            except Exception as err:
                if isinstance(err, nvml.NVMLError) and err.value == TIMEOUT:
                    continue  # no event within the wait: idle
                # Log each kind once; keep counting after a pause rather than die silently.
                if str(err) not in seen:
                    seen.add(str(err))
                    log.error("gpu: XID event thread: %s: %s (retrying every %gs)", type(err).__name__, err,
                              self.xid_retry_s)
                stop.wait(self.xid_retry_s)

    # -- reading -------------------------------------------------------------------

    def update(self) -> None:
        """Reads every device into a new snapshot. On failure drops the snapshot and raises."""
        try:
            if self._reinit or not self._initialised:
                self.start()
            pids = self._watched()
            gpus = tuple(self._read(dev, pids) for dev in self._devices)
        except BaseException:
            self._snapshot = None
            raise
        self._snapshot = Snapshot(driver_version=self._driver, gpus=gpus)

    def _watched(self) -> set[int]:
        try:
            return set(self.watched_pids())
        except Exception as err:  # no process info means no per-process series, not a failed GPU read
            self._log_once("pids", "gpu: watched pids unavailable: %s", err)
            return set()

    def _basic(self, dev: Device, call: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.nvml, call)(dev.handle, *args, **kwargs)
        except self.nvml.NVMLError as err:
            self._reinit = True
            raise GpuReadError(f"GPU {dev.index} ({dev.uuid}): {call}: {err}") from err

    def _optional(self, dev: Device, call: str, *args: Any) -> Any:
        """The reading, or None when the device does not support it or the call failed."""
        try:
            return getattr(self.nvml, call)(dev.handle, *args)
        except self.nvml.NVMLError as err:
            return self._failed(dev, call, err)

    def _optional_newest(self, dev: Device, calls: tuple[str, str], *args: Any) -> Any:
        """Like _optional with the current call; the deprecated one only where the current is absent."""
        for call in calls:
            fn = None if call in self._absent else getattr(self.nvml, call, None)
            if fn is None:  # bindings older than this call
                self._absent.add(call)
                continue
            try:
                return fn(dev.handle, *args)
            except self.nvml.NVMLError as err:
                if err.value == FUNCTION_NOT_FOUND and call != calls[-1]:  # driver older than this call
                    self._absent.add(call)
                    continue
                return self._failed(dev, call, err)
        return None

    def _failed(self, dev: Device, call: str, err: Any) -> None:
        if err.value == NOT_SUPPORTED:
            return None
        if err.value in (GPU_IS_LOST, UNINITIALIZED):
            self._reinit = True
            raise GpuReadError(f"GPU {dev.index} ({dev.uuid}): {call}: {err}") from err
        key = (*dev.labels, call)
        with self._lock:
            self._read_errors[key] = self._read_errors.get(key, 0) + 1
        self._log_once(f"{dev.index}:{call}:{err.value}", "gpu %d: %s failed: %s", dev.index, call, err)
        return None

    def _read(self, dev: Device, watched: set[int]) -> GpuReading:
        nvml = self.nvml
        # Basic: liveness (name) and memory. v2's "used" is what nvidia-smi shows; v1's adds the
        # driver-reserved part.
        self._basic(dev, "nvmlDeviceGetName")
        mem = self._basic(dev, "nvmlDeviceGetMemoryInfo", version=nvml.nvmlMemory_v2)
        util = self._optional(dev, "nvmlDeviceGetUtilizationRates")
        power = self._optional(dev, "nvmlDeviceGetPowerUsage")
        limit = self._optional(dev, "nvmlDeviceGetEnforcedPowerLimit")
        energy = self._optional(dev, "nvmlDeviceGetTotalEnergyConsumption")
        sm_clock = self._optional(dev, "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM)

        ecc: list[tuple[str, int]] = []
        mode = self._optional(dev, "nvmlDeviceGetEccMode")
        if mode is not None and mode[0] == nvml.NVML_FEATURE_ENABLED:
            for kind, error_type in (
                ("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ):
                count = self._optional(dev, "nvmlDeviceGetTotalEccErrors", error_type, nvml.NVML_VOLATILE_ECC)
                if count is not None:
                    ecc.append((kind, count))

        # NVML may report host pids (containers without the host pid namespace): then nothing
        # matches, which the matched/unmatched counts make visible.
        per_pid: dict[int, int] = {}
        processes = None
        procs = self._optional(dev, "nvmlDeviceGetComputeRunningProcesses")
        if procs is not None:
            matched = [p for p in procs if p.pid in watched]
            processes = (len(matched), len(procs) - len(matched))
            for p in matched:
                if p.usedGpuMemory is not None:  # None: not available (e.g. Windows WDDM)
                    per_pid[p.pid] = per_pid.get(p.pid, 0) + p.usedGpuMemory

        return GpuReading(
            device=dev,
            memory_used_bytes=mem.used,
            memory_total_bytes=mem.total,
            memory_reserved_bytes=mem.reserved,
            utilization_ratio=None if util is None else util.gpu / 100,
            memory_utilization_ratio=None if util is None else util.memory / 100,
            temperature_celsius=self._optional_newest(
                dev, ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"), nvml.NVML_TEMPERATURE_GPU
            ),
            power_watts=None if power is None else power / 1000,
            power_limit_watts=None if limit is None else limit / 1000,
            energy_joules=None if energy is None else energy / 1000,
            sm_clock_hertz=None if sm_clock is None else sm_clock * 1e6,
            clock_event_reasons=self._optional_newest(
                dev, ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
            ),
            ecc_errors=tuple(ecc),
            process_memory=tuple(sorted(per_pid.items())),
            processes=processes,
        )

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)

    # -- scrape --------------------------------------------------------------------

    def families(self) -> Iterable[Metric]:
        """Metric families from the current snapshot and counters. No NVML calls."""
        snap = self._snapshot
        with self._lock:
            xids = dict(self._xids)
            read_errors = dict(self._read_errors)
        if snap is not None:
            yield from _snapshot_families(snap)
            errors = CounterMetricFamily(
                "whisper_gpu_read_errors_total",
                "Optional NVML readings that failed with an error other than Not Supported (the reading "
                "was left out), by NVML call.",
                labels=["gpu", "uuid", "name", "call"],
            )
            for key, count in sorted(read_errors.items()):
                errors.add_metric(list(key), count)
            yield errors
        xid = CounterMetricFamily(
            "whisper_gpu_xid_errors_total",
            "XID critical errors reported by the driver (NVML events) since the exporter started, by XID code.",
            labels=["gpu", "uuid", "name", "xid"],
        )
        for key, count in sorted(xids.items()):
            xid.add_metric(list(key), count)
        yield xid


LABELS = ["gpu", "uuid", "name"]

# (metric, HELP, GpuReading field); a None field leaves the series out.
_GAUGES = (
    ("whisper_gpu_utilization_ratio",
     "Fraction of the last sample period (1/6 s to 1 s) in which a kernel ran on the GPU, 0..1.",
     "utilization_ratio"),
    ("whisper_gpu_memory_utilization_ratio",
     "Fraction of the last sample period in which device memory was read or written, 0..1.",
     "memory_utilization_ratio"),
    ("whisper_gpu_memory_used_bytes",
     "Device memory in use, in bytes (NVML v2 memory info, as nvidia-smi's memory.used; "
     "without the driver-reserved part).",
     "memory_used_bytes"),
    ("whisper_gpu_memory_total_bytes", "Total device memory, in bytes.", "memory_total_bytes"),
    ("whisper_gpu_memory_reserved_bytes", "Device memory reserved by the driver and firmware, in bytes.",
     "memory_reserved_bytes"),
    ("whisper_gpu_temperature_celsius", "GPU core temperature, in degrees Celsius.", "temperature_celsius"),
    ("whisper_gpu_power_watts", "Power draw of the board, in watts.", "power_watts"),
    ("whisper_gpu_power_limit_watts", "Enforced power limit of the board, in watts.", "power_limit_watts"),
    ("whisper_gpu_sm_clock_hertz", "Current SM (streaming multiprocessor) clock, in hertz.", "sm_clock_hertz"),
)


def _snapshot_families(snap: Snapshot) -> Iterable[Metric]:
    info = GaugeMetricFamily(
        "whisper_gpu_info", "Always 1; the labels identify the GPU and the driver.",
        labels=LABELS + ["pci_bus_id", "driver_version"],
    )
    for gpu in snap.gpus:
        info.add_metric(gpu.device.labels + [gpu.device.pci_bus_id, snap.driver_version], 1)
    yield info

    for metric, help_text, field in _GAUGES:
        family = GaugeMetricFamily(metric, help_text, labels=LABELS)
        for gpu in snap.gpus:
            value = getattr(gpu, field)
            if value is not None:
                family.add_metric(gpu.device.labels, value)
        yield family

    energy = CounterMetricFamily(
        "whisper_gpu_energy_joules_total", "Energy used by the GPU since the driver was loaded, in joules.",
        labels=LABELS,
    )
    reasons = GaugeMetricFamily(
        "whisper_gpu_clock_event_active",
        "1 while the reason is holding the clocks down (NVML clocks event reasons), else 0.",
        labels=LABELS + ["reason"],
    )
    ecc = CounterMetricFamily(
        "whisper_gpu_ecc_errors_total",
        "Device memory ECC errors since the driver was loaded (volatile counts), by type; only with ECC on.",
        labels=LABELS + ["type"],
    )
    procs = GaugeMetricFamily(
        "whisper_gpu_processes",
        "Compute processes on the GPU that are (matched=true) or are not (false) the watched Whisper server's.",
        labels=LABELS + ["matched"],
    )
    proc_mem = GaugeMetricFamily(
        "whisper_gpu_process_memory_used_bytes",
        "Device memory used by each of the watched Whisper server's processes, in bytes.",
        labels=LABELS + ["pid"],
    )
    for gpu in snap.gpus:
        labels = gpu.device.labels
        if gpu.energy_joules is not None:
            energy.add_metric(labels, gpu.energy_joules)
        if gpu.clock_event_reasons is not None:
            for reason, bit in CLOCK_EVENT_REASONS:
                reasons.add_metric(labels + [reason], 1 if gpu.clock_event_reasons & bit else 0)
        for kind, count in gpu.ecc_errors:
            ecc.add_metric(labels + [kind], count)
        if gpu.processes is not None:
            procs.add_metric(labels + ["true"], gpu.processes[0])
            procs.add_metric(labels + ["false"], gpu.processes[1])
        for pid, used in gpu.process_memory:
            proc_mem.add_metric(labels + [str(pid)], used)
    yield from (energy, reasons, ecc, procs, proc_mem)


def make(section: GpuConfig, shared: Shared) -> GpuCollector:
    if not shared.config.collectors.process.enabled:
        return GpuCollector(section)
    # The pids the process collector found: per-process GPU memory is the server's, not anyone's.
    return GpuCollector(section, watched_pids=shared.process_watch.pids)


PLUGIN = Plugin("gpu", GpuConfig, make, "NVIDIA GPUs through NVML: utilisation, memory, power, clocks, ECC, XID")
