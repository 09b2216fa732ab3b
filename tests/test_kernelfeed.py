"""The daemon's feed of block changes: every change found once, idle looks free.

The feed finds changes by `Block.change_number`, which triggers give in
commit order. These tests count the SQL statements and the SQLite virtual
machine steps one look costs, not its time, and write from a second
connection as the console and the CLI do from their own processes.
"""

import sqlite3
import time

from appliance import addresses
from appliance import models
from appliance import service
from appliance.kernelfeed import KernelFeed
from appliance.models import Block

# SQLite calls the progress handler once per this many virtual machine steps
STEPS_PER_CALL = 10


def permanent_blocks(networks, stamp):
    """Insert permanent blocks of `networks`, all stamped `stamp`, in one batch."""
    rows = []
    for text in networks:
        first, last = addresses.key_range(addresses.parse_network(text))
        rows.append(
            {
                "target": text,
                "key_first": first,
                "key_last": last,
                "threat_type": "spam",
                "action": "permanent",
                "created_at": stamp,
                "created_by": "test",
                "changed_at": stamp,
            }
        )
    with models.db.atomic():
        for start in range(0, len(rows), 5000):
            Block.insert_many(rows[start : start + 5000]).execute()


class Cost:
    """Counts the statements and virtual machine steps of the database calls made."""

    def __enter__(self):
        """Start counting on the shared connection."""
        self.statements = []
        self.steps = 0
        connection = models.db.connection()
        connection.set_trace_callback(self.statements.append)
        connection.set_progress_handler(self._step, STEPS_PER_CALL)
        return self

    def _step(self):
        """One call per STEPS_PER_CALL steps; 0 lets the statement go on."""
        self.steps += STEPS_PER_CALL
        return 0

    def __exit__(self, *_exc):
        """Stop counting."""
        connection = models.db.connection()
        connection.set_trace_callback(None)
        connection.set_progress_handler(None, 0)


def other_process(settings):
    """A connection of its own to the database, as another process has."""
    return sqlite3.connect(settings.database, isolation_level=None, timeout=10)


def test_idle_look_reads_no_row_after_20000_blocks_lifted_at_once(settings):
    networks = [
        f"2001:db8:{0x2000 + n // 4096:x}:{n % 4096:x}::/64" for n in range(20000)
    ]
    permanent_blocks(networks, time.time())
    feed = KernelFeed(settings)
    assert len(feed.whole(time.time()).targets) == 20000

    # one approval lifts them all in one transaction, with one changed_at
    approved, lifted = service.approve("2001:db8:2000::/36", actor="test")
    first_look = feed.changes(time.time())
    with Cost() as idle:
        second_look = feed.changes(time.time())
    with Cost() as later:
        third_look = feed.changes(time.time())

    assert (approved, len(lifted)) == ("2001:db8:2000::/36", 20000)
    assert len(first_look.gone) == 20000
    assert sorted(first_look.removed) == sorted(networks)
    assert not second_look and not third_look
    assert len(idle.statements) == 1 and len(later.statements) == 1
    assert "change_number" in idle.statements[0]
    # an index seek that finds nothing: a few dozen steps, where reading the
    # 20,000 rows again would take hundreds of thousands
    assert idle.steps <= 100 and later.steps <= 100


def test_change_stamped_earlier_than_one_already_seen_is_found(settings):
    now = time.time()
    early = service.block("192.0.2.7", duration=3600, actor="test")
    feed = KernelFeed(settings)
    feed.whole(now)
    late = service.block("192.0.2.8", duration=3600, actor="test")
    assert list(feed.changes(now).targets) == [late.id]

    # another process stamped its change a minute ago (its clock stepped back,
    # or it waited on the lock), and commits it only now
    writer = other_process(settings)
    writer.execute(
        "UPDATE block SET lifted_at = ?, changed_at = ? WHERE id = ?",
        (now, now - 60, early.id),
    )
    writer.close()
    found = feed.changes(now)

    assert (found.gone, found.removed) == ([early.id], ["192.0.2.7"])
    assert not feed.changes(now)


def test_change_is_found_once_the_transaction_holding_it_commits(settings):
    now = time.time()
    block = service.block("198.51.100.0/24", duration=None, actor="test")
    feed = KernelFeed(settings)
    feed.whole(now)
    writer = other_process(settings)

    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "UPDATE block SET lifted_at = ?, changed_at = ? WHERE id = ?",
        (now, now - 60, block.id),
    )
    while_open = feed.changes(now)
    writer.execute("COMMIT")
    writer.close()
    after = feed.changes(now)

    assert not while_open
    assert (after.gone, after.removed) == ([block.id], ["198.51.100.0/24"])


def test_database_numbers_changes_in_commit_order(settings):
    first = service.block("203.0.113.51", duration=3600, actor="test")
    second = service.block("203.0.113.52", duration=3600, actor="test")
    service.unblock("203.0.113.51", actor="test")
    # the enforcer's status writes are no change for the feed
    service.record_kernel_status({second.id: True}, {}, time.time())

    numbers = dict(Block.select(Block.id, Block.change_number).tuples())

    assert numbers == {first.id: 3, second.id: 2}
