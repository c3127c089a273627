"""The labeled reference set: a manifest of audio, reference transcript, language and strata tags.

Two formats, told apart by the file name (`.jsonl`, `.ndjson`, `.json`: JSON
lines; `.csv`; `.tsv`) or, for any other name, by the first character (`{`
means JSON lines):

    {"id": "en-01", "audio": "audio/en-01.wav", "reference": "The quick brown fox.", "language": "en",
     "duration_band": "short", "audio_quality": "clean", "source": "call-centre"}

    id,audio,reference,language,audio_quality
    en-01,audio/en-01.wav,The quick brown fox.,en,clean

Columns (one name each; the names in brackets are accepted for the same column,
so NeMo, Common Voice and HF-style manifests load as they are):

    audio        required  path of the audio (WAV, FLAC, MP3, OGG); relative paths
                           resolve against the manifest's folder [audio_path, audio_filepath, path, file]
    reference    required  what is said, as it should be transcribed [text, transcript, sentence]
    language     required  Whisper language code (en, de, zh, yue ...) or name (English,
                           Cantonese); zh-yue -> yue, cmn -> zh [lang, locale]
    id           optional  unique name of the item (default: the audio path as written) [utt_id]
    duration     optional  seconds (default: from the audio file's header)
    duration_band, audio_quality, source   optional strata tags [quality -> audio_quality]
    tags         optional  more strata tags: a JSON object, or "key=value;key=value" in CSV

A line that is not usable is reported with its line number and skipped; the
rest of the manifest is loaded: bad JSON, an unknown column, a missing or
unreadable audio file, an empty reference (or one with nothing left after
Whisper's normaliser), a missing or unknown language, a duplicate id. Blank
lines and JSON-lines lines starting with `#` are ignored. `ManifestError` is
for a manifest that cannot be used at all (cannot be read; a CSV header with an
unknown or repeated column).

`duration_band`, when the line does not give one, is derived from the audio's
duration (see DURATION_BANDS), so a sample is stratified by duration even when
the manifest has no tags.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import stat
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from whisper_exporter.whisper import audio as audio_mod
from whisper_exporter.whisper import scoring
from whisper_exporter.whisper.languages import language_code

# Upper bounds (seconds) of the duration bands; the last band is open.
DURATION_BANDS = (5.0, 15.0, 30.0, 60.0)

# canonical column -> accepted names
_ALIASES = {
    "audio": ("audio", "audio_path", "audio_filepath", "path", "file"),
    "reference": ("reference", "text", "transcript", "sentence"),
    "language": ("language", "lang", "locale"),
    "id": ("id", "utt_id"),
    "duration": ("duration",),
    "duration_band": ("duration_band",),
    "audio_quality": ("audio_quality", "quality"),
    "source": ("source",),
    "tags": ("tags",),
}
COLUMN = {name: canonical for canonical, names in _ALIASES.items() for name in names}
STRATA_COLUMNS = ("duration_band", "audio_quality", "source")
KNOWN_COLUMNS = tuple(COLUMN)

MAX_TAG_CHARS = 64
MAX_FILE_BYTES = 512 * 1024 * 1024  # of a manifest, review queue or references file (/dev/zero is none)
_COLUMN_NAME = re.compile(r"[A-Za-z_][\w .-]{0,39}")  # what a header cell looks like; other text is not quoted


class ManifestError(Exception):
    """The manifest cannot be used at all."""


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line of the manifest (the header is line 1 of a CSV)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Item:
    """One usable line of the manifest."""

    id: str
    line: int
    audio: str  # absolute path
    reference: str
    language: str  # Whisper language code
    duration: float  # seconds
    strata: tuple[tuple[str, str], ...] = ()  # sorted (tag, value) pairs, duration_band included

    @property
    def unit(self) -> str:
        return scoring.unit_for(self.language)

    @property
    def cell(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The stratum the item belongs to: its language and all its tags."""
        return (self.language, self.strata)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.strata)


@dataclass
class Manifest:
    path: str
    format: str  # jsonl | csv | tsv
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0  # records read (usable or not), blank and comment lines excluded

    def languages(self) -> list[str]:
        return sorted({i.language for i in self.items})


_BAND_LABELS = tuple(f"{low:g}-{high:g}s" for low, high in zip((0.0,) + DURATION_BANDS, DURATION_BANDS)) + (
    f"{DURATION_BANDS[-1]:g}s+",)


def duration_band(seconds: Optional[float]) -> str:
    """'0-5s', '5-15s', '15-30s', '30-60s', '60s+'; 'unknown' without a duration."""
    if seconds is None or not 0 <= seconds < math.inf:  # NaN fails the comparison too
        return "unknown"
    return _BAND_LABELS[bisect_right(DURATION_BANDS, seconds)]


def detect_format(path: Union[str, os.PathLike], head: bytes = b"") -> str:
    name = os.fspath(path).lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                         (".tsv", "tsv")):
        if name.endswith(suffix):
            return kind
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"


def load(path: Union[str, os.PathLike], format: Optional[str] = None, check_audio: bool = True) -> Manifest:
    """Read the manifest at `path`: its usable items and a Problem for each line skipped.

    Raises ManifestError when the file cannot be read or its CSV header is wrong."""
    path = os.fspath(path)
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory, not a manifest file") from None
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from None
    kind = format or detect_format(path, data[:64])
    if kind not in ("jsonl", "csv", "tsv"):
        raise ManifestError(f"{path}: unknown manifest format {kind!r} (jsonl, csv or tsv)")
    manifest = Manifest(path=path, format=kind)
    base = Path(path).resolve().parent
    records = jsonl_records(data) if kind == "jsonl" else _csv_records(path, data, "\t" if kind == "tsv" else ",")
    seen: dict[str, int] = {}
    for line, record in records:
        manifest.lines += 1
        if isinstance(record, Problem):
            manifest.problems.append(record)
            continue
        try:
            item = _item(line, record, base, check_audio)
        except _Skip as skip:
            manifest.problems.append(Problem(line, str(skip)))
            continue
        if item.id in seen:
            manifest.problems.append(Problem(line, f"duplicate id {item.id!r} (first on line {seen[item.id]})"))
            continue
        seen[item.id] = line
        manifest.items.append(item)
    return manifest


class _Skip(Exception):
    pass


def read_regular(path: Union[str, os.PathLike], limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them. The open never blocks
    (a FIFO); a device, FIFO or directory, or a larger file, raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a device or FIFO)")
        os.set_blocking(fd, True)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def _quoted(name: str) -> str:
    """A header cell for a message: quoted when it looks like a column name. Anything else may be
    the first line of a file that is no manifest at all (/etc/shadow), and is not repeated."""
    return repr(name) if _COLUMN_NAME.fullmatch(name) else "(a cell that is not a column name)"


def jsonl_records(data: bytes) -> Iterator[tuple[int, Union[dict, Problem]]]:
    """(line number, object) for each JSON-object line, or (line number, Problem) for a bad one.
    Blank lines and # comments are skipped; a UTF-8 byte-order mark is ignored."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if not raw or raw.startswith(b"#"):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, Problem(number, "not UTF-8 text")
            continue
        try:
            obj = json.loads(text)
        except ValueError as err:
            yield number, Problem(number, f"not valid JSON ({getattr(err, 'msg', err)})")
            continue
        except RecursionError:  # [[[[... a few thousand deep
            yield number, Problem(number, "JSON nested too deep")
            continue
        if not isinstance(obj, dict):
            yield number, Problem(number, f"a JSON object expected, got {type(obj).__name__}")
            continue
        yield number, obj


def _csv_records(path: str, data: bytes, delimiter: str) -> Iterator[tuple[int, Union[dict, Problem]]]:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: Optional[list[str]] = None
    header_line = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            yield start, Problem(start, f"not valid CSV ({err})")
            continue
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header, header_line = [cell.strip() for cell in row], start
            _check_header(path, header, header_line)
            continue
        if any(_has_surrogates(cell) for cell in row):
            yield start, Problem(start, "not UTF-8 text")
            continue
        if len(row) > len(header):
            yield start, Problem(start, f"{len(row)} fields, the header (line {header_line}) has {len(header)}")
            continue
        yield start, {name: (row[i] if i < len(row) else "") for i, name in enumerate(header)}


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _check_header(path: str, header: list[str], line: int) -> None:
    if any(_has_surrogates(name) for name in header):
        raise ManifestError(f"{path}: line {line}: the header is not UTF-8 text")
    canonical: dict[str, str] = {}
    for name in header:
        if name not in COLUMN:
            raise ManifestError(f"{path}: line {line}: unknown column {_quoted(name)} in the header "
                                f"(known: {', '.join(KNOWN_COLUMNS)})")
        other = canonical.get(COLUMN[name])
        if other is not None:
            raise ManifestError(f"{path}: line {line}: columns {other!r} and {name!r} are the same column")
        canonical[COLUMN[name]] = name
    missing = [c for c in ("audio", "reference", "language") if c not in canonical]
    if missing:
        raise ManifestError(f"{path}: line {line}: the header has no {', '.join(missing)} column "
                            f"(columns: {', '.join(header)})")  # all known names: checked above


def _text(value: Any, column: str, allow_empty: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Skip(f"{column}: a string expected, got {type(value).__name__}")
    return str(value).strip() if not isinstance(value, str) else value


def _tag(value: Any, column: str) -> str:
    text = _text(value, column).strip()
    if len(text) > MAX_TAG_CHARS:
        raise _Skip(f"{column}: a tag of at most {MAX_TAG_CHARS} characters expected")
    return text


def _item(line: int, record: dict, base: Path, check_audio: bool) -> Item:
    values: dict[str, Any] = {}
    written: dict[str, str] = {}
    for name, value in record.items():
        canonical = COLUMN.get(name) if isinstance(name, str) else None
        if canonical is None:
            raise _Skip(f"unknown column {name!r} (known: {', '.join(KNOWN_COLUMNS)})")
        if canonical in written:
            raise _Skip(f"columns {written[canonical]!r} and {name!r} are the same column")
        written[canonical] = name
        values[canonical] = value

    audio_text = _text(values.get("audio"), "audio").strip()
    if not audio_text:
        raise _Skip("no audio path")
    reference = _text(values.get("reference"), "reference")
    if not reference.strip():
        raise _Skip("empty reference")
    raw_language = values.get("language")
    if raw_language is None or (isinstance(raw_language, str) and not raw_language.strip()):
        raise _Skip("no language")
    language = language_code(raw_language) if isinstance(raw_language, str) else None
    if language is None:
        raise _Skip(f"unknown language {raw_language!r} (a Whisper language code such as en, de, zh, yue)")
    if not scoring.units(scoring.normalize(reference, language), scoring.unit_for(language)):
        raise _Skip("empty reference: nothing is left of it after Whisper's text normaliser")

    path = Path(os.path.expanduser(audio_text))
    if not path.is_absolute():
        path = base / path
    duration = _duration(values.get("duration"))
    if check_audio:
        try:
            header_duration = audio_mod.duration_seconds(path, name=audio_text)
        except audio_mod.AudioError as err:
            raise _Skip(f"audio {err}") from None
        if duration is None:
            duration = header_duration

    strata: dict[str, str] = {}
    tags = values.get("tags")
    if tags is not None and tags != "":
        strata.update(_parse_tags(tags))
    for column in STRATA_COLUMNS:
        value = _tag(values.get(column), column)
        if value:
            strata[column] = value
    if "duration_band" not in strata:
        strata["duration_band"] = duration_band(duration)

    item_id = _text(values.get("id"), "id").strip() or audio_text
    return Item(id=item_id, line=line, audio=str(path), reference=reference, language=language,
                duration=duration if duration is not None else 0.0, strata=tuple(sorted(strata.items())))


def _duration(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise _Skip(f"duration: a number of seconds expected, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _Skip(f"duration: a number of seconds expected, got {value!r}")
    return seconds


def _parse_tags(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        out = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            key, sep, tag = part.partition("=")
            if not sep or not key.strip():
                raise _Skip(f"tags: 'key=value;key=value' expected, got {value!r}")
            out[key.strip()] = _tag(tag, f"tags.{key.strip()}")
        return out
    if isinstance(value, dict):
        return {str(k): _tag(v, f"tags.{k}") for k, v in value.items() if v is not None and v != ""}
    raise _Skip(f"tags: an object (or 'key=value;key=value') expected, got {type(value).__name__}")
