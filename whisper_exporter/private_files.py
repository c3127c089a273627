"""Files that hold users' words or audio: 0600, opened without following a link, in 0700 folders.

The review queue, the verified references, the tap's kept samples and its spool all go
through here (SECURITY.md, "Private files"). A file is created 0600 whatever the umask; an
existing one of the exporter's user that others could read is tightened to 0600 (and logged).
The last path component is never followed when it is a symbolic link (O_NOFOLLOW): a link
planted in the queue's place would have had samples appended to its target.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("whisper_exporter.private_files")

FILE_MODE = 0o600
DIR_MODE = 0o700
# O_NONBLOCK: opening a FIFO planted in a file's place must not block (it is refused as not regular).
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def error_kind(err: OSError) -> str:
    """A short, bounded name for an OSError ("ENOSPC", "EROFS" ...), for log rate limits."""
    return errno.errorcode.get(err.errno or 0, type(err).__name__)


class RateLimitedLog:
    """At most one warning per kind per `every` seconds; the counters carry the rest."""

    def __init__(self, logger: logging.Logger, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.every, self._clock = logger, every, clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, *args: object) -> bool:
        """Log `message` unless a warning of this kind went out less than `every` seconds ago."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                return False
            if len(self._last) > 256:  # kinds are errno names; this is a backstop
                self._last.clear()
            self._last[kind] = now
        self.logger.warning(message, *args)
        return True


def private_dir(folder: str, own: bool = True) -> Optional[str]:
    """Make `folder` a 0700 folder: created so when missing; an existing one tightened to 0700
    when it is the exporter's own (`own`: configured as a folder of its own, like sample_dir and
    spool_dir) or, for the folder a file was put in (the review queue's), when the exporter's
    non-root user owns it. A sticky folder (/tmp: shared by design) is never changed. What
    changed, or why a wider folder was left, is logged. Returns that message (None: nothing to say).
    Raises OSError when the folder cannot be created or is not a directory."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        os.makedirs(folder, mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)  # makedirs' mode is filtered by the umask
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", folder)
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return None
    if mode & stat.S_ISVTX:
        message = f"{folder} is a shared folder (mode {mode:04o}, like /tmp): left so; give the exporter a folder of its own"
        log.warning("%s", message)
        return message
    uid = os.geteuid()
    if own or (st.st_uid == uid and uid != 0):
        try:
            os.chmod(folder, DIR_MODE)
        except OSError as err:
            message = f"{folder} is mode {mode:04o} and cannot be made 0700 ({err.strerror or err})"
            log.warning("%s: others may list the names in it", message)
            return message
        message = f"{folder} was mode {mode:04o}, now 0700: it holds users' words or audio"
        log.warning("%s", message)
        return message
    message = f"{folder} is mode {mode:04o} and not the exporter's own: left so (the files in it are 0600)"
    log.warning("%s", message)
    return message


def open_private(path: str, flags: int) -> int:
    """os.open for a private file: created 0600, never through a symbolic link, regular files
    only. A file of the exporter's user that others could read is tightened to 0600 (logged).
    Raises OSError (ELOOP with a clear message for a link)."""
    try:
        fd = os.open(path, flags | _FLAGS, FILE_MODE)
    except OSError as err:
        if err.errno == errno.ELOOP or (err.errno == errno.EMLINK and os.path.islink(path)):
            raise OSError(errno.ELOOP, "a symbolic link, refused (private files are not followed)", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, FILE_MODE)
            log.warning("%s was mode %04o, now 0600: it holds users' words or audio", path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str, limit: int) -> bytes:
    """The bytes of a private file, at most `limit` of them (a larger file raises OSError EFBIG)."""
    fd = open_private(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data


def append_line(path: str, record: bytes) -> None:
    """Append one whole line (`record` ends in a newline) or nothing: one write, cut back to the
    old end when it fails or falls short (a full disk left half a line, and the next append was
    glued onto it). A file that does not end in a newline (a crash mid-write, a hand edit) gets
    one first. Raises OSError."""
    fd = open_private(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            record = b"\n" + record
        try:
            written = os.write(fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(record)} bytes")
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data` in one rename, as a 0600 file (a link at `path` is
    replaced, not followed). Raises OSError; the temporary file is removed on failure."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # O_EXCL, 0600
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
