"""A fake NVML module whose answers follow tests/fixtures/nvml_h100.json (readings from a real H100).

Pass a FakeNVML instance where the GPU collector takes its `nvml` module. Each reading in
the fixture is {"ok": value} or {"error": message, "code": n}; errors are raised as the real
`pynvml.NVMLError(code)`, so the real subclasses (NVMLError_NotSupported, ...) are what the
collector sees. Constants and exception classes are the real pynvml ones; NVML functions the
fake does not implement are absent (AttributeError), never silently the real, library-calling ones.

Knobs for the failure cases: `state` ("idle" / "under_load"), `devices` (copies of the
fixture's GPU with their own uuid and bus id), `library_missing`, `lost` (indices whose calls
answer GPU_IS_LOST), `hang(call)` (that call blocks on a threading.Event), `override()`
(replace one reading), `errors` (a function answers an error code), `make_absent()` (a function
does not exist), `inject_xid()` and
`inject_event_error()` (delivered to nvmlEventSetWait_v2).
"""
from __future__ import annotations

import ast
import collections
import functools
import inspect
import json
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pynvml

FIXTURE_PATH = Path(__file__).parent / "fixtures" / "nvml_h100.json"


def load_fixture() -> dict:
    return json.loads(FIXTURE_PATH.read_text())


class _Absent:
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        raise AttributeError("absent")  # then __getattr__ runs, which refuses NVML functions


@functools.lru_cache(maxsize=None)
def _process(entry: str) -> dict:
    return ast.literal_eval(entry)


class FakeHandle:
    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"FakeHandle({self.index})"


class FakeNVML:
    def __init__(self, state: str = "under_load", devices: Optional[int] = None):
        self.fixture = load_fixture()
        self.state = state
        self.device_count = self.fixture["device_count"] if devices is None else devices
        self.library_missing = False
        self.lost: set[int] = set()
        self.errors: dict[str, int] = {}  # NVML function name -> error code it answers, whatever the reading
        self.calls: collections.Counter = collections.Counter()
        self.init_count = 0  # nvmlInit minus nvmlShutdown, like NVML's own refcount
        self._overrides: dict[tuple[Optional[int], str], dict] = {}
        self._hangs: dict[str, threading.Event] = {}
        self._handles = [FakeHandle(i) for i in range(self.device_count)]
        self._events: queue.Queue = queue.Queue()
        self.event_sets: list[dict] = []  # {"devices": set of indices, "freed": bool}

    # -- knobs ---------------------------------------------------------------------

    def override(self, reading: str, ok: Any = None, error: Optional[int] = None,
                 device: Optional[int] = None) -> None:
        """Replace one fixture reading, on one device or (device=None) on all."""
        entry = {"error": "injected", "code": error} if error is not None else {"ok": ok}
        self._overrides[(device, reading)] = entry

    def make_absent(self, call: str) -> None:
        """Make the NVML function `call` missing, as in older bindings (AttributeError)."""
        self.__class__ = type(type(self).__name__, (type(self),), {call: _Absent()})

    def hang(self, call: str) -> threading.Event:
        """Make `call` block until the returned event is set."""
        event = self._hangs[call] = threading.Event()
        return event

    def inject_xid(self, device: int, xid: int) -> None:
        self._events.put(("xid", device, xid))

    def inject_event_error(self, code: int) -> None:
        self._events.put(("error", code))

    # -- plumbing ------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Constants and exception classes come from the real bindings; functions do not.
        value = getattr(pynvml, name)
        if inspect.isfunction(value):
            raise AttributeError(f"fake NVML does not implement {name}")
        return value

    def _enter(self, call: str, handle: Optional[FakeHandle] = None) -> None:
        self.calls[call] += 1
        event = self._hangs.get(call)
        if event is not None:
            event.wait()
        if self.init_count <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if call in self.errors:
            raise pynvml.NVMLError(self.errors[call])
        if handle is not None and handle.index in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def _reading(self, call: str, handle: FakeHandle, key: str) -> Any:
        self._enter(call, handle)
        entry = (self._overrides.get((handle.index, key)) or self._overrides.get((None, key))
                 or self.fixture[self.state][key])
        if "error" in entry:
            raise pynvml.NVMLError(entry["code"])
        value = entry["ok"]
        if handle.index and key == "uuid":  # other devices: the fixture's GPU with its own identity
            value = value[:-2] + f"{handle.index:02x}"
        if handle.index and key == "pci_bus_id":
            value = value[:9] + f"{handle.index:02x}" + value[11:]
        return value

    # -- NVML functions (same names and parameters as pynvml) ----------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.library_missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if "nvmlInit" in self.errors:  # a driver that is there but failing (e.g. DRIVER_NOT_LOADED)
            raise pynvml.NVMLError(self.errors["nvmlInit"])
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.fixture["driver"]

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.device_count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handles[index]

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        return handle.index

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._reading("nvmlDeviceGetName", handle, "name")

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._reading("nvmlDeviceGetUUID", handle, "uuid")

    def nvmlDeviceGetSerial(self, handle: FakeHandle) -> str:
        return self._reading("nvmlDeviceGetSerial", handle, "serial")

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        return SimpleNamespace(busId=self._reading("nvmlDeviceGetPciInfo", handle, "pci_bus_id"))

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: Any = None) -> SimpleNamespace:
        if version and version != pynvml.nvmlMemory_v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        key = "memory_v2" if version else "memory_v1"
        return SimpleNamespace(**self._reading("nvmlDeviceGetMemoryInfo", handle, key))

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        return SimpleNamespace(**self._reading("nvmlDeviceGetUtilizationRates", handle, "utilization"))

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int, version: Any = None) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU, "the fixture holds the GPU sensor only"
        return self._reading("nvmlDeviceGetTemperatureV", handle, "temperature_gpu")

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU, "the fixture holds the GPU sensor only"
        return self._reading("nvmlDeviceGetTemperature", handle, "temperature_gpu")

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetPowerUsage", handle, "power_usage_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetEnforcedPowerLimit", handle, "power_limit_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetTotalEnergyConsumption", handle, "total_energy_mj")

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        keys = {pynvml.NVML_CLOCK_SM: "clock_sm", pynvml.NVML_CLOCK_MEM: "clock_mem"}
        if type not in keys:
            raise KeyError(f"the fixture has no clock of type {type}")
        return self._reading("nvmlDeviceGetClockInfo", handle, keys[type])

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, type: int) -> int:
        if type != pynvml.NVML_CLOCK_SM:
            raise KeyError(f"the fixture has no max clock of type {type}")
        return self._reading("nvmlDeviceGetMaxClockInfo", handle, "max_clock_sm")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetCurrentClocksEventReasons", handle, "clocks_event_reasons")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetCurrentClocksThrottleReasons", handle, "clocks_event_reasons")

    def nvmlDeviceGetFanSpeed(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetFanSpeed", handle, "fan_speed")

    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetPerformanceState", handle, "pstate")

    def nvmlDeviceGetEccMode(self, handle: FakeHandle) -> list:
        return self._reading("nvmlDeviceGetEccMode", handle, "ecc_mode")

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        if counterType != pynvml.NVML_VOLATILE_ECC:
            raise KeyError("the fixture holds volatile ECC counts only")
        key = {pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: "ecc_corrected_volatile",
               pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: "ecc_uncorrected_volatile"}[errorType]
        return self._reading("nvmlDeviceGetTotalEccErrors", handle, key)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list:
        entries = self._reading("nvmlDeviceGetComputeRunningProcesses", handle, "compute_procs")
        # The fixture stores each process as the repr of a dict (pynvml's friendly object).
        return [SimpleNamespace(**(_process(e) if isinstance(e, str) else e)) for e in entries]

    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timeStamp: int) -> list:
        entries = self._reading("nvmlDeviceGetProcessUtilization", handle, "process_utilization")
        return [SimpleNamespace(**e) for e in entries]

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        return self._reading("nvmlDeviceGetSupportedEventTypes", handle, "xid_event_supported")

    # Events: one queue of injected events, delivered to whichever live set the device is in.

    def nvmlEventSetCreate(self) -> dict:
        self._enter("nvmlEventSetCreate")
        event_set = {"devices": set(), "types": 0, "freed": False}
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: dict) -> None:
        self._enter("nvmlDeviceRegisterEvents", handle)
        supported = self._reading("nvmlDeviceGetSupportedEventTypes", handle, "xid_event_supported")
        if eventTypes & ~supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        eventSet["devices"].add(handle.index)
        eventSet["types"] |= eventTypes

    def nvmlEventSetWait_v2(self, eventSet: dict, timeoutms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2")
        if eventSet["freed"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        try:
            item = self._events.get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        if item[0] == "error":
            raise pynvml.NVMLError(item[1])
        _, device, xid = item
        if device not in eventSet["devices"] or not eventSet["types"] & pynvml.nvmlEventTypeXidCriticalError:
            raise AssertionError(f"XID injected for GPU {device}, which is not registered for XID events")
        return SimpleNamespace(device=self._handles[device], eventType=pynvml.nvmlEventTypeXidCriticalError,
                               eventData=xid, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)

    def nvmlEventSetFree(self, eventSet: dict) -> None:
        self._enter("nvmlEventSetFree")
        eventSet["freed"] = True
