"""Follow log files like `tail -F`, by polling with stat identity (device + inode).

One `Follower` per configured path (a file or a glob). Each `poll()`:

1. lists the files the path matches now and stats each by name;
2. a file whose identity is already open is the same file (renamed within the
   glob, or seen again): it keeps its offset. A new identity is opened: files
   present at the first poll start at the end (unless start_at beginning),
   files that appear later (created, re-created, rotated in) start at 0;
3. reads every open file from its offset to EOF, before and after switching,
   so the old file of a rotation is drained. A file that is no longer matched
   (renamed away, deleted) stays open and is read while it still grows, for a
   writer that has not reopened yet, and is closed after RETIRE_IDLE seconds
   without growth;
4. at each poll an open file is checked for truncation (copytruncate, `> file`):
   its size below our offset, or the bytes just before our offset changed
   (truncated and written past our offset again between two polls). Either
   restarts it at 0. What was written after our last read and before the
   truncation is read from copytruncate's copy when one is found (a file the
   glob follows, or a sibling named after the file: app.log.1,
   app.log-20250101; or, when logrotate compressed it at once, app.log.1.gz):
   the same first bytes and the same bytes before our offset. A copy that is not followed by a truncation (a
   plain `cp`) is never read: its lines were read from the original.

Only regular files are read. Every open is non-blocking and checked with fstat, so a FIFO
or device that matches the glob (or appears next to the log, where copytruncate's copy is
looked for) is skipped, never waited on. `follow_symlinks=False` refuses a file that is a
symbolic link; `allowed_dirs` refuses any file whose real path (symlinks resolved) is not
inside one of those directories, so a link to /etc/shadow is never read. Refusals are
counted as read errors (symlink_refused, outside_allowed_dirs).

Only complete lines are delivered; a partial last line waits for its newline.
A line longer than max_line_bytes is dropped and reported (memory stays
bounded: at most one read chunk plus one line per open file). Errors (permission
denied, a vanished directory) are counted by errno name and retried at the next
poll; nothing here raises for file-system trouble.

inotify was not used: mtail dropped it after its queue overflowed under fast
writes, and a poll is a few stat() calls (about 10 microseconds for one file).
"""
from __future__ import annotations

import bz2
import errno
import glob
import gzip
import logging
import lzma
import os
import stat
import time
from typing import Any, Callable, Optional

log = logging.getLogger("whisper_exporter.logfiles.follow")

CHUNK = 1 << 18  # bytes per read
FINGERPRINT = 64  # bytes before the offset that must not change while we follow a file
RETIRE_IDLE = 30.0  # seconds a file no longer at its path is kept open without growing
MAX_FILES = 256  # files one glob may have open
SKIP_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")  # compressed rotations
# for copytruncate's copy
_DECOMPRESS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_REMEMBER = 1024  # closed files whose offset is kept, should they reappear under the glob

Ident = tuple[int, int]


class _Tail:
    __slots__ = ("fd", "ident", "path", "offset", "partial", "discarding", "fp", "head", "grew_at", "matched",
                 "copy_of", "intact_mtime")

    def __init__(self, fd: int, ident: Ident, path: str, offset: int, now: float):
        self.fd = fd
        self.ident = ident
        self.path = path
        self.offset = offset
        self.partial = b""  # an incomplete last line
        self.discarding = False  # inside a line that was too long, until its newline
        self.fp = b""  # the last bytes read, ending at offset
        self.head = b""  # the first bytes of the file
        self.grew_at = now
        self.matched = True  # still at a path the pattern matches
        self.copy_of: Optional[Ident] = None  # this file looks like a copy of that open file
        self.intact_mtime = 0  # the file's mtime when it was last found intact (not truncated)


class Follower:
    """Follow one path or glob. Counters are plain attributes, read by the collector."""

    def __init__(
        self,
        pattern: str,
        on_lines: Callable[[list[bytes]], None],
        *,
        start_at_end: bool = True,
        max_line_bytes: int = 1 << 20,
        on_error: Optional[Callable[[str, bytes], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        retire_idle: Optional[float] = None,
        follow_symlinks: bool = True,
        allowed_dirs: Optional[list[str]] = None,
    ):
        self.pattern = os.path.expanduser(pattern)
        self.follow_symlinks = follow_symlinks
        self.allowed_dirs = None if allowed_dirs is None else [
            os.path.join(os.path.realpath(os.path.expanduser(d)), "") for d in allowed_dirs]
        self.is_glob = any(c in self.pattern for c in "*?[")
        self.on_lines = on_lines
        self.on_error = on_error or (lambda reason, sample: None)
        self.start_at_end = start_at_end
        self.max_line_bytes = max_line_bytes
        self.clock = clock
        self.retire_idle = RETIRE_IDLE if retire_idle is None else retire_idle
        self.tails: dict[Ident, _Tail] = {}  # open files, oldest first
        self.at_path: dict[str, Ident] = {}  # the identity last seen at each matched path
        self.closed: dict[Ident, tuple[int, bytes]] = {}  # closed files: offset, fingerprint
        self.primed = False
        # Self-metrics.
        self.lines = 0
        self.bytes = 0
        self.rotations = 0
        self.too_long = 0
        self.read_errors: dict[str, int] = {}
        self.last_line_wall: Optional[float] = None  # time.time() of the last complete line
        self.started_wall = time.time()
        self._logged_errors: set[str] = set()

    # -- public -------------------------------------------------------------

    @property
    def open_files(self) -> int:
        return len(self.tails)

    def poll(self, deadline: Optional[float] = None) -> bool:
        """Read everything new. Returns False when stopped by `deadline` (time.monotonic())
        with data left, which the next poll reads."""
        first = not self.primed
        self.primed = True
        self._discover(at_end=first and self.start_at_end)
        done = True
        for tail in list(self.tails.values()):
            if not self._read(tail, deadline):
                done = False
                break
        if done:
            self._retire_idle()
        return done

    def close(self) -> None:
        for tail in list(self.tails.values()):
            self._close(tail, flush=False)

    # -- discovery ----------------------------------------------------------

    def _paths(self) -> list[str]:
        if not self.is_glob:
            return [self.pattern]
        try:
            found = [p for p in glob.glob(self.pattern) if not p.endswith(SKIP_SUFFIXES)]
        except OSError as err:  # pragma: no cover - glob swallows most errors itself
            self._error(err, "glob")
            return []
        found.sort()
        if len(found) > MAX_FILES:
            self._count("too_many_files")
            found = found[:MAX_FILES]
        return found

    def _discover(self, at_end: bool) -> None:
        now = self.clock()
        seen: set[Ident] = set()
        matched_paths: set[str] = set()
        for path in self._paths():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # not there (yet, or any more): not an error
            except OSError as err:
                self._error(err, path)
                continue
            if not _is_regular(st.st_mode):
                continue
            refused = self._refused(path)
            if refused:
                self._count(refused)
                self._log_once(refused, f"log {self.pattern}: {path}: not read ({refused.replace('_', ' ')})")
                continue
            ident = (st.st_dev, st.st_ino)
            seen.add(ident)
            matched_paths.add(path)
            previous = self.at_path.get(path)
            self.at_path[path] = ident
            tail = self.tails.get(ident)
            if tail is not None:
                tail.path = path
                continue
            offset: Optional[int] = 0
            fp, partial_known, reused = b"", False, False
            remembered = self.closed.pop(ident, None)
            if at_end:
                offset = None  # decided once the file is open
            elif remembered is not None:
                offset, fp = remembered
                partial_known = True
            try:
                fd = self._open(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                self._error(err, path)
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != ident or not _is_regular(st.st_mode):
                    os.close(fd)  # replaced between stat and open: next poll
                    continue
                if offset is None:
                    offset, fp, skip_first = _end_of_complete_lines(fd, st.st_size, self.max_line_bytes)
                elif partial_known:
                    if st.st_size < offset or _pread(fd, len(fp), offset - len(fp)) != fp:
                        # Not the file we closed but a new one given its inode number (ext4 reuses
                        # them at once): read it all, and count the rotation below.
                        offset, fp, reused = 0, b"", True
                    skip_first = False
                else:
                    skip_first = False
            except OSError as err:
                os.close(fd)
                self._error(err, path)
                continue
            copied = None if (at_end or partial_known) else self._copy_of(fd, st.st_size)
            tail = _Tail(fd, ident, path, offset, now)
            tail.fp = fp
            tail.discarding = skip_first
            try:
                tail.head = _pread(fd, FINGERPRINT, 0) if offset > 0 else b""
            except OSError:
                pass
            if copied is not None:
                # A copy of a file we follow (copytruncate's, or any cp): what it holds up to
                # our offset was read already. Nothing of it is read unless the original gets
                # truncated: then the copy's bytes past that offset are the lines we missed.
                tail.offset, tail.head = st.st_size, copied.head
                tail.fp = _pread(fd, FINGERPRINT, max(0, st.st_size - FINGERPRINT))
                tail.copy_of = copied.ident
            self.tails[ident] = tail
            if previous is not None and (reused or (previous != ident and remembered is None)):
                # A new file where another was: rotation by rename and create, or delete and re-create.
                self.rotations += 1
                log.info("log %s: new file at %s (rotated or re-created)", self.pattern, path)
        for tail in self.tails.values():
            tail.matched = tail.ident in seen
        if self.is_glob:  # remember only what the glob matches now: names may churn (dated files)
            self.at_path = {p: i for p, i in self.at_path.items() if p in matched_paths}

    # -- reading ------------------------------------------------------------

    def _read(self, tail: _Tail, deadline: Optional[float]) -> bool:
        try:
            st = os.fstat(tail.fd)
            if st.st_size < tail.offset or (
                tail.fp and st.st_size >= tail.offset
                and _pread(tail.fd, len(tail.fp), tail.offset - len(tail.fp)) != tail.fp
            ):
                # Truncated (copytruncate, `> file`), perhaps written past our offset again since.
                self.rotations += 1
                recovered = self._recover_from_copy(tail)
                log.info("log %s: %s was truncated; reading it from the start%s", self.pattern, tail.path,
                         f" (its last {recovered} bytes read from the copy)" if recovered else "")
                tail.offset, tail.fp, tail.head, tail.discarding = 0, b"", b"", False
            tail.intact_mtime = st.st_mtime_ns
            while True:
                data = _pread(tail.fd, CHUNK, tail.offset)
                if not data:
                    return True
                if len(tail.head) < FINGERPRINT and tail.offset == len(tail.head):
                    tail.head = (tail.head + data)[:FINGERPRINT]
                tail.offset += len(data)
                self.bytes += len(data)
                tail.fp = data[-FINGERPRINT:] if len(data) >= FINGERPRINT else (tail.fp + data)[-FINGERPRINT:]
                tail.grew_at = self.clock()
                self._split(tail, data)
                if deadline is not None and time.monotonic() > deadline:
                    return False
        except OSError as err:
            self._error(err, tail.path)
            return True

    def _split(self, tail: _Tail, data: bytes) -> None:
        if tail.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1:]
            tail.discarding = False
        if tail.partial:
            data = tail.partial + data
            tail.partial = b""
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > self.max_line_bytes:
            self._too_long(rest)
            tail.discarding = True
            rest = b""
        tail.partial = rest
        if not lines:
            return
        limit = self.max_line_bytes
        if len(data) - len(rest) > limit and max(map(len, lines)) > limit:
            kept = []
            for line in lines:
                if len(line) > limit:
                    self._too_long(line)
                else:
                    kept.append(line)
            lines = kept
        self.lines += len(lines)
        self.last_line_wall = time.time()
        if lines:
            self.on_lines(lines)

    def _too_long(self, start: bytes) -> None:
        self.lines += 1
        self.too_long += 1
        self.last_line_wall = time.time()
        self.on_error("line_too_long", start[:200])

    # -- copytruncate -------------------------------------------------------

    def _copy_of(self, fd: int, size: int) -> Optional[_Tail]:
        """The open file this new file is a copy of: same first bytes, and the same
        bytes just before our offset in it."""
        for t in self.tails.values():
            if t.copy_of is not None or t.offset <= 0 or not t.head or size < t.offset:
                continue
            try:
                if _pread(fd, len(t.head), 0) == t.head and \
                        _pread(fd, len(t.fp), t.offset - len(t.fp)) == t.fp:
                    return t
            except OSError:
                return None
        return None

    def _recover_from_copy(self, tail: _Tail) -> int:
        """`tail` was truncated. If copytruncate left a copy of it (a file the glob already
        follows, or a sibling named after it: app.log.1, app.log-20250101), read from that
        copy what was written after our last read and before the truncation. Returns bytes read.

        A copy qualifies when it holds the same first bytes, the same bytes just before our
        offset, more than our offset, and was modified no earlier than the file itself when we
        last found it intact: the lines we missed were written after that, and the copy after
        them (older rotations of a log of identical lines would pass the byte checks; their
        last write came before the file we follow was created). Times of one file system,
        so one clock. Of several copies, the newest."""
        if not tail.fp:
            return 0
        since = tail.intact_mtime
        best: Optional[tuple[int, int, int, bool]] = None  # mtime, fd, size, whether we opened fd here
        opened: list[int] = []
        try:
            for copy in self.tails.values():
                if copy.copy_of == tail.ident:
                    st = os.fstat(copy.fd)
                    if self._is_copy(copy.fd, st, tail, since) and (best is None or st.st_mtime_ns > best[0]):
                        best = (st.st_mtime_ns, copy.fd, st.st_size, False)
            directory, base = os.path.split(tail.path)
            try:
                names = os.listdir(directory or ".")
            except OSError:
                names = []
            for name in names:
                if name == base or not name.startswith(base) or name.endswith(SKIP_SUFFIXES):
                    continue
                sibling = os.path.join(directory, name)
                try:
                    # A FIFO named app.log.pipe here wedged the collector in a blocking open.
                    if not _is_regular(os.stat(sibling).st_mode) or self._refused(sibling):
                        continue
                    fd = self._open(sibling)
                except OSError:
                    continue
                opened.append(fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in self.tails or not _is_regular(st.st_mode):
                    continue
                if self._is_copy(fd, st, tail, since) and (best is None or st.st_mtime_ns > best[0]):
                    best = (st.st_mtime_ns, fd, st.st_size, True)
            if best is None:
                # logrotate's `compress` without `delaycompress` may have compressed the copy already.
                for name in sorted(names):
                    if name.startswith(base) and name.endswith(tuple(_DECOMPRESS)) and \
                            not self._refused(os.path.join(directory, name)):
                        n = self._read_compressed_copy(os.path.join(directory, name), tail, since)
                        if n is not None:
                            return n
                return 0
            _, fd, size, ours = best
            n = self._read_range(fd, tail, tail.offset, size)
            st = os.fstat(fd)
            if ours:  # should the glob match the copy later: it was read to its end
                self.closed[(st.st_dev, st.st_ino)] = (size, _pread(fd, FINGERPRINT, max(0, size - FINGERPRINT)))
            else:
                for copy in self.tails.values():
                    if copy.fd == fd:
                        copy.copy_of = None
            return n
        except OSError:
            return 0
        finally:
            for fd in opened:
                os.close(fd)

    def _read_compressed_copy(self, path: str, tail: _Tail, since: int) -> Optional[int]:
        """Like an uncompressed copy, decompressing from the start (once per rotation)."""
        try:
            if not tail.head:
                return None
            fd = self._open(path)
            raw = os.fdopen(fd, "rb")
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_mtime_ns < since or not _is_regular(st.st_mode):
                return None
            os.set_blocking(fd, True)
            with _DECOMPRESS[os.path.splitext(path)[1]](raw, "rb") as z:
                if z.read(len(tail.head)) != tail.head:
                    return None
                z.seek(tail.offset - len(tail.fp))
                if z.read(len(tail.fp)) != tail.fp:
                    return None
                n = 0
                while True:
                    data = z.read(CHUNK)
                    if not data:
                        return n
                    n += len(data)
                    self.bytes += len(data)
                    self._split(tail, data)
        except (OSError, EOFError, ValueError) as err:  # corrupt, or still being written
            log.info("log %s: could not read the compressed copy %s: %s", self.pattern, path, type(err).__name__)
            return None
        finally:
            raw.close()

    @staticmethod
    def _is_copy(fd: int, st: os.stat_result, tail: _Tail, since: int) -> bool:
        if st.st_size <= tail.offset or st.st_mtime_ns < since or len(tail.head) == 0:
            return False
        return (_pread(fd, len(tail.head), 0) == tail.head
                and _pread(fd, len(tail.fp), tail.offset - len(tail.fp)) == tail.fp)

    def _read_range(self, fd: int, tail: _Tail, start: int, end: int) -> int:
        """Bytes [start, end) of fd, as the continuation of tail's lines."""
        pos = start
        while pos < end:
            data = _pread(fd, min(CHUNK, end - pos), pos)
            if not data:
                break
            pos += len(data)
            self.bytes += len(data)
            self._split(tail, data)
        return pos - start

    # -- closing ------------------------------------------------------------

    def _retire_idle(self) -> None:
        now = self.clock()
        for tail in list(self.tails.values()):
            if tail.matched or now - tail.grew_at < self.retire_idle:
                continue
            self._close(tail, flush=True)

    def _close(self, tail: _Tail, flush: bool) -> None:
        """Close a file that left its path and stopped growing. Its unfinished last
        line is delivered: the file will not be written again."""
        if flush and tail.partial:
            line, tail.partial = tail.partial, b""
            self.lines += 1
            self.last_line_wall = time.time()
            self.on_lines([line])
        try:
            os.close(tail.fd)
        except OSError:  # pragma: no cover
            pass
        del self.tails[tail.ident]
        self.closed[tail.ident] = (tail.offset, tail.fp)
        while len(self.closed) > _REMEMBER:
            del self.closed[next(iter(self.closed))]

    # -- what may be read ---------------------------------------------------

    def _open(self, path: str) -> int:
        """A read-only descriptor of `path` that never blocks in open() (a FIFO, a device)."""
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        if not self.follow_symlinks:
            flags |= getattr(os, "O_NOFOLLOW", 0)  # closes the race between the check and the open
        return os.open(path, flags)

    def _refused(self, path: str) -> Optional[str]:
        """Why `path` must not be read under the symlink and directory settings; None if it may."""
        if not self.follow_symlinks and os.path.islink(path):
            return "symlink_refused"
        if self.allowed_dirs is not None:
            real = os.path.realpath(path)
            if not any(real.startswith(d) for d in self.allowed_dirs):
                return "outside_allowed_dirs"
        return None

    # -- errors -------------------------------------------------------------

    def _error(self, err: OSError, where: str) -> None:
        reason = errno.errorcode.get(err.errno or 0, type(err).__name__)
        self._count(reason)
        self._log_once(reason, f"log {self.pattern}: {where}: {err.strerror or err} (retrying at every poll)")

    def _log_once(self, reason: str, message: str) -> None:
        if reason not in self._logged_errors:  # once per kind; the counter has the rest
            self._logged_errors.add(reason)
            log.warning("%s", message)

    def _count(self, reason: str) -> None:
        self.read_errors[reason] = self.read_errors.get(reason, 0) + 1


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _pread(fd: int, n: int, offset: int) -> bytes:
    if n <= 0:
        return b""
    return os.pread(fd, n, offset)


def _end_of_complete_lines(fd: int, size: int, max_line: int) -> tuple[int, bytes, bool]:
    """Where to start in a file that was there before us: after its last newline, so an
    unfinished last line is read whole once it is finished. Returns (offset, the bytes
    before it, whether to skip up to the next newline)."""
    if size == 0:
        return 0, b"", False
    window = min(size, max_line + 1)
    tail = _pread(fd, window, size - window)
    nl = tail.rfind(b"\n")
    if nl < 0:  # one line longer than we would keep: skip what is left of it
        return size, tail[-FINGERPRINT:], True
    offset = size - window + nl + 1
    before = tail[: nl + 1][-FINGERPRINT:]
    return offset, before, False
