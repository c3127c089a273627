"""Label Studio interop: review-queue items as Label Studio tasks, and its JSON export as verified records.

Export (`tasks`, `label_config`): one task per queue item, oldest first. The task's data holds the
audio URL, the queue's id (`item_id`, how an annotation finds its item again) and what the
server said; the server's transcript and language go in as a prediction, so a reviewer corrects
rather than types (Label Studio's predictions format: `result` items with from_name, to_name,
type and value, as its tasks API takes them). The labelling config has the controls the results
name: Audio `audio`, TextArea `transcription`, Choices `language` (one, Whisper's codes) and
Choices `flags` (any of sampling.FLAGS).

Import (`map_task`, `import_export`): Label Studio's JSON export (Export type JSON; the shape
of label_studio/data_export/serializers.py, 1.23: a list of tasks, each with `data`, `id` and
`annotations`, an annotation with `result`, `completed_by` (a user id, or the user expanded to
id, email and names), `was_cancelled`, `ground_truth`, `lead_time` seconds and ISO
`created_at`/`updated_at`). Per task one annotation counts: the ground truth if one is marked,
else the latest; skipped (cancelled) ones never. It becomes one verified record
(sampling.append_reference, source "label-studio"). No reason given for a task ever holds
transcript text: they are printed and logged.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Optional, Union
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from whisper_exporter.quality.flags import FLAGS
from whisper_exporter.quality.manifest import MAX_FILE_BYTES, read_regular
from whisper_exporter.quality.sampling import QueueItem, append_reference, load_references
from whisper_exporter.whisper.languages import WHISPER_LANGUAGES, language_code

AUDIO = "audio"  # the Audio tag's name: every result's to_name
TEXT = "transcription"
LANGUAGE = "language"
FLAG_CHOICES = "flags"
ITEM_ID = "item_id"  # the task data key holding the review queue's id
MODEL_VERSION = "whisper-exporter"
SOURCE = "label-studio"
DEFAULT_AUDIO_URL_PREFIX = "/data/local-files/?d="  # Label Studio's own local-files serving
FLAG_HINTS = {
    "no_speech": "nobody speaks: a transcript with text here is a hallucination",
    "unintelligible": "speech, but nobody could say what it is",
    "wrong_language": "spoken in another language than the one chosen",
    "personal_data": "the audio or the transcript holds personal data",
}


# -- export -----------------------------------------------------------------------------------


def label_config(languages: Iterable[str] = WHISPER_LANGUAGES) -> str:
    """The labelling config XML for the tasks `tasks()` makes."""
    language_choices = "\n".join(
        f"    <Choice value={quoteattr(code)} hint={quoteattr(WHISPER_LANGUAGES.get(code, code))}/>"
        for code in languages)
    flag_choices = "\n".join(f"    <Choice value={quoteattr(flag)} hint={quoteattr(FLAG_HINTS[flag])}/>"
                             for flag in FLAGS)
    # No hotkey on the Audio tag: Label Studio's ASR template binds ctrl+enter, which is also submit.
    return f"""<View>
  <Header value="Listen, then correct the server's transcript (keep its punctuation right too)"/>
  <Audio name="{AUDIO}" value="$audio"/>
  <TextArea name="{TEXT}" toName="{AUDIO}" rows="4" editable="true" maxSubmissions="1"/>
  <Header value="Language spoken"/>
  <Choices name="{LANGUAGE}" toName="{AUDIO}" choice="single" layout="select">
{language_choices}
  </Choices>
  <Header value="Flags (an item with a flag is not scored as WER)"/>
  <Choices name="{FLAG_CHOICES}" toName="{AUDIO}" choice="multiple" showInline="true">
{flag_choices}
  </Choices>
</View>
"""


def audio_url(path: str, prefix: str = DEFAULT_AUDIO_URL_PREFIX, root: str = "/") -> Optional[str]:
    """The URL Label Studio plays `path` from: its path under `root`, percent-encoded, after
    `prefix`; None when the file is not under `root`."""
    full, top = os.path.abspath(path), os.path.abspath(root)
    relative = os.path.relpath(full, top)
    if relative == os.curdir or relative.startswith(os.pardir + os.sep) or relative == os.pardir:
        return None
    return prefix + quote(relative, safe="/")


def task(item: QueueItem, url: str) -> dict:
    """One Label Studio task for a queue item, the server's answer as its prediction."""
    result: list[dict] = [{"from_name": TEXT, "to_name": AUDIO, "type": "textarea",
                           "value": {"text": [item.transcript]}}]
    if item.language in WHISPER_LANGUAGES:
        result.append({"from_name": LANGUAGE, "to_name": AUDIO, "type": "choices",
                       "value": {"choices": [item.language]}})
    return {
        "data": {AUDIO: url, ITEM_ID: item.id, "transcript": item.transcript, "language": item.language,
                 "duration": item.duration, "duration_band": item.duration_band, "sampled_at": item.sampled_at},
        "predictions": [{"model_version": MODEL_VERSION, "result": result}],
    }


# -- import -----------------------------------------------------------------------------------


class ExportError(Exception):
    """The file is not a Label Studio JSON export at all."""


@dataclass(frozen=True)
class Mapped:
    task: str  # how the report names the task: Label Studio's id
    item: str
    record: dict[str, Any] = field(hash=False)  # append_reference's arguments after path


@dataclass(frozen=True)
class Unreviewed:
    task: str
    item: str
    reason: str


@dataclass(frozen=True)
class Unmapped:
    task: str
    reason: str


Outcome = Union[Mapped, Unreviewed, Unmapped]


def read_export(path: str) -> list:
    """The tasks of a Label Studio JSON export file; raises OSError, ExportError."""
    try:
        data = json.loads(read_regular(path, MAX_FILE_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ExportError(f"not JSON ({err})") from None
    if isinstance(data, dict) and "data" in data:  # one task exported alone
        data = [data]
    if not isinstance(data, list):
        raise ExportError("not a list of tasks (export with Export type JSON)")
    if any(isinstance(t, dict) and "annotation_id" in t and "annotations" not in t for t in data):
        # JSON-MIN puts the answers beside the task data under the controls' names: the
        # `language` chosen and the queue's `language` are one key, skipped annotations are gone.
        raise ExportError("a JSON-MIN export: export with Export type JSON (JSON-MIN merges the task data and "
                          "the answers under the same names)")
    return data


def _timestamp(value: Any) -> Optional[float]:
    """An ISO 8601 time as Label Studio writes it (…Z or with an offset) in unix seconds."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # Label Studio's USE_TZ times are UTC
    return moment.timestamp()


def _chosen(annotations: list) -> Optional[dict]:
    """The annotation that counts: the ground truth if one is marked, else the latest; never a skipped one."""
    done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None

    def order(a: dict) -> tuple:
        ident = a.get("id")
        return (bool(a.get("ground_truth")), _timestamp(a.get("updated_at")) or _timestamp(a.get("created_at")) or 0.0,
                ident if isinstance(ident, int) else 0)

    return max(done, key=order)


def _reviewer(completed_by: Any, default: Optional[str]) -> Optional[str]:
    """The annotator: the expanded user's email (or name), else `default`, else Label Studio's user id."""
    if isinstance(completed_by, dict):
        for key in ("email", "username"):
            if isinstance(completed_by.get(key), str) and completed_by[key].strip():
                return completed_by[key].strip()
        name = " ".join(str(completed_by.get(k) or "") for k in ("first_name", "last_name")).strip()
        if name:
            return name
        completed_by = completed_by.get("id")
    if default:
        return default
    if isinstance(completed_by, int) and not isinstance(completed_by, bool):
        return f"label-studio user {completed_by}"
    return None


def _choices(entry: dict) -> Optional[list]:
    value = entry.get("value")
    choices = value.get("choices") if isinstance(value, dict) else None
    return choices if isinstance(choices, list) and all(isinstance(c, str) for c in choices) else None


def _read_result(result: list) -> Union[str, tuple[Optional[str], Optional[str], list[str]]]:
    """(text, language, flags) from an annotation's result, or why it cannot be read."""
    text: Optional[str] = None
    language: Optional[str] = None
    flags: list[str] = []
    for entry in result:
        if not isinstance(entry, dict):
            return "a result entry is not an object"
        name = entry.get("from_name")
        if name == TEXT:
            value = entry.get("value")
            lines = value.get("text") if isinstance(value, dict) else None
            if isinstance(lines, str):
                lines = [lines]
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                return f"the {TEXT} result has no value.text list"
            text = " ".join(line.strip() for line in lines if line.strip())
        elif name == LANGUAGE:
            choices = _choices(entry)
            if not choices or len(choices) != 1:
                return f"the {LANGUAGE} result is not one choice"
            language = language_code(choices[0])
            if language is None:
                return f"unknown language {choices[0][:20]!r}"
        elif name == FLAG_CHOICES:
            choices = _choices(entry)
            if choices is None:
                return f"the {FLAG_CHOICES} result has no value.choices list"
            unknown = [c for c in choices if c not in FLAGS]
            if unknown:
                return f"unknown flag {unknown[0][:30]!r} (known: {', '.join(FLAGS)})"
            flags = [f for f in FLAGS if f in choices]
        # Other controls a team added to the config are theirs: not part of the record.
    return text, language, flags


def map_task(obj: Any, reviewer: Optional[str] = None) -> Outcome:
    """What one exported task becomes: a verified record, left for review, or why it cannot be mapped."""
    if not isinstance(obj, dict):
        return Unmapped("?", "not a task object")
    ident = obj.get("id")
    name = str(ident) if isinstance(ident, (int, str)) and not isinstance(ident, bool) else "?"
    data = obj.get("data")
    if not isinstance(data, dict):
        data = {}
    item = data.get(ITEM_ID)
    if not isinstance(item, str) or not item.strip():
        return Unmapped(name, f"no data.{ITEM_ID}: not a task from `whisper-exporter review export`")
    item = item.strip()
    annotations = obj.get("annotations")
    if annotations is None:
        annotations = []
    if not isinstance(annotations, list):
        return Unmapped(name, "annotations is not a list")
    chosen = _chosen(annotations)
    if chosen is None:
        why = "skipped in Label Studio" if annotations else "not annotated yet"
        return Unreviewed(name, item, why)
    result = chosen.get("result")
    if not isinstance(result, list):
        return Unmapped(name, "the annotation has no result list")
    read = _read_result(result)
    if isinstance(read, str):
        return Unmapped(name, read)
    text, language, flags = read
    if not text and not flags:
        return Unmapped(name, f"no text in {TEXT!r} and no flag: nothing verified")
    seconds = chosen.get("lead_time")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds < 0:
        seconds = None
    original = data.get("transcript")
    annotation_id = chosen.get("id")
    record = {
        "ident": item, "reference": text or "", "language": language, "flags": tuple(flags),
        "reviewer": _reviewer(chosen.get("completed_by"), reviewer),
        "seconds": float(seconds) if seconds is not None else None,
        "original": original if isinstance(original, str) else None,
        "reviewed_at": _timestamp(chosen.get("updated_at")) or _timestamp(chosen.get("created_at")),
        "source": SOURCE,
        "note": f"label-studio task {name}" + (f" annotation {annotation_id}" if isinstance(annotation_id, int)
                                               else ""),
    }
    return Mapped(name, item, record)


@dataclass
class ImportReport:
    written: list[Mapped] = field(default_factory=list)
    already: list[Mapped] = field(default_factory=list)  # the references file has the item: not written twice
    unreviewed: list[Unreviewed] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)


def import_export(tasks: list, references: str, queued: dict[str, QueueItem],
                  reviewer: Optional[str] = None) -> ImportReport:
    """Append a verified record for every mapped task whose item waits in the review queue.

    An item the references file has already (reviewed on the page, or imported before) is not
    written again. The original transcript is the queue's (the one the collector scores).
    Raises OSError when the references file cannot be read or written (the records before it
    are in the file, each whole)."""
    existing, _problems = load_references(references)  # a bad line is the quality collector's to report
    done = set(existing)
    report = ImportReport()
    for obj in tasks:
        outcome = map_task(obj, reviewer)
        if isinstance(outcome, Unmapped):
            report.unmapped.append(outcome)
        elif isinstance(outcome, Unreviewed):
            report.unreviewed.append(outcome)
        elif outcome.item in done:
            report.already.append(outcome)
        elif outcome.item not in queued:
            report.unmapped.append(Unmapped(outcome.task, f"item {outcome.item} is not in the review queue"))
        else:
            record = dict(outcome.record, original=queued[outcome.item].transcript)
            try:
                append_reference(references, **record)
            except ValueError as err:
                report.unmapped.append(Unmapped(outcome.task, str(err)))
                continue
            done.add(outcome.item)
            report.written.append(outcome)
    return report


class _Once(logging.Filter):
    """Lets each message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def folder_warnings_once() -> Iterator[None]:
    """Say each private_files warning once: the queue's open and every append_reference check the
    folder, and 10,000 records logged its mode 10,000 times."""
    folder_log, once = logging.getLogger("whisper_exporter.private_files"), _Once()
    folder_log.addFilter(once)
    try:
        yield
    finally:
        folder_log.removeFilter(once)
