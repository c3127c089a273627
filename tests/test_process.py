"""The process collector against real processes: spawned, killed, restarted."""
from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import psutil
import pytest
from helpers import free_port, wait_for

from whisper_exporter.collectors.process import ProcessConfig
from whisper_exporter.config import Config
from whisper_exporter.runtime.collector import plugins
from whisper_exporter.runtime.shared import ProcessWatch

try:
    from whisper_exporter.collectors import process
except ModuleNotFoundError as err:
    # collectors/__init__.py imports collectors.gpu too; while that module is not
    # there, load this one alone under its real name.
    if err.name != "whisper_exporter.collectors.gpu":
        raise
    package = types.ModuleType("collectors")
    package.__path__ = [str(Path(__file__).resolve().parent.parent / "collectors")]
    sys.modules["collectors"] = package
    process = importlib.import_module("whisper_exporter.collectors.process")

# The fake server: argv = kids, burn|idle, marker. Its children are plain sleepers
# without the marker, so only `children: true` brings them in. Three extra
# threads make the thread count something to check.
SERVER = r"""
import subprocess, sys, threading, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(int(sys.argv[1]))]
if sys.argv[2] == "burn":
    kids.append(subprocess.Popen([sys.executable, "-c",
        "import time\nend = time.time() + 60\nwhile time.time() < end: pass"]))
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
time.sleep(60)
"""
# Starts argv in its own session and exits, so the server is not a descendant of
# the test process: the collector never watches the exporter's own descendants.
LAUNCHER = ("import subprocess, sys; D = subprocess.DEVNULL; print(subprocess.Popen(sys.argv[1:], "
            "start_new_session=True, stdin=D, stdout=D, stderr=D).pid)")


def detached(*argv: str) -> psutil.Process:
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True,
                         check=True, timeout=30)
    return psutil.Process(int(out.stdout))


def tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def settle(procs: list[psutil.Process], timeout: float = 15) -> None:
    """Wait until the processes' threads, fds and RSS stop moving (Python start-up done)."""
    def look():
        return [(p.num_threads(), p.num_fds(), p.memory_info().rss // 65536) for p in procs]

    deadline = time.monotonic() + timeout
    last = look()
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = look()
        if now == last:
            return
        last = now
    raise AssertionError("processes did not settle")


def wait_dead(p: psutil.Process) -> None:
    """Until p is a zombie or gone (its parent, the fake server, never reaps it)."""
    deadline = time.monotonic() + 10
    try:
        while p.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "process did not die"
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        pass


class Server:
    def __init__(self, marker: str, kids: int = 2, burn: bool = False, extra: tuple[str, ...] = ()):
        self.root = detached(sys.executable, "-c", SERVER, str(kids), "burn" if burn else "idle", marker, *extra)
        self.spawned = [self.root]
        want = kids + burn
        deadline = time.monotonic() + 15
        # The threads start after every child was spawned (Popen returns after exec).
        while self.root.num_threads() < 4 or len(self.root.children()) < want:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        self.spawned = tree(self.root)

    @property
    def pid(self) -> int:
        return self.root.pid

    def pids(self) -> set[int]:
        return {p.pid for p in tree(self.root)}

    def kill(self) -> None:
        for p in reversed(self.spawned):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.spawned, timeout=10)


@pytest.fixture
def spawn():
    servers: list[Server] = []

    def start(marker: str, **kw) -> Server:
        server = Server(marker, **kw)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def marker() -> str:
    return f"wx-proc-test-{uuid.uuid4().hex[:12]}"


def collect(section: ProcessConfig):
    collector = process.ProcessCollector(section)
    collector.start()
    collector.update()
    return collector


def values(collector) -> dict[str, float]:
    out = {}
    for family in collector.families():
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def cpu(collector) -> float:
    v = values(collector)
    return v["whisper_process_cpu_seconds_total{mode=user}"] + v["whisper_process_cpu_seconds_total{mode=system}"]


def test_registered_under_its_name():
    from whisper_exporter.runtime.shared import Shared

    assert plugins()["process"] is process.PLUGIN
    assert process.make(ProcessConfig(), Shared.build(Config())).name == "process"


def test_found_by_pattern_with_children(spawn, marker):
    server = spawn(marker, kids=2)
    c = collect(ProcessConfig(match=re.escape(marker), children=True))
    v = values(c)
    assert v["whisper_process_up"] == 1
    assert v["whisper_process_processes"] == 3
    assert c.pids == server.pids() and len(c.pids) == 3
    assert f"pid {server.pid} " in c.status and "watching 3 processes" in c.status

    alone = collect(ProcessConfig(match=re.escape(marker), children=False))
    assert values(alone)["whisper_process_processes"] == 1
    assert alone.pids == {server.pid}


def test_metrics_equal_psutil_readings(spawn, marker):
    server = spawn(marker, kids=2)
    procs = tree(server.root)
    settle(procs)
    c = collect(ProcessConfig(match=re.escape(marker)))
    v = values(c)
    rss = sum(p.memory_info().rss for p in procs)
    assert v["whisper_process_resident_memory_bytes"] == pytest.approx(rss, rel=0.05)
    assert v["whisper_process_threads"] == sum(p.num_threads() for p in procs) == 4 + 1 + 1
    assert v["whisper_process_open_fds"] == sum(p.num_fds() for p in procs)
    assert v["whisper_process_start_time_seconds"] == server.root.create_time()
    times = [p.cpu_times() for p in procs]
    # Idle sleepers: their CPU time has stopped moving, the sum must match closely.
    assert v["whisper_process_cpu_seconds_total{mode=user}"] == pytest.approx(sum(t.user for t in times), abs=0.05)
    assert v["whisper_process_cpu_seconds_total{mode=system}"] == pytest.approx(sum(t.system for t in times), abs=0.05)
    assert cpu(c) > 0  # three Python start-ups cost something


def test_found_by_pid(spawn, marker):
    server = spawn(marker, kids=2)
    c = collect(ProcessConfig(match=None, pid=server.pid, children=True))
    assert values(c)["whisper_process_processes"] == 3 and c.pids == server.pids()
    c = collect(ProcessConfig(match=None, pid=server.pid, children=False))
    assert values(c)["whisper_process_processes"] == 1 and c.pids == {server.pid}
    assert values(c)["whisper_process_start_time_seconds"] == server.root.create_time()

    # A child that exits stays a zombie (the fake server never reaps): not watched.
    c = collect(ProcessConfig(match=None, pid=server.pid, children=True))
    kid = server.root.children()[0]
    kid.kill()
    wait_dead(kid)
    c.update()
    assert values(c)["whisper_process_processes"] == 2 and kid.pid not in c.pids

    # The server killed: down at once, even while it is an unreaped zombie.
    server.root.kill()
    wait_dead(server.root)
    c.update()
    assert values(c)["whisper_process_up"] == 0
    assert c.status == f"pid {server.pid}: not running"


def test_pid_file_follows_a_restart(spawn, marker, tmp_path):
    pid_file = tmp_path / "whisper.pid"
    first = spawn(marker, kids=1)
    pid_file.write_text(f"{first.pid}\n")
    c = collect(ProcessConfig(match=None, pid_file=str(pid_file)))
    assert values(c)["whisper_process_up"] == 1 and c.pids == first.pids()
    before = cpu(c)
    assert before > 0

    first.kill()
    c.update()
    v = values(c)
    assert v["whisper_process_up"] == 0 and v["whisper_process_processes"] == 0
    assert "whisper_process_resident_memory_bytes" not in v
    assert "not running" in c.status
    down = cpu(c)
    assert down >= before

    second = spawn(marker, kids=1)
    assert second.pid != first.pid
    pid_file.write_text(f"{second.pid}\n")
    c.update()
    v = values(c)
    assert v["whisper_process_up"] == 1 and c.pids == second.pids()
    assert v["whisper_process_start_time_seconds"] == second.root.create_time()
    assert cpu(c) > down  # the new server's start-up CPU is added, nothing taken away


def test_cpu_counter_grows_and_survives_restart_by_pattern(spawn, marker):
    server = spawn(marker, kids=1, burn=True)
    section = ProcessConfig(match=re.escape(marker))
    c = collect(section)
    burner = [p for p in server.root.children() if p.pid in c.pids and "while" in " ".join(p.cmdline())]
    assert len(burner) == 1 and values(c)["whisper_process_processes"] == 3
    start, burner_start = cpu(c), sum(burner[0].cpu_times()[:2])
    deadline = time.monotonic() + 10  # on a loaded machine the burner may get little CPU at first
    while sum(burner[0].cpu_times()[:2]) - burner_start <= 0.25 and time.monotonic() < deadline:
        time.sleep(0.2)
    c.update()
    before_kill = cpu(c)  # compared as read: start + (x - start) need not equal x in floats
    grown, burned = before_kill - start, sum(burner[0].cpu_times()[:2]) - burner_start
    assert burned > 0.2
    assert grown >= burned - 0.05  # the counter saw at least what the burner burned

    # A child that exits (a zombie until reaped) leaves the set; the counter stays.
    burner[0].kill()
    wait_dead(burner[0])
    c.update()
    assert values(c)["whisper_process_processes"] == 2
    after_child = cpu(c)
    assert after_child >= before_kill

    server.kill()
    c.update()
    assert values(c)["whisper_process_up"] == 0
    assert f"no process matches {re.escape(marker)!r}" in c.status
    assert cpu(c) >= after_child

    again = spawn(marker, kids=1)
    c.update()
    assert values(c)["whisper_process_up"] == 1 and c.pids == again.pids()
    assert cpu(c) > after_child


@pytest.mark.parametrize("content, reason", [
    ("not a pid\n", "no pid in it ('not a pid')"),
    ("", "no pid in it"),
    ("-5\n", "no pid in it"),
    ("99999999\n", "pid file {path}: not running"),
])
def test_bad_pid_file_means_down_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "whisper.pid"
    path.write_text(content)
    c = collect(ProcessConfig(match="python", pid_file=str(path)))  # match must not be a fallback
    v = values(c)
    assert v["whisper_process_up"] == 0 and v["whisper_process_processes"] == 0
    assert reason.format(path=path) in c.status and str(path) in c.status
    assert c.pids == frozenset()


@pytest.mark.parametrize("pid", [0, -3])
def test_invalid_pid_is_down_not_a_fault(pid):
    c = collect(ProcessConfig(match=None, pid=pid))
    assert values(c)["whisper_process_up"] == 0
    assert c.status == f"pid {pid}: not a valid pid"


def test_missing_pid_file(tmp_path):
    c = collect(ProcessConfig(pid_file=str(tmp_path / "nope.pid")))
    assert values(c)["whisper_process_up"] == 0
    assert c.status == f"pid file {tmp_path / 'nope.pid'}: not found"


def test_never_watches_the_exporter(spawn, marker):
    me = psutil.Process()
    own = " ".join(me.cmdline())
    # A pattern that matches this test process's own command line.
    c = collect(ProcessConfig(match=re.escape(own)))
    assert re.search(re.escape(own), own)
    assert os.getpid() not in c.pids
    assert not c.pids & {p.pid for p in me.parents()}

    # Same marker in three processes: a real server, one that says it is the
    # exporter, and a child of this (exporter) process. The one that says it is an
    # exporter is not watched; a child is (a harness may start the server itself).
    server = spawn(marker, kids=0)
    # Another exporter: its program is the whisper-exporter console script (argv[0] set by exec -a).
    other_exporter = detached("bash", "-c", 'exec -a /opt/venv/bin/whisper-exporter "$0" "$@"',
                              sys.executable, "-c", "import time; time.sleep(60)", marker)
    # A Whisper server started from a checkout whose path says whisper-exporter: still a server.
    in_checkout = detached("bash", "-c", 'exec -a /src/whisper-exporter/.venv/bin/python "$0" "$@"',
                           sys.executable, "-c", "import time; time.sleep(60)", marker)
    own_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        # bash has exec'd both (until then their command lines are bash's)
        assert wait_for(lambda: other_exporter.cmdline()[0] == "/opt/venv/bin/whisper-exporter"
                        and in_checkout.cmdline()[0] == "/src/whisper-exporter/.venv/bin/python", timeout=15)
        c = collect(ProcessConfig(match=re.escape(marker)))
        assert c.pids == {server.pid, own_child.pid, in_checkout.pid}
        by_pid = collect(ProcessConfig(match=None, pid=os.getpid()))
        assert values(by_pid)["whisper_process_up"] == 0 and "exporter" in by_pid.status
        by_pid = collect(ProcessConfig(match=None, pid=other_exporter.pid))
        assert values(by_pid)["whisper_process_up"] == 0 and "exporter" in by_pid.status
    finally:
        own_child.kill()
        own_child.wait()
        other_exporter.kill()
        in_checkout.kill()


# Run as an exporter would be: a process whose own command line matches the default
# pattern ("whisper" in it) and that imports whisper_exporter.
EXPORTER_LIKE = r"""
import importlib, os, re, sys, types
try:
    from whisper_exporter.collectors import process
except ModuleNotFoundError:
    package = types.ModuleType("collectors")
    package.__path__ = [os.path.join(os.getcwd(), "collectors")]
    sys.modules["collectors"] = package
    process = importlib.import_module("whisper_exporter.collectors.process")
import psutil
from whisper_exporter.config import Config
from whisper_exporter.collectors.process import ProcessConfig
section = ProcessConfig(match=process.FALLBACK_PATTERN)
assert re.search(section.match, " ".join(psutil.Process().cmdline()))
from whisper_exporter.runtime.shared import ProcessWatch
watch = ProcessWatch()
c = process.ProcessCollector(section, watch=watch)
c.update()
family = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
print(len(c.pids & family), len(watch.pids() & family))
"""


def test_default_pattern_never_matches_the_exporter_itself():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", EXPORTER_LIKE, "--server-flavour", "faster-whisper"],
                         cwd=root, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]


def test_scan_fault_raises_and_serves_nothing(spawn, marker, monkeypatch):
    spawn(marker, kids=0)
    c = collect(ProcessConfig(match=re.escape(marker)))
    before = cpu(c)

    def broken(*a, **kw):
        raise OSError("/proc is not mounted")

    monkeypatch.setattr(process.psutil, "process_iter", broken)
    with pytest.raises(OSError):
        c.update()
    assert list(c.families()) == []
    assert c.status.startswith("error:")
    monkeypatch.undo()
    c.update()
    assert values(c)["whisper_process_up"] == 1 and cpu(c) >= before


def test_publishes_the_pids_it_found_to_the_watch(spawn, marker):
    server = spawn(marker, kids=1)
    watch = ProcessWatch()
    c = process.ProcessCollector(ProcessConfig(match=re.escape(marker)), watch=watch)
    assert watch.pids() == set()
    c.update()
    assert watch.pids() == server.pids() == set(c.pids)


def test_parent_map_agrees_with_psutil(spawn, marker):
    # A command name with spaces and parentheses, as /proc/<pid>/stat shows it raw.
    odd = detached(sys.executable, "-c",
                   "open('/proc/self/comm', 'w').write('a) b (c'); import time; time.sleep(60)", marker)
    try:
        deadline = time.monotonic() + 10
        while odd.name() != "a) b (c":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        parents = process._parent_map()
        assert parents[odd.pid] == odd.ppid()
        checked = 0
        for pid, ppid in parents.items():
            try:
                assert psutil.Process(pid).ppid() == ppid
                checked += 1
            except psutil.NoSuchProcess:
                pass
        assert checked > 10
    finally:
        odd.kill()


def test_nothing_to_look_for():
    c = collect(ProcessConfig(match=None))
    assert values(c)["whisper_process_up"] == 0 and "set pid, pid_file or match" in c.status


# -- found by what it is: the listener on service.url's port ------------------------------------

# A server: listens on 127.0.0.1:argv[1] until killed. Its other arguments say what it pretends to be.
LISTENER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(120)
"""


def listening(port: int, *what: str) -> psutil.Process:
    proc = detached(sys.executable, "-c", LISTENER, str(port), *what)
    wait_for(lambda: any(c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp")))
    return proc


@pytest.fixture
def crowd(tmp_path, marker):
    """The user's host: the Whisper server on its port, another job's Whisper server on another
    port, and a `tail -F` of the server's log; every one matches the old default pattern."""
    port, other_port = free_port(), free_port()
    log = tmp_path / f"whisper-{marker}.log"
    log.write_text("")
    procs = {
        "server": listening(port, "faster-whisper-server", marker),
        "other": listening(other_port, "whisper-other-job", marker),
        "tail": detached("tail", "-F", str(log)),
    }
    try:
        yield port, procs
    finally:
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=10)


def by_wiring(url: str, **section) -> "process.ProcessCollector":
    """The collector as the exporter builds it from a config with this service.url."""
    from whisper_exporter.runtime.shared import Shared

    config = Config()
    config.service.url = url
    config.collectors.process = ProcessConfig(**section)
    c = process.make(config.collectors.process, Shared.build(config))
    c.update()
    return c


def test_default_watches_the_process_on_the_service_port_not_lookalikes(crowd):
    port, procs = crowd
    c = by_wiring(f"http://127.0.0.1:{port}")
    assert c.pids == {procs["server"].pid}
    assert values(c)["whisper_process_up"] == 1 and values(c)["whisper_process_processes"] == 1
    assert c.status == (f"watching 1 process (pid {procs['server'].pid} {procs['server'].name()}), "
                        f"found by listening on port {port}")
    # The server dies; another job's server and the tail go on. Up must say so.
    procs["server"].kill()
    procs["server"].wait(10)
    c.update()
    assert values(c)["whisper_process_up"] == 0 and c.pids == frozenset()
    assert c.status == f"nothing listens on port {port}"
    assert procs["other"].is_running() and procs["tail"].is_running()


def test_localhost_names_and_an_explicit_port(crowd):
    port, procs = crowd
    assert by_wiring(f"http://localhost:{port}/v1").pids == {procs["server"].pid}
    # service.url on another host, the port given: the listener on it is still the server.
    assert by_wiring("http://whisper.example:8000", port=port).pids == {procs["server"].pid}


def test_a_broad_pattern_warns_and_names_every_match(crowd, marker, caplog):
    port, procs = crowd
    with caplog.at_level("WARNING", logger=process.log.name):
        c = by_wiring(f"http://127.0.0.1:{port}", match=f"whisper.*{marker}")
    pids = sorted(p.pid for p in procs.values())
    assert c.pids == set(pids)
    for pid in pids:
        assert f"pid {pid} " in c.status
    assert c.status.endswith("; WARNING: 3 unrelated processes match")
    warned = [r.getMessage() for r in caplog.records if "unrelated" in r.getMessage()]
    assert len(warned) == 1 and "tail -F" in warned[0] and "whisper-other-job" in warned[0]
    caplog.clear()
    c.update()  # the same set again: not warned twice
    assert not [r for r in caplog.records if "unrelated" in r.getMessage()]


def test_a_remote_service_url_falls_back_to_the_pattern_and_says_so():
    c = by_wiring("http://whisper.example:8000")
    assert "fallback: service.url's host whisper.example is not an address of this machine" in c.status
    assert c.status.startswith(("watching", "no process matches"))


def test_listeners_hidden_from_the_exporter_fall_back_to_the_pattern(crowd, monkeypatch):
    port, procs = crowd

    def denied(kind="inet"):  # macOS without root; a container without the server's fds
        raise psutil.AccessDenied()

    monkeypatch.setattr(process.psutil, "net_connections", denied)
    c = by_wiring(f"http://127.0.0.1:{port}")
    assert f"fallback: the process listening on port {port} is not visible to the exporter" in c.status
    assert procs["server"].pid in c.pids  # found by the fallback pattern


def test_status_is_bounded_however_many_match(marker):
    sleepers = [detached(sys.executable, "-c", "import time; time.sleep(60)", marker) for _ in range(7)]
    try:
        c = collect(ProcessConfig(match=re.escape(marker)))
        assert len(c.pids) == 7
        assert "and 3 more" in c.status and len(c.status) < 400
    finally:
        for p in sleepers:
            p.kill()


@pytest.mark.parametrize("url, port", [
    ("http://127.0.0.1:8000", 8000), ("http://localhost", 80), ("https://[::1]/x", 443),
    ("http://0.0.0.0:9", 9), ("http://10.255.255.1:8000", None), ("http://whisper:8000", None),
])
def test_server_port(url, port):
    assert process.server_port(url)[0] == port


def test_old_metric_name_only_as_an_opt_in_alias(spawn, marker):
    spawn(marker, kids=0)
    assert "whisper_process_count" not in values(collect(ProcessConfig(match=re.escape(marker))))
    old = values(collect(ProcessConfig(match=re.escape(marker), deprecated_count_metric=True)))
    assert old["whisper_process_count"] == old["whisper_process_processes"] == 1


def test_no_listener_on_the_port_is_told_without_walking_every_process(monkeypatch):
    """While the server is not there, each run reads the kernel's socket tables, not every
    process's fds: psutil.net_connections costs ~9 MB and 0.3 s on a host with 20,000 sockets
    (the idle exporter's RSS and CPU). A real listener is still found by its pid."""
    from whisper_exporter.collectors import process as process_module

    walks = []
    real = psutil.net_connections
    monkeypatch.setattr(psutil, "net_connections", lambda kind="inet": walks.append(kind) or real(kind))
    port = free_port()
    assert process_module._listeners(port, frozenset()) == (set(), False)
    assert walks == []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            pids, hidden = process_module._listeners(server.getsockname()[1], frozenset())
            assert pids == {os.getpid()} and not hidden
    assert walks == ["tcp", "tcp"]
