"""Make the audio of the labeled test set (refs.jsonl) with espeak-ng and sox.

The references in refs.jsonl were written by hand; the audio is generated from
them, so the repository keeps no audio:

- the voice follows the language (`cmn` for Mandarin, `yue` for Cantonese) and
  the `source` tag (`espeak-f`: the female variant `+f3`);
- the `audio_quality` tag `phone` makes 8 kHz audio (telephone band), `clean`
  16 kHz; both mono 16-bit WAV.

    python tests/data/quality/make_set.py OUT_DIR   # writes OUT_DIR/refs.jsonl and OUT_DIR/audio/*.wav

Tests load this file by path (`load()` below) and call `build(out_dir)`.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "refs.jsonl"
VOICES = {"en": "en-us", "de": "de", "fr": "fr-fr", "es": "es", "zh": "cmn", "yue": "yue"}
RATES = {"clean": 16000, "phone": 8000}


def entries(manifest: Path = MANIFEST) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def speak(text: str, path: Path, voice: str, rate: int) -> Path:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not installed (Debian packages espeak-ng and sox)")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", "-R", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)], check=True,
                   capture_output=True)
    raw.unlink()
    return path


def build(out_dir: Path, manifest: Path = MANIFEST) -> Path:
    """Copy the manifest into `out_dir` and make each entry's audio beside it; returns the copy."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in entries(manifest):
        voice = VOICES[entry["language"]] + ("+f3" if entry.get("source") == "espeak-f" else "")
        speak(entry["reference"], out_dir / entry["audio"], voice, RATES[entry.get("audio_quality", "clean")])
    copy = out_dir / manifest.name
    shutil.copyfile(manifest, copy)
    return copy


def load():
    """This module, imported by path (tests/data is not a package)."""
    spec = importlib.util.spec_from_file_location("quality_make_set", __file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_set.py OUT_DIR")
    print(build(Path(sys.argv[1])))
