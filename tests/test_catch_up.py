"""Catching up with `ingest`: batches read ahead in parts, and killed runs resumed.

The reading process hands each batch to the counting one in parts, so the
counting starts before a batch is read to its end; the batch is still
committed once, with the position it ends at. An `ingest` killed with
SIGKILL while it commits is run again and must end where one clean run ends.
"""

import shutil
import signal
import subprocess
import sys
import time
from functools import partial

from appliance import loggen
from appliance.ingest import ReadAhead
from appliance.ingest import Source
from appliance.sources.correlate import Correlator
from tests.conftest import write_config
from tests.test_exactly_once import clean_run
from tests.test_exactly_once import lines_counted
from tests.test_exactly_once import outcome
from tests.test_exactly_once import wait_for
from tests.test_ground_truth import RULES_TOML

SEED = 20261205


def test_a_batch_arrives_in_parts_and_ends_with_its_position(settings, tmp_path):
    log_path = tmp_path / "mail.log"
    loggen.generate(log_path, SEED, hours=2)
    lines = log_path.read_text().splitlines()
    source = Source(str(log_path), files=[str(log_path)])

    ahead = ReadAhead(source, limit=1000, part=300)
    batches, events = [], []
    try:
        for parts in ahead.batches():
            sizes = 0
            for part in parts:
                sizes += 1
                events += part
            batches.append((ahead.end.lines, sizes))
            last = ahead.end.snapshot
    finally:
        ahead.close()
        source.close()

    full, rest = divmod(len(lines), 1000)
    assert full >= 3
    # 1,000 lines come as 300 + 300 + 300 + 100; the rest in parts of 300
    assert batches == [(1000, 4)] * full + [(rest, -(-rest // 300))] * (rest > 0)
    assert last.offset == log_path.stat().st_size
    assert last.lines == len(lines)
    assert events == Correlator().feed_lines(lines)


def run_ingest(config_path, log_path):
    """Start `sender-filter ingest` of one log; returns the process."""
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "ingest", str(log_path)]
        + ["--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def counted_beyond(database, log_path, killed_at):
    """Whether more lines are committed than at the last kill."""
    return lines_counted(database, str(log_path)) > max(killed_at, default=0)


def test_ingest_killed_while_catching_up_counts_each_line_once_when_rerun(tmp_path):
    content = tmp_path / "content.log"
    truth = loggen.generate(content, SEED, hours=24, scale=12)
    total = sum(1 for _ in open(content, "rb"))
    config_path = write_config(tmp_path, RULES_TOML)
    database = str(tmp_path / "sender-filter.db")
    log_path = tmp_path / "mail.log"
    shutil.copyfile(content, log_path)
    subprocess.run(
        [sys.executable, "-m", "appliance.cli", "init", "--config", str(config_path)],
        check=True,
        capture_output=True,
    )

    killed_at = []
    for kill in range(3):
        ingest = run_ingest(config_path, log_path)
        # killed as soon as a batch more is committed, while the next is counted
        wait_for(partial(counted_beyond, database, log_path, killed_at), poll=0.005)
        ingest.send_signal(signal.SIGKILL)
        ingest.wait()
        killed_at.append(lines_counted(database, str(log_path)))
        time.sleep(0.01 * kill)
    ingest = run_ingest(config_path, log_path)
    assert ingest.wait(timeout=120) == 0

    # each kill fell inside the catch-up, after the one before
    assert 0 < killed_at[0] < killed_at[1] < killed_at[2] < total
    clean = clean_run(tmp_path / "clean", content)
    assert outcome(database, str(log_path)) == clean
    assert clean[2] == [(total, truth["garbage_lines"])]
    assert len(clean[0]) > 30
