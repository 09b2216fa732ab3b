"""Rotation by rename, copy-truncate and compression: every line read once.

Each test writes numbered lines and checks the reader saw each number exactly
once, in order, through rotations while reading and while stopped.
"""

import gzip
import json
import os
import random
import shutil
import time

import pytest

from appliance.sources.follow import LogFile
from appliance.sources.watch import Watcher

LINE = (
    "2026-12-04T10:{m:02d}:{s:02d}.{us:06d}+00:00 mx1 postfix/smtpd[{n}]: "
    "connect from x[192.0.2.{host}]\n"
)


def line(n):
    """Log line number n (its smtpd pid is n)."""
    return LINE.format(m=n // 60 % 60, s=n % 60, us=n * 7919 % 10**6, n=n, host=n % 200)


def numbers(read):
    """The line numbers in what LogFile.lines returned."""
    return [int(text.split("[", 1)[1].split("]", 1)[0]) for text in read]


def append(path, first, last):
    """Append lines first..last (inclusive) to a file."""
    with open(path, "a") as log:
        log.write("".join(line(n) for n in range(first, last + 1)))


def drain(follower, calls=20):
    """Every number the follower gives over a few calls."""
    seen = []
    for _ in range(calls):
        seen += numbers(follower.lines(1000))
    return seen


def restarted(follower):
    """A new follower from the old one's saved position, as after a restart."""
    inode, head, offset = follower.position()
    follower.close()
    return LogFile(
        follower.path, inode=inode, offset=offset, head=head, known=follower.known
    )


def shift(path):
    """Make room for a new .1: every .N (and .N.gz) becomes .N+1."""
    for number in range(9, 0, -1):
        for suffix in ("", ".gz"):
            older = f"{path}.{number}{suffix}"
            if os.path.exists(older):
                os.rename(older, f"{path}.{number + 1}{suffix}")


def rotate(path, compress_second=False):
    """logrotate by rename: shift, mail.log to .1 (and, optionally, gzip .2)."""
    shift(path)
    os.rename(path, f"{path}.1")
    if compress_second and os.path.exists(f"{path}.2"):
        with open(f"{path}.2", "rb") as plain, gzip.open(f"{path}.2.gz", "wb") as gz:
            shutil.copyfileobj(plain, gz)
        os.unlink(f"{path}.2")


def copy_truncate(path):
    """logrotate copytruncate: copy to .1 (after shifting), then truncate in place."""
    shift(path)
    shutil.copyfile(path, f"{path}.1")
    os.truncate(path, 0)


def test_restart_after_rename_reads_the_rest_of_mail_log_1_first(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 10)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(4)) == [1, 2, 3, 4]

    rotate(path)
    append(path, 11, 15)
    follower = restarted(follower)
    follower.grace = 0

    assert drain(follower) == list(range(5, 16))


def test_restart_after_two_rotations_and_compression_reads_everything_once(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 10)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(3)) == [1, 2, 3]

    append(path, 11, 12)
    rotate(path)
    append(path, 13, 20)
    rotate(path, compress_second=True)
    append(path, 21, 25)
    assert sorted(os.listdir(tmp_path)) == ["mail.log", "mail.log.1", "mail.log.2.gz"]
    follower = restarted(follower)
    follower.grace = 0

    assert drain(follower) == list(range(4, 26))


def test_copy_truncate_while_stopped_neither_rereads_nor_loses(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 10)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(6)) == list(range(1, 7))

    append(path, 11, 12)
    copy_truncate(path)
    append(path, 13, 30)
    follower = restarted(follower)
    follower.grace = 0

    assert drain(follower) == list(range(7, 31))


def test_copy_truncate_while_following_reads_the_unread_end_from_the_copy(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 10)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(5)) == list(range(1, 6))

    copy_truncate(path)
    append(path, 11, 40)

    assert drain(follower) == list(range(6, 41))


def test_a_writer_taking_back_a_failed_write_is_not_read_again(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 10)
    follower = LogFile(str(path), grace=0)
    assert numbers(follower.lines(100)) == list(range(1, 11))
    size = path.stat().st_size
    append(path, 11, 12)
    os.truncate(path, size)

    append(path, 13, 14)

    assert drain(follower) == [13, 14]


def test_a_file_that_does_not_exist_yet_is_read_when_it_appears(tmp_path):
    path = tmp_path / "logs" / "mail.log"
    follower = LogFile(str(path))
    watcher = Watcher([str(path)])
    try:
        assert follower.lines(100) == []
        assert watcher.wait(0.01) is False
        path.parent.mkdir()
        time.sleep(1.1)
        watcher.wait(0.01)

        append(path, 1, 2)
        started = time.monotonic()
        assert watcher.wait(5) is True
        assert time.monotonic() - started < 0.1
    finally:
        watcher.close()
    assert numbers(follower.lines(100)) == [1, 2]


def test_the_watcher_wakes_on_a_write_and_on_a_poke_not_on_other_files(tmp_path):
    path = tmp_path / "mail.log"
    append(path, 1, 1)
    watcher = Watcher([str(path)])
    try:
        (tmp_path / "other.log").write_text("noise\n")
        assert watcher.wait(0.05) is False
        append(path, 2, 2)
        assert watcher.wait(5) is True
        watcher.poke()
        assert watcher.wait(5) is True
    finally:
        watcher.close()


class RotatingLog:
    """A log written, rotated and read at random, with restarts and crashes.

    The reader commits after each batch it gets; a crash drops the batch in
    hand and restarts from the last commit, as a killed daemon does.
    """

    def __init__(self, directory, seed):
        self.rng = random.Random(seed)
        self.path = str(directory / "mail.log")
        self.writer = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.written = 0
        self.committed = []
        self.saved = (0, "", 0, [])
        self.follower = LogFile(self.path, grace=0)
        self.reopen_due = False
        self.write(1)
        while not self.committed:
            self.read()

    def write(self, count):
        """Append `count` lines, reading once in the middle of a line now and then."""
        data = "".join(line(self.written + n) for n in range(1, count + 1)).encode()
        self.written += count
        cut = self.rng.randint(0, len(data))
        os.write(self.writer, data[:cut])
        if self.rng.random() < 0.5:
            self.read()
        os.write(self.writer, data[cut:])

    def read(self):
        """One batch: committed, or lost with the reader in a crash."""
        batch = self.follower.lines(self.rng.randint(1, 30))
        if batch and self.rng.random() < 0.1:
            self.restart()
        elif batch:
            self.committed += numbers(batch)
            self.saved = (*self.follower.position(), self.follower.known)
            self.saved = json.loads(json.dumps(self.saved))

    def restart(self):
        """A new reader from the last commit."""
        self.follower.close()
        inode, head, offset, known = self.saved
        self.follower = LogFile(
            self.path, inode=inode, offset=offset, head=head, known=known, grace=0
        )

    def reopen(self):
        """The writer reopens the path (rsyslog after its HUP)."""
        os.close(self.writer)
        self.writer = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.reopen_due = False

    def copy_truncate_can_be_followed(self):
        """False while the reader has the path open but has read none of it.

        Content written and cut away before a single line of it was read
        leaves nothing to recognise its copy by: such a copy-truncate is not
        detectable, and is not tried.
        """
        if os.path.getsize(self.path) == 0:
            return True
        current = self.follower.current
        return current is not None and current.live and current.seen != b""

    def step(self):
        """One random thing: write, read, rotate, reopen, copy-truncate, restart."""
        roll = self.rng.random()
        if roll < 0.35:
            self.write(self.rng.randint(1, 20))
        elif roll < 0.75:
            self.read()
        elif roll < 0.82 and not self.reopen_due:
            rotate(self.path, compress_second=self.rng.random() < 0.3)
            self.reopen_due = True
        elif roll < 0.88 and self.reopen_due:
            self.reopen()
        elif roll < 0.92 and not self.reopen_due:
            if self.copy_truncate_can_be_followed():
                copy_truncate(self.path)
        elif roll >= 0.92:
            self.restart()

    def finish(self):
        """Let the writer reopen and the reader read everything."""
        if self.reopen_due:
            self.reopen()
        for _ in range(300):
            self.read()
        os.close(self.writer)
        self.follower.close()


@pytest.mark.parametrize("seed", range(30))
def test_random_rotations_and_crashes_read_every_line_once_in_order(tmp_path, seed):
    log = RotatingLog(tmp_path, seed)

    for _ in range(300):
        log.step()
    log.finish()

    assert log.committed == list(range(1, log.written + 1))
