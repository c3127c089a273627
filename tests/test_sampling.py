"""Stratified sampling of the reference set (balance, full coverage, a persistent cursor), and
production sampling into the bounded review queue."""
import json
import math
from collections import Counter

import pytest

from whisper_exporter.quality.manifest import Item
from whisper_exporter.quality.sampling import (
    ProductionSampler,
    QueueItem,
    ReviewQueue,
    StratifiedSampler,
    interleave,
    item_id,
    load_references,
)
from whisper_exporter.runtime.quality_counters import review_queue_families


def item(i, language="en", **tags):
    return Item(id=f"{language}-{i}", line=i, audio=f"/a/{language}-{i}.wav", reference="x", language=language,
                duration=1.0, strata=tuple(sorted(tags.items())))


def uneven_set():
    """Cells of very different sizes: 40 clean English, 3 noisy English, 10 Mandarin, 1 Cantonese."""
    items = [item(i, "en", audio_quality="clean") for i in range(40)]
    items += [item(100 + i, "en", audio_quality="noisy") for i in range(3)]
    items += [item(i, "zh", audio_quality="clean") for i in range(10)]
    items += [item(0, "yue", audio_quality="clean")]
    return items


def run(sampler, items, n):
    batch = sampler.sample(items, n)
    for it in batch:
        sampler.done(it)
    return batch


def test_interleave_is_round_robin_across_languages_then_cells():
    items = [item(0, "en"), item(1, "en"), item(2, "en"), item(0, "zh"), item(0, "yue"), item(1, "zh")]
    assert [i.id for i in interleave(items)] == ["en-0", "zh-0", "yue-0", "en-1", "zh-1", "en-2"]
    # English has four strata cells, Mandarin one: languages still alternate, and English's turns
    # go round its cells
    tagged = [item(i, "en", audio_quality=q, duration_band=b) for i, (q, b) in
              enumerate([("clean", "short"), ("clean", "short"), ("clean", "long"), ("noisy", "short"),
                         ("noisy", "long")])] + [item(i, "zh") for i in range(3)]
    assert [i.id for i in interleave(tagged)] == ["en-0", "zh-0", "en-2", "zh-1", "en-3", "zh-2", "en-4", "en-1"]


def test_every_item_is_its_own_cell_and_languages_still_alternate():
    """A manifest where the tags make every line its own cell must not fall back to manifest order."""
    items = [item(i, lang, source=f"s{i}") for lang in ("en", "de", "zh") for i in range(4)]
    assert [i.language for i in interleave(items)[:6]] == ["en", "de", "zh"] * 2


@pytest.mark.parametrize("per_run", [1, 4, 7, 10, 53, 54, 100])
def test_every_item_is_covered_within_ceil_items_over_per_run_runs(per_run):
    items = uneven_set()
    sampler = StratifiedSampler()
    runs = math.ceil(len(items) / per_run)
    for start in range(3):  # from a fresh cursor, and again from wherever the cursor stands
        seen = set()
        for _ in range(runs):
            batch = run(sampler, items, per_run)
            assert len(batch) == min(per_run, len(items))
            assert len({i.id for i in batch}) == len(batch)  # no item twice in one run
            seen |= {i.id for i in batch}
        assert seen == {i.id for i in items}, f"window {start}: {len(items) - len(seen)} items not covered"


def test_each_run_is_balanced_across_language_and_strata():
    items = uneven_set()
    sampler = StratifiedSampler()
    first = run(sampler, items, 8)
    languages = Counter(i.language for i in first)
    # 8 items: Cantonese has one item only, English and Mandarin share the rest, although clean
    # English is 40 of the 54 items
    assert languages == {"en": 4, "zh": 3, "yue": 1}
    english = Counter(i.tags["audio_quality"] for i in first if i.language == "en")
    assert english == {"clean": 2, "noisy": 2}  # English's turns alternate between its strata
    # equal cells: every run holds each language and each cell equally (+-1)
    even = [item(i, lang, source=src) for lang in ("en", "de", "zh") for src in ("a", "b") for i in range(10)]
    sampler = StratifiedSampler()
    for _ in range(10):
        counts = Counter(i.cell for i in run(sampler, even, 6))
        assert set(counts.values()) == {1} and len(counts) == 6


def test_small_cells_are_not_drowned_by_a_big_one():
    """A random sample of 12 would hold ~9 clean English items (74% of the set) and likely no
    Cantonese; the round-robin gives every cell its turn first."""
    items = uneven_set()
    ours = Counter(i.cell[0] for i in run(StratifiedSampler(), items, 12))
    assert ours["zh"] >= 3 and ours["yue"] == 1 and ours["en"] <= 8


def test_items_not_reached_come_first_next_run():
    items = [item(i) for i in range(10)]
    sampler = StratifiedSampler()
    batch = sampler.sample(items, 4)
    sampler.done(batch[0])  # the run stopped after one item (budget, stop, server down)
    again = sampler.sample(items, 4)
    assert [i.id for i in again] == [i.id for i in batch[1:]] + ["en-4"]


def test_pass_rolls_over_within_a_run_and_is_counted():
    items = [item(i) for i in range(5)]
    sampler = StratifiedSampler()
    assert [i.id for i in run(sampler, items, 3)] == ["en-0", "en-1", "en-2"]
    assert sampler.passes == 0 and sampler.coverage() == pytest.approx(0.6)
    second = run(sampler, items, 3)
    assert [i.id for i in second] == ["en-3", "en-4", "en-0"]  # the next pass begins in the same run
    assert sampler.passes == 1 and sampler.coverage() == pytest.approx(0.2)


def test_manifest_changes_keep_the_cursor():
    items = [item(i) for i in range(6)]
    sampler = StratifiedSampler()
    run(sampler, items, 3)
    changed = items[1:] + [item(9, "zh")]  # en-0 removed, a Mandarin line added
    batch = run(sampler, changed, 3)
    assert "zh-9" in {i.id for i in batch}  # a new cell gets its turn at once
    assert not {"en-1", "en-2"} & {i.id for i in batch}  # evaluated in this pass already


def test_cursor_survives_a_restart_through_the_state_file(tmp_path):
    state = tmp_path / "state.json"
    items = [item(i, lang) for lang in ("en", "zh") for i in range(6)]
    first = StratifiedSampler(str(state))
    a = run(first, items, 5)
    first.save()
    assert json.loads(state.read_text())["covered"] == sorted(i.id for i in a)
    second = StratifiedSampler(str(state))  # the exporter restarted
    b = run(second, items, 5)
    assert not {i.id for i in a} & {i.id for i in b}
    c = run(second, items, 5)
    assert {i.id for i in a + b + c} == {i.id for i in items}


def test_an_unreadable_state_file_starts_a_new_pass(tmp_path, caplog):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    sampler = StratifiedSampler(str(state))
    assert sampler.covered == set() and "sampling state" in caplog.text


# -- production ------------------------------------------------------------------------------


def test_production_sampling_is_systematic_per_language_and_duration_band(tmp_path):
    queue = ReviewQueue(str(tmp_path / "queue.jsonl"), max_items=10_000)
    sampler = ProductionSampler(queue, 0.01, clock=lambda: 1000.0)
    offered = Counter()
    # Mostly short clean English; a little long English, and rare Cantonese.
    traffic = [("en", 3.0)] * 2500 + [("en", 45.0)] * 250 + [("yue", 8.0)] * 120 + [("zh", None)] * 7
    for n, (language, seconds) in enumerate(traffic):
        sampler.offer(f"/audio/{n}.wav", f"text {n}", language, seconds)
        offered[(language, seconds)] += 1
    rows = [json.loads(line) for line in (tmp_path / "queue.jsonl").read_text().splitlines()]
    cells = Counter((r["language"], r["duration_band"]) for r in rows)
    assert cells == {("en", "0-5s"): 25, ("en", "30-60s"): 3, ("yue", "5-15s"): 2, ("zh", "unknown"): 1}
    # each cell at its fraction: ceil(n * 1%), the first request of a cell included
    assert rows[0]["audio"] == "/audio/0.wav"
    assert rows[0] == {"id": item_id("/audio/0.wav", "text 0"), "audio": "/audio/0.wav", "transcript": "text 0",
                       "language": "en", "duration": 3.0, "duration_band": "0-5s", "sampled_at": 1000.0}
    assert queue.added_total == 31 and len(queue) == 31


def test_a_full_queue_drops_and_counts(tmp_path):
    queue = ReviewQueue(str(tmp_path / "queue.jsonl"), max_items=3)
    sampler = ProductionSampler(queue, 1.0)
    results = [sampler.offer(f"/a/{n}.wav", "t", "en", 1.0) for n in range(5)]
    assert results == [True, True, True, False, False]
    assert queue.dropped["full"] == 2 and len(queue) == 3
    assert len((tmp_path / "queue.jsonl").read_text().splitlines()) == 3
    fams = {f.name: f for f in review_queue_families(queue)}
    dropped = {s.labels["reason"]: s.value for s in fams["whisper_quality_review_queue_dropped"].samples
               if s.name.endswith("_total")}
    assert dropped["full"] == 2.0
    assert fams["whisper_quality_review_queue_items"].samples[0].value == 3.0
    # once reviewed items leave, there is room again
    assert queue.remove([item_id("/a/0.wav", "t")]) == 1
    assert sampler.offer("/a/9.wav", "t", "en", 1.0) and len(queue) == 3


def test_the_same_request_logged_twice_is_one_item(tmp_path):
    queue = ReviewQueue(str(tmp_path / "queue.jsonl"), max_items=10)
    sampler = ProductionSampler(queue, 1.0)
    assert sampler.offer("/a/1.wav", "same", "en", 1.0)
    assert not sampler.offer("/a/1.wav", "same", "en", 1.0)
    assert queue.dropped["duplicate"] == 1 and len(queue) == 1


def test_queue_write_errors_are_counted_not_raised(tmp_path):
    folder = tmp_path / "a-file"
    folder.write_text("")
    queue = ReviewQueue(str(folder / "queue.jsonl"), max_items=10)  # the folder cannot exist: a file is there
    assert not ProductionSampler(queue, 1.0).offer("/a/1.wav", "t", "en", 1.0)
    assert queue.dropped["write_error"] == 1


def test_queue_size_is_read_back_at_start(tmp_path):
    path = tmp_path / "queue.jsonl"
    items = [QueueItem(f"id{n}", "/a.wav", "t", "en", 1.0, "0-5s", 0.0) for n in range(4)]
    path.write_text("".join(i.to_json() + "\n" for i in items))
    queue = ReviewQueue(str(path), max_items=5)
    assert len(queue) == 4
    assert queue.add(QueueItem("new", "/b.wav", "t", "en", 1.0, "0-5s", 0.0))
    assert not queue.add(QueueItem("new2", "/c.wav", "t", "en", 1.0, "0-5s", 0.0))
    assert [i.id for i in queue.items()] == ["id0", "id1", "id2", "id3", "new"]


def test_one_queue_object_per_exporter(tmp_path):
    """The wiring builds the queue once; the log collector's sampler and the quality collector share it."""
    from whisper_exporter.config import from_dict
    from whisper_exporter.runtime.shared import Shared

    config = from_dict({"collectors": {"quality": {"production": {"queue": str(tmp_path / "q.jsonl")}}}})
    shared = Shared.build(config)
    assert shared.production_sampler().queue is shared.review_queue is not None
    assert Shared.build(from_dict({})).review_queue is None



def test_references_file_problems_are_named(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(
        '{"id": "a", "reference": "hello world"}\n'
        'not json\n'
        '{"id": "b", "reference": ""}\n'
        '{"id": "c", "reference": "x", "speaker": "s"}\n'
        '{"reference": "no id"}\n'
        '{"id": "d", "reference": "早晨", "language": "Cantonese"}\n'
        '{"id": "e", "reference": "x", "language": "elvish"}\n'
        '{"id": "a", "reference": "hello world again", "note": "fixed"}\n',
        encoding="utf-8")
    refs, problems = load_references(str(path))
    assert sorted(refs) == ["a", "d"]
    assert refs["a"].reference == "hello world again"  # a later line for the same id wins
    assert refs["d"].language == "yue"
    assert [p.line for p in problems] == [2, 3, 4, 5, 7]
    assert "unknown key 'speaker'" in problems[2].message
    assert load_references(str(tmp_path / "none.jsonl")) == ({}, [])
