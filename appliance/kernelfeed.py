"""What the kernel should hold, read from the database whole or change by change.

The daemon reads the whole state (`KernelFeed.whole`) on start and for the
periodic full comparison, and only the blocks made or changed since it last
looked (`KernelFeed.changes`) on a new block's way to the kernel, so that way
costs the same with 20 or 20,000 blocks in force. A change is found by its
`Block.change_number`, which the database gives in commit order, so a look
that finds nothing new reads no row, whatever changed before. Blocks the
lock-out guard would refuse now (they cover the appliance's own addresses,
loopback or an approved entry, which may have come after the block) are left
out of both, with one warning per block.
"""

import logging
from dataclasses import dataclass
from dataclasses import field

from peewee import fn

from appliance import addresses
from appliance import service
from appliance.models import ApprovedHost
from appliance.models import Block
from appliance.models import db

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.0/8", "::1/128")
# the blocks in force at a time, in plain SQL over the key index
OVERLAPPING = (
    f"SELECT id, target FROM {Block._meta.table_name} WHERE key_first <= ? "
    "AND key_first >= ? AND key_last >= ? AND lifted_at IS NULL "
    "AND (expires_at IS NULL OR expires_at > ?)"
)


@dataclass
class Wanted:
    """Entries for the kernel and the blocks they stand for.

    `desired` maps entry -> seconds left (None: permanent), `expires` entry ->
    end time, `targets` block id -> entry for the blocks sent, `removed` the
    entries to take out, `gone` the ids of blocks no longer in force, and
    `refused` the ids of blocks the guard now leaves out.
    """

    desired: dict = field(default_factory=dict)
    expires: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)
    gone: list = field(default_factory=list)
    refused: set = field(default_factory=set)

    def __bool__(self):
        """Whether there is anything to send or to record."""
        return bool(self.targets or self.removed or self.gone or self.refused)


class KernelFeed:
    """Reads the blocks in force for the kernel, whole or as changes."""

    def __init__(self, settings):
        """Nothing read yet; `settings` give the configured own addresses."""
        self.settings = settings
        # the highest Block.change_number handled
        self.seen = 0
        # block id -> why the guard leaves it out (warned about once)
        self.refused = {}

    def whole(self, now):
        """Every block in force at `now` that the guard still allows."""
        # read before the blocks: a change between the two is read again later
        self.seen = Block.select(fn.max(Block.change_number)).scalar() or 0
        self.refused = self._refused_now(now)
        wanted = Wanted(refused=set(self.refused))
        for block_id, target, expires_at in service.active_targets(now):
            if block_id not in self.refused:
                wanted.targets[block_id] = target
                wanted.expires[target] = expires_at
                wanted.desired[target] = _left(expires_at, now)
        return wanted

    def changes(self, now):
        """The blocks made, changed or lifted since the last look."""
        wanted = Wanted()
        ended = set()
        for row in self._fresh_rows():
            in_force = row.lifted_at is None and (
                row.expires_at is None or row.expires_at > now
            )
            if not in_force:
                wanted.gone.append(row.id)
                ended.add(row.target)
            elif row.id in self.refused:
                wanted.refused.add(row.id)
            else:
                wanted.targets[row.id] = row.target
                wanted.expires[row.target] = row.expires_at
                wanted.desired[row.target] = _left(row.expires_at, now)
        # an entry stays while another block in force still holds it
        ended -= wanted.desired.keys()
        if ended:
            staying = Block.select(Block.target).where(
                Block.target.in_(sorted(ended))
                & Block.lifted_at.is_null()
                & (Block.expires_at.is_null() | (Block.expires_at > now))
            )
            ended -= {row.target for row in staying}
        wanted.removed = sorted(ended)
        return wanted

    def _fresh_rows(self):
        """Block rows made or changed since the last look, in commit order."""
        rows = list(
            Block.select(
                Block.id,
                Block.target,
                Block.expires_at,
                Block.lifted_at,
                Block.change_number,
            )
            .where(Block.change_number > self.seen)
            .order_by(Block.change_number)
        )
        if rows:
            self.seen = rows[-1].change_number
        return rows

    def _refused_now(self, now):
        """Block id -> reason, for the blocks in force the guard refuses now."""
        protected = [
            (network, f"covers the appliance's own address {text}")
            for network, text in own_networks(self.settings)
        ]
        protected += [
            (addresses.parse_network(text), "covers loopback") for text in LOOPBACK
        ]
        for approved in ApprovedHost.select(ApprovedHost.target):
            network = addresses.parse_network(approved.target)
            protected.append((network, f"covers approved {approved.target}"))

        refused = {}
        for network, why in protected:
            first, last = addresses.key_range(network)
            lowest = service.lowest_first(network)
            rows = db.execute_sql(OVERLAPPING, (last, lowest, first, now))
            for block_id, target in rows.fetchall():
                refused.setdefault(block_id, (target, why))
        for block_id, (target, why) in refused.items():
            if block_id not in self.refused:
                log.warning(
                    "%s (block #%d) left out of the kernel: it %s, which the "
                    "guard refuses now; lift the block or change the list",
                    target,
                    block_id,
                    why,
                )
        return refused


def own_networks(settings):
    """(network, text) of the appliance's own addresses, read afresh."""
    own = [addresses.parse_network(text) for text in settings.own_addresses]
    own += service.interface_addresses()
    return [(network, addresses.sender_text(network)) for network in own]


def _left(expires_at, now):
    """Seconds a block has left, None for a permanent one."""
    return None if expires_at is None else expires_at - now
