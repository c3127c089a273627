"""The Whisper server's processes, read through psutil: up, CPU, memory, threads, fds.

The processes are found by `pid`, else by `pid_file` (re-read every update, so a
restarted server is followed), else by the `match` regular expression searched in
each process's name and command line. The whole set is reported as one server:
no per-pid labels, so a restart does not create new series.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.config import Duration, KeyPath, valid_regex
from whisper_exporter.runtime.shared import ProcessWatch, Shared

log = logging.getLogger(__name__)


@dataclass
class ProcessConfig:
    enabled: bool = True
    interval: Duration = Duration(5)
    timeout: Duration = Duration(3)
    match: Optional[str] = "faster-whisper|whisper|uvicorn"
    pid: Optional[int] = None
    pid_file: Optional[str] = None
    children: bool = True

    def check(self, at: KeyPath) -> None:
        valid_regex(at, "match", self.match)

# Programs that are an exporter, ours or another instance: the console script or `-m` module.
EXPORTER_NAMES = ("whisper-exporter", "whisper_exporter")
# A pid file is a number and a newline; refuse to read a huge file by mistake.
_PID_FILE_MAX = 4096
# What a process may do between listing and reading: skip it, never crash.
_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


@dataclass(frozen=True)
class _Found:
    procs: dict[int, psutil.Process]  # the watched set, by pid
    roots: frozenset[int]  # the pid, or the matches whose parent is not a match
    reason: str  # how they were found, or why nothing was


def _read_pid_file(path: str) -> tuple[Optional[int], str]:
    """The pid in the file, or None and why not."""
    try:
        with open(path, "rb") as f:
            text = f.read(_PID_FILE_MAX).decode("ascii", "replace")
    except FileNotFoundError:
        return None, f"pid file {path}: not found"
    except OSError as err:
        return None, f"pid file {path}: {err.strerror or err}"
    first = text.strip().split("\n", 1)[0].strip()
    if not first.isdigit() or int(first) <= 0:
        shown = first if len(first) <= 20 else first[:17] + "..."
        return None, f"pid file {path}: no pid in it ({shown!r})"
    return int(first), f"pid file {path}"


def _parent_map() -> dict[int, int]:
    """pid -> parent pid for every process.

    On Linux /proc/<pid>/stat is read directly: about half of what psutil's
    ppid() costs (5 vs 10 us a process here), and this runs for every process
    on every update; it brings update() down to the cost of a bare
    process_iter(['name', 'cmdline']) walk (benchmarks/bench_process.py).
    """
    if not psutil.LINUX:
        return {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"]) if p.info["ppid"] is not None}
    parents = {}
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone since listed
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split(None, 2)
        if len(fields) >= 2:
            parents[pid] = int(fields[1])
    return parents


def _name_cmdline(proc: psutil.Process) -> Optional[tuple[str, list[str]]]:
    """What the pattern is searched in; None when the process is gone or a zombie."""
    try:
        name = proc.name()
        try:
            return name, proc.cmdline()
        except psutil.AccessDenied:  # e.g. hidepid: the name alone can still match
            return name, []
    except _GONE:
        return None


def _is_exporter(cmdline: list[str]) -> bool:
    """Whether the command runs an exporter: `whisper-exporter ...`, `python .../whisper-exporter ...`
    or `python -m whisper_exporter ...`. Only the program is looked at, not every argument, so a
    Whisper server started from a checkout or venv whose path says whisper-exporter is still watched."""
    if any(os.path.basename(arg) in EXPORTER_NAMES for arg in cmdline[:2]):
        return True
    return any(arg == "-m" and nxt.split(".")[0] == "whisper_exporter" for arg, nxt in zip(cmdline, cmdline[1:]))


def _descendants(roots: Iterable[int], children: dict[int, list[int]]) -> set[int]:
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _exporter_family(me: int, parent: dict[int, int]) -> set[int]:
    """The exporter and its ancestors (a wrapper shell, `python -m`): never watched.

    Its descendants are not excluded: the exporter starts none in production, and a
    supervisor or test harness that starts the Whisper server beside it must see it.
    """
    family = {me}
    pid = parent.get(me)
    while pid and pid not in family:
        family.add(pid)
        pid = parent.get(pid)
    return family


def _scan(section: ProcessConfig, regex: Optional[re.Pattern]) -> _Found:
    """Which processes to watch now. Raises only when the process table cannot be read."""
    me = os.getpid()
    by_pid = section.pid is not None or section.pid_file is not None
    if by_pid:
        if section.pid is not None:
            pid, reason = section.pid, f"pid {section.pid}"
        else:
            pid, reason = _read_pid_file(section.pid_file)
        if pid is None:
            return _Found({}, frozenset(), reason)
        if pid <= 0:  # the config accepts any integer; psutil raises on negatives
            return _Found({}, frozenset(), f"{reason}: not a valid pid")
        try:
            root = psutil.Process(pid)
        except _GONE:
            root = None
        # A zombie root is dead even while its other threads still hold its
        # children (they have its pid as parent until the last thread exits).
        if root is None or (root_called := _name_cmdline(root)) is None:
            return _Found({}, frozenset(), f"{reason}: not running")
    elif regex is None:
        return _Found({}, frozenset(), "nothing to look for: set pid, pid_file or match")

    parent = _parent_map()
    children: dict[int, list[int]] = {}
    for child, ppid in parent.items():
        children.setdefault(ppid, []).append(child)
    excluded = _exporter_family(me, parent)

    # What each process is called, for the pattern and the exporter check.
    table: dict[int, psutil.Process] = {}
    seen: dict[int, tuple[str, list[str]]] = {}
    if by_pid:
        if pid in excluded:
            return _Found({}, frozenset(), f"{reason}: that is the exporter or its parent or child")
        table[pid], seen[pid] = root, root_called
        matched = {pid}
    else:
        # Plain calls, not process_iter(attrs): attrs land in psutil's shared
        # Process objects, which another thread's scan may overwrite.
        matched = set()
        for proc in psutil.process_iter():
            if proc.pid in excluded or (called := _name_cmdline(proc)) is None:
                continue
            table[proc.pid], seen[proc.pid] = proc, called
            if regex.search(called[0]) or regex.search(" ".join(called[1])):
                matched.add(proc.pid)
        if not matched:
            return _Found({}, frozenset(), f"no process matches {regex.pattern!r}")

    roots = {p for p in matched if parent.get(p) not in matched}
    wanted = matched | (_descendants(roots, children) if section.children else set())
    procs, exporters = {}, 0
    for p in sorted(wanted - excluded):
        proc = table.get(p)
        if proc is None:
            try:
                proc = psutil.Process(p)
            except _GONE:
                continue
        called = seen.get(p) or _name_cmdline(proc)
        if called is None:  # gone, or a zombie: dead either way
            continue
        if _is_exporter(called[1]):
            exporters += 1
            continue
        procs[p] = proc
    roots &= procs.keys()
    if not procs:
        if by_pid:
            why = "that is the exporter itself" if exporters else "not running"
            return _Found({}, frozenset(), f"{reason}: {why}")
        but = " but the exporter itself" if exporters else ""
        return _Found({}, frozenset(), f"no process matches {regex.pattern!r}{but}")
    return _Found(procs, frozenset(roots), reason if by_pid else f"match {regex.pattern!r}")


@dataclass(frozen=True)
class _Snapshot:
    count: int
    cpu_user: float
    cpu_system: float
    rss: int
    threads: int
    open_fds: Optional[int]  # None when any process's fds could not be counted
    start_time: Optional[float]  # None when nothing is watched


@dataclass(frozen=True)
class _Reading:
    create_time: float
    user: float
    system: float
    rss: int
    threads: int
    fds: Optional[int]
    name: str


def _read(proc: psutil.Process) -> Optional[_Reading]:
    """One process's figures, or None when it is gone (zombies count as gone)."""
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:  # died since the scan
                return None
            cpu = proc.cpu_times()
            try:
                fds: Optional[int] = proc.num_fds()
            except psutil.AccessDenied:  # another user's process, without CAP_SYS_PTRACE
                fds = None
            return _Reading(proc.create_time(), cpu.user, cpu.system,
                            proc.memory_info().rss, proc.num_threads(), fds, proc.name())
    except _GONE:
        return None


class ProcessCollector:
    name = "process"

    def __init__(self, section: ProcessConfig, watch: Optional[ProcessWatch] = None):
        self.section = section
        self.watch = watch  # where the pids found are published (the GPU collector reads them)
        self._regex = re.compile(section.match) if section.match else None
        self._snapshot: Optional[_Snapshot] = None
        self.status = "not scanned yet"
        self.pids: frozenset[int] = frozenset()
        # CPU seconds as a running total of per-process increases, so the counter
        # stays monotonic when a child exits or the server restarts with a new pid.
        # Only the processes read at the last update are remembered (bounded).
        self._cpu_user = 0.0
        self._cpu_system = 0.0
        self._cpu_seen: dict[int, tuple[float, float, float]] = {}  # pid -> (create_time, user, system)
        self._lock = threading.Lock()  # update() is not meant to overlap itself; make sure

    def start(self) -> None:
        pass

    def update(self) -> None:
        with self._lock:
            try:
                found = _scan(self.section, self._regex)
                readings = {pid: r for pid, r in ((pid, _read(p)) for pid, p in found.procs.items()) if r}
            except Exception as err:
                # A table we cannot read is our fault, not the server's: serve no
                # readings (the CPU total, a counter, is kept) and let the scheduler see it.
                self._snapshot = None
                self.status = f"error: {err}"
                raise
            self._account_cpu(readings)
            self._snapshot = self._summarise(found, readings)
            self.pids = frozenset(readings)
            if self.watch is not None:
                self.watch.publish(self.pids)
            self.status = self._describe(found, readings)

    def _account_cpu(self, readings: dict[int, _Reading]) -> None:
        seen = {}
        for pid, r in readings.items():
            prev = self._cpu_seen.get(pid)
            if prev is not None and prev[0] == r.create_time:
                self._cpu_user += max(0.0, r.user - prev[1])
                self._cpu_system += max(0.0, r.system - prev[2])
            else:  # new to us (or a reused pid): all its CPU time is new to the counter
                self._cpu_user += r.user
                self._cpu_system += r.system
            seen[pid] = (r.create_time, r.user, r.system)
        self._cpu_seen = seen

    def _summarise(self, found: _Found, readings: dict[int, _Reading]) -> _Snapshot:
        values = readings.values()
        fds = [r.fds for r in values]
        roots = [readings[p].create_time for p in found.roots if p in readings]
        # A root that vanished mid-read leaves its children: the oldest of them stands in.
        starts = roots or [r.create_time for r in values]
        return _Snapshot(
            count=len(readings),
            cpu_user=self._cpu_user,
            cpu_system=self._cpu_system,
            rss=sum(r.rss for r in values),
            threads=sum(r.threads for r in values),
            open_fds=sum(fds) if fds and None not in fds else None,
            start_time=min(starts) if starts else None,
        )

    @staticmethod
    def _describe(found: _Found, readings: dict[int, _Reading]) -> str:
        if not readings:
            return found.reason if not found.procs else f"{found.reason}: gone while reading"
        first = min(found.roots & readings.keys(), default=min(readings))
        n = len(readings)
        more = f" and {n - 1} more" if n > 1 else ""
        return (f"watching {n} process{'es' if n > 1 else ''} "
                f"(pid {first} {readings[first].name}{more}), found by {found.reason}")

    def families(self) -> Iterable[Metric]:
        snap = self._snapshot
        if snap is None:
            return []
        up = GaugeMetricFamily("whisper_process_up",
                               "1 when at least one Whisper server process was found at the last update.",
                               value=1 if snap.count else 0)
        count = GaugeMetricFamily("whisper_process_count",
                                  "Number of Whisper server processes watched (roots and children).",
                                  value=snap.count)
        cpu = CounterMetricFamily("whisper_process_cpu_seconds_total",
                                  "CPU time used by the Whisper server's processes, summed over the set "
                                  "and kept monotonic across restarts.", labels=["mode"])
        cpu.add_metric(["user"], snap.cpu_user)
        cpu.add_metric(["system"], snap.cpu_system)
        out: list[Metric] = [up, count, cpu]
        if not snap.count:
            return out
        out.append(GaugeMetricFamily("whisper_process_resident_memory_bytes",
                                     "Resident memory of the Whisper server's processes, summed.",
                                     value=snap.rss))
        out.append(GaugeMetricFamily("whisper_process_threads",
                                     "Threads of the Whisper server's processes, summed.", value=snap.threads))
        if snap.open_fds is not None:
            out.append(GaugeMetricFamily("whisper_process_open_fds",
                                         "Open file descriptors of the Whisper server's processes, summed.",
                                         value=snap.open_fds))
        out.append(GaugeMetricFamily("whisper_process_start_time_seconds",
                                     "Start time of the oldest Whisper server root process, unix seconds.",
                                     value=snap.start_time))
        return out

    def stop(self) -> None:
        pass


def make(section: ProcessConfig, shared: Shared) -> ProcessCollector:
    return ProcessCollector(section, watch=shared.process_watch)


PLUGIN = Plugin("process", ProcessConfig, make, "the Whisper server's processes: up, CPU, memory, threads, fds")
