"""Exactly once: a daemon killed with SIGKILL again and again, through rotations.

A writer process appends a generated gateway log to `mail.log` in chunks,
cutting lines across writes; the test rotates the file by rename (the writer
reopens later, like rsyslog after its HUP) and by copy-truncate, sometimes
while the daemon is down, and SIGKILLs `sender-filter run` at random moments
(seeded). When everything is read, the suspicious entries, blocks and line
counts must equal the generator's ground truth and a clean `ingest` of the
same content, exactly; and each temporary block is lifted once, at its end,
though the scheduler's jobs were re-created at every restart.
"""

import gzip
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import config
from appliance import loggen
from tests.conftest import write_config
from tests.test_ground_truth import RULES_TOML
from tests.test_ground_truth import expected_entries

SEED = 20261204
LOGS_TOML = '[logs]\nfiles = ["mail.log"]\n'
WAIT = 60.0
LAST_EXPIRY = 14

WRITER = r"""
import os, random, sys, time
path, content, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(content, "rb").read().splitlines(keepends=True)
rng = random.Random(seed)
written = 0
log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for command in sys.stdin:
    word, *count = command.split()
    if word == "write":
        chunk = b"".join(lines[written : written + int(count[0])])
        written += int(count[0])
        cuts = sorted(rng.sample(range(1, len(chunk)), 3)) if len(chunk) > 3 else []
        start = 0
        for cut in cuts + [len(chunk)]:
            view = memoryview(chunk)[start:cut]
            while view:
                view = view[os.write(log, view):]
            start = cut
            time.sleep(rng.random() * 0.003)
    elif word == "reopen":
        os.close(log)
        log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    print("ok", written, flush=True)
"""


class Writer:
    """The writer process, driven one command at a time."""

    def __init__(self, directory, log_path, content):
        script = directory / "writer.py"
        script.write_text(WRITER)
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(log_path), str(content), str(SEED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, command):
        """Send a command and wait (bounded) for its acknowledgement."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], 10)
        assert ready, f"writer did not answer {command!r}"
        answer = self.process.stdout.readline()
        assert answer.startswith("ok"), answer
        return int(answer.split()[1])

    def stop(self):
        """End the writer."""
        self.process.kill()
        self.process.wait(10)


class Daemon:
    """`sender-filter run` as a child process that the test kills at will."""

    def __init__(self, config_path, output):
        self.config_path = config_path
        self.output = output
        self.process = None
        self.kills = 0

    def start(self, wait=True):
        """Start the daemon; with `wait`, return once it follows the log."""
        started = self.starts()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run"]
            + ["--config", str(self.config_path)],
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for(lambda: self.starts() > started)

    def starts(self):
        """How many times a daemon has said it follows the log."""
        return Path(self.output.name).read_text().count("INFO appliance.daemon: follow")

    def kill(self):
        """SIGKILL, and reap it so its lock and files are released."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.kills += 1

    def stop(self):
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def shift(path):
    """Make room for a new .1: every .N (and .N.gz) becomes .N+1."""
    for number in range(20, 0, -1):
        for suffix in ("", ".gz"):
            older = Path(f"{path}.{number}{suffix}")
            if older.exists():
                older.rename(f"{path}.{number + 1}{suffix}")


def compress_second(path):
    """logrotate's delaycompress: gzip mail.log.2."""
    second = Path(f"{path}.2")
    if second.exists():
        with open(second, "rb") as plain, gzip.open(f"{second}.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)
        second.unlink()


def rename_rotation(path, writer, rng):
    """Rename to .1; the writer goes on in the old file a little, then reopens."""
    shift(path)
    path.rename(f"{path}.1")
    writer.send(f"write {rng.randint(1, 40)}")
    compress_second(path)
    writer.send("reopen")


def copy_truncate(path):
    """Copy to .1, then truncate in place (the writer is idle meanwhile)."""
    shift(path)
    shutil.copyfile(path, f"{path}.1")
    os.truncate(path, 0)


def run_sql(database, query, *args):
    """Rows of a query on an appliance database (read with plain sqlite3)."""
    connection = sqlite3.connect(database, timeout=10)
    try:
        return connection.execute(query, args).fetchall()
    finally:
        connection.close()


def outcome(database, log_path):
    """What a run decided and counted, comparable across runs."""
    blocks = run_sql(
        database,
        "SELECT target, threat_type, action, created_at, expires_at, created_by,"
        " reason FROM block",
    )
    entries = run_sql(
        database,
        "SELECT e.sender, e.threat_type, e.first_seen, e.last_seen, e.violations,"
        " e.messages, e.rate, e.status, e.open, b.target, b.created_at"
        " FROM suspiciousentry e LEFT JOIN block b ON e.block_id = b.id",
    )
    counts = run_sql(
        database, "SELECT lines, skipped FROM sourcecounter WHERE path = ?", log_path
    )
    return sorted(blocks, key=repr), sorted(entries, key=repr), counts


def evidence_rows(database):
    """Every entry's kept violations with their lines (the log's path aside)."""
    return sorted(
        run_sql(
            database,
            "SELECT e.sender, e.threat_type, v.number, v.slot, v.ts, v.line,"
            " v.message, v.violations, v.recipients, v.unknown"
            " FROM evidence v JOIN suspiciousentry e ON v.entry_id = e.id",
        ),
        key=repr,
    )


def unlifted(database, truth):
    """True until the last block's end has passed and every temporary one is lifted."""
    latest = max(b["expires_at"] for b in truth["blocks"] if b["expires_at"])
    return time.time() < latest or run_sql(
        database,
        "SELECT id FROM block WHERE expires_at IS NOT NULL AND lifted_at IS NULL",
    )


def lines_counted(database, log_path):
    """Lines the daemon has committed for a log so far."""
    try:
        rows = run_sql(
            database, "SELECT lines FROM sourcecounter WHERE path = ?", log_path
        )
    except sqlite3.OperationalError:
        return 0
    return rows[0][0] if rows else 0


def wait_for(condition, seconds=WAIT, poll=0.05):
    """Poll until `condition()` holds, every `poll` seconds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {seconds} s"
        time.sleep(poll)


def generate(directory, rules):
    """The log, dated so that its last block expires (wall time) during the test."""
    probe_end = int(time.time())
    probe = loggen.generate(directory / "probe.log", SEED, rules=rules, end=probe_end)
    latest = max(b["expires_at"] for b in probe["blocks"] if b["expires_at"])
    end = int(time.time()) + LAST_EXPIRY - int(latest - probe_end)
    content = directory / "content.log"
    truth = loggen.generate(content, SEED, rules=rules, end=end)
    return truth, content


def clean_run(directory, content):
    """`ingest` of the whole content on a fresh appliance; its outcome."""
    directory.mkdir()
    config_path = write_config(directory, RULES_TOML)
    log_path = directory / "mail.log"
    shutil.copyfile(content, log_path)
    for argv in (["init"], ["ingest", str(log_path)]):
        subprocess.run(
            [sys.executable, "-m", "appliance.cli", *argv, "--config"]
            + [str(config_path)],
            check=True,
            capture_output=True,
            timeout=WAIT,
        )
    return outcome(directory / "sender-filter.db", str(log_path))


@pytest.fixture
def appliance(tmp_path):
    """An initialised appliance following `mail.log`; yields (settings, daemon)."""
    config_path = write_config(tmp_path, RULES_TOML + LOGS_TOML)
    subprocess.run(
        [sys.executable, "-m", "appliance.cli", "init", "--config", str(config_path)],
        check=True,
        capture_output=True,
        timeout=WAIT,
    )
    with open(tmp_path / "daemon.log", "ab") as output:
        daemon = Daemon(config_path, output)
        try:
            yield config.load(config_path), daemon
        finally:
            daemon.stop()
            print("--- daemon log (end) ---")
            print((tmp_path / "daemon.log").read_text()[-6000:])


def test_sigkill_at_random_through_rotations_counts_every_line_once(
    appliance, tmp_path
):
    settings, daemon = appliance
    log_path = Path(settings.log_files[0])
    database = str(settings.database)
    truth, content = generate(tmp_path, settings.rules)
    total = sum(1 for _ in open(content, "rb"))
    rng = random.Random(SEED)
    chunks = []
    while sum(chunks) < total:
        chunks.append(min(rng.randint(100, 900), total - sum(chunks)))
    steps = len(chunks)
    kill_at = set(rng.sample(range(2, steps - 2), 12))
    down = dict(zip(sorted(kill_at)[2:8:2], ("rename", "copy", "twice"), strict=True))
    renames = set(rng.sample(sorted(set(range(1, steps - 1)) - kill_at), 3))
    truncates = set(rng.sample(sorted(set(range(1, steps - 1)) - kill_at - renames), 2))
    writer = Writer(tmp_path, log_path, content)
    started = time.monotonic()

    try:
        daemon.start()
        for step, count in enumerate(chunks):
            writer.send(f"write {count}")
            if step == 0:
                # a daemon that never committed a line has no position to go back to
                wait_for(lambda: lines_counted(database, str(log_path)) > 0)
            time.sleep(rng.uniform(0.01, 0.1))
            if step in renames:
                rename_rotation(log_path, writer, rng)
            if step in truncates:
                copy_truncate(log_path)
            if step not in kill_at:
                continue
            time.sleep(rng.choice((0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)))
            daemon.kill()
            if step in down:
                writer.send(f"write {rng.randint(50, 300)}")
                if down[step] == "copy":
                    copy_truncate(log_path)
                else:
                    rename_rotation(log_path, writer, rng)
                    if down[step] == "twice":
                        writer.send(f"write {rng.randint(50, 300)}")
                        rename_rotation(log_path, writer, rng)
                writer.send(f"write {rng.randint(0, 100)}")
            if rng.random() < 0.3:
                daemon.start(wait=False)
                time.sleep(rng.uniform(0.05, 0.6))
                daemon.kill()
            daemon.start()
        written = writer.send("write 0")
        assert written >= total

        wait_for(lambda: lines_counted(database, str(log_path)) >= total)
        wait_for(lambda: not unlifted(database, truth))
        assert daemon.process.poll() is None, "the daemon died"
        daemon.stop()
    finally:
        writer.stop()
    seconds = time.monotonic() - started

    blocks, entries, counts = outcome(database, str(log_path))
    clean = clean_run(tmp_path / "clean", content)
    print(f"{daemon.kills} kills, {total} lines, {seconds:.1f} s")

    assert daemon.kills >= 10
    assert counts == [(total, truth["garbage_lines"])] == clean[2]
    assert sorted(b[:2] + b[3:5] for b in blocks) == sorted(
        (b["ip"], b["type"], b["created_at"], b["expires_at"]) for b in truth["blocks"]
    )
    assert sorted(e[:6] + e[7:8] for e in entries) == expected_entries(truth)
    assert (blocks, entries) == clean[:2]
    assert len(blocks) > 30
    kept = evidence_rows(database)
    assert kept == evidence_rows(str(tmp_path / "clean" / "sender-filter.db"))
    assert len(kept) > 500
    lifted = run_sql(
        database,
        "SELECT count(*), count(DISTINCT detail) FROM auditentry"
        " WHERE action = 'expired'",
    )
    assert lifted == [(len([b for b in blocks if b[4]]),) * 2]
    assert run_sql(database, "SELECT 1 FROM block WHERE lifted_at != expires_at") == []


def test_a_line_written_is_counted_within_100_ms(appliance, tmp_path):
    settings, daemon = appliance
    log_path = Path(settings.log_files[0])
    daemon.start()
    wait_for(lambda: "following" in (tmp_path / "daemon.log").read_text())
    delays = []

    for number in range(1, 8):
        with open(log_path, "a") as log:
            log.write(f"Dec  4 10:00:0{number} mx1 postfix/smtpd[1]: connect from x\n")
        written = time.monotonic()
        while lines_counted(str(settings.database), str(log_path)) < number:
            assert time.monotonic() - written < 5, "the line was not read"
            time.sleep(0.002)
        delays.append(time.monotonic() - written)
        time.sleep(0.2)

    print("delays (ms):", [round(d * 1000) for d in delays])
    assert sorted(delays)[len(delays) // 2] < 0.1
