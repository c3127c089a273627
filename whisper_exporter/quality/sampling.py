"""Which utterances get scored: a stratified sample of the reference set, and of production traffic.

Reference set (`StratifiedSampler`). The items are grouped into cells by
language and strata tags (manifest.Item.cell). One *pass* visits every item
once, in round-robin order: across the languages, and within each language
across its cells (one item of each language in turn; a language's turns go to
its duration bands, audio qualities and sources in turn), so each run's sample
is spread across languages and strata as evenly as their sizes allow (a small
cell is not drowned by a big one, and a big one is not left out). A run takes the next `per_run` items of the pass that have not been
evaluated yet; when the pass is done the next one starts (in the same run if
there is room). Every item is therefore evaluated within ceil(items / per_run)
complete runs. The cursor is the set of items already evaluated in the current
pass, kept by item id, so adding or removing manifest lines does not
disturb it; with a state file it survives restarts.

Production (`ProductionSampler`, fed by the log collector). Of the requests
whose log line carries the audio path and the transcript, a fraction goes to
the review queue, stratified by language and duration band: each (language,
band) cell is sampled systematically, so after n requests of a cell exactly
ceil(n * fraction) of them were drawn, the first one included. Rare languages
and long recordings are represented at the same fraction as the bulk, and the
draw does not depend on what the audio sounds like (the write-up's sample drifted
toward clean recordings: 98% measured where people heard 89%).

The review queue (`ReviewQueue`) is a JSON-lines file, one item per line:

    {"id": "3f2a...", "audio": "/data/uploads/abc.wav", "transcript": "...", "language": "en",
     "duration": 7.2, "duration_band": "5-15s", "sampled_at": 1718000000.0, "detected": "en"}

(`detected`: only when the server identified the language, the request naming none),
bounded by `max_items`: a sample drawn while it is full is dropped and counted.
Reviewers write the verified record of an item into the references file (JSON
lines, keyed by the queue's id; the review page and `review import` write through
`append_reference`; only id and reference are required):

    {"id": "3f2a...", "reference": "what was really said", "language": "en", "flags": ["no_speech"],
     "reviewer": "ana", "seconds": 41.5, "original": "the server's transcript", "reviewed_at": 1718003600.0,
     "source": "page", "note": "..."}

`reference` may be "" only with flags. The quality collector scores each
unflagged reviewed item (set="production"), counts the flagged ones, and takes
them off the queue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Optional, Sequence

from whisper_exporter.private_files import (
    RateLimitedLog,
    append_line,
    error_kind,
    open_private,
    private_dir,
    read_private,
    write_atomically,
)
from whisper_exporter.quality.flags import FLAGS
from whisper_exporter.quality.manifest import MAX_FILE_BYTES, Item, Problem, duration_band, jsonl_records, read_regular
from whisper_exporter.whisper.languages import language_code

log = logging.getLogger("whisper_exporter.quality.sampling")

STATE_VERSION = 1


# -- the reference set ----------------------------------------------------------------------


def cells(items: Iterable[Item]) -> dict[tuple, list[Item]]:
    """Items grouped by cell (language, strata), cells and items in manifest order."""
    out: dict[tuple, list[Item]] = {}
    for item in items:
        out.setdefault(item.cell, []).append(item)
    return out


def _round_robin(groups: list[list[Item]]) -> list[Item]:
    order: list[Item] = []
    depth = 0
    while True:
        layer = [group[depth] for group in groups if depth < len(group)]
        if not layer:
            return order
        order.extend(layer)
        depth += 1


def interleave(items: Iterable[Item]) -> list[Item]:
    """One pass: round-robin across languages, and within each language round-robin across its
    strata cells (each cell's items in manifest order). Languages get equal turns however many
    strata each has; within a language, each combination of tags gets its turn."""
    by_language: dict[str, list[list[Item]]] = {}
    for (language, _strata), group in cells(items).items():
        by_language.setdefault(language, []).append(group)
    return _round_robin([_round_robin(groups) for groups in by_language.values()])


class StratifiedSampler:
    """The persistent round-robin cursor over the reference set (see the module docstring)."""

    def __init__(self, state_path: Optional[str] = None):
        self.state_path = state_path
        self.covered: set[str] = set()  # ids evaluated in the current pass
        self.passes = 0  # passes completed
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        if state_path:
            self._load()

    def sample(self, items: Sequence[Item], n: int) -> list[Item]:
        """The next `n` items to evaluate (fewer only when the set is smaller than `n`).

        Nothing counts as evaluated until `done()` says so: items a run did not get to
        come first in the next run."""
        with self._lock:
            order = interleave(items)
            self._keys = {item.id for item in order}
            self.covered &= self._keys  # forget items no longer in the manifest
            if self._keys and self.covered >= self._keys:
                self._new_pass()
            picked = [item for item in order if item.id not in self.covered][:n]
            if len(picked) < n:  # the pass ends within this run: go on with the next one
                taken = {item.id for item in picked}
                picked += [item for item in order if item.id not in taken][: n - len(picked)]
            return picked

    def done(self, item: Item) -> None:
        """`item` was evaluated (whatever the server answered)."""
        with self._lock:
            self.covered.add(item.id)
            if self._keys and self.covered >= self._keys:
                self._new_pass()

    def _new_pass(self) -> None:
        self.passes += 1
        self.covered = set()

    def coverage(self) -> float:
        """Share of the set evaluated in the current pass."""
        with self._lock:
            return len(self.covered & self._keys) / len(self._keys) if self._keys else 0.0

    def _load(self) -> None:
        if self.state_path is None:
            return
        try:
            data = json.loads(read_regular(self.state_path).decode("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as err:
            log.warning("quality: cannot read the sampling state %s (%s); starting a new pass", self.state_path, err)
            return
        if isinstance(data, dict) and data.get("version") == STATE_VERSION:
            covered = data.get("covered")
            passes = data.get("passes")
            if isinstance(covered, list) and all(isinstance(k, str) for k in covered):
                self.covered = set(covered)
            if isinstance(passes, int) and passes >= 0:
                self.passes = passes

    def save(self) -> None:
        """Write the cursor to the state file (atomically); no-op without one. Raises OSError."""
        if not self.state_path:
            return
        with self._lock:
            data = {"version": STATE_VERSION, "passes": self.passes, "covered": sorted(self.covered)}
        write_atomically(self.state_path, (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8"))


# -- the review queue -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueItem:
    id: str
    audio: str
    transcript: str
    language: str
    duration: Optional[float]
    duration_band: str
    sampled_at: float
    # The language the server identified (the request named none); None when the client named it
    # or the source cannot tell (a log line): language identification counts only identified ones.
    detected: Optional[str] = None

    def to_json(self) -> str:
        obj = {"id": self.id, "audio": self.audio, "transcript": self.transcript, "language": self.language,
               "duration": self.duration, "duration_band": self.duration_band, "sampled_at": self.sampled_at}
        if self.detected is not None:
            obj["detected"] = self.detected
        return json.dumps(obj, ensure_ascii=False)


def item_id(audio: str, transcript: str) -> str:
    """A stable id for a production sample: the same request logged twice is one item."""
    return hashlib.sha256(f"{audio}\0{transcript}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ReviewQueue:
    """The review queue file. One object per file in the process (`review_queue()`), shared by
    the log collector (which appends) and the quality collector (which removes scored items).

    It holds what users said: a 0600 file (never followed through a link) in a 0700 folder,
    which is created so and, when the exporter's user owns it, tightened (private_files)."""

    def __init__(self, path: str, max_items: int):
        self.path = path
        self.max_items = max_items
        self._lock = threading.Lock()
        self.added_total = 0
        self.dropped: dict[str, int] = {"full": 0, "duplicate": 0, "write_error": 0}
        self._ids: set[str] = set()
        self._sampled: dict[str, float] = {}  # id -> sampled_at, for the pending metrics without a read
        self._warnings = RateLimitedLog(log)
        with self._lock:
            try:
                private_dir(os.path.dirname(os.path.abspath(path)), own=False)
                self._sync()
            except OSError as err:  # counted as write errors from the first append on
                log.warning("review queue %s: %s; samples will be dropped until it is fixed", path,
                            err.strerror or err)

    def _sync(self) -> list[QueueItem]:
        items, _problems = self._read()
        self._ids = {i.id for i in items}
        self._sampled = {i.id: i.sampled_at for i in items}
        return items

    def _read(self) -> tuple[list[QueueItem], list[Problem]]:
        try:
            data = read_private(self.path, MAX_FILE_BYTES)
        except FileNotFoundError:
            return [], []
        items, problems = [], []
        for number, obj in jsonl_records(data):
            if isinstance(obj, Problem):
                problems.append(Problem(number, "not a queue item"))
                continue
            try:
                items.append(QueueItem(
                    id=str(obj["id"]), audio=str(obj.get("audio", "")), transcript=str(obj["transcript"]),
                    language=str(obj.get("language") or "unknown"),
                    duration=obj.get("duration") if isinstance(obj.get("duration"), (int, float)) else None,
                    duration_band=str(obj.get("duration_band") or "unknown"),
                    sampled_at=float(obj.get("sampled_at") or 0.0),
                    detected=str(obj["detected"]) if obj.get("detected") else None))
            except (ValueError, KeyError, TypeError, AttributeError):
                problems.append(Problem(number, "not a queue item"))
        return items, problems

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> list[QueueItem]:
        """What the file holds now (re-read: a person may have edited it); none when it cannot be
        read (a link in its place, a FIFO: logged once a minute per kind)."""
        with self._lock:
            try:
                return self._sync()
            except OSError as err:
                self._warnings.warn(f"read-{error_kind(err)}", "review queue %s: cannot read it (%s)", self.path,
                                    err.strerror or err)
                return []

    def add(self, item: QueueItem) -> bool:
        """Append `item`; False (and counted) when the queue is full, holds it already, or the
        file cannot be written. Never raises."""
        with self._lock:
            if item.id in self._ids:
                self.dropped["duplicate"] += 1
                return False
            if len(self._ids) >= self.max_items:
                self.dropped["full"] += 1
                return False
            try:
                append_line(self.path, (item.to_json() + "\n").encode("utf-8", "replace"))
            except OSError as err:
                self.dropped["write_error"] += 1
                self._warnings.warn(error_kind(err), "review queue %s: cannot append (%s); samples are dropped "
                                    "(counted; logged once a minute per kind)", self.path, err.strerror or err)
                return False
            self._ids.add(item.id)
            self._sampled[item.id] = item.sampled_at
            self.added_total += 1
            return True

    def remove(self, ids: Iterable[str]) -> int:
        """Take these items off the queue (rewriting the file); how many were there."""
        gone = set(ids)
        if not gone:
            return 0
        with self._lock:
            try:
                lines = read_private(self.path, MAX_FILE_BYTES).split(b"\n")
            except FileNotFoundError:
                self._ids, self._sampled = set(), {}
                return 0
            kept, removed = [], 0
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    line_id = str(json.loads(raw.decode("utf-8"))["id"])
                except (ValueError, KeyError, TypeError):
                    line_id = None
                if line_id in gone:
                    removed += 1
                    continue
                kept.append(raw.decode("utf-8", "replace"))
            write_atomically(self.path, "".join(line + "\n" for line in kept).encode("utf-8", "replace"))
            self._sync()
            return removed

    def pending(self, reviewed: Iterable[str]) -> tuple[int, Optional[float]]:
        """(items waiting that are not in `reviewed`, the oldest one's sampled_at or None), from
        memory: a scrape reads no file."""
        done = set(reviewed)
        with self._lock:
            times = [t for ident, t in self._sampled.items() if ident not in done]
        return len(times), (min(times) if times else None)

    def stats(self) -> tuple[int, int, dict[str, int]]:
        """(items waiting, added in total, dropped by reason), for the metrics."""
        with self._lock:
            return len(self._ids), self.added_total, dict(self.dropped)


# -- production sampling ---------------------------------------------------------------------


class ProductionSampler:
    """Systematic sampling per (language, duration band) cell into a ReviewQueue."""

    MAX_CELLS = 4096  # languages are bounded label values and bands are few; this is a backstop

    def __init__(self, queue: ReviewQueue, fraction: float, clock=time.time):
        self.queue = queue
        self.fraction = Fraction(fraction).limit_denominator(1_000_000)
        self._num, self._den = self.fraction.numerator, self.fraction.denominator
        self._clock = clock
        self._seen: dict[tuple[str, str], int] = {}
        self._drawn: dict[tuple[str, str], int] = {}
        self.offered_total = 0

    def draw(self, language: Optional[str], duration: Optional[float]) -> Optional[tuple[str, str]]:
        """Count one eligible request in its (language, duration band) cell; the cell when this one
        is drawn (so the sample stays systematic: drawn = ceil(seen x fraction) per cell), else None."""
        if not self._num:
            return None
        band = duration_band(duration)
        cell = (language or "unknown", band)
        seen = self._seen.get(cell)
        if seen is None:
            if len(self._seen) >= self.MAX_CELLS:
                cell = ("other", band)
                seen = self._seen.get(cell, 0)
            else:
                seen = 0
        seen += 1
        self._seen[cell] = seen
        self.offered_total += 1
        drawn = self._drawn.get(cell, 0)
        if drawn * self._den >= seen * self._num:  # drawn >= ceil(seen * fraction): not this one
            return None
        self._drawn[cell] = drawn + 1  # a draw the queue drops still counts as drawn: the sample stays systematic
        return cell

    def queue_item(self, cell: tuple[str, str], audio: str, transcript: str, duration: Optional[float],
                   detected: Optional[str] = None) -> bool:
        """Add a drawn request to the review queue; False when the queue dropped it (counted there).
        `detected`: the language the server identified, when the request named none."""
        return self.queue.add(QueueItem(
            id=item_id(audio, transcript), audio=audio, transcript=transcript, language=cell[0],
            duration=duration if duration is not None and math.isfinite(duration) else None,
            duration_band=cell[1], sampled_at=self._clock(), detected=detected))

    def offer(self, audio: str, transcript: str, language: Optional[str], duration: Optional[float]) -> bool:
        """One logged request with its audio path and transcript; True when it was queued.

        `language` is the log collector's bounded label (a code, "other" or "unknown"). On the
        log hot path: a few dict operations per request, file I/O only for the drawn ones."""
        if not audio or transcript is None:
            return False
        cell = self.draw(language, duration)
        return cell is not None and self.queue_item(cell, audio, transcript, duration)



# -- the references file ---------------------------------------------------------------------


SOURCES = ("page", "label-studio")  # which tool wrote a verified record


@dataclass(frozen=True)
class VerifiedReference:
    id: str
    reference: str  # "" only when flags is non-empty
    language: Optional[str]  # a correction of the queue item's language, when given
    line: int
    flags: tuple[str, ...] = ()  # a subset of FLAGS, in that order
    reviewer: Optional[str] = None
    seconds: Optional[float] = None  # time the reviewer spent on it
    original: Optional[str] = None  # the server's transcript the reviewer saw
    reviewed_at: Optional[float] = None  # unix seconds
    source: Optional[str] = None  # one of SOURCES
    note: Optional[str] = None


REFERENCE_KEYS = ("id", "reference", "language", "flags", "reviewer", "seconds", "original", "reviewed_at",
                  "source", "note")


def _number(value: object) -> Optional[float]:
    """A finite number of 0 or more, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _reference(number: int, obj: dict) -> "VerifiedReference | Problem":
    """One line of the references file, or why it cannot be used."""
    unknown = [k for k in obj if k not in REFERENCE_KEYS]
    if unknown:
        return Problem(number, f"unknown key {unknown[0]!r} (known: {', '.join(REFERENCE_KEYS)})")
    ident, reference = obj.get("id"), obj.get("reference")
    if not isinstance(ident, str) or not ident.strip():
        return Problem(number, "no id")
    flags = obj.get("flags")
    if flags is None:
        flags = []
    if not isinstance(flags, list) or not all(isinstance(f, str) and f in FLAGS for f in flags):
        return Problem(number, f"flags must be a list of {', '.join(FLAGS)}")
    if not isinstance(reference, str) or (not reference.strip() and not flags):
        return Problem(number, "empty reference")
    language = None
    if obj.get("language") not in (None, ""):
        language = language_code(obj["language"]) if isinstance(obj["language"], str) else None
        if language is None:
            return Problem(number, f"unknown language {obj['language']!r}")
    for key in ("reviewer", "original", "note"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return Problem(number, f"{key} must be a string")
    for key in ("seconds", "reviewed_at"):
        if obj.get(key) is not None and _number(obj[key]) is None:
            return Problem(number, f"{key} must be a number of 0 or more")
    if obj.get("source") is not None and obj["source"] not in SOURCES:
        return Problem(number, f"source must be one of {', '.join(SOURCES)}")
    return VerifiedReference(
        ident.strip(), reference, language, number, flags=tuple(f for f in FLAGS if f in flags),
        reviewer=obj.get("reviewer"), seconds=_number(obj.get("seconds")), original=obj.get("original"),
        reviewed_at=_number(obj.get("reviewed_at")), source=obj.get("source"), note=obj.get("note"))


def load_references(path: str) -> tuple[dict[str, VerifiedReference], list[Problem]]:
    """The reviewers' file: id -> verified reference, and the lines skipped (a later line for
    the same id wins). A missing file is no references yet."""
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return {}, []
    refs: dict[str, VerifiedReference] = {}
    problems: list[Problem] = []
    for number, obj in jsonl_records(data):
        if isinstance(obj, Problem):
            problems.append(Problem(number, "not a JSON object"))
            continue
        ref = _reference(number, obj)
        if isinstance(ref, Problem):
            problems.append(ref)
        else:
            refs[ref.id] = ref
    return refs, problems


def append_reference(path: str, ident: str, reference: str, language: Optional[str] = None,
                     note: Optional[str] = None, *, flags: Sequence[str] = (), reviewer: Optional[str] = None,
                     seconds: Optional[float] = None, original: Optional[str] = None,
                     reviewed_at: Optional[float] = None, source: Optional[str] = None) -> None:
    """Add a verified reference to the references file as one whole line: the file is 0600 (it
    holds what users said), never followed through a link, in a 0700 folder (private_files). The
    one writer of the file in the exporter (the review page and `review import` write through it).
    Raises OSError, and ValueError for an empty id, an empty reference without flags, an unknown
    flag or source."""
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ValueError(f"unknown flag {unknown[0]!r} (known: {', '.join(FLAGS)})")
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    if not ident.strip() or (not reference.strip() and not flags):
        raise ValueError("a verified reference needs an id and a reference (or a flag)")
    obj: dict[str, object] = {"id": ident.strip(), "reference": reference}
    if language:
        obj["language"] = language
    if flags:
        obj["flags"] = [f for f in FLAGS if f in flags]
    optional = {"reviewer": reviewer, "seconds": seconds, "original": original, "reviewed_at": reviewed_at,
                "source": source, "note": note}
    obj.update({k: v for k, v in optional.items() if v is not None and v != ""})
    private_dir(os.path.dirname(os.path.abspath(path)), own=False)
    append_line(path, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "replace"))


# -- audio kept by the tap -------------------------------------------------------------------


class AudioKeeper:
    """Production audio the tap keeps for review, under privacy bounds: a directory of its own
    (mode 0700, files 0600: the exporter's user alone reads them), at most `max_files` files and
    `max_bytes` bytes, none older than `retention` seconds. Drops are counted by reason.

    A file is written under a temporary name in the folder and renamed into place when whole,
    so a full disk leaves no empty or partial file behind (they counted against max_files and
    were in no queue line). Names are unique (uuid4): `id()` of a record is reused once it is
    freed, and 80 of 200 samples collided."""

    TMP_PREFIX = ".tmp-"

    def __init__(self, folder: str, max_files: int, max_bytes: int, retention: float, clock=time.time):
        self.folder = folder
        self.max_files, self.max_bytes, self.retention = max_files, max_bytes, retention
        self._clock = clock
        self._lock = threading.Lock()
        self.kept_total = 0
        self.dropped: dict[str, int] = {"full": 0, "write_error": 0}
        self._warnings = RateLimitedLog(log)
        private_dir(folder, own=True)  # an existing folder too: review audio is users' speech
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files a crash left mid-write: never renamed, so in no queue line."""
        gone = 0
        with os.scandir(self.folder) as entries:
            for e in entries:
                if e.name.startswith(self.TMP_PREFIX) and e.is_file(follow_symlinks=False):
                    try:
                        os.unlink(e.path)
                        gone += 1
                    except OSError:
                        pass
        if gone:
            log.warning("tap sampling: removed %d partial files a previous run left in %s", gone, self.folder)

    def _files(self) -> list[tuple[float, int, str]]:
        out = []
        with os.scandir(self.folder) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and not e.name.startswith(self.TMP_PREFIX):
                    st = e.stat(follow_symlinks=False)
                    out.append((st.st_mtime, st.st_size, e.path))
        return sorted(out)

    def expire(self) -> int:
        """Delete files past the retention limit; how many went."""
        cutoff = self._clock() - self.retention
        gone = 0
        with self._lock:
            for mtime, _size, path in self._files():
                if mtime < cutoff:
                    try:
                        os.unlink(path)
                        gone += 1
                    except OSError:
                        pass
        return gone

    def keep(self, source: str, suffix: str = "") -> Optional[str]:
        """Copy the spooled upload at `source` into the folder under a new unique name ending in
        `suffix` (".wav"); its path, or None when a bound is reached or it cannot be written
        (counted, and logged at most once a minute per kind)."""
        self.expire()
        with self._lock:
            target = os.path.join(self.folder, f"tap-{int(self._clock())}-{uuid.uuid4().hex}{suffix}")
            tmp: Optional[str] = None
            try:
                files = self._files()
                size = os.stat(source).st_size
                if len(files) >= self.max_files or sum(f[1] for f in files) + size > self.max_bytes:
                    self.dropped["full"] += 1
                    return None
                tmp = os.path.join(self.folder, f"{self.TMP_PREFIX}{uuid.uuid4().hex}")
                fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.rename(tmp, target)
            except OSError as err:
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                self.dropped["write_error"] += 1
                self._warnings.warn(error_kind(err), "tap sampling: cannot keep an upload in %s (%s); samples are "
                                    "dropped (counted; logged once a minute per kind)", self.folder,
                                    err.strerror or err)
                return None
            self.kept_total += 1
            return target
