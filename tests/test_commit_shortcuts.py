"""The shortcuts that make counting and committing cheap give what the plain way does.

Catching up counts in batches: blocks lifted together, a blocked sender's
cover remembered, idle senders forgotten by their latest time, the collector
kept off long-lived objects. Each test pins a case where a careless shortcut
would count, block or lift differently.
"""

import gc
import ipaddress

import pytest
from test_profiler import feed

from appliance import addresses
from appliance import ingest
from appliance import service
from appliance.events import MailEvent
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.profiler import Profiler

T0 = 1_780_000_000.0
RULES = "[rules.spam]\nmessages = 10\nrate = 50\n"


def spam(ip, count, start, step=10):
    """`count` spam transactions from `ip`, `step` seconds apart."""
    return [
        MailEvent(ts=start + n * step, ip=ip, message=1, violations=("spam",))
        for n in range(count)
    ]


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.9",
        "::ffff:198.51.100.7",
        "[IPv6:2001:db8:ffff:1:2::3]",
        "2001:db8::1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ],
)
@pytest.mark.parametrize("prefix", [32, 48, 64, 128])
def test_sender_network_is_the_address_or_its_prefix(text, prefix):
    address = addresses.parse_ip(text)
    if address.version == 4:
        expected = ipaddress.ip_network(f"{address}/32")
    else:
        expected = ipaddress.ip_network(f"{address}/{prefix}", strict=False)

    network = addresses.sender_of(text, prefix)

    assert (network, type(network)) == (expected, type(expected))


@pytest.mark.parametrize("text", ["192.0.2.1:25", "2001:db8::g", "1.2.3", "a::b::c"])
def test_text_that_is_no_address_of_either_family_is_refused(text):
    with pytest.raises(addresses.AddressError, match="is not an IP address"):
        addresses.parse_ip(text)


def test_expired_blocks_end_at_their_expiry_each_with_an_audit_line(settings):
    def block(text, duration, at):
        network = addresses.parse_network(text)
        return service.block_network(
            network,
            threat_type="spam",
            duration=duration,
            actor="rule:spam",
            reason="test",
            now=at,
        )

    due = [
        block("192.0.2.40", 600, T0),
        block("2001:db8:5::/64", 700, T0 + 30),
        block("198.51.100.0/24", 900, T0 + 60),
    ]
    kept = [block("192.0.2.41", None, T0), block("192.0.2.42", 3600, T0)]

    lifted = service.expire_due(now=T0 + 1000)

    assert lifted == ["192.0.2.40", "2001:db8:5::/64", "198.51.100.0/24"]
    rows = Block.select().where(Block.lifted_at.is_null(False)).order_by(Block.id)
    assert [(b.id, b.lifted_at, b.lift_reason) for b in rows] == [
        (due[0].id, T0 + 600, "expired"),
        (due[1].id, T0 + 730, "expired"),
        (due[2].id, T0 + 960, "expired"),
    ]
    assert all(Block.get_by_id(b.id).lifted_at is None for b in kept)
    audit = AuditEntry.select().where(AuditEntry.action == "expired")
    assert [
        (a.actor, a.target, a.detail, (a.key_first, a.key_last))
        for a in audit.order_by(AuditEntry.id)
    ] == [
        (
            "scheduler",
            b.target,
            f"block #{b.id} lifted",
            addresses.key_range(addresses.parse_network(b.target)),
        )
        for b in due
    ]


def test_sender_unblocked_by_hand_is_blocked_again_by_its_next_spam(make_settings):
    profiler = Profiler(make_settings(RULES))
    # blocked by the 11th, and the 12th finds the block
    feed(profiler, spam("192.0.2.20", 12, T0))
    service.unblock("192.0.2.20", actor="admin:alice")

    profiler.refresh_blocks()
    feed(profiler, spam("192.0.2.20", 1, T0 + 200))

    blocks = Block.select().order_by(Block.id)
    assert [(b.created_at, b.lift_reason) for b in blocks] == [
        (T0 + 100, "unblocked"),
        (T0 + 200, None),
    ]


def test_blocked_sender_counts_on_without_a_second_block(make_settings):
    profiler = Profiler(make_settings(RULES))

    feed(profiler, spam("192.0.2.21", 30, T0))

    assert [b.created_at for b in Block.select()] == [T0 + 100]
    assert profiler.blocks_made == 1


def test_sender_is_forgotten_only_when_its_latest_event_leaves_the_window(
    make_settings,
):
    profiler = Profiler(make_settings())
    sender = "192.0.2.30"
    # the later event is logged first: the last one added is not the latest
    feed(profiler, [MailEvent(T0 + 100, sender, 1), MailEvent(T0 + 10, sender, 1)])

    feed(profiler, [MailEvent(T0 + 3650, "192.0.2.31", 1)])
    kept = sender in profiler.history and profiler.history[sender].sums["spam"][0]
    feed(profiler, [MailEvent(T0 + 3750, "192.0.2.31", 1)])

    assert kept == 2
    assert sender not in profiler.history


def test_catch_up_leaves_the_collector_as_it_found_it(settings, tmp_path):
    log = tmp_path / "mail.log"
    log.write_text(
        "Dec  4 10:00:00 mx postfix/smtpd[1]: connect from a[192.0.2.50]\n"
        "Dec  4 10:00:01 mx postfix/smtpd[1]: disconnect from a[192.0.2.50]\n"
    )

    summary = ingest.read_files(settings, [str(log)])

    assert summary["lines"] == 2
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()
