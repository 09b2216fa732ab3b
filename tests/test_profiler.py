"""The profiler's rules, windows and episodes, fed MailEvents directly."""

from appliance import service
from appliance.events import MailEvent
from appliance.models import Block
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.profiler import Profiler

T0 = 1_780_000_000.0

RULES = """
[rules.spam]
messages = 10
rate = 50
[rules.virus]
messages = 10
action = "permanent"
[rules.dha]
messages = 3
recipients = 10
unknown_recipients = 5
[rules.bounce]
messages = 10
action = "monitor"
"""


def feed(profiler, events):
    """Process events and write them, as one ingest batch does."""
    with db.atomic():
        for event in events:
            profiler.process(event)
        profiler.flush()


def spam_run(ip, count, spam_every, start=T0, step=10):
    """`count` transactions, every `spam_every`-th one spam."""
    return [
        MailEvent(
            ts=start + n * step,
            ip=ip,
            message=1,
            violations=("spam",) if n % spam_every == 0 else (),
            recipients=1,
        )
        for n in range(count)
    ]


def test_spam_sender_blocked_when_rate_and_volume_cross(make_settings):
    profiler = Profiler(make_settings(RULES))

    feed(profiler, spam_run("192.0.2.10", 11, 1))

    block = Block.get()
    assert (block.target, block.threat_type, block.action) == (
        "192.0.2.10",
        "spam",
        "temporary",
    )
    assert block.created_at == T0 + 100
    assert block.expires_at == T0 + 100 + 3600
    entry = SuspiciousEntry.get()
    assert (entry.violations, entry.messages, entry.rate, entry.status) == (
        11,
        11,
        100.0,
        "blocked",
    )
    assert entry.block_id == block.id


def test_volume_must_be_above_threshold_not_equal(make_settings):
    profiler = Profiler(make_settings(RULES))

    feed(profiler, spam_run("192.0.2.11", 10, 1))

    assert Block.select().count() == 0
    assert SuspiciousEntry.get().status == "suspicious"


def test_rate_exactly_at_threshold_does_not_block(make_settings):
    profiler = Profiler(make_settings(RULES))

    clean_first = [
        MailEvent(T0 + n, "192.0.2.12", 1, ("spam",) if n % 2 else (), 1)
        for n in range(12)
    ]

    feed(profiler, clean_first)

    entry = SuspiciousEntry.get()
    # the episode starts at the first spam; the window (12 messages, 50%) does not cross
    assert (entry.violations, entry.messages, entry.rate) == (6, 11, 54.55)
    assert Block.select().count() == 0


def test_window_slides_in_event_time(make_settings):
    profiler = Profiler(make_settings(RULES))
    early = spam_run("192.0.2.13", 8, 1, start=T0)
    late = spam_run("192.0.2.13", 8, 1, start=T0 + 4000)

    feed(profiler, early + late)

    assert Block.select().count() == 0
    entries = list(SuspiciousEntry.select().order_by(SuspiciousEntry.first_seen))
    assert [(e.first_seen, e.violations, e.messages) for e in entries] == [
        (T0, 8, 8),
        (T0 + 4000, 8, 8),
    ]


def test_dha_needs_recipient_and_unknown_counts(make_settings):
    profiler = Profiler(make_settings(RULES))
    probes = [
        MailEvent(T0 + n, "198.51.100.7", 1, ("dha",), recipients=2, unknown=1)
        for n in range(5)
    ]

    feed(profiler, probes[:4])
    assert Block.select().count() == 0

    feed(profiler, probes[4:] + [MailEvent(T0 + 9, "198.51.100.7", 0, (), 1, 1)])
    block = Block.get()
    assert (block.target, block.threat_type) == ("198.51.100.7", "dha")
    assert block.created_at == T0 + 9


def test_monitor_rule_marks_entry_without_blocking(make_settings):
    profiler = Profiler(make_settings(RULES))
    bounces = [MailEvent(T0 + n, "203.0.113.5", 1, ("bounce",), 1) for n in range(12)]

    feed(profiler, bounces)

    assert Block.select().count() == 0
    assert SuspiciousEntry.get().status == "monitored"


def test_ipv6_senders_counted_per_64(make_settings):
    profiler = Profiler(make_settings(RULES))
    events = [
        MailEvent(T0 + n, f"2001:db8:5:6::{n + 1:x}", 1, ("virus",), 1)
        for n in range(11)
    ]

    feed(profiler, events)

    block = Block.get()
    assert (block.target, block.action, block.expires_at) == (
        "2001:db8:5:6::/64",
        "permanent",
        None,
    )


def test_ipv4_mapped_address_is_the_ipv4_sender(make_settings):
    profiler = Profiler(make_settings(RULES))
    events = spam_run("::ffff:192.0.2.20", 6, 1) + spam_run(
        "192.0.2.20", 5, 1, start=T0 + 60
    )

    feed(profiler, events)

    assert Block.get().target == "192.0.2.20"


def test_approved_sender_is_never_blocked(make_settings):
    settings = make_settings(RULES)
    service.approve("192.0.2.0/28", actor="test")
    profiler = Profiler(settings)

    feed(profiler, spam_run("192.0.2.14", 20, 1))

    assert Block.select().count() == 0
    assert SuspiciousEntry.get().status == "approved"


def test_restart_continues_the_same_window(make_settings):
    settings = make_settings(RULES)
    events = spam_run("192.0.2.15", 11, 1)
    first = Profiler(settings)
    feed(first, events[:6])

    second = Profiler(settings)
    second.load()
    feed(second, events[6:])

    entry = SuspiciousEntry.get()
    assert (entry.violations, entry.messages, entry.status) == (11, 11, "blocked")
    assert Block.get().created_at == T0 + 100


def test_blocked_sender_not_blocked_twice_and_reblocked_after_expiry(make_settings):
    profiler = Profiler(make_settings(RULES))
    events = spam_run("192.0.2.16", 40, 1, step=60) + spam_run(
        "192.0.2.16", 20, 1, start=T0 + 3600 + 600, step=5
    )

    feed(profiler, events)

    created = [b.created_at for b in Block.select().order_by(Block.id)]
    assert created == [T0 + 600, T0 + 3600 + 600]


def test_shortened_window_drops_older_events_of_its_type_only(make_settings):
    profiler = Profiler(make_settings())
    feed(
        profiler,
        [MailEvent(T0 + n * 100, "192.0.2.40", 1, ("spam",)) for n in range(10)],
    )

    Rule.update(window=600).where(Rule.threat_type == "spam").execute()
    profiler.reload_rules()
    feed(profiler, [MailEvent(T0 + 1000, "192.0.2.40", 1)])

    sums = profiler.history["192.0.2.40"].sums
    # spam counts from T0 + 500 on; the other types keep the hour
    assert sums["spam"] == [6, 5, 0, 0]
    assert sums["virus"] == [11, 0, 0, 0]
