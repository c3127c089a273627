#!/bin/sh
# Regenerate the bundled negative canaries: non-speech audio whose expected transcript is "".
# 4 s, 16 kHz, mono, 16-bit WAV. `sox -R` seeds the noise generator, so the noise file is
# the same on every run. Whisper (tiny.en, temperature 0) answers each with text:
#   silence.wav  digital silence               -> "You"
#   noise.wav    brown noise at -10 dBFS-ish   -> "You"
#   tone.wav     a steady 440 Hz sine          -> "beep beep beep ..."
# Usage: sh whisper_exporter/canary/make_negative.sh   (needs sox)
set -eu
cd "$(dirname "$0")"
FORMAT="-R -r 16000 -c 1 -b 16"
sox $FORMAT -n silence.wav trim 0 4
sox $FORMAT -n noise.wav synth 4 brownnoise vol 0.3
sox $FORMAT -n tone.wav synth 4 sine 440 vol 0.5
for name in silence noise tone; do
  : > "$name.txt"  # the expected transcript: nothing
done
