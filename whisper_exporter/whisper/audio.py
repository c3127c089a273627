"""Audio duration from the file's own header, for real-time factors.

Read by mutagen (pure Python, no native library, no decoding): WAV (RIFF
header), FLAC (STREAMINFO sample count), MP3 (Xing/Info or VBRI frame count,
else the bitrate and file size of a constant-bitrate stream), Ogg Vorbis and
Ogg Opus (last granule position), and anything else mutagen knows (M4A, AIFF,
WavPack ...). soundfile would need libsndfile, and MP3 only from its 1.1; we
only need the length, which mutagen reads without decoding a sample.
"""
from __future__ import annotations

import io
import os
import re
import stat
from typing import Any, BinaryIO, Optional, Union

import mutagen  # the package alone is small; its format modules are imported as needed (_kinds)

# The formats the exporter promises; mutagen reads more.
SUPPORTED = ("wav", "flac", "mp3", "ogg", "opus")
# Audio sent to the server is read whole; a canary or reference item is seconds to minutes long
# (an hour of 16 kHz 16-bit mono WAV is 115 MB). A 3 GB (sparse) file or /dev/zero is refused.
MAX_AUDIO_BYTES = 256 * 1024 * 1024


class AudioError(Exception):
    """The file cannot be read or its duration cannot be told from its header."""


def open_regular(path: Union[str, os.PathLike], name: Optional[str] = None) -> BinaryIO:
    """`path` opened for reading, if it is a regular file of at most MAX_AUDIO_BYTES. The open
    never blocks (a FIFO would hang it). Raises AudioError naming `name` (default: the path)."""
    name = os.fspath(path) if name is None else name
    try:
        # The opener adds O_NONBLOCK; open() keeps the name, from which mutagen guesses the format.
        handle = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except OSError as err:
        raise AudioError(f"{name}: cannot read ({err.strerror or err})") from None
    fd = handle.fileno()
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        handle.close()
        raise AudioError(f"{name}: not a regular file (a device, FIFO or directory)")
    if st.st_size > MAX_AUDIO_BYTES:
        handle.close()
        raise AudioError(f"{name}: larger than {MAX_AUDIO_BYTES // (1024 * 1024)} MiB")
    os.set_blocking(fd, True)
    return handle


def read_audio(path: Union[str, os.PathLike], name: Optional[str] = None) -> bytes:
    """The bytes of the audio file at `path` (see open_regular). Raises AudioError."""
    with open_regular(path, name) as handle:
        try:
            return handle.read(MAX_AUDIO_BYTES + 1)[:MAX_AUDIO_BYTES]
        except OSError as err:
            raise AudioError(f"{name or os.fspath(path)}: cannot read ({err.strerror or err})") from None


def _reason(err: Exception) -> str:
    """mutagen's message when it is a plain sentence; never bytes from the file."""
    text = str(err)
    if len(text) <= 100 and re.fullmatch(r"[\w .,:()/=-]*", text):
        return text
    return type(err).__name__


def _kinds(head: bytes) -> Optional[list[Any]]:
    """The mutagen formats to try for a file that starts with `head`: WAV alone for a RIFF/WAVE
    header (the canaries, most uploads), else None (every format mutagen knows). mutagen.File
    imports every format module it tries (~1.6 MB); for such a header WAVE is the one it picks."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        from mutagen.wave import WAVE

        return [WAVE]
    return None


def _header(handle: BinaryIO) -> bytes:
    head = handle.read(12)
    handle.seek(0)
    return head


def duration_seconds(source: Union[str, os.PathLike, bytes], name: Optional[str] = None) -> float:
    """Length of the audio (a path, or the file's bytes) in seconds, from its header.
    Raises AudioError, naming `name` (default: the path)."""
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            audio = mutagen.File(io.BytesIO(source), options=_kinds(bytes(source[:12])))
        else:
            with open_regular(source, name) as handle:
                audio = mutagen.File(handle, options=_kinds(_header(handle)))
    except OSError as err:
        raise AudioError(f"{name}: cannot read ({err.strerror or err})") from None
    except mutagen.MutagenError as err:
        raise AudioError(f"{name}: not a readable audio file ({_reason(err)})") from None
    except (MemoryError, RecursionError, ValueError, OverflowError, EOFError) as err:  # a hostile header
        raise AudioError(f"{name}: not a readable audio file ({type(err).__name__})") from None
    if audio is None or getattr(audio, "info", None) is None:
        raise AudioError(f"{name}: unknown audio format (supported: {', '.join(SUPPORTED)})")
    length = getattr(audio.info, "length", None)
    if not isinstance(length, (int, float)) or length <= 0:
        raise AudioError(f"{name}: the header gives no duration")
    return float(length)
