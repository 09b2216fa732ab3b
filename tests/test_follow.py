"""Following a log like tail -F, resuming from the saved position, and catch-up."""

import json
import os
import time

import pytest
from peewee import OperationalError

from appliance import cli
from appliance import daemon as daemon_module
from appliance import loggen
from appliance.ingest import LinesProgress
from appliance.ingest import LogsBusy
from appliance.ingest import Pipeline
from appliance.ingest import ReaderLock
from appliance.ingest import Source
from appliance.ingest import read_files
from appliance.ingest import rotation_order
from appliance.models import Block
from appliance.models import SourceCounter
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.profiler import Profiler
from appliance.sources import follow
from appliance.sources.correlate import Correlator
from appliance.sources.follow import LogFile
from enforcement.dryrun import DryRunBackend
from tests.conftest import write_config
from tests.test_rotation import append
from tests.test_rotation import line
from tests.test_rotation import numbers
from tests.test_rotation import rotate

LINE = "Dec  4 10:00:0{n} mx1 postfix/smtpd[1]: connect from unknown[192.0.2.{n}]\n"


def texts(read):
    """The lines LogFile.lines returned, with the line ends the file has."""
    return [text + "\n" for text in read]


def test_rotation_by_rename_drains_the_old_file_then_follows_the_new(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1))
    follower = LogFile(str(path), grace=0)
    assert texts(follower.lines(100)) == [LINE.format(n=1)]

    with open(path, "a") as old:
        old.write(LINE.format(n=2))
    os.rename(path, tmp_path / "mail.log.1")
    path.write_text(LINE.format(n=3))

    assert texts(follower.lines(100)) == [LINE.format(n=2)]
    assert texts(follower.lines(100)) == [LINE.format(n=3)]
    assert follower.lines(100) == []


def test_a_writer_that_has_not_reopened_yet_is_read_before_the_new_file(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1))
    follower = LogFile(str(path), grace=0.3)
    follower.lines(100)
    old = open(path, "a")
    os.rename(path, tmp_path / "mail.log.1")
    path.write_text(LINE.format(n=3))

    assert follower.lines(100) == []
    old.write(LINE.format(n=2))
    old.close()
    assert texts(follower.lines(100)) == [LINE.format(n=2)]
    time.sleep(0.35)

    assert texts(follower.lines(100)) == [LINE.format(n=3)]


def test_copy_truncate_starts_again_from_the_top(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1) + LINE.format(n=2))
    follower = LogFile(str(path), grace=0)
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

    assert texts(follower.lines(100)) == [whole]
    assert follower.position()[2] == len(whole)


def test_a_saved_position_resumes_and_a_new_file_restarts(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(LINE.format(n=1) + LINE.format(n=2))
    first = LogFile(str(path))
    first.lines(1)
    inode, head, offset = first.position()

    resumed = LogFile(str(path), inode=inode, offset=offset, head=head)
    assert texts(resumed.lines(100)) == [LINE.format(n=2)]

    os.unlink(path)
    path.write_text(LINE.format(n=5) + LINE.format(n=6))
    fresh = LogFile(str(path), inode=inode, offset=offset, head=head)
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

    forget_everything()
    for _ in range(6):
        ingest(settings, log_path, stop_after=3)
    ingest(settings, log_path)

    assert snapshot() == once
    assert len(once[1]) > 5


def forget_everything():
    """Empty what reading and profiling wrote, keeping the rules."""
    with db.atomic():
        for model in (SuspiciousEntry, Block):
            model.delete().execute()
        for table in ("windowbatch", "sourceposition", "sourcecounter", "auditentry"):
            db.execute_sql(f"DELETE FROM {table}")


def test_a_step_whose_transaction_fails_is_read_again_from_the_database(
    make_settings, tmp_path, monkeypatch
):
    log_path = tmp_path / "mail.log"
    loggen.generate(log_path, seed=3, hours=2, scale=0.5)
    rules = "[rules.spam]\nmessages = 20\n[rules.dha]\nmessages = 20\n"
    settings = make_settings(rules + f'[logs]\nfiles = ["{log_path}"]\n')
    ingest(settings, log_path)
    once = snapshot()
    forget_everything()
    saves = []

    def save_failing_twice(source, snapshot):
        saves.append(source.path)
        if len(saves) in (2, 4):
            raise OperationalError("database is locked")
        save(source, snapshot)

    save = Source.save
    monkeypatch.setattr(Source, "save", save_failing_twice)
    monkeypatch.setattr(daemon_module, "RETRY_AFTER", 0)
    daemon = daemon_module.Daemon(settings, DryRunBackend(settings))
    daemon.load()
    for _ in range(20):
        daemon._read()
    daemon.watcher.close()

    assert len(saves) > 4
    assert snapshot() == once
    counter = SourceCounter.get(SourceCounter.path == str(log_path))
    assert counter.lines == sum(1 for _ in open(log_path, "rb"))


@pytest.fixture
def config_path(tmp_path):
    """An initialised appliance; returns its config path."""
    path = write_config(tmp_path)
    assert cli.main(["init", "--config", str(path)]) == 0
    return path


def cli_ingest(config_path, capsys, *files):
    """`sender-filter ingest --json FILE...`; returns its summary."""
    argv = ["ingest", "--json", "--config", str(config_path), *map(str, files)]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_catch_up_today_and_the_compressed_file_tomorrow_counts_once(
    config_path, tmp_path, capsys
):
    path = tmp_path / "mail.log"
    append(path, 1, 30)
    rotate(path)
    append(path, 31, 50)
    assert cli_ingest(config_path, capsys, tmp_path / "mail.log.1")["lines"] == 30

    rotate(path, compress_second=True)
    append(path, 51, 60)
    assert cli_ingest(config_path, capsys, tmp_path / "mail.log.2.gz")["lines"] == 0
    summary = cli_ingest(config_path, capsys, tmp_path / "mail.log.1", path)

    assert summary["lines"] == 30
    assert summary["sources"][0]["path"] == str(path)
    assert SourceCounter.get(SourceCounter.path == str(path)).lines == 60
    assert cli_ingest(config_path, capsys, *tmp_path.glob("mail.log*"))["lines"] == 0


def test_catch_up_reads_rotated_files_oldest_first(
    config_path, tmp_path, capsys, monkeypatch
):
    path = tmp_path / "mail.log"
    for first in (1, 11, 21):
        append(path, first, first + 9)
        rotate(path, compress_second=True)
    append(path, 31, 35)
    # ingest decodes in a child process: the lines it fed go through a file
    fed = tmp_path / "fed.txt"
    feed_lines = Correlator.feed_lines

    def recording(self, lines):
        with open(fed, "a") as record:
            record.writelines(text + "\n" for text in lines)
        return feed_lines(self, lines)

    monkeypatch.setattr(Correlator, "feed_lines", recording)
    files = sorted(tmp_path.glob("mail.log*"))
    assert [f.name for f in files][-1] == "mail.log.3.gz"
    assert cli_ingest(config_path, capsys, *files)["lines"] == 35

    assert numbers(fed.read_text().splitlines()) == list(range(1, 36))


def test_catch_up_after_following_reads_only_what_the_follower_left(
    config_path, tmp_path, capsys
):
    path = tmp_path / "mail.log"
    append(path, 1, 20)
    profiler = Profiler(cli.config.load(config_path))
    source = Source(str(path))
    source.file.grace = 0
    while Pipeline(profiler).step(source, limit=7):
        pass
    source.close()
    append(path, 21, 25)
    rotate(path)
    append(path, 26, 28)

    summary = cli_ingest(config_path, capsys, tmp_path / "mail.log.1", path)

    assert summary["lines"] == 8
    assert SourceCounter.get(SourceCounter.path == str(path)).lines == 28


def test_ingest_is_refused_while_another_process_reads_the_logs(
    config_path, tmp_path, capsys
):
    append(tmp_path / "mail.log", 1, 3)
    settings = cli.config.load(config_path)
    with ReaderLock(settings, "sender-filter run"):
        with pytest.raises(LogsBusy, match="sender-filter run .pid"):
            ReaderLock(settings, "another").acquire()
        argv = ["ingest", "--config", str(config_path), str(tmp_path / "mail.log")]
        assert cli.main(argv) == 2
        assert "is reading logs into this database" in capsys.readouterr().err

    assert read_files(settings, [tmp_path / "mail.log"])["lines"] == 3


def test_status_gives_each_source_its_counts_and_what_is_left(
    config_path, tmp_path, capsys
):
    path = tmp_path / "mail.log"
    append(path, 1, 4)
    path.open("a").write("not a mail log line\n")
    cli_ingest(config_path, capsys, path)
    append(path, 6, 6)

    assert cli.main(["status", "--json", "--config", str(config_path)]) == 0
    status = json.loads(capsys.readouterr().out)

    assert status["sources"] == [
        {
            "path": str(path),
            "lines": 5,
            "skipped": 1,
            "offset": path.stat().st_size - len(line(6)),
            "behind": len(line(6)),
            "updated_at": status["sources"][0]["updated_at"],
        }
    ]
    assert cli.main(["status", "--config", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert f"{path}: 5 lines, 1 not understood, {len(line(6))} bytes to read" in text


def test_the_progress_bar_counts_lines_per_second_with_an_eta(capsys):
    bar = LinesProgress("mail.log", enabled=True)
    bar.advance(1000, 100_000, 300_000, ["/var/log/mail.log.2.gz"])
    bar.close()

    shown = capsys.readouterr().err
    assert "lines/s" in shown and "4.00k" in shown and "mail.log.2.gz" in shown
    quiet = LinesProgress("mail.log", enabled=False)
    quiet.advance(1000, 100_000, 300_000)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_a_jsonl_source_is_read_by_the_json_lines_decoder(settings, tmp_path):
    decoder = pytest.importorskip("appliance.sources.jsonlines").JsonLinesDecoder

    source = Source(str(tmp_path / "events.jsonl"))

    assert isinstance(source.decoder, decoder)
    assert isinstance(Source(str(tmp_path / "mail.log")).decoder, Correlator)


def test_rotation_names_sort_oldest_first_whatever_the_order_given():
    given = ["/l/mail.log", "/l/mail.log.1", "/l/mail.log.3.gz", "/l/mail.log.2.gz"]
    given += ["/l/mail.err", "/l/syslog-20261201.gz", "/l/syslog-20261130.gz"]

    assert rotation_order(given) == {
        "/l/mail.log": ["/l/mail.log.3.gz", "/l/mail.log.2.gz", "/l/mail.log.1"]
        + ["/l/mail.log"],
        "/l/mail.err": ["/l/mail.err"],
        "/l/syslog": ["/l/syslog-20261130.gz", "/l/syslog-20261201.gz"],
    }


def test_a_symlink_to_a_log_already_read_reads_nothing(make_settings, tmp_path):
    from appliance.ingest import read_files

    settings = make_settings()
    log_path = tmp_path / "mail.log"
    log_path.write_text(LINE.format(n=1) + LINE.format(n=2))
    (tmp_path / "other.log").symlink_to(log_path)

    first = read_files(settings, [str(log_path)])
    again = read_files(settings, [str(tmp_path / "other.log")])

    assert (first["lines"], again["lines"]) == (2, 0)


@pytest.mark.parametrize("chunk", [64, follow.READ_BYTES])
def test_reads_stop_at_the_line_limit_whatever_the_chunk_size(
    tmp_path, monkeypatch, chunk
):
    monkeypatch.setattr(follow, "READ_BYTES", chunk)
    written = [f"line {n:02d} of the log\n" for n in range(30)]
    path = tmp_path / "mail.log"
    path.write_text("".join(written) + "half a li")
    opened = follow.OpenedLog(str(path))

    batches = [opened.read(7) for _ in range(6)]
    complete_lines_end = opened.offset
    last = opened.read(7, final=True)

    assert [len(batch) for batch in batches] == [7, 7, 7, 7, 2, 0]
    assert [t + "\n" for batch in batches for t in batch] == written
    assert complete_lines_end == len("".join(written).encode())
    assert (last, opened.offset) == (["half a li"], path.stat().st_size)
    opened.close()
