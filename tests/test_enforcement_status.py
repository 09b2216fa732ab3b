"""Repeat offenders get longer blocks; the kernel status is written per block."""

import pytest

from appliance import addresses
from appliance import config
from appliance import service
from appliance.config import ConfigError
from appliance.daemon import Daemon
from appliance.models import ApplianceState
from appliance.models import Block
from enforcement.dryrun import DryRunBackend
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
    ],
)
def test_bad_enforcement_settings_are_refused(tmp_path, line, message):
    path = write_config(tmp_path, line + "\n")

    with pytest.raises(ConfigError) as refusal:
        config.load(path)

    assert str(refusal.value) == message


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
