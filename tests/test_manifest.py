"""Manifest loading: JSON lines and CSV, relative paths, strata tags, and every bad line named."""
import json
import os

import pytest
from helpers import wav

from whisper_exporter.quality import manifest
from whisper_exporter.quality.manifest import ManifestError, duration_band, language_code


def jsonl(path, *records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def clips(tmp_path):
    wav(tmp_path / "audio" / "a.wav", 2.0)
    wav(tmp_path / "audio" / "b.wav", 7.0, rate=8000)
    wav(tmp_path / "audio" / "c.wav", 40.0, rate=8000)
    return tmp_path


def test_jsonl_relative_paths_resolve_against_the_manifest_folder(clips, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "refs.jsonl",
                 {"id": "a", "audio": "audio/a.wav", "reference": "Hello there.", "language": "en",
                  "audio_quality": "clean", "source": "studio"},
                 {"audio": str(tmp_path / "audio" / "b.wav"), "reference": "你好", "language": "zh"})
    monkeypatch.chdir("/")  # not the manifest's folder
    m = manifest.load(path)
    assert m.problems == [] and m.format == "jsonl"
    a, b = m.items
    assert a.audio == str(tmp_path / "audio" / "a.wav") and os.path.isabs(a.audio)
    assert (a.id, a.line, a.language, a.unit) == ("a", 1, "en", "word")
    assert a.duration == pytest.approx(2.0)
    assert a.tags == {"audio_quality": "clean", "source": "studio", "duration_band": "0-5s"}
    assert b.id == str(tmp_path / "audio" / "b.wav")  # no id: the audio path as written
    assert (b.language, b.unit, b.line) == ("zh", "char", 2)
    assert b.tags == {"duration_band": "5-15s"}  # derived from the header: 7 s
    assert a.cell != b.cell


def test_every_broken_line_is_named_and_the_rest_is_loaded(clips, tmp_path):
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF but not really a wav file")
    path = jsonl(
        tmp_path / "refs.jsonl",
        {"id": "good-1", "audio": "audio/a.wav", "reference": "one two", "language": "en"},  # 1
        '{"id": "cut", "audio": "audio/a.wav", "reference": "one',                             # 2
        {"id": "missing", "audio": "audio/nope.wav", "reference": "x y", "language": "en"},   # 3
        {"id": "empty", "audio": "audio/a.wav", "reference": "  ", "language": "en"},          # 4
        {"id": "extra", "audio": "audio/a.wav", "reference": "x", "language": "en", "speaker": "bob"},  # 5
        "",                                                                                    # 6 (blank)
        {"id": "good-2", "audio": "audio/b.wav", "reference": "三 四", "language": "yue"},     # 7
        {"id": "nolang", "audio": "audio/a.wav", "reference": "x"},                           # 8
        {"id": "klingon", "audio": "audio/a.wav", "reference": "x", "language": "tlh"},        # 9
        {"id": "good-1", "audio": "audio/c.wav", "reference": "dup", "language": "en"},        # 10
        {"id": "bad-audio", "audio": "audio/broken.wav", "reference": "x", "language": "en"},  # 11
        "[1, 2]",                                                                              # 12
        {"id": "punct", "audio": "audio/a.wav", "reference": "[inaudible]", "language": "en"},      # 13
        "# a comment",                                                                         # 14
        {"id": "num", "audio": "audio/a.wav", "reference": "x", "language": "en", "duration": "long"},  # 15
    )
    m = manifest.load(path)
    assert [i.id for i in m.items] == ["good-1", "good-2"]
    assert [i.line for i in m.items] == [1, 7]
    problems = {p.line: p.message for p in m.problems}
    assert sorted(problems) == [2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 15]
    assert "not valid JSON" in problems[2]
    assert "audio/nope.wav" in problems[3] and "no such file" in problems[3]
    assert problems[4] == "empty reference"
    assert "unknown column 'speaker'" in problems[5]
    assert problems[8] == "no language"
    assert "unknown language 'tlh'" in problems[9]
    assert "duplicate id 'good-1' (first on line 1)" == problems[10]
    assert "audio/broken.wav" in problems[11]
    assert "JSON object" in problems[12]
    assert "normaliser" in problems[13]
    assert "duration" in problems[15]
    assert str(m.problems[0]) == "line 2: " + problems[2]
    assert m.lines == 13  # records read, blank and comment lines excluded


def test_csv_with_aliases_tags_and_line_numbers(clips, tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text(
        "id,audio_filepath,text,locale,quality,tags\n"
        "a,audio/a.wav,\"Hello, world\",en-US,clean,source=web;speaker=s1\n"
        "\n"
        "b,audio/b.wav,\"a reference\nover two lines\",English,phone,\n"
        "c,audio/missing.wav,x,en,clean,\n"
        "d,audio/c.wav,早晨,Cantonese,phone,\n"
        "e,audio/a.wav,x,en,clean,,surplus\n",
        encoding="utf-8",
    )
    m = manifest.load(path)
    assert m.format == "csv"
    assert [(i.id, i.line, i.language) for i in m.items] == [("a", 2, "en"), ("b", 4, "en"), ("d", 7, "yue")]
    a = m.items[0]
    assert a.reference == "Hello, world"
    assert a.tags == {"audio_quality": "clean", "source": "web", "speaker": "s1", "duration_band": "0-5s"}
    assert m.items[1].reference == "a reference\nover two lines"
    assert m.items[2].tags["duration_band"] == "30-60s" and m.items[2].unit == "char"
    problems = {p.line: p.message for p in m.problems}
    assert sorted(problems) == [6, 8]
    assert "missing.wav" in problems[6]
    assert "7 fields" in problems[8]


@pytest.mark.parametrize("header, expected", [
    ("audio,reference,language,speaker", "unknown column 'speaker'"),
    ("audio,reference", "no language column"),
    ("audio,text,reference,language", "same column"),
])
def test_csv_header_problems_make_the_manifest_unusable(tmp_path, header, expected):
    path = tmp_path / "refs.csv"
    path.write_text(header + "\nx.wav,hello,en,y\n")
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert expected in str(info.value) and "line 1" in str(info.value)


def test_unreadable_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        manifest.load(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="directory"):
        manifest.load(tmp_path)


def test_invalid_utf8_lines_are_named(clips, tmp_path):
    good = json.dumps({"audio": "audio/a.wav", "reference": "ok", "language": "en"}).encode()
    path = tmp_path / "refs.jsonl"
    path.write_bytes(good + b"\n" + b'{"audio": "audio/a.wav", "reference": "\xff", "language": "en"}\n')
    m = manifest.load(path)
    assert len(m.items) == 1 and [(p.line, p.message) for p in m.problems] == [(2, "not UTF-8 text")]
    csv_path = tmp_path / "refs.csv"
    csv_path.write_bytes(b"audio,reference,language\naudio/a.wav,ok,en\naudio/a.wav,\xff\xfe,en\n")
    m = manifest.load(csv_path)
    assert len(m.items) == 1 and [(p.line, p.message) for p in m.problems] == [(3, "not UTF-8 text")]


def test_format_is_sniffed_for_other_names(clips, tmp_path):
    path = jsonl(tmp_path / "refs.txt", {"audio": "audio/a.wav", "reference": "ok", "language": "en"})
    assert manifest.load(path).format == "jsonl"
    path.write_text("audio,reference,language\naudio/a.wav,ok,en\n")
    assert manifest.load(path).format == "csv" and len(manifest.load(path).items) == 1


def test_given_duration_sets_the_band_without_reading_it_from_the_header(clips, tmp_path):
    path = jsonl(tmp_path / "refs.jsonl",
                 {"audio": "audio/a.wav", "reference": "ok", "language": "en", "duration": 75},
                 {"audio": "audio/b.wav", "reference": "ok", "language": "en", "duration_band": "short"})
    a, b = manifest.load(path).items
    assert a.duration == 75 and a.tags["duration_band"] == "60s+"
    assert b.tags["duration_band"] == "short"  # a given band wins


@pytest.mark.parametrize("value, code", [
    ("en", "en"), ("EN", "en"), ("en-GB", "en"), ("English", "en"), ("zh", "zh"), ("cmn", "zh"),
    ("Mandarin", "zh"), ("yue", "yue"), ("zh-yue", "yue"), ("Cantonese", "yue"), ("zh_yue", "yue"),
    ("xx", None), ("", None), (None, None), (3, None),
])
def test_language_codes_keep_cantonese_apart_from_mandarin(value, code):
    assert language_code(value) == code


@pytest.mark.parametrize("seconds, band", [
    (0, "0-5s"), (4.99, "0-5s"), (5, "5-15s"), (29.9, "15-30s"), (30, "30-60s"), (60, "60s+"),
    (3600, "60s+"), (None, "unknown"), (float("nan"), "unknown"),
])
def test_duration_bands(seconds, band):
    assert duration_band(seconds) == band


def test_the_bundled_test_set_loads_cleanly(tmp_path):
    """tests/data/quality/refs.jsonl: 16 lines, six languages, every line usable once its audio is made."""
    from pathlib import Path

    make_set = Path(__file__).parent / "data" / "quality" / "make_set.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_set", make_set)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for entry in module.entries():  # no audio: every line is named for it
        wav(tmp_path / entry["audio"], 1.0)
    copy = tmp_path / "refs.jsonl"
    copy.write_bytes(module.MANIFEST.read_bytes())
    m = manifest.load(copy)
    assert m.problems == []
    assert m.languages() == ["de", "en", "es", "fr", "yue", "zh"]
    assert {i.unit for i in m.items if i.language in ("zh", "yue")} == {"char"}
