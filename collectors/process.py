"""The Whisper server's processes, read through psutil: up, CPU, memory, threads, fds.

The server is found by what it is. Explicit settings win: `pid`, else `pid_file`
(re-read every update, so a restarted server is followed), else the `match`
regular expression searched in each process's name and command line. With none
of them set, the server is the process listening on `port` (default: the port of
`service.url`, when its host is this machine). Only when that listener cannot be
seen (another user's process without CAP_SYS_PTRACE, another network namespace,
a remote URL) is FALLBACK_PATTERN used, and the status says so. The whole set
is reported as one server: no per-pid labels, so a restart does not create new series.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from whisper_exporter.config import Duration, KeyPath, valid_regex, warning
from whisper_exporter.runtime.collector import Plugin
from whisper_exporter.runtime.shared import ProcessWatch, Shared

log = logging.getLogger(__name__)


@dataclass
class ProcessConfig:
    enabled: bool = True
    interval: Duration = Duration(5)
    timeout: Duration = Duration(3)
    match: Optional[str] = None  # an explicit pattern; see FALLBACK_PATTERN for when none is set
    pid: Optional[int] = None
    pid_file: Optional[str] = None
    port: Optional[int] = None  # the server's listening port (default: service.url's, when it is on this host)
    children: bool = True
    # Also export the pre-0.2 name whisper_process_count (which `promtool check metrics` rejects:
    # only histograms and summaries may end in _count) for dashboards not yet moved to
    # whisper_process_processes. Deprecated: removed in the release after next.
    deprecated_count_metric: bool = False

    def warnings(self, at: KeyPath, config: Any) -> list[str]:
        """Settings that cannot find the server."""
        if self.pid is None and self.pid_file is not None and not os.path.exists(os.path.expanduser(self.pid_file)):
            return [warning(at, "pid_file", f"{self.pid_file}: no such file (yet): whisper_process_up is 0 "
                                            "until the server writes it")]
        if self.pid is None and self.pid_file is None and self.match is None and self.port is None:
            port, why = server_port(config.service.url)
            if port is None:
                return [warning(at, "match", f"not set, and {why}: the broad fallback pattern "
                                             f"{FALLBACK_PATTERN!r} is used; set pid_file, match or port")]
        return []

    def check(self, at: KeyPath) -> None:
        valid_regex(at, "match", self.match)
        if self.port is not None and not 0 < self.port < 65536:
            raise at.error("port", "a TCP port from 1 to 65535", self.port)


# Used only when no pid, pid_file or match is set and the listener on the server's port cannot be
# seen. It is broad on purpose (any Whisper server): it can match another job's server or a
# `tail -F whisper.log`, which is why the port comes first and several matches are warned about.
FALLBACK_PATTERN = "faster-whisper|whisper|uvicorn"
# The status string names at most this many root processes (the status page shows it whole).
_STATUS_ROOTS = 4

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
    root_of: dict[int, int] = dataclasses.field(default_factory=dict)  # watched pid -> its root
    by_pattern: bool = False  # several roots found by a pattern are likely unrelated programs


def server_port(url: str) -> tuple[Optional[int], str]:
    """The port of `url` when its host is this machine, else None and why not."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None, f"service.url {url!r} has no usable port"
    host = (parts.hostname or "").lower()
    if host in ("localhost", socket.gethostname().lower()) or host.endswith(".localhost"):
        return port, ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None, f"service.url's host {host} is not an address of this machine"
    if ip.is_loopback or ip.is_unspecified:
        return port, ""
    try:
        mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    except OSError:
        mine = set()
    if str(ip) in mine:
        return port, ""
    return None, f"service.url's host {host} is not an address of this machine"


def _listens(conns: Iterable, port: int) -> list:
    return [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]


_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_TCP_LISTEN = b"0A"  # the kernel's TCP_LISTEN, as /proc/net/tcp writes the state


def _anyone_listens(port: int) -> Optional[bool]:
    """Whether a TCP socket in this network namespace listens on `port`, read from the kernel's
    socket tables line by line; None where there are none to read (not Linux)."""
    suffix = b":%04X" % port
    read = False
    for path in _TCP_TABLES:
        try:
            with open(path, "rb") as table:
                read = True
                next(table, None)  # the header
                for line in table:
                    fields = line.split(None, 4)  # sl, local address, remote address, state
                    if len(fields) > 3 and fields[3] == _TCP_LISTEN and fields[1].endswith(suffix):
                        return True
        except OSError:
            continue
    return False if read else None


def _listeners(port: int, cached: frozenset[int]) -> tuple[set[int], bool]:
    """Pids listening on TCP `port`, and whether a listener exists that the exporter cannot see.

    The pids found last time are asked first (one process's sockets: cheap); the full table
    (every process's fds) is walked only when none of them listens any more and the kernel's
    socket table says someone does: while the server is down that walk would run every
    interval (~9 MB and 0.3 s on a host with 20,000 sockets).
    """
    still = set()
    for pid in cached:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except _GONE:
            continue
        if _listens(conns, port):
            still.add(pid)
    if still:
        return still, False
    if _anyone_listens(port) is False:
        return set(), False
    try:
        conns = psutil.net_connections("tcp")
    except psutil.AccessDenied:  # e.g. macOS without root: nothing can be said about owners
        return set(), True
    found = _listens(conns, port)
    # pid None: the socket is in our network namespace but its process's fds are not readable
    # (another user's process, without CAP_SYS_PTRACE).
    return {c.pid for c in found if c.pid is not None}, any(c.pid is None for c in found)


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


def _called(proc: psutil.Process) -> str:
    """'pid 123 (tail -F whisper.log)', for warnings; each argument and the whole cut short."""
    got = _name_cmdline(proc)
    if not got:
        return f"pid {proc.pid} (gone)"
    args = [os.path.basename(got[1][0])] + got[1][1:] if got[1] else [got[0]]
    text = " ".join(" ".join(a if len(a) <= 24 else a[:21] + "..." for a in args).split())
    return f"pid {proc.pid} ({text if len(text) <= 100 else text[:97] + '...'})"


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


def _scan(section: ProcessConfig, regex: Optional[re.Pattern], listening: Optional[set[int]] = None,
          why: str = "") -> _Found:
    """Which processes to watch now. Raises only when the process table cannot be read.

    `listening`: the pids found on the server's port (used when no pid or pid_file is set and
    `regex` is None); `why`: how the processes were looked for, when not by pid or `regex`.
    """
    me = os.getpid()
    by_pid = section.pid is not None or section.pid_file is not None
    if by_pid:
        if section.pid is not None:
            pid, reason = section.pid, f"pid {section.pid}"
        else:
            read, reason = _read_pid_file(section.pid_file or "")
            if read is None:
                return _Found({}, frozenset(), reason)
            pid = read
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
    elif regex is None and not listening:
        return _Found({}, frozenset(), why or "nothing to look for: set pid, pid_file or match")
    else:
        reason = why if regex is None else f"match {regex.pattern!r}" + (f" ({why})" if why else "")

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
        assert root is not None and root_called is not None  # checked above
        table[pid], seen[pid] = root, root_called
        matched = {pid}
    elif regex is None:  # the listeners on the port
        matched = set(listening or ()) - excluded
        if not matched:
            return _Found({}, frozenset(), f"{reason}: only the exporter")
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
            return _Found({}, frozenset(), f"no process matches {regex.pattern!r}" + (f" ({why})" if why else ""))

    roots = {p for p in matched if parent.get(p) not in matched}
    root_of: dict[int, int] = {}
    for r in sorted(roots):
        root_of[r] = r
        for p in _descendants([r], children):
            if section.children or p in matched:
                root_of.setdefault(p, r)
    wanted = set(root_of) | matched
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
            why_not = "that is the exporter itself" if exporters else "not running"
            return _Found({}, frozenset(), f"{reason}: {why_not}")
        if regex is None:
            return _Found({}, frozenset(), f"{reason}: gone while reading")
        but = " but the exporter itself" if exporters else ""
        return _Found({}, frozenset(), f"no process matches {regex.pattern!r}{but}" + (f" ({why})" if why else ""))
    return _Found(procs, frozenset(roots), reason, {p: r for p, r in root_of.items() if p in procs},
                  by_pattern=not by_pid and regex is not None)


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

    def __init__(self, section: ProcessConfig, watch: Optional[ProcessWatch] = None,
                 port: Optional[int] = None, no_port: str = ""):
        """`port`: the server's listening port (section.port wins); `no_port`: why there is none,
        which makes FALLBACK_PATTERN the way to look when nothing explicit is set."""
        self.section = section
        self.watch = watch  # where the pids found are published (the GPU collector reads them)
        self._regex = re.compile(section.match) if section.match else None
        self.port = section.port or port
        self._no_port = "" if self.port else no_port
        self._fallback = re.compile(FALLBACK_PATTERN)
        self._listening: frozenset[int] = frozenset()  # pids found on the port last time
        self._warned: Optional[frozenset[int]] = None  # the unrelated roots last warned about
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
                found = self._find()
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
            self._warn_unrelated(found, readings)

    def _find(self) -> _Found:
        """Explicit settings first; else the listener on the port; else the fallback pattern."""
        s = self.section
        if s.pid is not None or s.pid_file is not None or self._regex is not None:
            return _scan(s, self._regex)
        if self.port:
            pids, hidden = _listeners(self.port, self._listening)
            self._listening = frozenset(pids)
            if pids:
                return _scan(s, None, pids, f"listening on port {self.port}")
            if not hidden:
                return _Found({}, frozenset(), f"nothing listens on port {self.port}")
            why = (f"fallback: the process listening on port {self.port} is not visible to the exporter; "
                   "run it as the server's user, or set pid_file or match")
        elif self._no_port:
            why = f"fallback: {self._no_port}; set pid_file or match"
        else:
            return _scan(s, None)
        return _scan(s, self._fallback, why=why)

    def _warn_unrelated(self, found: _Found, readings: dict[int, _Reading]) -> None:
        """Several roots found by a pattern are likely different programs: say which, once per set."""
        roots = frozenset(found.roots & readings.keys()) if found.by_pattern else frozenset()
        if len(roots) < 2:
            self._warned = None
            return
        if roots != self._warned:
            self._warned = roots
            log.warning("process: %d unrelated processes match, all watched as one server: %s. "
                        "Set pid_file, or a match (or port) that finds only the server.",
                        len(roots), ", ".join(_called(found.procs[p]) for p in sorted(roots)))

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
            open_fds=sum(f for f in fds if f is not None) if fds and None not in fds else None,
            start_time=min(starts) if starts else None,
        )

    @staticmethod
    def _describe(found: _Found, readings: dict[int, _Reading]) -> str:
        """Every watched process by its root (the status page's detail column); bounded."""
        if not readings:
            return found.reason if not found.procs else f"{found.reason}: gone while reading"
        kids: dict[int, int] = {}
        for pid in readings:
            root = found.root_of.get(pid, pid)
            root = root if root in readings else pid  # a root that vanished mid-read: its child stands in
            kids[root] = kids.get(root, -1) + 1
        roots = sorted(kids)
        shown = []
        for root in roots[:_STATUS_ROOTS]:
            n = kids[root]
            shown.append(f"pid {root} {readings[root].name}" + (f" +{n} child{'ren' if n > 1 else ''}" if n else ""))
        if len(roots) > _STATUS_ROOTS:
            shown.append(f"and {len(roots) - _STATUS_ROOTS} more")
        n = len(readings)
        text = f"watching {n} process{'es' if n > 1 else ''} ({'; '.join(shown)}), found by {found.reason}"
        if found.by_pattern and len(roots) > 1:
            text += f"; WARNING: {len(roots)} unrelated processes match"
        return text

    def families(self) -> Iterable[Metric]:
        snap = self._snapshot
        if snap is None:
            return []
        up = GaugeMetricFamily("whisper_process_up",
                               "1 when at least one Whisper server process was found at the last update.",
                               value=1 if snap.count else 0)
        count = GaugeMetricFamily("whisper_process_processes",
                                  "Number of Whisper server processes watched (roots and children).",
                                  value=snap.count)
        cpu = CounterMetricFamily("whisper_process_cpu_seconds_total",
                                  "CPU time used by the Whisper server's processes, summed over the set "
                                  "and kept monotonic across restarts.", labels=["mode"])
        cpu.add_metric(["user"], snap.cpu_user)
        cpu.add_metric(["system"], snap.cpu_system)
        out: list[Metric] = [up, count, cpu]
        if self.section.deprecated_count_metric:
            out.append(GaugeMetricFamily("whisper_process_count",
                                         "Deprecated alias of whisper_process_processes (fails promtool's lint; "
                                         "removed in the release after next).", value=snap.count))
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
    port, why = server_port(shared.config.service.url)
    return ProcessCollector(section, watch=shared.process_watch, port=port, no_port=why)


PLUGIN = Plugin("process", ProcessConfig, make, "the Whisper server's processes: up, CPU, memory, threads, fds")
