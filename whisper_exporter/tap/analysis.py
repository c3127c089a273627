"""What the tap learns from a copy of the traffic: upload fields, the audio file, the answer.

The upload is parsed as it streams by python-multipart's incremental parser; small
form fields are kept (bounded), the audio file part is spooled: in memory up to
`max_in_memory` bytes, then in a file of its own (mode 0600) in the spool directory.
Nothing here touches the bytes that are forwarded; any failure only ends the analysis.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any, BinaryIO, Optional

import orjson
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

import whisper_exporter.tap.spool as spool_folder
from whisper_exporter.tap.budget import MemoryBudget

# Form fields that carry the audio: OpenAI API and whisper.cpp use `file`,
# whisper-asr-webservice `audio_file`.
AUDIO_FIELDS = frozenset({"file", "audio_file"})
MAX_FIELD_BYTES = 4096  # a form field's value kept (language, model, prompt ...); longer ones are cut
MAX_FIELDS = 64  # form fields kept per request
MAX_HEADER_BYTES = 8192  # of one part's headers
MAX_SEGMENTS = 2000  # verbose_json segments kept on a record
# Parts of one upload analysed; beyond, the analysis stops (counted) and the bytes pass on.
# A real upload has a dozen; a million tiny ones stalled the tap's loop for 14 s (issue 22, item 9).
MAX_PARTS = 256


class Spool:
    """The uploaded file: chunks in memory up to a threshold, then a private file on disk.

    In memory it keeps the received chunks themselves (a list of references: no copy;
    a growing BytesIO cost 20 ms per MB in reallocations and page faults). The bytes in memory
    are taken from the tap's `budget`; when it has none left, the upload goes to disk."""

    def __init__(self, max_in_memory: int, max_bytes: int, spool_dir: Optional[str], suffix: str = "",
                 budget: Optional[MemoryBudget] = None):
        self.max_in_memory = max_in_memory
        self.budget = budget
        self.held = 0  # bytes taken from the budget
        self.max_bytes = max_bytes
        self.spool_dir = spool_dir
        self.suffix = suffix
        self.size = 0
        self.chunks: Optional[list[bytes]] = []
        self.file: Any = None  # the open spool file once on disk
        self.path: Optional[str] = None
        self.too_large = False
        self.failed = False  # the spool file could not be written (logged once per kind, reason "spool")

    def write(self, data: bytes) -> None:
        if self.too_large or self.failed:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self.too_large = True
            self.discard()
            return
        try:
            if self.file is not None:
                self.file.write(data)
                return
            if self.chunks is None:  # discarded
                return
            self.chunks.append(data)
            if self.size <= self.max_in_memory and self.budget is not None:
                if self.budget.take(len(data)):
                    self.held += len(data)
                    return
            if self.size > self.max_in_memory or self.budget is not None:
                # NamedTemporaryFile creates the file 0600 (O_EXCL): only the exporter's user reads uploads.
                self.file = tempfile.NamedTemporaryFile(
                    prefix="whisper-tap-", suffix=self.suffix, dir=self.spool_dir, delete=False)
                self.path = self.file.name
                self.file.writelines(self.chunks)
                self.chunks = None
                self._give_back()
        except OSError as err:  # a read-only or full spool: this upload's analysis ends, counted
            self._fail(err)

    def _give_back(self) -> None:
        if self.budget is not None:
            self.budget.give(self.held)
        self.held = 0

    def _fail(self, err: OSError) -> None:
        self.failed = True
        spool_folder.failed(err, self.spool_dir)
        self.discard()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as err:  # the last buffered bytes did not fit
                self._fail(err)

    def bytes(self) -> Optional[bytes]:
        return None if self.chunks is None else b"".join(self.chunks)

    def reader(self) -> BinaryIO:
        """The spooled bytes as a file to seek in (the caller closes it); empty when discarded."""
        if self.chunks is not None:
            return io.BytesIO(b"".join(self.chunks))
        if self.path is None:
            return io.BytesIO()
        return open(self.path, "rb")

    def to_disk(self) -> Optional[str]:
        """The spool as a file (written out now if it was in memory); None when discarded."""
        if self.path is None and self.chunks is not None:
            try:
                fd, self.path = tempfile.mkstemp(prefix="whisper-tap-", suffix=self.suffix, dir=self.spool_dir)
                with os.fdopen(fd, "wb") as handle:
                    handle.writelines(self.chunks)
                self.chunks = None  # on disk now: the memory goes back to the budget
                self._give_back()
            except OSError as err:
                self._fail(err)
        return self.path

    def discard(self) -> None:
        """Free the memory and delete the spool file."""
        self.chunks = None
        self._give_back()
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # a full spool: its buffered bytes go with the file
                pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:  # FileNotFoundError: moved away by the record's consumer (sampling)
                pass
            self.path = None


# WAV format tags with a constant byte rate, whose duration the bytes themselves give:
# PCM, IEEE float, A-law, mu-law (WAVE_FORMAT_EXTENSIBLE: its subformat's tag decides).
WAV_CONSTANT_RATE = frozenset({0x0001, 0x0003, 0x0006, 0x0007})
WAV_EXTENSIBLE = 0xFFFE
WAV_MAX_CHUNKS = 1000  # chunks walked before the data chunk; beyond, the file is not checked


def wav_received_seconds(handle: BinaryIO, size: int) -> Optional[float]:
    """For a constant-rate WAV of `size` bytes: the seconds its data chunk holds, counting only
    the bytes there are (a header may claim any length). None when not such a WAV."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    pos, block, rate = 12, 0, 0
    for _ in range(WAV_MAX_CHUNKS):
        handle.seek(pos)
        chunk = handle.read(8)
        if len(chunk) < 8:
            return None
        name, length = chunk[:4], int.from_bytes(chunk[4:], "little")
        body = pos + 8
        if name == b"fmt ":
            fmt = handle.read(min(length, 40))
            if len(fmt) < 16:
                return None
            tag = int.from_bytes(fmt[0:2], "little")
            if tag == WAV_EXTENSIBLE and len(fmt) >= 26:
                tag = int.from_bytes(fmt[24:26], "little")  # the subformat GUID starts with the tag
            rate = int.from_bytes(fmt[4:8], "little")
            block = int.from_bytes(fmt[12:14], "little")
            if tag not in WAV_CONSTANT_RATE or rate <= 0 or block <= 0:
                return None
        elif name == b"data":
            if not rate:
                return None  # data before fmt: not a WAV we can read
            declared = length if head[:4] == b"RIFF" else size  # RF64 keeps the length elsewhere
            held = max(0, min(declared, size - body))
            return (held // block) / rate
        pos = body + length + (length & 1)  # chunks are padded to even lengths
    return None


def boundary_of(content_type: str) -> Optional[bytes]:
    """The multipart boundary from a Content-Type header, or None when not multipart/form-data."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


class UploadAnalyzer:
    """Feeds a copy of a multipart upload to python-multipart; keeps fields and spools the audio."""

    def __init__(self, boundary: bytes, max_in_memory: int, max_bytes: int, spool_dir: Optional[str],
                 budget: Optional[MemoryBudget] = None):
        self.fields: dict[str, str] = {}  # the first value of each form field (not files)
        self.order: list[str] = []  # every part's name, in order (bounded)
        self.spool: Optional[Spool] = None
        self.filename: Optional[str] = None
        self.error: Optional[str] = None  # why the analysis stopped (multipart, too_large ...)
        self.complete = False
        self._limits = (max_in_memory, max_bytes, spool_dir)
        self._budget = budget
        self.parts = 0  # parts begun, up to MAX_PARTS + 1
        self._headers: dict[str, str] = {}
        self._header_size = 0
        self._name = b""
        self._value = b""
        self._target: Optional[str] = None  # "field" | "file" | None (skipped part)
        self._field = bytearray()
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self.parser: Optional[MultipartParser] = None
        try:
            self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except (ValueError, FormParserError):  # a boundary over python-multipart's 256 bytes (RFC 2046: 70)
            self.error = "multipart"  # counted; the request is proxied all the same

    def feed(self, chunk: bytes) -> None:
        if self.error is not None or self.complete or self.parser is None:
            return
        try:
            self.parser.write(chunk)
        except _TooManyParts:  # raised by a callback: the rest of the chunk is not parsed
            self.fail("too_many_parts")
        except FormParserError:
            self.fail("multipart")
        except Exception:  # a bug of ours: the request goes on all the same
            self.fail("internal")

    def finish(self) -> None:
        """The body ended: an upload without its closing boundary is malformed."""
        if self.error is None and not self.complete:
            self.fail("multipart")
        if self.spool is not None:
            self.spool.close()
            if self.spool.failed and self.error is None:
                self.error = spool_folder.REASON

    def fail(self, reason: str) -> None:
        self.error = reason
        if self.spool is not None:
            self.spool.discard()

    # python-multipart callbacks

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _TooManyParts()
        self._headers = {}
        self._header_size = 0
        self._name = self._value = b""
        self._target = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]
        self._header_size += end - start

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._header_size += end - start

    def _header_end(self) -> None:
        if self._header_size <= MAX_HEADER_BYTES:
            self._headers[self._name.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._name = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if len(self.order) < MAX_FIELDS:
            self.order.append(name)
        if filename is not None and name in AUDIO_FIELDS and self.spool is None:
            self.filename = filename.decode("utf-8", "replace")
            suffix = os.path.splitext(os.path.basename(self.filename))[1][:10]
            self.spool = Spool(*self._limits, suffix=suffix if suffix.isascii() else "", budget=self._budget)
            self._target = "file"
        elif filename is None and len(self.fields) < MAX_FIELDS:
            self._target = "field"
            self._name = name.encode()
            self._field = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file" and self.spool is not None:
            self.spool.write(data[start:end])
            if self.spool.too_large:
                self.error = "too_large"
                self._target = None
            elif self.spool.failed:
                self.error = spool_folder.REASON
                self._target = None
        elif self._target == "field" and len(self._field) < MAX_FIELD_BYTES:
            self._field += data[start:min(end, start + MAX_FIELD_BYTES - len(self._field))]

    def _part_end(self) -> None:
        if self._target == "field":
            self.fields.setdefault(self._name.decode(), self._field.decode("utf-8", "replace"))
        self._target = None

    def _end(self) -> None:
        self.complete = True


class _TooManyParts(Exception):
    """More than MAX_PARTS parts: python-multipart stops where the callback raised."""


class Capture:
    """The first `limit` bytes of an answer, for its transcript; beyond, the capture is dropped."""

    __slots__ = ("limit", "chunks", "size", "overflow")

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.chunks = []
        else:
            self.chunks.append(chunk)

    def value(self) -> Optional[bytes]:
        return None if self.overflow else b"".join(self.chunks)


class Answer:
    """What an answer says: its transcript, language, audio duration and segments."""

    __slots__ = ("text", "language", "duration", "segments")

    def __init__(self) -> None:
        self.text: Optional[str] = None
        self.language: Optional[str] = None
        self.duration: Optional[float] = None
        self.segments: Optional[list[dict[str, Any]]] = None


def read_answer(body: bytes, content_type: str) -> Answer:
    """Parse an answer body: JSON (json, verbose_json), plain text, or server-sent events.
    Raises ValueError when the body is not what its type says."""
    kind = content_type.split(";", 1)[0].strip().lower()
    answer = Answer()
    if kind == "application/json":
        _from_json(answer, orjson.loads(body))
    elif kind == "text/event-stream":
        _from_events(answer, body)
    elif kind == "text/plain":
        answer.text = body.decode("utf-8", "replace")
    return answer


def _from_json(answer: Answer, obj: Any) -> None:
    if not isinstance(obj, dict):
        return
    text = obj.get("text")
    if isinstance(text, str):
        answer.text = text
    language = obj.get("language")
    if isinstance(language, str):
        answer.language = language
    duration = obj.get("duration")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and duration > 0:
        answer.duration = float(duration)
    segments = obj.get("segments")
    if isinstance(segments, list):
        answer.segments = [s for s in segments[:MAX_SEGMENTS] if isinstance(s, dict)]


def _from_events(answer: Answer, body: bytes) -> None:
    """OpenAI streaming (transcript.text.delta / .done events) or a stream of JSON segments
    (speaches: each event a json/verbose_json body); the text is the done event's, else the
    deltas or segments joined."""
    pieces: list[str] = []
    done: Optional[str] = None
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "transcript.text.delta" and isinstance(event.get("delta"), str):
            pieces.append(event["delta"])
        elif kind == "transcript.text.done" and isinstance(event.get("text"), str):
            done = event["text"]
        elif kind is None:
            part = Answer()
            _from_json(part, event)
            if part.text is not None:
                pieces.append(part.text)
            answer.language = part.language or answer.language
            if part.segments:
                answer.segments = (answer.segments or []) + part.segments
    answer.text = done if done is not None else ("".join(pieces) if pieces else None)
