"""The hallucination detector against a real faster-whisper-server (tiny.en, CPU, temperature 0).

Non-speech audio made with sox (silence, noise, tones, chords, beeps, a sweep) must
come back either empty or flagged, with the reason that fits what the model wrote.
Real espeak-ng speech in six languages must not be flagged.

tiny.en is an English-only model: it hears German, French, Spanish, Italian and
Portuguese as English and writes English-sounding text for them. That text is
wrong but it is a transcription of what it heard, and the detector must leave it
alone. For some foreign clips, though, tiny.en does hallucinate in the sense of
issue 13: it loops ("I'm going to say that I'm going to say that ...") or writes
YouTube outros ("Thanks for watching, see you in the next video, ...") that nobody
said. Those are true positives. A simple independent judge (a phrase four times,
or an outro) tells them apart: a plain hallucination must be flagged, anything else
must not be. The speech clips were chosen, from a first run of candidates, among
those tiny.en transcribes plainly; the test requires 15 of the 20 to still be plain,
in all six languages, because tiny.en on CPU is not bit-for-bit repeatable at the
edges even at temperature 0.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import requests

from whisper_exporter.whisper.hallucination import segments_from_answer, suspect

pytest_plugins = ["whisper_server"]
pytestmark = pytest.mark.integration

CANARY = Path(__file__).resolve().parents[1] / "whisper_exporter" / "canary"
FORMAT = ["-r", "16000", "-c", "1", "-b", "16"]  # of the output; -R: repeatable noise

# name -> (sox synthesis arguments after `sox FORMAT -n out.wav`, reasons the answer must carry if it has text)
NON_SPEECH = {
    "silence": (["trim", "0", "5"], {"no_speech"}),
    "white_noise": (["synth", "5", "whitenoise", "vol", "0.3"], {"no_speech"}),
    "pink_noise": (["synth", "5", "pinknoise", "vol", "0.3"], {"no_speech"}),
    "brown_noise": (["synth", "5", "brownnoise", "vol", "0.3"], {"no_speech"}),
    "tone_440": (["synth", "5", "sine", "440", "vol", "0.5"], {"repetition"}),
    "square_220": (["synth", "5", "square", "220", "vol", "0.3"], {"no_speech"}),
    # Chords: one note per channel, then mixed down to mono.
    "chord_c_major": (["synth", "5", "sine", "261.63", "sine", "329.63", "sine", "392"], {"no_speech"}),
    "plucked_chord": (["synth", "5", "pluck", "C4", "pluck", "E4", "pluck", "G4"], {"no_speech"}),
    "sweep": (["synth", "5", "sine", "200-4000", "vol", "0.5"], {"no_speech"}),
    "tremolo": (["synth", "5", "sine", "330", "tremolo", "6", "80", "vol", "0.5"], {"no_speech"}),
}

# tiny.en on CPU (int8, two threads) is not bit-for-bit repeatable on clips at the edge of
# its no-speech threshold: the same chord came back as ". . . . ." in one run and "" in
# another. So each clip's answer, whatever it is, must be empty or flagged; these three
# answered with text in every run so far and must keep doing so, and at least half of
# all clips must answer with text, or the test would prove nothing.
ALWAYS_TEXT = {"silence", "brown_noise", "tone_440"}


def transcribe(server, path: Path) -> dict:
    with open(path, "rb") as f:
        answer = requests.post(server.url + "/v1/audio/transcriptions",
                               files={"file": (path.name, f, "audio/wav")},
                               data={"model": server.model, "model_name": server.model,
                                     "response_format": "verbose_json", "temperature": "0"},
                               timeout=300)
    answer.raise_for_status()
    return answer.json()


def judge(answer: dict, language: str | None = "en") -> tuple[str, ...]:
    return suspect(answer.get("text", ""), language, answer.get("duration"), segments_from_answer(answer))


def sox(path: Path, *args: str) -> Path:
    """Synthesise `path` (16 kHz mono); several waves in `synth` make one channel each, mixed down."""
    waves = sum(1 for a in args if a in ("sine", "pluck", "square", "whitenoise", "pinknoise", "brownnoise"))
    if waves <= 1:
        subprocess.run(["sox", "-R", "-n", *FORMAT, str(path), *args], check=True, capture_output=True)
        return path
    multi = path.with_name(path.stem + ".multi.wav")
    subprocess.run(["sox", "-R", "-n", "-r", "16000", "-c", str(waves), "-b", "16", str(multi), *args],
                   check=True, capture_output=True)
    subprocess.run(["sox", str(multi), *FORMAT, str(path), "vol", "0.5"], check=True, capture_output=True)
    multi.unlink()
    return path


def make_beeps(folder: Path, dither: bool) -> Path:
    """8 beeps: 0.2 s of 1 kHz, then 0.3 s of silence (sox dithers the silence unless told not to)."""
    flags = ["-R"] if dither else ["-R", "-D"]
    one = folder / "one_beep.wav"
    subprocess.run(["sox", *flags, "-n", *FORMAT, str(one), "synth", "0.2", "sine", "1000", "vol", "0.5", "pad", "0", "0.3"],
                   check=True, capture_output=True)
    out = folder / f"beeps{'' if dither else '_undithered'}.wav"
    subprocess.run(["sox", *flags, *[str(one)] * 8, str(out)], check=True, capture_output=True)
    return out


def test_non_speech_answers_with_text_are_flagged_with_the_right_reason(whisper_server, tmp_path):
    with_text, wrong = {}, []
    for name, (args, reasons) in sorted(NON_SPEECH.items()):
        answer = transcribe(whisper_server, sox(tmp_path / f"{name}.wav", *args))
        text, found = answer.get("text", "").strip(), judge(answer)
        if not text:
            if found != () or name in ALWAYS_TEXT:
                wrong.append(f"{name}: empty answer, reasons {found}")
            continue
        with_text[name] = (text, found)
        if not reasons <= set(found):
            wrong.append(f"{name}: {text[:60]!r} -> {found}, expected {sorted(reasons)}")
        if text.lower().strip(" .") == "you" and "known_phrase" not in found:
            wrong.append(f"{name}: 'You' is in the bag: {found}")
    assert not wrong, wrong
    assert len(with_text) >= len(NON_SPEECH) // 2, with_text


def test_beeps_come_back_as_a_loop(whisper_server, tmp_path):
    answer = transcribe(whisper_server, make_beeps(tmp_path, dither=True))
    assert answer["text"].lower().count("beep") >= 5  # "Beep, beep, beep, ..."
    assert "repetition" in judge(answer)


def test_undithered_beeps_come_back_as_an_outro_loop(whisper_server, tmp_path):
    answer = transcribe(whisper_server, make_beeps(tmp_path, dither=False))
    assert "next video" in answer["text"]  # "We'll see you in the next video, see you in the next video, ..."
    assert "repetition" in judge(answer)


@pytest.mark.parametrize("name", ["silence", "noise", "tone"])
def test_bundled_negative_canaries_expect_nothing_and_get_flagged_text(whisper_server, name):
    assert (CANARY / f"{name}.txt").read_text() == ""
    answer = transcribe(whisper_server, CANARY / f"{name}.wav")
    assert answer["text"].strip(), f"the {name} canary no longer makes tiny.en hallucinate: {answer!r}"
    expected = {"silence": "known_phrase", "noise": "known_phrase", "tone": "repetition"}[name]
    assert expected in judge(answer)


# --- false positives: real speech in six languages -----------------------------------

SPEECH = [
    # (voice, text): short (about 1 s) and long (up to 13 s) clips
    ("en", "Yes."),
    ("en", "Please call me back tomorrow."),
    ("en", "The meeting starts at ten in the small room on the second floor."),
    ("en", "Our new office is close to the station, so most of the team now comes to work by train. Parking is "
           "limited, and visitors should book a space a day ahead. Lunch is served in the canteen from noon until "
           "two, and coffee is free all day."),
    ("en", "The weather service expects heavy rain along the coast tomorrow afternoon. Drivers should leave early, "
           "check their tyres and avoid the bridge near the harbour. Schools will stay open, but the evening "
           "football match has been moved to Sunday."),
    ("de", "Guten Tag."),
    ("de", "Heute ist das Wetter gut, die Sonne scheint und es ist warm."),
    ("de", "Das Hotel liegt im Zentrum der Stadt. Mein Name ist Anna und ich wohne in Berlin. Der Computer ist neu "
           "und das Internet ist schnell."),
    ("de", "Heute ist das Wetter gut. Wir trinken Kaffee. Das Hotel liegt im Zentrum. Der Computer ist neu. Guten Tag."),
    ("fr", "Merci beaucoup."),
    ("fr", "Le train pour Lyon part à neuf heures du matin."),
    ("es", "Muchas gracias."),
    ("es", "Me llamo Carlos y vivo en Madrid."),
    ("it", "Grazie mille."),
    ("it", "Ciao Marco, come stai?"),
    ("pt", "Muito obrigado."),
    ("pt", "O hotel fica perto da praia."),
    ("pt", "O meu nome é Pedro e moro em Lisboa."),
    ("pt", "A música brasileira é muito popular."),
    ("pt", "Hoje está sol e vamos à praia com a família."),
]


SIGN_OFFS = {"you", "thank you", "thank you very much", "thanks for watching", "thank you for watching", "bye"}


def obvious_hallucination(text: str) -> bool:
    """An independent, simple judge: a phrase said 4 times or more, an outro, or a bare sign-off."""
    lowered = text.lower()
    fragments = [f.strip() for f in re.split(r"[,.!?;]", lowered) if len(f.split()) >= 2]
    return any(fragments.count(f) >= 4 for f in set(fragments)) or any(
        k in lowered for k in ("for watching", "next video", "this video", "subscribe")) or \
        " ".join(re.findall(r"[a-z']+", lowered)) in SIGN_OFFS


def test_real_speech_is_not_flagged(whisper_server, tmp_path):
    """No false positives; an answer that is plainly a hallucination must be flagged instead.

    tiny.en's own no_speech_prob is above 0.6 on some foreign clips (it is an English
    model); a no_speech flag backed by that is the model's own signal, counted apart
    and allowed on at most three clips.
    """
    from whisper_server import make_speech

    benign, unsure, wrong, seen = [], [], [], []
    for i, (voice, text) in enumerate(SPEECH):
        answer = transcribe(whisper_server, make_speech(text, tmp_path / f"speech{i}.wav", voice=voice))
        said, found = answer["text"].strip(), judge(answer, "en")  # tiny.en answers in English
        seen.append(f"{voice} {text[:25]!r} -> {said[:60]!r} {found}")
        if not said:
            continue
        if obvious_hallucination(said):
            if "repetition" not in found and "known_phrase" not in found:
                wrong.append(f"missed: {voice} {text[:30]!r} -> {said[:80]!r}")
        elif found == ("no_speech",) and voice != "en":
            unsure.append(voice)
        elif found:
            wrong.append(f"false positive: {voice} {text[:30]!r} -> {said[:80]!r}: {found}")
        else:
            benign.append(voice)
    assert not wrong, (wrong, seen)
    assert len(unsure) <= 3, seen
    # Most clips come back as plain transcripts, in English and at least four other languages.
    assert len(benign) >= 12 and "en" in benign and len(set(benign)) >= 5, seen


# Foreign clips on which tiny.en looped or wrote outros in our runs: whatever it answers,
# a plain hallucination must be flagged, and most of them must still hallucinate.
TRUE_POSITIVES = [
    ("de", "Guten Morgen zusammen."),
    ("fr", "Je voudrais un café et un croissant, s'il vous plaît."),
    ("fr", "Paris est une grande ville avec beaucoup de musées."),
    ("es", "La música del concierto fue fantástica."),
    ("pt", "A padaria do bairro abre muito cedo e o cheiro do pão fresco enche a rua inteira. Os vizinhos fazem "
           "fila para comprar bolos, café e sumo de laranja. Ao domingo a loja fecha ao meio dia."),
    ("it", "Il museo della città resterà aperto fino a tardi durante l'estate. I visitatori possono vedere quadri "
           "antichi, statue di marmo e una piccola collezione di monete romane. Il biglietto costa dieci euro."),
]


def test_loops_and_outros_on_foreign_speech_are_flagged(whisper_server, tmp_path):
    from whisper_server import make_speech

    hallucinated, wrong = 0, []
    for i, (voice, text) in enumerate(TRUE_POSITIVES):
        answer = transcribe(whisper_server, make_speech(text, tmp_path / f"tp{i}.wav", voice=voice))
        said, found = answer["text"].strip(), judge(answer, "en")
        if obvious_hallucination(said):
            hallucinated += 1
            if not {"repetition", "known_phrase"} & set(found):
                wrong.append(f"{voice} {text[:30]!r} -> {said[:80]!r}: {found}")
    assert not wrong, wrong
    assert hallucinated >= 3, "tiny.en no longer hallucinates on these clips: the test proves nothing"
