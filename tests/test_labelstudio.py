"""Label Studio interop (issue 23 part 2): `review export` and `review import` against Label Studio's
own formats. The files in tests/data/labelstudio/ came from a real Label Studio 1.23.2
(make_fixtures.py there): the tasks and labelling config `review export` wrote, which it
accepted, and its two JSON exports after annotating them through its REST API. The round trip
against a running Label Studio is tests/test_labelstudio_real.py."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from whisper_exporter.cli import main
from whisper_exporter.quality import labelstudio
from whisper_exporter.quality.flags import FLAGS
from whisper_exporter.quality.sampling import append_reference, load_references
from whisper_exporter.whisper.languages import WHISPER_LANGUAGES

DATA = Path(__file__).parent / "data" / "labelstudio"


@pytest.fixture
def setup(tmp_path):
    """A configuration naming a copy of the fixture queue and an empty references file."""
    queue = tmp_path / "review" / "queue.jsonl"
    queue.parent.mkdir()
    shutil.copy(DATA / "queue.jsonl", queue)
    config = tmp_path / "exporter.yml"
    config.write_text("collectors:\n  quality:\n    production:\n"
                      "      queue: review/queue.jsonl\n      references: review/verified.jsonl\n")
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def reviewed_at(export: str, task: int, annotation: int) -> float:
    """The annotation's updated_at in the export, as unix seconds (computed apart from the module)."""
    from datetime import datetime

    for t in json.loads((DATA / export).read_text()):
        for a in t["annotations"]:
            if t["id"] == task and a["id"] == annotation:
                return datetime.strptime(a["updated_at"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    raise AssertionError("no such annotation")


# -- export -----------------------------------------------------------------------------------


def test_the_label_config_is_the_one_label_studio_accepted_and_names_what_the_tasks_use():
    xml = labelstudio.label_config()
    assert xml == (DATA / "tasks.json.label-config.xml").read_text()  # what Label Studio validated
    root = ET.fromstring(xml)
    tags = {e.get("name"): e for e in root.iter() if e.get("name")}
    assert tags["audio"].tag == "Audio" and tags["audio"].get("value") == "$audio"
    assert tags["audio"].get("hotkey") is None  # the ASR template's ctrl+enter is also submit
    assert tags["transcription"].tag == "TextArea" and tags["transcription"].get("toName") == "audio"
    language, flags = tags["language"], tags["flags"]
    assert language.tag == flags.tag == "Choices"
    assert language.get("choice") == "single" and flags.get("choice") == "multiple"
    assert [c.get("value") for c in language] == list(WHISPER_LANGUAGES)
    assert [c.get("value") for c in flags] == list(FLAGS)


def test_export_writes_tasks_oldest_first_with_the_transcript_as_a_prediction(setup):
    queue = setup / "review" / "queue.jsonl"
    lines = queue.read_text().splitlines()
    queue.write_text("\n".join(reversed(lines)) + "\n")  # file order is not the order of sampling
    out = setup / "out" / "tasks.json"
    out.parent.mkdir()
    result = run("review", "export", "--format", "label-studio", "--config", str(setup / "exporter.yml"),
                 "--audio-root", "/srv", "--output", str(out))
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())
    assert tasks == json.loads((DATA / "tasks.json").read_text())  # the tasks Label Studio imported
    assert [t["data"]["item_id"] for t in tasks] == [json.loads(line)["id"] for line in lines]
    first = tasks[0]
    assert first["data"]["audio"] == "/data/local-files/?d=uploads/a1.wav"
    assert first["predictions"] == [{"model_version": "whisper-exporter", "result": [
        {"from_name": "transcription", "to_name": "audio", "type": "textarea",
         "value": {"text": ["the quick brown fox jumps over the lazy dog"]}},
        {"from_name": "language", "to_name": "audio", "type": "choices", "value": {"choices": ["en"]}}]}]
    assert tasks[4]["data"]["audio"] == "/data/local-files/?d=uploads/e5%20twice.wav"
    assert (out.parent / "tasks.json.label-config.xml").read_text() == labelstudio.label_config()
    assert out.stat().st_mode & 0o777 == 0o600  # what users said


def test_export_to_stdout_takes_a_url_prefix_and_prints_the_config_alone(setup):
    result = run("review", "export", "--config", str(setup / "exporter.yml"),
                 "--audio-url-prefix", "https://files.example/review/", "--audio-root", "/srv/uploads")
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)
    assert tasks[0]["data"]["audio"] == "https://files.example/review/a1.wav"
    config = run("review", "export", "--label-config")
    assert config.exit_code == 0 and config.stdout == labelstudio.label_config()


def test_export_names_items_outside_the_audio_root_and_exits_1(setup):
    result = run("review", "export", "--config", str(setup / "exporter.yml"), "--audio-root", "/srv/other")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == []
    assert "item a1corrected: its audio is not under --audio-root /srv/other" in result.stderr
    assert result.stderr.count("not exported") == 7


def test_export_without_a_queue_in_the_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "exporter.yml"
    config.write_text("collectors:\n  quality:\n    enabled: false\n")
    result = run("review", "export", "--config", str(config))
    assert result.exit_code == 2
    assert "collectors.quality.production.queue: not set" in result.stderr


# -- import -----------------------------------------------------------------------------------


EXPECTED = {  # item -> (reference, language, flags, seconds, task, annotation): what PLAN annotated
    "a1corrected": ("The quick brown fox jumped over the lazy dog.", "en", None, 21.5, 1, 1),
    "b2nospeech": ("", "en", ["no_speech"], 4.0, 2, 2),
    "e5twice": ("Guten Morgen, Anna.", "de", None, 7.25, 5, 5),  # the later of two annotations
    "f6truth": ("The first take.", "en", None, None, 6, 6),  # the ground truth, though older
    "g7personal": ("Call me at five.", "en", ["personal_data"], 9.0, 7, 8),
}


def expected_records(export: str, reviewer: str) -> list[dict]:
    queue = {json.loads(line)["id"]: json.loads(line) for line in (DATA / "queue.jsonl").read_text().splitlines()}
    out = []
    for item, (text, language, flags, seconds, task, annotation) in EXPECTED.items():
        record = {"id": item, "reference": text, "language": language}
        if flags:
            record["flags"] = flags
        record["reviewer"] = reviewer
        if seconds is not None:
            record["seconds"] = seconds
        record.update(original=queue[item]["transcript"], reviewed_at=reviewed_at(export, task, annotation),
                      source="label-studio", note=f"label-studio task {task} annotation {annotation}")
        out.append(record)
    return out


@pytest.mark.parametrize("export, option, reviewer", [
    ("export.json", [], "label-studio user 1"),  # the export API: completed_by is a user id
    ("export.json", ["--reviewer", "alice"], "alice"),
    ("export-snapshot.json", ["--reviewer", "alice"], "reviewer@example.org"),  # expanded: the email wins
])
def test_import_writes_one_verified_record_per_annotated_task(setup, export, option, reviewer):
    result = run("review", "import", str(DATA / export), "--config", str(setup / "exporter.yml"), *option)
    verified = setup / "review" / "verified.jsonl"
    assert records(verified) == expected_records(export, reviewer)
    # The task added by hand in Label Studio is named, with why; the exit status says so.
    assert result.exit_code == 1
    assert ("task 8: not imported: no data.item_id: not a task from `whisper-exporter review export`"
            in result.stderr)
    assert "5 verified record(s) written" in result.stdout
    assert "2 not reviewed yet" in result.stdout and "1 could not be mapped" in result.stdout
    # What the quality collector reads back: the shared verified-record format.
    refs, problems = load_references(str(verified))
    assert problems == [] and set(refs) == set(EXPECTED)
    assert refs["b2nospeech"].flags == ("no_speech",) and refs["e5twice"].language == "de"
    assert refs["a1corrected"].source == "label-studio" and refs["a1corrected"].seconds == 21.5


def test_import_twice_writes_nothing_new(setup):
    config = str(setup / "exporter.yml")
    run("review", "import", str(DATA / "export.json"), "--config", config)
    verified = setup / "review" / "verified.jsonl"
    before = verified.read_bytes()
    again = run("review", "import", str(DATA / "export-snapshot.json"), "--config", config)
    assert verified.read_bytes() == before
    assert "0 verified record(s) written" in again.stdout and "5 verified already" in again.stdout


def test_an_item_no_longer_queued_is_named(setup):
    queue = setup / "review" / "queue.jsonl"
    queue.write_text("".join(line + "\n" for line in queue.read_text().splitlines()
                             if '"a1corrected"' not in line))
    result = run("review", "import", str(DATA / "export.json"), "--config", str(setup / "exporter.yml"))
    assert result.exit_code == 1
    assert "task 1: not imported: item a1corrected is not in the review queue" in result.stderr
    assert "a1corrected" not in (setup / "review" / "verified.jsonl").read_text()


def annotated(item: str, result, **annotation) -> dict:
    return {"id": 40, "data": {"item_id": item, "transcript": "secret words"},
            "annotations": [{"id": 41, "completed_by": 3, "result": result, "was_cancelled": False,
                             "ground_truth": False, "updated_at": "2026-01-01T00:00:00.000000Z", **annotation}]}


def choice(name: str, *values: str) -> dict:
    return {"from_name": name, "to_name": "audio", "type": "choices", "value": {"choices": list(values)}}


def typed(text) -> dict:
    return {"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": text}}


@pytest.mark.parametrize("task, reason", [
    ("a string", "not a task object"),
    (annotated("a1corrected", "nope"), "the annotation has no result list"),
    (annotated("a1corrected", [typed(["x"]), choice("language", "klingon")]), "unknown language 'klingon'"),
    (annotated("a1corrected", [typed(["x"]), choice("flags", "boring")]), "unknown flag 'boring'"),
    (annotated("a1corrected", [typed(["x"]), choice("language", "en", "de")]), "the language result is not one"),
    (annotated("a1corrected", [typed([" "])]), "no text in 'transcription' and no flag"),
    (annotated("a1corrected", [typed(7)]), "the transcription result has no value.text list"),
    (annotated("a1corrected", ["x"]), "a result entry is not an object"),
    ({"id": 40, "data": {"item_id": "a1corrected"}, "annotations": {}}, "annotations is not a list"),
])
def test_a_task_that_cannot_be_mapped_is_named_with_why_and_never_its_text(setup, task, reason):
    export = setup / "export.json"
    export.write_text(json.dumps([task, annotated("b2nospeech", [choice("flags", "no_speech", "unintelligible")])]))
    result = run("review", "import", str(export), "--config", str(setup / "exporter.yml"))
    assert result.exit_code == 1
    assert reason in result.stderr
    assert "secret" not in result.output and "secret" not in result.stderr
    # The good task beside it is written all the same; flags in FLAGS order.
    [record] = records(setup / "review" / "verified.jsonl")
    assert record["id"] == "b2nospeech" and record["flags"] == ["no_speech", "unintelligible"]
    assert record["reviewer"] == "label-studio user 3" and record["original"] == "Thanks for watching!"


def test_an_export_that_is_not_one_exits_1_and_says_what_it_is(setup):
    for content, said in ((b"\xff\xfe", "not JSON"), (b'{"tasks": []}', "not a list of tasks")):
        export = setup / "export.json"
        export.write_bytes(content)
        result = run("review", "import", str(export), "--config", str(setup / "exporter.yml"))
        assert result.exit_code == 1 and said in result.stderr
    missing = run("review", "import", str(setup / "nothing.json"), "--config", str(setup / "exporter.yml"))
    assert missing.exit_code == 1 and "cannot read" in missing.stderr


def test_a_json_min_export_is_refused_saying_which_export_to_take(setup):
    """Label Studio's JSON-MIN (export-json-min.json, from the same project) writes the chosen
    `language` over the task data's own `language` and drops skipped annotations."""
    result = run("review", "import", str(DATA / "export-json-min.json"), "--config", str(setup / "exporter.yml"))
    assert result.exit_code == 1
    assert "a JSON-MIN export: export with Export type JSON" in result.stderr
    assert not (setup / "review" / "verified.jsonl").exists()


def test_import_without_a_references_file_in_the_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "exporter.yml"
    config.write_text("collectors:\n  quality:\n    production:\n      queue: q.jsonl\n")
    result = run("review", "import", str(DATA / "export.json"), "--config", str(config))
    assert result.exit_code == 2
    assert "collectors.quality.production.references: not set" in result.stderr


def test_map_task_reads_both_completed_by_shapes_and_the_choice_of_annotation():
    base = annotated("x", [typed(["one"])], lead_time=2)
    base["annotations"].append({"id": 42, "completed_by": {"id": 3, "email": "", "first_name": "Ana",
                                                           "last_name": "Lima"},
                                "result": [typed(["two"])], "was_cancelled": False, "ground_truth": False,
                                "updated_at": "2026-01-02T00:00:00Z"})
    base["annotations"].append({"id": 43, "completed_by": 3, "result": [typed(["three"])], "was_cancelled": True,
                                "updated_at": "2026-01-03T00:00:00Z"})
    mapped = labelstudio.map_task(base)
    assert isinstance(mapped, labelstudio.Mapped)
    assert mapped.record["reference"] == "two" and mapped.record["reviewer"] == "Ana Lima"  # latest, not skipped
    assert mapped.record["reviewed_at"] == 1767312000.0 and mapped.record["seconds"] is None
    skipped = labelstudio.map_task({"id": 5, "data": {"item_id": "y"},
                                    "annotations": [{"was_cancelled": True, "result": []}]})
    assert skipped == labelstudio.Unreviewed("5", "y", "skipped in Label Studio")


def test_a_full_disk_mid_import_leaves_whole_records_and_a_second_import_finishes(setup):
    import resource
    import signal

    config, verified = str(setup / "exporter.yml"), setup / "review" / "verified.jsonl"
    first = json.dumps(expected_records("export.json", "x")[0], ensure_ascii=False).encode()
    # The file-size limit stands in for a full disk: room for one record and a half, then EFBIG.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(first) * 3 // 2, old_limit[1]))
    try:
        full = run("review", "import", str(DATA / "export.json"), "--config", config, "--reviewer", "x")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert full.exit_code == 1
    assert "cannot write" in full.stderr and "the records before it are written, each whole" in full.stderr
    assert records(verified) == expected_records("export.json", "x")[:1]  # no half line
    again = run("review", "import", str(DATA / "export.json"), "--config", config, "--reviewer", "x")
    assert "4 verified record(s) written" in again.stdout and "1 verified already" in again.stdout
    assert records(verified) == expected_records("export.json", "x")


def test_a_wide_review_folder_is_named_once_per_import_not_once_per_record(setup, caplog):
    """append_reference checks the folder for every record: 10,000 records logged the same
    warning 10,000 times. Shown as root, whose folders private_files never changes."""
    import logging
    import os

    os.chmod(setup / "review", 0o755)
    with caplog.at_level(logging.WARNING, logger="whisper_exporter.private_files"):
        run("review", "import", str(DATA / "export.json"), "--config", str(setup / "exporter.yml"))
    folder = [r for r in caplog.records if r.name == "whisper_exporter.private_files" and "review is mode" in
              r.getMessage()]
    assert len(records(setup / "review" / "verified.jsonl")) == 5
    assert len(folder) <= 1  # as root: 1 (left 0755, said once); as its owner: 1 (made 0700) or none


# -- the verified-record format both writers share (quality/sampling.py) ------------------------


def test_a_verified_record_carries_the_review_and_reads_back(tmp_path):
    path = str(tmp_path / "review" / "verified.jsonl")
    append_reference(path, "q1", "Hello, world.", "en", "checked twice", flags=["personal_data"], reviewer="ana",
                     seconds=12.5, original="hello world", reviewed_at=1764700000.0, source="label-studio")
    append_reference(path, "q2", "", flags=["no_speech"], source="page")  # nothing said: no text, a flag
    assert [json.loads(line) for line in open(path, encoding="utf-8")] == [
        {"id": "q1", "reference": "Hello, world.", "language": "en", "flags": ["personal_data"], "reviewer": "ana",
         "seconds": 12.5, "original": "hello world", "reviewed_at": 1764700000.0, "source": "label-studio",
         "note": "checked twice"},
        {"id": "q2", "reference": "", "flags": ["no_speech"], "source": "page"}]
    refs, problems = load_references(path)
    assert problems == []
    assert refs["q1"].flags == ("personal_data",) and refs["q1"].reviewer == "ana" and refs["q1"].seconds == 12.5
    assert refs["q1"].original == "hello world" and refs["q1"].reviewed_at == 1764700000.0
    assert refs["q1"].source == "label-studio" and refs["q1"].note == "checked twice"
    assert refs["q2"].reference == "" and refs["q2"].flags == ("no_speech",) and refs["q2"].reviewer is None


@pytest.mark.parametrize("kwargs, said", [
    ({"reference": ""}, "needs an id and a reference"),
    ({"flags": ["boring"]}, "unknown flag 'boring'"),
    ({"source": "excel"}, "unknown source 'excel'"),
])
def test_append_reference_refuses_what_load_references_would_skip(tmp_path, kwargs, said):
    path = tmp_path / "verified.jsonl"
    with pytest.raises(ValueError, match=said):
        append_reference(str(path), "q1", **{"reference": "x", **kwargs})
    assert not path.exists()


def test_bad_review_fields_are_named_with_their_line(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(
        '{"id": "a", "reference": "", "flags": ["no_speech"]}\n'
        '{"id": "b", "reference": "", "flags": []}\n'
        '{"id": "c", "reference": "x", "flags": "no_speech"}\n'
        '{"id": "d", "reference": "x", "flags": ["loud"]}\n'
        '{"id": "e", "reference": "x", "seconds": "ten"}\n'
        '{"id": "f", "reference": "x", "seconds": true}\n'
        '{"id": "g", "reference": "x", "source": "excel"}\n'
        '{"id": "h", "reference": "x", "reviewer": 7}\n'
        '{"id": "i", "reference": "x", "reviewed_at": 1764700000, "original": "y", "seconds": 3}\n',
        encoding="utf-8")
    refs, problems = load_references(str(path))
    assert sorted(refs) == ["a", "i"]
    assert [p.line for p in problems] == [2, 3, 4, 5, 6, 7, 8]
    assert problems[0].message == "empty reference" and "flags" in problems[1].message
    assert "seconds" in problems[3].message and "source" in problems[5].message and "reviewer" in problems[6].message
    assert refs["i"].seconds == 3.0 and refs["i"].reviewed_at == 1764700000.0
