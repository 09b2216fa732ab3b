"""Following a log like tail -F, and resuming from the saved position."""

import os

from appliance import loggen
from appliance.ingest import Pipeline
from appliance.ingest import Source
from appliance.models import Block
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.profiler import Profiler
from appliance.sources.follow import LogFile

LINE = "Dec  4 10:00:0{n} mx1 postfix/smtpd[1]: connect from unknown[192.0.2.{n}]\n"


def texts(read):
    """Just the line texts of what LogFile.lines returned."""
    return [text for text, _offset in read]


def test_rotation_by_rename_drains_the_old_file_then_follows_the_new(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1))
    follower = LogFile(str(path))
    assert texts(follower.lines(100)) == [LINE.format(n=1)]

    with open(path, "a") as old:
        old.write(LINE.format(n=2))
    os.rename(path, tmp_path / "mail.log.1")
    path.write_text(LINE.format(n=3))

    assert texts(follower.lines(100)) == [LINE.format(n=2)]
    assert follower.lines(100) == []
    assert texts(follower.lines(100)) == [LINE.format(n=3)]


def test_copy_truncate_starts_again_from_the_top(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1) + LINE.format(n=2))
    follower = LogFile(str(path))
    assert len(follower.lines(100)) == 2

    path.write_text("")
    assert follower.lines(100) == []
    with open(path, "a") as log:
        log.write(LINE.format(n=3))

    assert texts(follower.lines(100)) == [LINE.format(n=3)]


def test_a_half_written_line_waits_for_its_end(tmp_path):
    path = tmp_path / "mail.log"
    whole = LINE.format(n=4)
    path.write_text(whole[:20])
    follower = LogFile(str(path))

    assert follower.lines(100) == []
    with open(path, "a") as log:
        log.write(whole[20:])

    assert follower.lines(100) == [(whole, len(whole))]


def test_a_saved_position_resumes_and_a_new_file_restarts(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1) + LINE.format(n=2))
    first = LogFile(str(path))
    first.lines(1)
    inode, head = first.identity()

    resumed = LogFile(str(path), inode=inode, offset=first.offset, head=head)
    assert texts(resumed.lines(100)) == [LINE.format(n=2)]

    os.unlink(path)
    path.write_text(LINE.format(n=5) + LINE.format(n=6))
    fresh = LogFile(str(path), inode=inode, offset=first.offset, head=head)
    assert texts(fresh.lines(100)) == [LINE.format(n=5), LINE.format(n=6)]


def snapshot():
    """Everything the profiler decided, comparable across runs."""
    entries = sorted(
        (e.sender, e.threat_type, e.first_seen, e.last_seen, e.violations, e.messages)
        for e in SuspiciousEntry.select()
    )
    blocks = sorted((b.target, b.threat_type, b.created_at) for b in Block.select())
    return entries, blocks


def ingest(settings, path, stop_after=None):
    """Read a log with fresh objects, as a restarted daemon does."""
    profiler = Profiler(settings)
    profiler.load()
    pipeline = Pipeline(profiler)
    source = Source(str(path))
    steps = 0
    while pipeline.step(source, limit=700):
        steps += 1
        if stop_after is not None and steps == stop_after:
            break
    source.file.close()


def test_restarts_between_batches_count_nothing_twice(make_settings, tmp_path):
    log_path = tmp_path / "mail.log"
    loggen.generate(log_path, seed=3, hours=2, scale=0.5)
    settings = make_settings(
        "[rules.spam]\nmessages = 20\n[rules.dha]\nmessages = 20\n"
    )
    ingest(settings, log_path)
    once = snapshot()

    with db.atomic():
        for model in (SuspiciousEntry, Block):
            model.delete().execute()
        for table in ("windowevent", "sourceposition", "sourcecounter", "auditentry"):
            db.execute_sql(f"DELETE FROM {table}")
    for _ in range(6):
        ingest(settings, log_path, stop_after=3)
    ingest(settings, log_path)

    assert snapshot() == once
    assert len(once[1]) > 5
