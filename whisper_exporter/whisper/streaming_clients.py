"""What the streaming APIs share: the timings a streamed canary measures, and real-time pacing.

A streaming client sends the audio as it would be spoken (`pace` 1.0; 2.0 sends
twice as fast; 0 sends it as fast as the connection takes) and reads the
server's events meanwhile, so the times are those a live speaker sees:

- first partial: from the first audio sent to the first partial transcript
  (None when the server sends none: wyoming-faster-whisper answers once);
- finalisation lag: from the end of the audio (audio-stop, commit) to the
  final transcript; 0 when the server finalised before the audio ended;
- end to end: the result's `elapsed`, from connecting to the final transcript.
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Optional

from whisper_exporter.whisper.audio import AudioError


@dataclass(frozen=True)
class StreamTimes:
    """Timings of one streamed utterance, in seconds."""

    pace: float  # audio seconds sent per wall-clock second; 0: unpaced
    audio_seconds: float  # of audio sent
    first_partial: Optional[float] = None
    finalisation_lag: Optional[float] = None
    partials: int = 0  # partial transcripts received


@dataclass(frozen=True)
class Pcm:
    """Raw PCM audio: what a streaming protocol sends in chunks."""

    data: bytes
    rate: int
    width: int  # bytes per sample
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.data) / float(self.rate * self.width * self.channels)

    def chunks(self, samples: int) -> list[tuple[float, bytes]]:
        """The audio cut into chunks of `samples` frames, each with its offset in seconds."""
        step = samples * self.width * self.channels
        return [(i / float(self.rate * self.width * self.channels), self.data[i:i + step])
                for i in range(0, len(self.data), step)]


def read_pcm(data: bytes, name: str = "audio") -> Pcm:
    """The PCM frames and format of a WAV file's bytes. Raises AudioError for anything else:
    the streaming protocols carry raw PCM, and the exporter decodes no compressed formats."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            pcm = Pcm(w.readframes(w.getnframes()), w.getframerate(), w.getsampwidth(), w.getnchannels())
    except (wave.Error, EOFError) as err:
        raise AudioError(f"{name}: a streaming API needs PCM WAV audio ({err})") from None
    if pcm.rate <= 0 or pcm.width not in (1, 2, 3, 4) or pcm.channels <= 0:
        raise AudioError(f"{name}: a streaming API needs PCM WAV audio (rate {pcm.rate}, width {pcm.width})")
    return pcm


def send_time(offset: float, pace: float) -> float:
    """When (seconds after the first chunk) the audio at `offset` seconds is due: real time / pace."""
    return 0.0 if pace <= 0 else offset / pace
