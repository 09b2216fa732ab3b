"""Damaged logs: a broken `.gz` and a line without an end do not stop reading.

A rotated `.gz` cut short (a full disk, a copy stopped half way) or not
compressed at all is read up to its damage, reported in one warning line,
and reading goes on with the newer files; run again, nothing is counted
twice. A line longer than LINE_BYTES (a run of NUL bytes left by a crash) is
passed over without holding it, counted once as a line not understood. Each
damaged run is compared with an ingest of the same content, undamaged.
"""

import gzip
import logging
import os
import subprocess
import sys
import tracemalloc
import zlib

import pytest

from appliance import loggen
from appliance.sources import follow
from appliance.sources.follow import LINE_BYTES
from appliance.sources.follow import LONG_LINE
from appliance.sources.follow import LogFile
from appliance.sources.follow import OpenedLog
from tests.conftest import write_config
from tests.test_exactly_once import WAIT
from tests.test_exactly_once import outcome
from tests.test_ground_truth import RULES_TOML
from tests.test_rotation import append
from tests.test_rotation import drain
from tests.test_rotation import numbers
from tests.test_rotation import restarted
from tests.test_rotation import rotate

SEED = 20261205
TRUNCATED = "Compressed file ended before the end-of-stream marker was reached"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(a generated log's lines as bytes, its ground truth)."""
    path = tmp_path_factory.mktemp("generated") / "content.log"
    truth = loggen.generate(path, SEED, hours=6, scale=2)
    return path.read_bytes().splitlines(keepends=True), truth


def thirds(lines):
    """The content of mail.log.2, mail.log.1 and mail.log: a log split in three."""
    third = len(lines) // 3
    parts = lines[:third], lines[third : 2 * third], lines[2 * third :]
    return [b"".join(part) for part in parts]


def compressed(content):
    """`content` as gzip writes it."""
    return gzip.compress(content, mtime=0)


def whole_lines_before_damage(damaged):
    """The complete lines a damaged gzip stream gives before its damage."""
    readable = zlib.decompressobj(wbits=31).decompress(damaged)
    return readable[: readable.rfind(b"\n") + 1]


def appliance_in(directory, files):
    """A fresh appliance in `directory` with the given {name: bytes} log files."""
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_bytes(content)
    run(directory, "init")
    return directory


def run(directory, *argv):
    """A `sender-filter` command on the appliance in `directory`; it must succeed."""
    config_path = write_config(directory, RULES_TOML)
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *argv, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def ingest(directory, *names):
    """`sender-filter ingest` of files in `directory`; returns its warnings."""
    done = run(directory, "ingest", *(str(directory / name) for name in names))
    return [line for line in done.stderr.splitlines() if "WARNING" in line]


def counted(directory):
    """What the appliance in `directory` counted from its mail.log and decided."""
    return outcome(directory / "sender-filter.db", str(directory / "mail.log"))


def test_a_truncated_gz_is_counted_to_its_damage_then_the_newer_files(
    generated, tmp_path
):
    lines, truth = generated
    oldest, older, newest = thirds(lines)
    whole_gz = compressed(oldest)
    cut_gz = whole_gz[: len(whole_gz) // 2]
    readable = whole_lines_before_damage(cut_gz)
    rotated = ("mail.log.2.gz", "mail.log.1", "mail.log")
    damaged = appliance_in(
        tmp_path / "damaged",
        {"mail.log.2.gz": cut_gz, "mail.log.1": older, "mail.log": newest},
    )
    undamaged = appliance_in(
        tmp_path / "undamaged",
        {"mail.log.2": readable, "mail.log.1": older, "mail.log": newest},
    )
    warning = (
        f"{damaged / 'mail.log.2.gz'} is damaged ({TRUNCATED}): "
        f"read up to byte {len(readable)} of its content, the rest left"
    )

    first = ingest(damaged, *rotated)
    ingest(undamaged, "mail.log.2", "mail.log.1", "mail.log")
    once = counted(damaged)
    again = ingest(damaged, *rotated)

    # the lines before the damage count as the same lines undamaged would
    assert 0 < len(readable) < len(oldest)
    assert once == counted(undamaged)
    expected_lines = readable.count(b"\n") + older.count(b"\n") + newest.count(b"\n")
    assert once[2][0][0] == expected_lines
    assert len(once[1]) > 30
    assert [line.split("WARNING ", 1)[1] for line in first] == [
        f"appliance.sources.follow: {warning}"
    ]
    # run again: the damaged file is known as read to its damage; said again
    assert counted(damaged) == once
    assert [line.split(": ", 1)[1] for line in again] == [warning]

    # the file restored from a copy: its rest is read on from the damage
    (damaged / "mail.log.2.gz").write_bytes(whole_gz)
    assert ingest(damaged, *rotated) == []
    assert counted(damaged)[2] == [(len(lines), truth["garbage_lines"])]


def test_a_plain_file_named_gz_is_left_with_a_warning(generated, tmp_path):
    oldest, older, newest = thirds(generated[0])
    damaged = appliance_in(
        tmp_path / "damaged",
        {"mail.log.2.gz": oldest, "mail.log.1": older, "mail.log": newest},
    )
    newer_only = appliance_in(
        tmp_path / "newer-only", {"mail.log.1": older, "mail.log": newest}
    )

    warnings = ingest(damaged, "mail.log.2.gz", "mail.log.1", "mail.log")
    ingest(newer_only, "mail.log.1", "mail.log")

    assert [line.split(": ", 1)[1] for line in warnings] == [
        f"{damaged / 'mail.log.2.gz'} is damaged (Not a gzipped file "
        f"({oldest[:2]!r})): read up to byte 0 of its content, the rest left"
    ]
    assert counted(damaged) == counted(newer_only)
    assert counted(damaged)[2][0][0] == older.count(b"\n") + newest.count(b"\n")


def test_a_gz_altered_inside_is_found_at_its_end_and_the_next_file_read(
    generated, tmp_path, caplog
):
    oldest, older, _ = thirds(generated[0])
    altered = bytearray(compressed(oldest))
    middle = len(altered) // 2
    altered[middle : middle + 256] = b"\xaa" * 256
    (tmp_path / "mail.log.2.gz").write_bytes(altered)
    (tmp_path / "mail.log.1").write_bytes(older)
    paths = [str(tmp_path / "mail.log.2.gz"), str(tmp_path / "mail.log.1")]
    reader = LogFile(str(tmp_path / "mail.log"), files=paths)

    with caplog.at_level(logging.WARNING):
        read = drain_text(reader)
    reader.close()

    # deflate does not notice altered bytes; the trailer's CRC does, at the end
    older_lines = older.decode().splitlines()
    assert read[-len(older_lines) :] == older_lines
    assert read[:1000] == oldest.decode().splitlines()[:1000]
    assert [
        (r.levelname, r.getMessage().split(" (", 1)[0]) for r in caplog.records
    ] == [("WARNING", f"{paths[0]} is damaged")]
    assert "(CRC check failed" in caplog.records[0].getMessage()


def drain_text(reader):
    """Every line a reader gives until it has no more."""
    read = []
    while batch := reader.lines(5000):
        read += batch
    return read


def test_following_reads_a_damaged_rotated_gz_to_its_damage_then_the_rest(
    tmp_path, caplog
):
    path = tmp_path / "mail.log"
    append(path, 1, 20000)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(3)) == [1, 2, 3]

    rotate(path)
    append(path, 20001, 20010)
    rotate(path, compress_second=True)
    append(path, 20011, 20015)
    gz_path = tmp_path / "mail.log.2.gz"
    whole_gz = gz_path.read_bytes()
    gz_path.write_bytes(whole_gz[: len(whole_gz) // 2])
    last_readable = whole_lines_before_damage(gz_path.read_bytes()).count(b"\n")
    follower = restarted(follower)
    follower.grace = 0

    with caplog.at_level(logging.WARNING):
        first = drain(follower)
        append(path, 20016, 20020)
        then = drain(follower)
    follower = restarted(follower)
    follower.grace = 0
    after_restart = drain(follower)
    follower.close()

    assert 3 < last_readable < 20000
    assert first == [*range(4, last_readable + 1), *range(20001, 20016)]
    assert then == list(range(20016, 20021))
    assert after_restart == []
    assert [r.getMessage().split(" (", 1)[0] for r in caplog.records] == [
        f"{gz_path} is damaged"
    ]


def test_a_line_longer_than_the_cap_counts_once_as_not_understood(generated, tmp_path):
    lines, truth = generated
    at = len(lines) // 2
    long_line = b"\0" * (3 * LINE_BYTES) + b"\n"
    with_long_line = b"".join([*lines[:at], long_line, *lines[at:]])
    with_short_junk = b"".join([*lines[:at], b"\0\n", *lines[at:]])
    damaged = appliance_in(tmp_path / "damaged", {"mail.log": with_long_line})
    short = appliance_in(tmp_path / "short", {"mail.log": with_short_junk})

    warnings = ingest(damaged, "mail.log")
    ingest(short, "mail.log")

    at_byte = len(b"".join(lines[:at]))
    assert [line.split(": ", 1)[1] for line in warnings] == [
        f"{damaged / 'mail.log'}: the line at byte {at_byte} is "
        f"{3 * LINE_BYTES} bytes long, over {LINE_BYTES}; "
        "counted as a line not understood"
    ]
    assert counted(damaged) == counted(short)
    assert counted(damaged)[2] == [(len(lines) + 1, truth["garbage_lines"] + 1)]
    assert len(counted(damaged)[1]) > 30


def test_a_line_of_the_cap_is_read_and_one_byte_more_is_passed_over(tmp_path):
    path = tmp_path / "mail.log"
    longest = b"x" * LINE_BYTES + b"\n"
    too_long = b"y" * (LINE_BYTES + 1) + b"\n"
    path.write_bytes(b"first\n" + longest + b"second\n" + too_long + b"third\n")
    opened = OpenedLog(str(path))

    batches = [(opened.read(1000), opened.offset) for _ in range(4)]
    opened.close()

    ends = [6, 6 + len(longest) + 7, 6 + len(longest) + 7 + len(too_long)]
    assert batches == [
        (["first", longest[:-1].decode(), "second"], ends[1]),
        ([LONG_LINE], ends[2]),
        (["third"], ends[2] + 6),
        ([], ends[2] + 6),
    ]


def test_a_long_line_is_passed_over_without_holding_it(tmp_path):
    path = tmp_path / "mail.log"
    with open(path, "wb") as log:
        log.write(b"before\n")
        for _ in range(30):
            log.write(b"\0" * LINE_BYTES)
        log.write(b"\nafter\n")
    opened = OpenedLog(str(path))

    tracemalloc.start()
    read = [opened.read(1000) for _ in range(3)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    opened.close()

    assert read == [["before"], [LONG_LINE], ["after"]]
    assert opened.offset == path.stat().st_size
    # a few chunks of it at a time, not the 30 MiB line
    assert peak < 4 * follow.READ_BYTES


def test_a_long_line_still_being_written_is_counted_once_when_it_ends(tmp_path):
    path = tmp_path / "mail.log"
    path.write_bytes(b"before\n" + b"\0" * (2 * LINE_BYTES))
    follower = LogFile(str(path), grace=0)

    assert follower.lines(1000) == ["before"]
    assert follower.lines(1000) == []
    assert follower.position()[2] == 7
    # stopped in the middle of the long line: read again from its start
    follower = restarted(follower)
    assert follower.lines(1000) == []
    with open(path, "ab") as log:
        log.write(b"\0" * LINE_BYTES + b"\nafter\n")
    assert follower.lines(1000) == [LONG_LINE]
    assert follower.lines(1000) == ["after"]
    assert follower.position()[2] == os.path.getsize(path)
    follower.close()


def test_a_long_last_line_of_a_gz_is_passed_over(tmp_path):
    path = tmp_path / "mail.log.1.gz"
    content = (
        b"before\n" + b"z" * (2 * LINE_BYTES) + b"\nafter\n" + b"\0" * 2 * LINE_BYTES
    )
    path.write_bytes(compressed(content))
    reader = LogFile(str(tmp_path / "mail.log"), files=[str(path)])

    read = drain_text(reader)
    reader.close()

    assert read == ["before", LONG_LINE, "after", LONG_LINE]
    assert reader.known == [[follow.fingerprint(content[:256]), len(content)]]


def test_a_gz_damaged_after_it_was_read_keeps_its_offset(tmp_path, caplog):
    path = tmp_path / "mail.log.2.gz"
    content = b"".join(b"line %d\n" % n for n in range(100000))
    whole_gz = compressed(content)
    path.write_bytes(whole_gz)
    reader = LogFile(str(tmp_path / "mail.log"), files=[str(path)])
    assert len(drain_text(reader)) == 100000
    reader.close()

    path.write_bytes(whole_gz[: len(whole_gz) // 2])
    again = LogFile(str(tmp_path / "mail.log"), known=reader.known, files=[str(path)])

    with caplog.at_level(logging.WARNING):
        assert drain_text(again) == []
    again.close()

    # remembered as read to its end before: restored, it gives nothing twice
    assert again.known == reader.known
    assert [r.getMessage().split(": read", 1)[1] for r in caplog.records] == [
        f" up to byte {len(content)} of its content, the rest left"
    ]
