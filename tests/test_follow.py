"""The tail -F follower on real files: rotation by rename and by copytruncate, truncation,
deletion and re-creation, partial lines, globs, long lines. Every test checks that each
line written is delivered exactly once."""
import logging
import logging.handlers
import os
import shutil
import threading
import time

import pytest

from whisper_exporter.logfiles.follow import Follower


class Sink:
    def __init__(self):
        self.lines = []
        self.errors = []

    def texts(self):
        return [line.decode() for line in self.lines]


def follow(path, **kwargs):
    sink = Sink()
    kwargs.setdefault("retire_idle", 0.3)
    f = Follower(str(path), on_lines=sink.lines.extend,
                 on_error=lambda reason, sample: sink.errors.append((reason, sample)), **kwargs)
    return f, sink


def append(path, *lines, end="\n"):
    with open(path, "a") as fh:
        fh.write("".join(line + end for line in lines))


def test_starts_at_the_end_of_a_file_present_at_start(tmp_path):
    log = tmp_path / "app.log"
    append(log, "old 1", "old 2")
    f, sink = follow(log)
    f.poll()
    assert sink.lines == []
    append(log, "new 1", "new 2")
    f.poll()
    assert sink.texts() == ["new 1", "new 2"]
    assert f.lines == 2 and f.bytes == len(b"new 1\nnew 2\n")


def test_start_at_beginning_reads_what_is_there(tmp_path):
    log = tmp_path / "app.log"
    append(log, "old 1", "old 2")
    f, sink = follow(log, start_at_end=False)
    f.poll()
    append(log, "new")
    f.poll()
    assert sink.texts() == ["old 1", "old 2", "new"]


def test_partial_last_line_waits_for_its_newline(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    append(log, "first half", end="")
    f.poll()
    assert sink.lines == [] and f.lines == 0
    append(log, " second half", "next")
    f.poll()
    assert sink.texts() == ["first half second half", "next"]


def test_unfinished_line_at_start_is_read_whole_once_finished(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("complete\nunfinis")
    f, sink = follow(log)
    f.poll()
    append(log, "hed")
    f.poll()
    assert sink.texts() == ["unfinished"]


def test_rotation_by_rename_drains_the_old_file_and_reads_the_new_from_zero(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    writer = open(log, "a", buffering=1)
    writer.write("a1\na2\n")
    f.poll()
    writer.write("a3\n")  # not read yet when the file is renamed
    os.rename(log, tmp_path / "app.log.1")
    writer.write("a4\n")  # the writer has not reopened yet
    f.poll()  # the path is missing: keep following the renamed file
    writer.write("a5\n")
    writer.close()
    append(log, "b1", "b2")  # the new file
    f.poll()
    assert sorted(sink.texts()) == ["a1", "a2", "a3", "a4", "a5", "b1", "b2"]
    assert f.rotations == 1
    append(tmp_path / "app.log.1", "a6")  # a late write to the old file, before it is retired
    append(log, "b3")
    f.poll()
    assert sorted(sink.texts()) == ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3"]


def test_old_file_is_closed_after_it_stops_growing(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log, retire_idle=0.2)
    f.poll()
    append(log, "a1", "a2-unfinished", end="\n")
    os.rename(log, tmp_path / "app.log.1")
    append(tmp_path / "app.log.1", "tail-without-newline", end="")
    append(log, "b1")
    f.poll()
    assert f.open_files == 2
    time.sleep(0.3)
    f.poll()
    assert f.open_files == 1
    # The old file's unfinished last line is delivered when it is closed: it cannot grow any more.
    assert sorted(sink.texts()) == ["a1", "a2-unfinished", "b1", "tail-without-newline"]


def test_copytruncate_with_an_append_mode_writer(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    writer = open(log, "a", buffering=1)  # O_APPEND, as logging.FileHandler opens it
    for i in range(50):
        writer.write(f"before {i}\n")
    f.poll()
    for i in range(10):
        writer.write(f"unread {i}\n")  # written after our last read: only the copy has them after truncation
    shutil.copyfile(log, tmp_path / "app.log.1")
    os.truncate(log, 0)
    for i in range(5):
        writer.write(f"after {i}\n")
    writer.close()
    f.poll()
    expected = [f"before {i}" for i in range(50)] + [f"unread {i}" for i in range(10)] + [f"after {i}" for i in range(5)]
    assert sink.texts() == expected
    assert f.rotations == 1


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_copytruncate_whose_copy_was_compressed_at_once(tmp_path, compress):
    """logrotate with copytruncate and compress but no delaycompress: by our next poll the
    copy is app.log.1.gz; the unread lines are read from it."""
    import gzip
    import lzma

    log = tmp_path / "app.log"
    log.write_text("")
    append(tmp_path / "app.log.2.gz", "an old rotation")  # not a copy of ours: never read
    f, sink = follow(log)
    f.poll()
    append(log, *[f"before {i}" for i in range(50)])
    f.poll()
    append(log, *[f"unread {i}" for i in range(10)])
    data = log.read_bytes()
    os.truncate(log, 0)
    opener, suffix = (gzip.open, ".gz") if compress == "gzip" else (lzma.open, ".xz")
    with opener(tmp_path / f"app.log.1{suffix}", "wb") as z:
        z.write(data)
    append(log, "after 0")
    f.poll()
    assert sink.texts() == [f"before {i}" for i in range(50)] + [f"unread {i}" for i in range(10)] + ["after 0"]


def test_a_plain_copy_is_not_read_again(tmp_path):
    """A copy of the file that is not followed by a truncation holds lines read already."""
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(tmp_path / "app.log*")
    f.poll()
    append(log, *[f"line {i}" for i in range(20)])
    f.poll()
    shutil.copyfile(log, tmp_path / "app.log.bak")
    append(log, "line 20")
    f.poll()
    f.poll()
    assert sink.texts() == [f"line {i}" for i in range(21)]


def test_copytruncate_with_a_glob_that_matches_the_copy(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(tmp_path / "app.log*")
    f.poll()
    append(log, *[f"x{i}" for i in range(30)])
    f.poll()
    append(log, "y1", "y2")
    shutil.copyfile(log, tmp_path / "app.log.1")
    f.poll()  # the copy is discovered before the truncation: nothing is read from it
    os.truncate(log, 0)
    append(log, "z1")
    f.poll()
    f.poll()
    assert sink.texts() == [f"x{i}" for i in range(30)] + ["y1", "y2", "z1"]


def test_truncated_and_written_past_the_old_offset_between_polls(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    append(log, *[f"first {i}" for i in range(5)])
    f.poll()
    with open(log, "w") as fh:  # truncate, then more bytes than were there before
        fh.write("".join(f"second generation line {i}\n" for i in range(20)))
    f.poll()
    assert sink.texts() == [f"first {i}" for i in range(5)] + [f"second generation line {i}" for i in range(20)]
    assert f.rotations == 1


def test_truncation_to_empty(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    append(log, "one", "two")
    f.poll()
    log.write_text("")  # `> app.log`
    f.poll()
    append(log, "three")
    f.poll()
    assert sink.texts() == ["one", "two", "three"]
    assert f.rotations == 1


def test_delete_and_recreate(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log)
    f.poll()
    append(log, "one")
    f.poll()
    append(log, "two")  # unread when the file is deleted
    log.unlink()
    f.poll()
    assert f.open_files == 1  # the deleted file is still open and was drained
    append(log, "three")
    f.poll()
    assert sink.texts() == ["one", "two", "three"]
    assert f.rotations == 1


def test_file_that_appears_later_is_read_from_its_start(tmp_path):
    log = tmp_path / "later.log"
    f, sink = follow(log)
    f.poll()
    assert f.open_files == 0 and f.read_errors == {}
    append(log, "one", "two")
    f.poll()
    assert sink.texts() == ["one", "two"]
    assert f.rotations == 0


def test_glob_picks_up_new_files_and_starts_old_ones_at_the_end(tmp_path):
    append(tmp_path / "a.log", "a old")
    append(tmp_path / "skip.log.gz", "compressed")
    f, sink = follow(tmp_path / "*.log*")
    f.poll()
    append(tmp_path / "a.log", "a new")
    append(tmp_path / "b.log", "b 1", "b 2")
    append(tmp_path / "c.log.gz", "also compressed")
    f.poll()
    assert sorted(sink.texts()) == ["a new", "b 1", "b 2"]
    assert f.open_files == 2


def test_rename_chain_within_the_glob_is_not_read_twice(tmp_path):
    """RotatingFileHandler renames app.log -> app.log.1 -> app.log.2; the glob matches them all."""
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(tmp_path / "app.log*")
    f.poll()
    handler = logging.handlers.RotatingFileHandler(log, backupCount=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("rotating-test")
    logger.addHandler(handler)
    expected = []
    for generation in range(5):
        for i in range(10):
            logger.warning("g%d-%d", generation, i)
            expected.append(f"g{generation}-{i}")
        f.poll()
        handler.doRollover()
    handler.close()
    f.poll()
    assert sorted(sink.texts()) == sorted(expected)
    assert len(sink.lines) == len(expected)
    assert f.rotations == 5


def test_too_long_lines_are_dropped_and_reported(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log, max_line_bytes=100)
    f.poll()
    append(log, "good 1", "x" * 500, "good 2")
    f.poll()
    append(log, "y" * 150, end="")  # a long unfinished line, over several polls
    f.poll()
    append(log, "y" * 150, end="")
    f.poll()
    append(log, "", "good 3")
    f.poll()
    assert sink.texts() == ["good 1", "good 2", "good 3"]
    assert [reason for reason, _ in sink.errors] == ["line_too_long", "line_too_long"]
    assert f.too_long == 2 and f.lines == 5


def test_directory_at_the_path_is_not_followed(tmp_path):
    (tmp_path / "app.log").mkdir()
    f, sink = follow(tmp_path / "app.log")
    f.poll()
    assert f.open_files == 0 and sink.lines == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_counted_and_retried(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    log.chmod(0)
    f, sink = follow(log)
    f.poll()
    assert f.read_errors == {"EACCES": 1}
    log.chmod(0o644)
    append(log, "one")
    f.poll()
    assert sink.texts() == ["one"]


def test_new_file_reusing_a_closed_files_inode_is_a_rotation(tmp_path):
    """A deleted file is closed once it stops growing; its inode number is free, and ext4 gives
    it to the next file created (the log re-created at the path). That new file is a rotation,
    read from 0, although the follower remembers the number. (Under CPU load the concurrent test
    below closed a deleted file before the next rotation and counted 11 rotations of 12.)"""
    now = [0.0]
    log = tmp_path / "app.log"
    append(log, "")
    f, sink = follow(log, clock=lambda: now[0], retire_idle=1.0)
    f.poll()
    append(log, *[f"a{i}" for i in range(20)])
    f.poll()
    old = os.stat(log)
    log.unlink()
    f.poll()
    now[0] += 5  # the deleted file stopped growing long ago: closed, its number remembered
    f.poll()
    assert f.open_files == 0 and f.rotations == 0
    append(log, "b1", "b2")
    new = os.stat(log)
    if (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
        # This file system did not reuse the number (tmpfs counts up): make the follower's
        # memory hold the new file's number, as on ext4.
        f.closed[(new.st_dev, new.st_ino)] = f.closed.pop((old.st_dev, old.st_ino))
    f.poll()
    assert sink.texts() == [f"a{i}" for i in range(20)] + ["b1", "b2"]
    assert f.rotations == 1


def test_concurrent_writer_rotating_every_way(tmp_path):
    """A writer thread logs numbered lines through logging's handlers while rotations of
    every kind happen; a poller runs at the same time. Every number arrives exactly once.

    Each rotation comes right after a burst of writes, so lines are still unread when
    it happens: the renamed or deleted file is drained through its open descriptor, and
    copytruncate's unread lines come from the copy. Two things no follower can do are
    avoided: a plain truncation waits until the lines before it were read (they exist
    nowhere else), and the next rotation waits two polls (a file that lives less than
    one poll at its path cannot be seen)."""
    log = tmp_path / "app.log"
    log.write_text("")
    f, sink = follow(log, retire_idle=0.2)
    f.poll()
    polls = [0]
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            f.poll()
            polls[0] += 1
            time.sleep(0.002)

    def wait_polls(n=2):
        target = polls[0] + n
        while polls[0] < target:
            time.sleep(0.001)

    formatter = logging.Formatter("seq=%(message)s")
    handler = logging.handlers.WatchedFileHandler(log)  # reopens after delete or rename
    handler.setFormatter(formatter)
    logger = logging.Logger("stress")
    logger.addHandler(handler)
    thread = threading.Thread(target=poller)
    thread.start()
    seq = 0
    kinds = ["rename", "copytruncate", "delete", "truncate"] * 3
    try:
        for n, kind in enumerate(kinds):
            for _ in range(300):
                logger.warning("%d", seq)
                seq += 1
            if kind == "truncate":
                wait_polls()
            if kind == "rename":
                os.rename(log, tmp_path / f"app.log.{n}")
            elif kind == "copytruncate":
                shutil.copyfile(log, tmp_path / f"app.log.{n}")
                os.truncate(log, 0)
            elif kind == "delete":
                log.unlink()
            elif kind == "truncate":
                os.truncate(log, 0)
            for _ in range(100):  # WatchedFileHandler reopens the path on its next write
                logger.warning("%d", seq)
                seq += 1
            wait_polls()
        wait_polls(3)
    finally:
        stop.set()
        thread.join()
        handler.close()
    f.poll()
    got = [int(line.split(b"=")[1]) for line in sink.lines]
    assert sorted(got) == list(range(seq))
    assert f.rotations == len(kinds)
