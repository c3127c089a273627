"""`whisper-exporter evaluate` against a small loopback server with scripted transcripts: the
per-language table, the worst items, broken manifest lines named, and the exit status of the gate."""
import json
import re

import pytest
from click.testing import CliRunner
from fake_whisper import FakeWhisper
from helpers import wav, write_manifest

from whisper_exporter.cli import main
from whisper_exporter.quality.evaluate import DEFAULT_THRESHOLD, parse_thresholds

# (id, language, reference, what the server answers)
SET = [
    ("en-1", "en", "The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog."),
    ("en-2", "en", "Please call Stella and ask her to bring these things.",
     "Please call Stella now and ask her to bring these things."),               # 1 insertion / 10 words
    ("zh-1", "zh", "你好，今天天气很好。", "你好今天天气不好"),                    # 1 substitution / 8 chars
    ("yue-1", "yue", "早晨，你今日食咗飯未呀？", "早晨你今日食左饭未"),             # 2 S, 1 D / 10 chars
]
# en: 1/19 words; zh: 1/8 chars; yue: 3/10 chars


@pytest.fixture
def server():
    fake = FakeWhisper(answers={f"{ident}.wav": answer for ident, _, _, answer in SET})
    yield fake
    fake.close()


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(tmp_path, (row[:3] for row in SET))


def evaluate(*args):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def test_table_per_language_and_exit_0_within_thresholds(server, manifest):
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "en=0.1,zh=0.125,yue=0.3")
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"^en\s+word\s+2\s+0\s+19\s+0\s+0\s+1\s+0\.0526\s+0\.1\s+0\s+ok$", out, re.M), out
    assert re.search(r"^zh\s+char\s+1\s+0\s+8\s+1\s+0\s+0\s+0\.1250\s+0\.125\s+0\s+ok$", out, re.M), out  # equal passes
    assert re.search(r"^yue\s+char\s+1\s+0\s+10\s+2\s+1\s+0\s+0\.3000\s+0\.3\s+0\s+ok$", out, re.M), out
    assert out.rstrip().endswith("Result: PASS")
    # the worst item first, with its normalised texts
    worst = out.split("Worst")[1]
    assert worst.index("yue-1") < worst.index("zh-1") < worst.index("en-2")
    assert "'早晨 你今日食咗飯未呀'" in worst  # normalised (punctuation -> space; spaces are not units)
    # By default (language: both) each item goes with its language, then once more without it.
    sent = sorted((r.filename, r.language or "") for r in server.requests)
    assert sent == sorted([(f"{i}.wav", lang) for i, lang, *_ in SET] + [(f"{i}.wav", "") for i, *_ in SET])


def test_exit_1_when_a_language_is_over_its_threshold(server, manifest):
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "en=0.1,zh=0.2,yue=0.29")
    assert result.exit_code == 1, result.output
    assert "Result: FAIL: yue: char error rate 0.3000 is above 0.29" in result.output
    assert re.search(r"^yue .* FAIL$", result.output, re.M)


def test_a_bare_number_is_the_threshold_of_every_other_language(server, manifest):
    assert evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.3").exit_code == 0
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.2,yue=0.5")
    assert result.exit_code == 0, result.output
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.1")
    assert result.exit_code == 1 and "zh:" in result.output and "yue:" in result.output


def test_json_report_carries_every_transcript_and_the_counts(server, manifest):
    result = evaluate("--manifest", manifest, "--target", server.url, "--json", "--max-error-rate", "zh=0.1",
                      "--allow-unthresholded")
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # progress lines go to stderr
    assert report["passed"] is False and report["breaches"] == ["zh: char error rate 0.1250 is above 0.1"]
    langs = report["languages"]
    assert {k: (v["unit"], v["reference_units"], v["errors"]) for k, v in langs.items()} == {
        "en": ("word", 19, 1), "yue": ("char", 10, 3), "zh": ("char", 8, 1)}
    assert langs["yue"]["substitutions"] == 2 and langs["yue"]["deletions"] == 1
    assert langs["zh"]["error_rate"] == 1 / 8 and langs["zh"]["threshold"] == 0.1
    items = {i["id"]: i for i in report["items"]}
    assert items["yue-1"]["transcript"] == "早晨你今日食左饭未" and items["yue-1"]["unit"] == "char"
    assert items["en-2"]["reference_normalized"] == "please call stella and ask her to bring these things"
    assert report["worst"][0] == "yue-1"
    assert report["manifest_problems"] == []


def test_broken_lines_are_named_and_the_good_ones_evaluated(server, manifest, tmp_path):
    with open(manifest, "a", encoding="utf-8") as f:
        f.write('{"id": "gone", "audio": "audio/gone.wav", "reference": "x", "language": "en"}\n')  # line 5
        f.write("{oops\n")                                                                           # line 6
        f.write('{"id": "e", "audio": "audio/en-1.wav", "reference": "", "language": "en"}\n')     # line 7
        f.write('{"id": "c", "audio": "audio/en-1.wav", "reference": "x", "language": "en", "mood": 1}\n')  # 8
    # Skipped lines fail the gate unless allowed: a skipped line is an utterance not evaluated.
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.5")
    assert result.exit_code == 1, result.output
    assert "Evaluated 4 utterance(s)" in result.output
    assert "Skipped 4 manifest line(s):" in result.output
    for line, text in ((5, "audio/gone.wav: no such file"), (6, "not valid JSON"), (7, "empty reference"),
                       (8, "unknown column 'mood'")):
        assert re.search(rf"^  line {line}: .*{re.escape(text)}", result.output, re.M), (line, result.output)
    assert "Result: FAIL: 4 of 8 manifest line(s) skipped, more than --max-skipped 0" in result.output
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.5", "--max-skipped", 4)
    assert result.exit_code == 0 and result.output.rstrip().endswith("Result: PASS"), result.output
    report = json.loads(evaluate("--manifest", manifest, "--target", server.url, "--json").stdout)
    assert [p["line"] for p in report["manifest_problems"]] == [5, 6, 7, 8]
    assert len(report["items"]) == 4


def test_utterances_without_a_transcript_fail_the_gate(manifest):
    fake = FakeWhisper(answers={"en-1.wav": 500, "en-2.wav": "please call stella", "zh-1.wav": "你好", "yue-1.wav": "早晨"})
    try:
        result = evaluate("--manifest", manifest, "--target", fake.url)
    finally:
        fake.close()
    assert result.exit_code == 1
    assert "No transcript for 1 item(s):" in result.output and "en-1 (line 1): http_error" in result.output
    assert "1 utterance(s) got no transcript (en-1)" in result.output


def test_thresholds_and_service_from_the_config_file(server, manifest, tmp_path):
    config = tmp_path / "exporter.yml"
    config.write_text(json.dumps({"service": {"url": server.url, "model": "tiny"},
                                  "collectors": {"quality": {"manifest": "refs.jsonl",
                                                             "thresholds": {"default": 0.2, "en": 0.05}}}}))
    result = evaluate("--config", config)  # manifest, target and thresholds all from the file
    assert result.exit_code == 1 and "en: word error rate 0.0526 is above 0.05" in result.output
    assert "yue: char error rate 0.3000 is above 0.2" in result.output
    result = evaluate("--config", config, "--max-error-rate", "0.5")  # the flag wins over the file
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    ([], "--manifest"),
    (["--manifest", "MANIFEST", "--max-error-rate", "en=abc"], "not an error rate"),
    (["--manifest", "MANIFEST", "--max-error-rate", "xx=0.1"], "unknown language 'xx'"),
    (["--manifest", "MANIFEST", "--max-error-rate", "en=-1"], "0 or more"),
    (["--manifest", "MANIFEST", "--target", "ftp://x"], "http"),
    (["--manifest", "NOPE"], "no such file"),
    (["--manifest", "EMPTY"], "no usable line"),
    (["--manifest", "BADCSV"], "unknown column 'speaker'"),
])
def test_bad_usage_exits_2(server, manifest, tmp_path, args, message):
    (tmp_path / "empty.jsonl").write_text('{"audio": "nope.wav", "reference": "x", "language": "en"}\n')
    (tmp_path / "bad.csv").write_text("audio,reference,language,speaker\n")
    swap = {"MANIFEST": manifest, "NOPE": tmp_path / "nope.jsonl", "EMPTY": tmp_path / "empty.jsonl",
            "BADCSV": tmp_path / "bad.csv"}
    result = evaluate(*[swap.get(a, a) for a in args], "--target" if "--target" not in args else "--worst",
                      server.url if "--target" not in args else 3)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert server.requests == []


def test_parse_thresholds():
    assert parse_thresholds("en=0.1, zh=0.15") == {"en": 0.1, "zh": 0.15}
    assert parse_thresholds("0.3,Cantonese=0.2") == {DEFAULT_THRESHOLD: 0.3, "yue": 0.2}
    assert parse_thresholds("*=0.4") == {DEFAULT_THRESHOLD: 0.4}
    for bad in ("", "en=", "en=nan", "en=inf"):
        with pytest.raises(ValueError):
            parse_thresholds(bad)


# -- a gate that cannot pass by accident (issue 14) -------------------------------------------

def test_five_of_six_lines_skipped_is_not_a_pass(server, manifest):
    lines = manifest.read_text(encoding="utf-8").splitlines()[:1]  # en-1, which the server gets right
    lines += ['{"audio": "audio/missing-%d.wav", "reference": "x", "language": "en"}' % i for i in range(5)]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.1")
    assert result.exit_code == 1, result.output
    assert "Result: FAIL: 5 of 6 manifest line(s) skipped, more than --max-skipped 0" in result.output
    # Allowing them is a choice on the command line, and then the gate judges what is left.
    assert evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.1",
                    "--max-skipped", 5).exit_code == 0
    assert evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.1",
                    "--max-skipped", 4).exit_code == 1


def test_a_language_without_a_threshold_is_not_a_pass(manifest, tmp_path):
    wav(tmp_path / "audio" / "de-1.wav")
    manifest.write_text(json.dumps({"id": "de-1", "audio": "audio/de-1.wav", "language": "de",
                                    "reference": "Guten Morgen, wie geht es Ihnen heute?"}) + "\n")
    # Every word wrong, and more: a WER above 1, as the user saw (1.29).
    fake = FakeWhisper(answers={"de-1.wav": "Gute Morgenstunde wo gehts denn hin so heute frueh am Tag"})
    try:
        result = evaluate("--manifest", manifest, "--target", fake.url)
        assert result.exit_code == 1, result.output
        assert re.search(r"^de\s+word\s+1\s+0\s+7\s+.*\s1\.\d{4}\s+-\s+0\s+FAIL$", result.output, re.M), result.output
        assert "Result: FAIL: no threshold for de (give --max-error-rate LANG=RATE" in result.output
        # Reported unjudged, on request:
        result = evaluate("--manifest", manifest, "--target", fake.url, "--allow-unthresholded")
        assert result.exit_code == 0 and re.search(r"-\s+0\s+unjudged$", result.output, re.M), result.output
        # A default threshold judges every language:
        result = evaluate("--manifest", manifest, "--target", fake.url, "--max-error-rate", "0.3")
        assert result.exit_code == 1 and "de: word error rate 1." in result.output
    finally:
        fake.close()


def test_progress_lines_when_stderr_is_not_a_terminal(server, manifest):
    result = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.5")
    progress = [line for line in result.stderr.splitlines() if line.startswith("evaluate:")]
    # Four utterances: a line after each (every 10%, at least one item), the last at 100%.
    assert [line.split()[1:3] for line in progress] == [["25%", "1/4"], ["50%", "2/4"], ["75%", "3/4"],
                                                         ["100%", "4/4"]], result.stderr
    assert "\r" not in result.stderr
    quiet = evaluate("--manifest", manifest, "--target", server.url, "--max-error-rate", "0.5", "--no-progress")
    assert quiet.exit_code == 0 and quiet.stderr == ""
