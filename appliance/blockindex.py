"""Blocks held in memory by network, for the profiler's event-time checks."""

from appliance.models import Block

FOREVER = float("inf")
# changed_at is wall time written by several processes: re-read a little overlap
OVERLAP = 2.0


class BlockIndex:
    """Every block that may be in force at some event time, found by network."""

    def __init__(self, parse):
        self.parse = parse
        self.spans = {}
        # by (version, prefix length, network address as an int): cheaper to
        # hash and to build for a supernet than ipaddress network objects
        self.by_network = {}
        self.prefixes = set()
        self.seen = 0.0

    def refresh(self):
        """Read blocks added or changed since the last refresh."""
        rows = Block.select(
            Block.id,
            Block.target,
            Block.created_at,
            Block.expires_at,
            Block.lifted_at,
            Block.lift_reason,
            Block.changed_at,
        ).where(Block.changed_at > self.seen - OVERLAP)
        for row in rows.iterator():
            self.seen = max(self.seen, row.changed_at)
            self.discard(row.id)
            # an expired block still counted in its own time; an unblock ends it
            if row.lifted_at is None or row.lift_reason == "expired":
                self.add(row)

    def add(self, block):
        """Index one block."""
        network = self.parse(block.target)
        until = block.expires_at if block.expires_at is not None else FOREVER
        key = _key(network)
        self.spans[block.id] = (key, block.created_at, until)
        self.by_network.setdefault(key, set()).add(block.id)
        self.prefixes.add((network.version, network.prefixlen))

    def discard(self, block_id):
        """Forget one block."""
        span = self.spans.pop(block_id, None)
        if span is not None:
            self.by_network[span[0]].discard(block_id)

    def covering(self, network, at):
        """The id of a block over all of `network` at event time `at`, or None."""
        first = int(network.network_address)
        for version, prefixlen in self.prefixes:
            if version != network.version or prefixlen > network.prefixlen:
                continue
            # the supernet of `network` with this prefix length
            outer = (version, prefixlen, first >> (network.max_prefixlen - prefixlen))
            for block_id in self.by_network.get(outer, ()):
                _key, created_at, until = self.spans[block_id]
                if created_at <= at < until:
                    return block_id
        return None


def _key(network):
    """A network's key in BlockIndex.by_network."""
    bits = network.max_prefixlen - network.prefixlen
    return (network.version, network.prefixlen, int(network.network_address) >> bits)
