"""The tap's spool folder: checked at start, and its failures logged once per kind.

Uploads larger than `max_in_memory` are copied to a file there for analysis. On a read-only
root filesystem without a spool volume every such upload lost its analysis as `internal`,
with nothing logged (a 1.9 MB upload in the Kubernetes example); now the start says so, and
each kind of failure (EROFS, ENOSPC ...) is logged once and counted as reason "spool".
"""
from __future__ import annotations

import logging
import tempfile
import threading
from typing import Optional

from whisper_exporter.private_files import error_kind, private_dir

log = logging.getLogger("whisper_exporter.tap")

REASON = "spool"  # the whisper_tap_analysis_errors_total reason
_logged: set[str] = set()  # kinds logged by this process; the counter has the rest
_lock = threading.Lock()


def where(folder: Optional[str]) -> str:
    """The folder uploads are spooled to, for messages."""
    return folder or tempfile.tempdir or "the system's temp dir"


def check(folder: Optional[str]) -> Optional[str]:
    """At the tap's start: make `folder` a 0700 folder of the exporter's own (created, or an
    existing one tightened) and try a file in it (the system's temp dir when None). None when
    it works; else the problem, logged once. The tap serves either way."""
    try:
        if folder is not None:
            private_dir(folder, own=True)
        with tempfile.TemporaryFile(prefix="whisper-tap-", dir=folder):
            pass
    except OSError as err:  # FileNotFoundError too: no usable temp dir at all
        problem = (f"the spool {where(folder)} is not writable ({err.strerror or err}): uploads over "
                   f"max_in_memory are proxied but not analysed (reason=\"{REASON}\"); give spool_dir a "
                   f"writable volume")
        log.warning("tap: %s", problem)
        return problem
    return None


def failed(err: OSError, folder: Optional[str]) -> None:
    """A request's upload could not be spooled: logged once per kind of error."""
    kind = error_kind(err)
    with _lock:
        if kind in _logged:
            return
        _logged.add(kind)
    log.warning("tap: cannot spool an upload to %s (%s: %s); uploads over max_in_memory are proxied but not "
                "analysed, counted as whisper_tap_analysis_errors_total{reason=\"%s\"} (logged once per kind)",
                where(folder), kind, err.strerror or err, REASON)
