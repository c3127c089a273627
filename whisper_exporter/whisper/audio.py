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
from typing import Optional, Union

import mutagen

# The formats the exporter promises; mutagen reads more.
SUPPORTED = ("wav", "flac", "mp3", "ogg", "opus")


class AudioError(Exception):
    """The file cannot be read or its duration cannot be told from its header."""


def duration_seconds(source: Union[str, os.PathLike, bytes], name: Optional[str] = None) -> float:
    """Length of the audio (a path, or the file's bytes) in seconds, from its header.
    Raises AudioError, naming `name` (default: the path)."""
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            audio = mutagen.File(io.BytesIO(source))
        else:
            with open(source, "rb") as handle:
                audio = mutagen.File(handle)
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except OSError as err:
        raise AudioError(f"{name}: cannot read ({err.strerror or err})") from None
    except mutagen.MutagenError as err:
        raise AudioError(f"{name}: not a readable audio file ({err})") from None
    if audio is None or getattr(audio, "info", None) is None:
        raise AudioError(f"{name}: unknown audio format (supported: {', '.join(SUPPORTED)})")
    length = getattr(audio.info, "length", None)
    if not isinstance(length, (int, float)) or length <= 0:
        raise AudioError(f"{name}: the header gives no duration")
    return float(length)
