"""An upload's audio duration from its header, with the work per upload bounded.

mutagen walks a file's structure one block at a time: `fLaC` followed by empty metadata
blocks (`01 00 00 00` repeated) cost 1.25 s of CPU per MB, and an ID3 tag of a million
tiny frames 1.5 s per MB (issue 22, item 5). Here FLAC's STREAMINFO is read directly (the
spec puts it first), an ID3v2 tag is skipped by its declared size (its frames say nothing
about the length), and mutagen reads everything else through a file that refuses more
than MAX_READS calls, MAX_READ_BYTES bytes or MAX_CPU_SECONDS of the thread's CPU.
"""
from __future__ import annotations

import io
import time
from typing import Any, BinaryIO, Optional

import mutagen

from whisper_exporter.whisper.audio import AudioError

MAX_READS = 10000  # reads and seeks; a real file takes under 100
MAX_READ_BYTES = 1 << 20  # bytes mutagen may read (cover art included)
MAX_CPU_SECONDS = 0.5  # of the worker thread's CPU time, checked at each read


class TooMuchWork(AudioError):
    """The header took more reads, bytes or CPU time than one upload may."""


class _Bounded(io.RawIOBase):
    """A read-only view of `handle` from `start` that counts the work done through it."""

    def __init__(self, handle: BinaryIO, size: int, start: int = 0):
        super().__init__()
        self.handle, self.start, self.size = handle, start, max(0, size - start)
        self.calls, self.bytes = 0, 0
        self.stopped: Optional[str] = None  # what ran out, once it did
        self.t0 = time.thread_time()
        handle.seek(start)

    def _charge(self) -> None:
        self.calls += 1
        if self.calls > MAX_READS:
            self._stop("reads")
        if time.thread_time() - self.t0 > MAX_CPU_SECONDS:
            self._stop("cpu")

    def _stop(self, what: str) -> None:
        self.stopped = what
        raise OSError(f"audio header: too much work ({what})")  # mutagen wraps it; stopped says why

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: Optional[int] = -1) -> bytes:
        self._charge()
        left = max(0, self.size - self.tell())
        n = left if n is None or n < 0 else min(n, left)
        if self.bytes + n > MAX_READ_BYTES:
            self._stop("bytes")
        data = self.handle.read(n)
        self.bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._charge()
        if whence == 0:
            self.handle.seek(self.start + max(0, offset))
        elif whence == 1:
            self.handle.seek(max(self.start, self.handle.tell() + offset))
        else:
            self.handle.seek(max(self.start, self.start + self.size + offset))
        return self.tell()

    def tell(self) -> int:
        return self.handle.tell() - self.start


def flac_seconds(head: bytes) -> float:
    """Duration from a FLAC file's first bytes: STREAMINFO, which must be its first block."""
    if len(head) < 42 or head[4] & 0x7F != 0 or int.from_bytes(head[5:8], "big") < 34:
        raise AudioError("upload: a FLAC file whose first block is not STREAMINFO")
    info = int.from_bytes(head[18:26], "big")  # rate 20 bits, channels 3, bits 5, samples 36
    rate, samples = info >> 44, info & ((1 << 36) - 1)
    if rate == 0 or samples == 0:
        raise AudioError("upload: the FLAC header gives no duration")
    return samples / rate


def id3_size(head: bytes) -> int:
    """Bytes of a leading ID3v2 tag (header, frames, footer), 0 when there is none."""
    if len(head) < 10 or head[:3] != b"ID3" or any(b & 0x80 for b in head[6:10]):
        return 0
    size = 10 + ((head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9])
    return size + (10 if head[5] & 0x10 else 0)  # the footer flag


def upload_seconds(handle: BinaryIO, size: int) -> float:
    """Seconds of audio in the `size` bytes of `handle`. Raises AudioError (TooMuchWork when the
    header asked for more work than an upload may have)."""
    head = handle.read(64)
    if head.startswith(b"fLaC"):
        return flac_seconds(head)
    start = id3_size(head)
    if start >= size:
        raise AudioError("upload: an ID3 tag and no audio")
    bounded = _Bounded(handle, size, start)
    try:
        audio = mutagen.File(bounded)
    except Exception as err:  # mutagen raises its own, OSError, ValueError ... on hostile headers
        if bounded.stopped is not None:
            raise TooMuchWork(f"upload: the audio header took too much work ({bounded.stopped})") from None
        raise AudioError(f"upload: not a readable audio file ({type(err).__name__})") from None
    if audio is None or getattr(audio, "info", None) is None:
        raise AudioError("upload: unknown audio format")
    length = getattr(audio.info, "length", None)
    if not isinstance(length, (int, float)) or length <= 0:
        raise AudioError("upload: the header gives no duration")
    return float(length)
