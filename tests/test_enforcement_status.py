"""Repeat offenders get longer blocks; the kernel status is written per block.

Also the daemon's enforcement pass against what it meets outside the kernel:
a locked database, blocks the guard would refuse now, bad enforcement
settings. These run the dry-run backend, which needs no privileges.
"""

import dataclasses
import logging
import sqlite3
import threading

import pytest

from appliance import addresses
from appliance import config
from appliance import service
from appliance.config import ConfigError
from appliance.daemon import Daemon
from appliance.daemon import unexpected
from appliance.models import ApplianceState
from appliance.models import Block
from enforcement.dryrun import DryRunBackend
from enforcement.plan import Change
from tests.conftest import write_config

HOUR = 3600
DAY = 86400
# lines for the config's [enforcement] section
REPEAT = """
repeat_period = 86400
repeat_factor = 3
repeat_max = 36000
"""


def rule_block(target, at, duration=HOUR):
    """Block `target` the way the profiler does when the spam rule fires."""
    return service.block_network(
        addresses.parse_network(target),
        threat_type="spam",
        duration=duration,
        actor="rule:spam",
        reason="spam rate 40% over 120 messages",
        now=at,
    )


def test_rule_block_lasts_longer_for_each_repeat_within_the_period(settings):
    start = 1_800_000_000.0

    first = rule_block("192.0.2.7", start)
    service.lift(Block.id == first.id, actor="scheduler", reason="expired")
    second = rule_block("192.0.2.7", start + 2 * HOUR)
    service.lift(Block.id == second.id, actor="scheduler", reason="expired")
    third = rule_block("192.0.2.7", start + 5 * HOUR)

    assert [b.offence for b in (first, second, third)] == [1, 2, 3]
    assert second.expires_at - second.created_at == 2 * HOUR
    assert third.expires_at - third.created_at == 4 * HOUR
    assert third.reason == "spam rate 40% over 120 messages; repeat offence 3"


def test_repeat_outside_the_period_counts_as_a_first_offence(settings):
    start = 1_800_000_000.0
    first = rule_block("2001:db8:2::/64", start)
    service.lift(Block.id == first.id, actor="scheduler", reason="expired")

    again = rule_block("2001:db8:2::/64", start + 8 * DAY)

    assert again.offence == 1
    assert again.expires_at - again.created_at == HOUR


def test_repeat_factor_and_maximum_come_from_the_settings(make_settings):
    make_settings(REPEAT)
    start = 1_800_000_000.0
    durations = []
    for number in range(4):
        block = rule_block("198.51.100.7", start + number * 7 * HOUR)
        durations.append(block.expires_at - block.created_at)
        service.lift(Block.id == block.id, actor="scheduler", reason="expired")

    # four offences within 24 h: 1 h, 3 h, 9 h, then 27 h capped at 10 h
    assert durations == [HOUR, 3 * HOUR, 9 * HOUR, 10 * HOUR]


def test_manual_blocks_keep_their_duration_but_count_as_offences(settings):
    first = service.block("192.0.2.7", duration=HOUR, actor="cli")
    service.unblock("192.0.2.7", actor="cli")

    second = service.block("192.0.2.7", duration=HOUR, actor="admin:alice")

    assert (second.offence, second.expires_at - second.created_at) == (2, HOUR)
    assert first.offence == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("repeat_factor = 0.5", "repeat_factor must be a number from 1 to 100"),
        ("repeat_max = 0", "repeat_max must be an integer from 1 to 2592000"),
        ('iptables = "xt"', "iptables must be one of auto, nft, legacy"),
        (
            'chain = "INPUT"',
            "enforcement.chain = 'INPUT' is a built-in chain; name a chain of its "
            "own, such as SENDER_FILTER",
        ),
        (
            'chain = "forward"',
            "enforcement.chain = 'forward' is a built-in chain; name a chain of "
            "its own, such as SENDER_FILTER",
        ),
        (
            'chain = "SF; iptables -F"',
            "enforcement.chain must match [A-Za-z0-9_-]{1,28} (letters, digits, "
            "and the punctuation shown)",
        ),
        (
            f'chain = "{"C" * 29}"',
            "enforcement.chain must match [A-Za-z0-9_-]{1,28} (letters, digits, "
            "and the punctuation shown)",
        ),
        (
            'set_v4 = "two words"',
            "enforcement.set_v4 must match [A-Za-z0-9_.-]{1,31} (letters, digits, "
            "and the punctuation shown)",
        ),
        (
            f'set_v6 = "{"s" * 32}"',
            "enforcement.set_v6 must match [A-Za-z0-9_.-]{1,31} (letters, digits, "
            "and the punctuation shown)",
        ),
        (
            'set_v6 = "sender_filter_v4"',
            "enforcement.set_v4 and set_v6 must differ (in their first 26 characters)",
        ),
        (
            f'set_v4 = "{"s" * 26}4"\nset_v6 = "{"s" * 26}6"',
            "enforcement.set_v4 and set_v6 must differ (in their first 26 characters)",
        ),
        (
            'set_v6 = "sf-swap"',
            "enforcement.set_v6 = 'sf-swap' ends in -swap, the ending of the fresh "
            "sets a rebuild fills; choose another name",
        ),
        (
            'chain = "DROP"',
            "enforcement.chain = 'DROP' reads as an iptables target or option; name "
            "a chain of its own, such as SENDER_FILTER",
        ),
        (
            'chain = "MARK"',
            "enforcement.chain = 'MARK' reads as an iptables target or option; name "
            "a chain of its own, such as SENDER_FILTER",
        ),
        (
            'chain = "-j"',
            "enforcement.chain = '-j' reads as an iptables target or option; name "
            "a chain of its own, such as SENDER_FILTER",
        ),
        (
            "[network]\nipv6_prefix = 24",
            "network.ipv6_prefix = 24 is wider than network.widest_v6 = 32: every "
            "IPv6 block would be refused",
        ),
        (
            "ports = []",
            'enforcement.ports is a list of ports 1-65535 (1 to 15 of them), or "all"',
        ),
        (
            f"ports = {list(range(1, 17))}",
            'enforcement.ports is a list of ports 1-65535 (1 to 15 of them), or "all"',
        ),
        ('sync_interval = "abc"', "enforcement.sync_interval is not a setting"),
        ("setup_request = 1", "setup_request must be a file path"),
        ('setup_request = "  "', "setup_request must be a file path"),
    ],
)
def test_bad_enforcement_settings_are_refused(tmp_path, line, message):
    path = write_config(tmp_path, line + "\n")

    with pytest.raises(ConfigError) as refusal:
        config.load(path)

    assert str(refusal.value) == message


def test_setup_request_is_a_path_beside_the_config_or_none(tmp_path):
    given = config.load(write_config(tmp_path, 'setup_request = "run/setup"\n'))
    absent = config.load(write_config(tmp_path))

    assert given.setup_request == tmp_path / "run" / "setup"
    assert absent.setup_request is None


def test_run_and_teardown_refuse_a_built_in_chain_in_one_line(tmp_path, capsys):
    from appliance import cli
    from enforcement.__main__ import main as enforcement_main

    path = write_config(tmp_path, 'chain = "INPUT"\n')

    ran = cli.main(["run", "--config", str(path)])
    torn = enforcement_main(["teardown", "--config", str(path)])

    errors = capsys.readouterr().err.splitlines()
    assert (ran, torn) == (2, 2)
    assert errors == [
        "sender-filter run: enforcement.chain = 'INPUT' is a built-in chain; "
        "name a chain of its own, such as SENDER_FILTER",
        "python -m enforcement teardown: enforcement.chain = 'INPUT' is a "
        "built-in chain; name a chain of its own, such as SENDER_FILTER",
    ]


def test_kernel_status_writes_only_rows_whose_answer_changed(settings):
    first = service.block("192.0.2.7", duration=None, actor="cli")
    second = service.block("192.0.2.8", duration=None, actor="cli")

    written = service.record_kernel_status(
        {first.id: True, second.id: False}, {}, 100.0
    )
    written = service.record_kernel_status(
        {first.id: True, second.id: True}, written, 200.0
    )

    rows = {b.id: (b.enforced, b.enforced_checked_at) for b in Block.select()}
    assert rows == {first.id: (True, 100.0), second.id: (True, 200.0)}
    service.lift(Block.id == first.id, actor="cli", reason="unblocked")
    service.record_kernel_status({second.id: True}, written, 300.0)
    assert Block.get_by_id(first.id).enforced is False
    assert Block.get_by_id(first.id).enforced_checked_at == 300.0
    assert Block.get_by_id(second.id).enforced_checked_at == 200.0


def test_dry_run_pass_records_every_block_as_not_enforced(settings):
    permanent = service.block("192.0.2.7", duration=None, actor="cli")
    temporary = service.block("2001:db8:7::/64", duration=HOUR, actor="cli")
    daemon = Daemon(settings, DryRunBackend(settings))

    daemon.enforce(rebuild=True)
    daemon.watcher.close()

    rows = {b.id: b.enforced for b in Block.select()}
    assert rows == {permanent.id: False, temporary.id: False}
    assert ApplianceState.get_by_id("enforcement").value == "dry-run"


def test_locked_database_during_enforcement_is_logged_and_retried(settings, caplog):
    """A write transaction held elsewhere past the busy timeout stops no pass."""
    block = service.block("192.0.2.7", duration=None, actor="cli")
    daemon = Daemon(settings, DryRunBackend(settings))
    daemon.load()
    # the same wait as in production, shortened so the test is quick
    service.db.execute_sql("PRAGMA busy_timeout = 100")
    holder = sqlite3.connect(settings.database, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    with caplog.at_level(logging.ERROR, logger="appliance.daemon"):
        daemon.tick()
        locked = Block.get_by_id(block.id).enforced_checked_at
        release = threading.Timer(1.5, holder.rollback)
        release.start()
        started = daemon._start()
        release.join()
    daemon.tick()
    daemon.expiry.stop()
    daemon.watcher.close()
    holder.close()

    failures = [r.getMessage() for r in caplog.records]
    assert failures[0] == (
        "enforcement step failed on the database (database is locked); retrying in 1 s"
    )
    assert locked is None
    assert started is True
    assert Block.get_by_id(block.id).enforced is False
    assert ApplianceState.get_by_id("enforcement").value == "dry-run"


def test_blocks_the_guard_refuses_now_are_left_out_with_one_warning(
    make_settings, caplog
):
    """An address that became the appliance's own, or approved, is not enforced."""
    settings = make_settings()
    mine = service.block("198.51.100.0/24", duration=None, actor="cli")
    approved = service.block("203.0.113.9", duration=None, actor="cli")
    kept = service.block("192.0.2.7", duration=3600, actor="cli")
    # approved later through a path that lifts nothing (another gateway's
    # older version sharing the database)
    service.ApprovedHost.create(
        target="203.0.113.0/28",
        key_first=addresses.key_range(addresses.parse_network("203.0.113.0/28"))[0],
        key_last=addresses.key_range(addresses.parse_network("203.0.113.0/28"))[1],
        created_by="cli",
    )
    now_own = dataclasses.replace(settings, own_addresses=("198.51.100.1",))
    backend = DryRunBackend(now_own)
    daemon = Daemon(now_own, backend)

    with caplog.at_level(logging.WARNING, logger="appliance.kernelfeed"):
        daemon.enforce(rebuild=True)
        daemon.enforce()
    daemon.watcher.close()

    assert backend.enforced() == {"192.0.2.7"}
    assert [r.getMessage() for r in caplog.records] == [
        "198.51.100.0/24 (block #1) left out of the kernel: it covers the "
        "appliance's own address 198.51.100.1, which the guard refuses now; "
        "lift the block or change the list",
        "203.0.113.9 (block #2) left out of the kernel: it covers approved "
        "203.0.113.0/28, which the guard refuses now; lift the block or change "
        "the list",
    ]
    assert (mine.id, approved.id, kept.id) == (1, 2, 3)
    assert Block.get_by_id(mine.id).enforced is False


def test_drift_is_only_what_the_kernel_did_not_get_from_the_database():
    sent = {"192.0.2.7": None, "192.0.2.8": 1000.0, "192.0.2.9": 2000.0}
    expires = {"192.0.2.7": None, "192.0.2.8": 1000.0, "192.0.2.9": 5000.0}
    change = Change(
        # .7 vanished from the set; .10 is a block made since the last pass
        added=["192.0.2.7", "192.0.2.10"],
        # .99 was put in by hand; .8 is a block lifted since the last pass
        removed=["198.51.100.99", "192.0.2.8"],
        # .8 re-timed by hand; .9 extended since the last pass
        retimed=["192.0.2.8", "192.0.2.9"],
    )

    drift = unexpected(change, sent, expires)
    news = unexpected(Change(added=["192.0.2.10"], removed=["192.0.2.8"]), sent, {})

    assert (drift.added, drift.removed, drift.retimed) == (
        ["192.0.2.7"],
        ["198.51.100.99"],
        ["192.0.2.8"],
    )
    assert not news
