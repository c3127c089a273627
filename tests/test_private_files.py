"""Files that hold what users said or their audio (review queue, verified references, kept samples,
the tap's spool): 0600 in 0700 folders, never through a link, written whole or not at all, and
their failures logged without flooding and counted (issues 21.3, 22.14-17)."""
from __future__ import annotations

import logging
import os
import resource
import signal
import stat
from pathlib import Path

import pytest
import requests
import yaml
from aiohttp import web
from helpers import wait_for
from tap_helpers import Records, Upstream, start_tap, wav_bytes

from whisper_exporter.private_files import private_dir
from whisper_exporter.quality.sampling import (
    AudioKeeper,
    ProductionSampler,
    QueueItem,
    ReviewQueue,
    append_reference,
    load_references,
)
from whisper_exporter.tap import TapConfig, TapRecord
from whisper_exporter.tap import spool as spool_folder

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTIONS = "/v1/audio/transcriptions"


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask: open() alone made 0644 files
    yield
    os.umask(old)


def queue_item(n: int) -> QueueItem:
    return QueueItem(id=f"id-{n}", audio=f"/srv/{n}.wav", transcript="what the user said", language="en",
                     duration=3.0, duration_band="0-5s", sampled_at=0.0)


# -- the review queue and the verified references (21.3, 22.17) ------------------------------------

def test_the_review_queue_is_created_0600_in_a_0700_folder(tmp_path, umask_022):
    folder = tmp_path / "state" / "review"  # neither exists yet
    path = folder / "queue.jsonl"
    queue = ReviewQueue(str(path), max_items=10)
    assert queue.add(queue_item(1)) and queue.add(queue_item(2))
    assert mode(path) == 0o600 and mode(folder) == 0o700
    assert queue.remove(["id-1"]) == 1  # a rewrite is 0600 too
    assert mode(path) == 0o600
    assert [i.id for i in queue.items()] == ["id-2"]


def test_an_existing_world_readable_queue_is_made_0600(tmp_path, umask_022, caplog):
    path = tmp_path / "queue.jsonl"
    path.write_text(queue_item(1).to_json() + "\n")
    os.chmod(path, 0o644)  # as the previous version created it
    with caplog.at_level(logging.WARNING):
        queue = ReviewQueue(str(path), max_items=10)
    assert len(queue) == 1
    assert mode(path) == 0o600
    assert any("was mode 0644, now 0600" in r.getMessage() for r in caplog.records)


def test_the_review_queue_does_not_follow_a_symlink(tmp_path, caplog):
    victim = tmp_path / "victim.txt"
    victim.write_text("the operator's notes\n")
    path = tmp_path / "queue.jsonl"
    path.symlink_to(victim)  # ln -s victim.txt queue.jsonl
    with caplog.at_level(logging.WARNING):
        queue = ReviewQueue(str(path), max_items=10)
        assert not ProductionSampler(queue, 1.0).offer("/a/1.wav", "what the user said", "en", 1.0)
    assert victim.read_text() == "the operator's notes\n"  # nothing appended to the link's target
    assert queue.stats() == (0, 0, {"full": 0, "duplicate": 0, "write_error": 1})
    assert queue.items() == []  # not read through the link either (the quality collector's round goes on)
    assert any("symbolic link" in r.getMessage() for r in caplog.records)
    assert os.path.islink(path)


def test_a_fifo_in_the_queues_place_is_refused_without_blocking(tmp_path):
    path = tmp_path / "queue.jsonl"
    os.mkfifo(path)
    queue = ReviewQueue(str(path), max_items=10)  # reading it did not block
    assert not queue.add(queue_item(1))  # nor did appending (O_NONBLOCK; not a regular file)
    assert queue.dropped["write_error"] == 1


def test_verified_references_are_written_0600_and_not_through_a_link(tmp_path, umask_022):
    folder = tmp_path / "reviews"
    path = folder / "references.jsonl"
    append_reference(str(path), "id-1", "what was really said")
    append_reference(str(path), "id-2", "早晨", language="yue", note="checked twice")
    assert mode(path) == 0o600 and mode(folder) == 0o700
    refs, problems = load_references(str(path))
    assert problems == [] and refs["id-1"].reference == "what was really said" and refs["id-2"].language == "yue"
    link = tmp_path / "link.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_text("")
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        append_reference(str(link), "id-3", "x")
    assert victim.read_text() == ""
    with pytest.raises(ValueError):
        append_reference(str(path), " ", "x")


def test_the_queue_folder_is_tightened_only_when_it_is_the_exporters(tmp_path, monkeypatch, caplog):
    ours, theirs, shared = tmp_path / "ours", tmp_path / "theirs", tmp_path / "shared"
    for folder in (ours, theirs, shared):
        folder.mkdir()
    os.chmod(ours, 0o755)
    os.chmod(theirs, 0o755)
    os.chmod(shared, 0o1777)  # like /tmp
    uid = os.geteuid()
    if uid == 0:  # the exporter runs as a user of its own (uid 10001 in the image); root owns everything
        uid = 10001
        for folder in (ours, shared):
            os.chown(folder, uid, -1)
        os.chown(theirs, 10002, -1)
        monkeypatch.setattr(os, "geteuid", lambda: uid)
    else:
        theirs = Path("/usr/share")  # a folder the test's user does not own
    with caplog.at_level(logging.WARNING):
        assert "now 0700" in (private_dir(str(ours), own=False) or "")
        assert "not the exporter's own" in (private_dir(str(theirs), own=False) or "")
        assert "shared folder" in (private_dir(str(shared), own=False) or "")
        assert "shared folder" in (private_dir(str(shared), own=True) or "")  # spool_dir: /tmp is never changed
    assert mode(ours) == 0o700 and mode(theirs) == 0o755 and mode(shared) == 0o1777
    assert len([r for r in caplog.records if r.name == "whisper_exporter.private_files"]) == 4


# -- kept samples (22.15, 22.16) ---------------------------------------------------------------------

def test_sample_names_do_not_collide_when_record_ids_are_reused(tmp_path):
    from collectors.tap import TapCollector

    queue = ReviewQueue(str(tmp_path / "queue.jsonl"), max_items=1000)
    keeper = AudioKeeper(str(tmp_path / "samples"), max_files=1000, max_bytes=10**9, retention=86400)
    collector = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0"), "http://127.0.0.1:9",
                             sampler=ProductionSampler(queue, 1.0), keeper=keeper)
    spool = tmp_path / "spool"
    spool.mkdir()
    for n in range(50):  # in the same second: the names were tap-{second}-{id(record)}
        upload = spool / f"whisper-tap-{n}.wav"
        upload.write_bytes(wav_bytes(0.1))
        record = TapRecord(endpoint=TRANSCRIPTIONS, method="POST", status=200, duration=0.1, language="en",
                           audio_duration=2.0, transcript=f"sentence {n}", audio_path=str(upload), started=1000.0)
        assert collector.wants_audio(record)
        collector.observe(record)
        del record  # freed: the next record may get its id()
    assert keeper.dropped == {"full": 0, "write_error": 0}
    assert keeper.kept_total == 50 and len(os.listdir(tmp_path / "samples")) == 50
    assert len(queue) == 50
    assert {i.audio for i in queue.items()} == {str(p) for p in (tmp_path / "samples").iterdir()}


@pytest.mark.parametrize("room", [0, 65536], ids=["no_room_at_all", "room_for_part_of_it"])
def test_a_full_disk_leaves_no_orphan_sample(tmp_path, room, caplog):
    folder = tmp_path / "samples"
    keeper = AudioKeeper(str(folder), max_files=10, max_bytes=10**9, retention=86400)
    source = tmp_path / "upload.wav"
    source.write_bytes(wav_bytes(6.0))  # 192 KB
    # The file-size limit stands in for a full disk: a real short write, then EFBIG (as ENOSPC).
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, old_limit[1]))
    try:
        with caplog.at_level(logging.WARNING):
            results = [keeper.keep(str(source), ".wav") for _ in range(5)]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert results == [None] * 5
    assert os.listdir(folder) == []  # no empty or partial file left to count against max_files
    assert keeper.dropped["write_error"] == 5 and keeper.kept_total == 0
    warnings = [r for r in caplog.records if "cannot keep an upload" in r.getMessage()]
    assert len(warnings) == 1  # one line per kind per minute; the counter has the rest
    kept = keeper.keep(str(source), ".wav")  # room again
    assert kept is not None and Path(kept).read_bytes() == source.read_bytes()
    assert mode(kept) == 0o600 and os.listdir(folder) == [os.path.basename(kept)]


def test_a_crashs_partial_sample_is_removed_at_start(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / ".tmp-0123abcd").write_bytes(b"RIFF")  # killed mid-copy
    (folder / "tap-1-ab.wav").write_bytes(b"RIFF....")
    keeper = AudioKeeper(str(folder), max_files=1, max_bytes=10**9, retention=86400)
    assert sorted(os.listdir(folder)) == ["tap-1-ab.wav"]
    assert len(keeper._files()) == 1


def test_an_existing_sample_dir_is_made_0700(tmp_path, caplog):
    folder = tmp_path / "samples"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING):
        AudioKeeper(str(folder), max_files=1, max_bytes=10**9, retention=86400)
    assert mode(folder) == 0o700
    assert any("was mode 0777, now 0700" in r.getMessage() for r in caplog.records)


# -- the tap's spool (22.14) -------------------------------------------------------------------------

def echo_upstream() -> Upstream:
    async def transcribe(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"text": "the meeting moved to thursday", "duration": 40.0})

    return Upstream({TRANSCRIPTIONS: transcribe})


def upload(tap, seconds: float) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{tap.port}{TRANSCRIPTIONS}", files={"file": ("a.wav", wav_bytes(seconds))},
                         data={"language": "en", "response_format": "verbose_json"}, timeout=30)


@pytest.fixture
def fresh_spool_log():
    spool_folder._logged.clear()  # once per kind per process: each test starts with none logged
    yield
    spool_folder._logged.clear()


def test_the_tap_collector_shows_an_unwritable_spool(tmp_path):
    from collectors.tap import TapCollector

    blocker = tmp_path / "readonly"
    blocker.write_text("")
    collector = TapCollector(TapConfig(enabled=True, listen="127.0.0.1:0", spool_dir=str(blocker / "spool")),
                             "http://127.0.0.1:9")
    collector.start()
    try:
        assert "not writable" in collector.status and str(blocker / "spool") in collector.status
    finally:
        collector.stop()


def test_an_existing_spool_dir_is_made_0700(tmp_path, caplog):
    upstream = echo_upstream()
    folder = tmp_path / "spool"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING):
        tap = start_tap(upstream.url, Records(), spool_dir=str(folder))
    try:
        assert mode(folder) == 0o700
        assert tap.spool_problem is None
        assert any("was mode 0777, now 0700" in r.getMessage() for r in caplog.records)
    finally:
        tap.stop()
        upstream.stop()


def test_an_unwritable_spool_is_reported_at_start_and_its_failures_counted(tmp_path, caplog, fresh_spool_log):
    upstream = echo_upstream()
    blocker = tmp_path / "readonly"
    blocker.write_text("")  # the spool's parent is a file: the folder cannot exist (as on a read-only root)
    records = Records()
    with caplog.at_level(logging.WARNING):
        tap = start_tap(upstream.url, records, spool_dir=str(blocker / "spool"), max_in_memory=16384)
    try:
        assert tap.spool_problem is not None and "not writable" in tap.spool_problem  # the tap serves on
        starting = [r for r in caplog.records if "not writable" in r.getMessage()]
        assert len(starting) == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # 1.9 s of 16 kHz 16-bit WAV is 61 KB: over max_in_memory, to the spool
                response = upload(tap, 1.9)
                assert response.status_code == 200 and response.json()["text"] == "the meeting moved to thursday"
            small = upload(tap, 0.2)  # 6 KB, in memory: analysed as before
            assert small.status_code == 200
            got = records.wait(4)
        assert [r.analysis_error for r in got] == ["spool", "spool", "spool", None]
        assert got[0].audio_duration is None and got[3].audio_duration == pytest.approx(0.2)
        assert tap.stats.snapshot()["analysis_errors"] == {"spool": 3}
        logged = [r for r in caplog.records if "cannot spool an upload" in r.getMessage()]
        assert len(logged) == 1 and "ENOTDIR" in logged[0].getMessage()  # once per kind
    finally:
        tap.stop()
        upstream.stop()


def test_a_spool_that_fails_at_run_time_is_counted_and_logged_once(tmp_path, caplog, fresh_spool_log):
    upstream = echo_upstream()
    folder = tmp_path / "spool"
    records = Records()
    kept: list[str] = []

    def wants_audio(record: TapRecord) -> bool:
        return True  # sampling asks for every upload on disk, small ones too (Spool.to_disk)

    def on_record(record: TapRecord) -> None:
        kept.append(str(record.audio_path))
        records(record)

    tap = start_tap(upstream.url, on_record, wants_audio=wants_audio, spool_dir=str(folder), max_in_memory=16384)
    try:
        assert tap.spool_problem is None
        assert upload(tap, 0.2).status_code == 200
        records.wait(1)
        assert wait_for(lambda: not os.listdir(folder))  # the first upload's file goes after its callback
        os.rmdir(folder)
        folder.write_text("")  # the spool is gone from under the running tap
        with caplog.at_level(logging.WARNING):
            assert upload(tap, 1.9).status_code == 200  # spooled while streaming
            assert upload(tap, 0.2).status_code == 200  # written out for sampling
            got = records.wait(3)
        assert [r.analysis_error for r in got] == [None, "spool", "spool"]
        assert kept[1:] == ["None", "None"]
        assert tap.stats.snapshot()["analysis_errors"] == {"spool": 2}
        assert len([r for r in caplog.records if "cannot spool an upload" in r.getMessage()]) == 1
    finally:
        tap.stop()
        upstream.stop()


def test_the_kubernetes_example_gives_the_spool_a_bounded_volume():
    from whisper_exporter.config import from_dict

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "whisper.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    (exporter,) = [c for c in spec["initContainers"] if c["name"] == "whisper-exporter"]
    assert exporter["securityContext"]["readOnlyRootFilesystem"] is True  # so the spool needs a volume
    (config_text,) = kinds["ConfigMap"]["data"].values()
    tap = from_dict(yaml.safe_load(config_text), source="deploy/kubernetes/whisper.yaml").collectors.tap
    assert tap.enabled and tap.spool_dir
    volumes = {v["name"]: v for v in spec["volumes"]}
    # in a writable volume, a folder below its root: the exporter makes it, so it owns it (0700)
    (mount,) = [m for m in exporter["volumeMounts"] if tap.spool_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    assert not mount.get("readOnly")
    volume = volumes[mount["name"]]
    assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit")
    # one upload at its largest fits in the volume: beyond the limit the kubelet evicts the pod
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= tap.max_spool_bytes


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes ("4Gi", "500M", "1024")."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
