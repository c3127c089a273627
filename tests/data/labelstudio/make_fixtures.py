"""Make this folder's Label Studio exports from a real Label Studio (tests/label_studio.py).

    PYTHONPATH=. python tests/data/labelstudio/make_fixtures.py

`review export` turns queue.jsonl into tasks.json and tasks.json.label-config.xml; the tasks go
into a fresh project and are annotated through the REST API as listed in PLAN; then the
project is exported: export.json (the export API, completed_by a user id), export-snapshot.json
(an export snapshot with the annotators expanded) and export-json-min.json (JSON-MIN, which the
import refuses). No audio is
needed: annotating through the API does not play it. Transcripts here are made up.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/: label_studio, helpers

from label_studio import VERSION, start_label_studio  # noqa: E402


def text(value: str) -> dict:
    return {"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [value]}}


def choices(name: str, *values: str) -> dict:
    return {"from_name": name, "to_name": "audio", "type": "choices", "value": {"choices": list(values)}}


# item id -> the annotations submitted, in order (fields beside result go as they are)
PLAN = {
    "a1corrected": [{"result": [text("The quick brown fox jumped over the lazy dog."), choices("language", "en")],
                     "lead_time": 21.5}],
    "b2nospeech": [{"result": [choices("language", "en"), choices("flags", "no_speech")], "lead_time": 4.0}],
    "c3skipped": [{"result": [], "was_cancelled": True, "lead_time": 1.0}],
    "d4pending": [],
    "e5twice": [{"result": [text("Guten Morgen"), choices("language", "de")], "lead_time": 5.0},
                {"result": [text("Guten Morgen, Anna."), choices("language", "de")], "lead_time": 7.25}],
    "f6truth": [{"result": [text("The first take."), choices("language", "en")], "ground_truth": True},
                {"result": [text("The second take."), choices("language", "en")]}],
    "g7personal": [{"result": [text("Call me at five."), choices("language", "en"),
                               choices("flags", "personal_data")], "lead_time": 9.0}],
}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ls-fixtures-"))
    queue = work / "queue.jsonl"  # a copy: the review queue is made 0600 when read
    queue.write_bytes((HERE / "queue.jsonl").read_bytes())
    config = work / "config.yml"
    config.write_text(f"collectors:\n  quality:\n    production:\n      queue: {queue}\n"
                      f"      references: {work / 'verified.jsonl'}\n")
    subprocess.run([sys.executable, "-m", "whisper_exporter", "review", "export", "--config", str(config),
                    "--audio-root", "/srv", "--output", str(work / "tasks.json")], check=True)
    for name in ("tasks.json", "tasks.json.label-config.xml"):  # 0644 here: made-up test data
        (HERE / name).write_bytes((work / name).read_bytes())
    tasks = json.loads((HERE / "tasks.json").read_text())
    # A task someone added by hand in Label Studio, not from the review queue.
    tasks.append({"data": {"audio": "/data/local-files/?d=other/x.wav"}})
    studio = start_label_studio(work / "ls")
    try:
        project = studio.create_project((HERE / "tasks.json.label-config.xml").read_text())
        listed = studio.import_tasks(project, tasks)
        for task in listed:
            item = task["data"].get("item_id")
            for annotation in PLAN.get(item, [{"result": [text("hand-made task")]}] if item is None else []):
                studio.annotate(task["id"], **annotation)
        (HERE / "export.json").write_text(json.dumps(studio.export(project), indent=1, ensure_ascii=False) + "\n")
        (HERE / "export-json-min.json").write_text(
            json.dumps(studio.export_min(project), indent=1, ensure_ascii=False) + "\n")
        (HERE / "export-snapshot.json").write_text(
            json.dumps(studio.export_snapshot(project), indent=1, ensure_ascii=False) + "\n")
        print(f"label-studio {VERSION}: {len(listed)} tasks exported into {HERE}")
    finally:
        studio.stop()


if __name__ == "__main__":
    main()
