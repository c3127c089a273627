"""The Label Studio round trip against a real Label Studio (issue 23 part 2): the PyPI package in
its own virtualenv, offline on loopback (tests/label_studio.py; the first run installs it, about
80 s). `review export` writes the tasks and the labelling config; Label Studio takes both, plays
the audio from its local-files storage, is annotated through its REST API, and its export goes
back through `review import`; the quality collector then scores what the reviewer wrote."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jiwer
import pytest
from click.testing import CliRunner

from whisper_exporter.cli import main
from whisper_exporter.collectors.quality import QualityCollector
from whisper_exporter.config import from_dict
from whisper_exporter.quality.sampling import QueueItem, item_id

pytest_plugins = ["label_studio"]
pytestmark = pytest.mark.integration

CANARIES = Path(__file__).parent.parent / "whisper_exporter" / "canary"
SAID = "Please call Stella and ask her to bring these things with her from the store."  # canary/en.txt
HEARD = "please call stella ask her to bring these things with her from the store"  # the server's, one word lost
CORRECTED = "Please call Stella, and ask her to bring these things with her from the store."


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def value(collector, name: str, **labels: str) -> float:
    for family in collector.families():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no {name}{labels}")


def test_round_trip_through_a_real_label_studio(label_studio, tmp_path):
    studio = label_studio
    uploads = studio.files_root / "uploads"
    uploads.mkdir()
    speech, silence = uploads / "call stella.wav", uploads / "silence.wav"
    shutil.copy(CANARIES / "en.wav", speech)
    shutil.copy(CANARIES / "silence.wav", silence)
    items = [QueueItem(item_id(str(speech), HEARD), str(speech), HEARD, "en", 3.9, "0-5s", 1764700000.0),
             QueueItem(item_id(str(silence), "Thank you."), str(silence), "Thank you.", "en", 4.0, "0-5s",
                       1764700001.0)]
    review = tmp_path / "review"
    review.mkdir()
    (review / "queue.jsonl").write_text("".join(i.to_json() + "\n" for i in items), encoding="utf-8")
    config = tmp_path / "exporter.yml"
    config.write_text("collectors:\n  quality:\n    enabled: true\n    production:\n"
                      "      queue: review/queue.jsonl\n      references: review/verified.jsonl\n")

    exported = cli("review", "export", "--config", str(config), "--audio-root", str(studio.files_root),
                   "--output", str(tmp_path / "tasks.json"))
    assert exported.exit_code == 0, exported.output
    label_config = (tmp_path / "tasks.json.label-config.xml").read_text()
    project = studio.create_project(label_config)  # Label Studio validates the config against the tasks
    studio.add_local_storage(project, uploads)
    tasks = studio.import_tasks(project, json.loads((tmp_path / "tasks.json").read_text()))
    assert [t["data"]["item_id"] for t in tasks] == [i.id for i in items]
    for task, queued in zip(tasks, items):
        # The audio plays from the URL the export wrote, through Label Studio itself.
        audio = studio.api("GET", task["data"]["audio"])
        assert audio.content == Path(queued.audio).read_bytes()
        assert audio.headers["Content-Type"].startswith("audio/")
        [prediction] = studio.api("GET", f"/api/tasks/{task['id']}").json()["predictions"]
        assert prediction["result"][0]["value"]["text"] == [queued.transcript]  # the editor starts from it

    # A reviewer corrects the first transcript and says nobody speaks in the second.
    studio.annotate(tasks[0]["id"], [
        {"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [CORRECTED]}},
        {"from_name": "language", "to_name": "audio", "type": "choices", "value": {"choices": ["en"]}}],
        lead_time=31.5)
    studio.annotate(tasks[1]["id"], [
        {"from_name": "flags", "to_name": "audio", "type": "choices", "value": {"choices": ["no_speech"]}}],
        lead_time=2.0)
    export = tmp_path / "label-studio-export.json"
    export.write_text(json.dumps(studio.export_snapshot(project)))

    imported = cli("review", "import", str(export), "--config", str(config))
    assert imported.exit_code == 0, imported.output
    assert "2 verified record(s) written" in imported.stdout
    records = [json.loads(line) for line in (review / "verified.jsonl").read_text().splitlines()]
    for record in records:
        assert isinstance(record.pop("reviewed_at"), float)
    assert records == [
        {"id": items[0].id, "reference": CORRECTED, "language": "en", "reviewer": "reviewer@example.org",
         "seconds": 31.5, "original": HEARD, "source": "label-studio",
         "note": f"label-studio task {tasks[0]['id']} annotation 1"},
        {"id": items[1].id, "reference": "", "flags": ["no_speech"], "reviewer": "reviewer@example.org",
         "seconds": 2.0, "original": "Thank you.", "source": "label-studio",
         "note": f"label-studio task {tasks[1]['id']} annotation 2"}]

    # The quality collector scores the corrected one (set="production"), never the flagged one.
    settings = from_dict({"collectors": {"quality": {"enabled": True, "production": {
        "queue": "review/queue.jsonl", "references": "review/verified.jsonl"}}}}, source=str(config))
    collector = QualityCollector(settings.collectors.quality, settings)
    collector.update()  # the series first, at 0 (Prometheus' baseline)
    collector.update()
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    truth = jiwer.process_words(norm(CORRECTED), norm(HEARD))
    labels = dict(language="en", set="production", unit="word")
    assert value(collector, "whisper_quality_errors_total", type="deletion", **labels) == truth.deletions == 1
    assert value(collector, "whisper_quality_reference_units_total", **labels) == len(norm(CORRECTED).split())
    assert value(collector, "whisper_quality_utterances_total", result="scored", **labels) == 1
    assert (review / "queue.jsonl").read_text() == ""
