"""Audio durations read from file headers (mutagen), on files made here.

WAV, FLAC and Ogg Vorbis come from sox; sox here has no MP3 writer, so MP3 and
Ogg Opus are encoded with PyAV (libmp3lame, libopus), which faster-whisper
brings in with the test extras.
"""
import subprocess

import pytest
from helpers import require_tool

from whisper_exporter.whisper import audio
from whisper_exporter.whisper.audio import AudioError, duration_seconds

SECONDS = 2.5


@pytest.fixture(scope="module")
def tone(tmp_path_factory):
    require_tool("sox")
    folder = tmp_path_factory.mktemp("audio")
    wav = folder / "tone.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(wav), "synth", str(SECONDS), "sine", "440"],
                   check=True)
    return wav


def _sox(src, dst):
    subprocess.run(["sox", str(src), str(dst)], check=True)
    return dst


def _pyav(src, dst, codec, container, rate):
    import av  # PyAV, installed with faster-whisper (pip install -e '.[test]'): missing, the test fails
    inp, out = av.open(str(src)), av.open(str(dst), "w", format=container)
    stream = out.add_stream(codec, rate=rate, layout="mono")
    resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
    fifo, size = av.AudioFifo(), stream.codec_context.frame_size or 1024

    def drain(final=False):
        while fifo.samples >= size or (final and fifo.samples):
            for packet in stream.encode(fifo.read(min(size, fifo.samples))):
                out.mux(packet)

    for frame in list(inp.decode(audio=0)) + [None]:
        for resampled in resampler.resample(frame):
            resampled.pts = None
            fifo.write(resampled)
        drain(final=frame is None)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    inp.close()
    return dst


def test_wav(tone):
    assert duration_seconds(tone) == pytest.approx(SECONDS, abs=1e-3)


def test_flac(tone, tmp_path):
    assert duration_seconds(_sox(tone, tmp_path / "t.flac")) == pytest.approx(SECONDS, abs=1e-3)


def test_ogg_vorbis(tone, tmp_path):
    assert duration_seconds(_sox(tone, tmp_path / "t.ogg")) == pytest.approx(SECONDS, abs=1e-3)


def test_ogg_opus(tone, tmp_path):
    assert duration_seconds(_pyav(tone, tmp_path / "t.opus", "libopus", "ogg", 48000)) == pytest.approx(SECONDS, abs=0.01)


def test_mp3(tone, tmp_path):
    # MP3 comes in whole frames (576 samples at 16 kHz = 36 ms) plus the encoder's padding.
    assert duration_seconds(_pyav(tone, tmp_path / "t.mp3", "libmp3lame", "mp3", 16000)) == pytest.approx(SECONDS, abs=0.12)


def test_bytes_and_path_agree(tone):
    assert duration_seconds(tone.read_bytes(), name=str(tone)) == duration_seconds(tone)


def test_bundled_canary_is_a_few_seconds_of_16k_mono():
    from importlib import resources

    path = resources.files("whisper_exporter") / "canary" / "en.wav"
    import wave

    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels()) == (16000, 1)
    assert 3.0 <= duration_seconds(str(path)) <= 6.0


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.wav", None, "no such file"),
        ("empty.wav", b"", "not a readable audio file"),
        ("empty.bin", b"", "unknown audio format"),
        ("page.bin", b"<html><body>not audio</body></html>", "unknown audio format"),
        ("page.wav", b"<html><body>not audio</body></html>", "not a readable audio file"),
        ("cut.wav", b"RIFF\x24\x00\x00\x00WAVEjunk", "not a readable audio file"),
    ],
)
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError) as info:
        duration_seconds(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_supported_formats_are_named():
    assert set(audio.SUPPORTED) >= {"wav", "flac", "mp3", "ogg"}


def test_test_speech_is_the_same_every_run(tmp_path):
    # sox dithers at random when it resamples to 16 bits unless told -R: the real-server tests'
    # audio, and so tiny.en's borderline answers, changed from run to run.
    from whisper_server import make_speech

    first = make_speech("Le train pour Lyon part à neuf heures.", tmp_path / "a.wav", voice="fr")
    second = make_speech("Le train pour Lyon part à neuf heures.", tmp_path / "b.wav", voice="fr")
    assert first.read_bytes() == second.read_bytes()
