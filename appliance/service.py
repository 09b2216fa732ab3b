"""The small service API the console, the CLI and the daemon share.

Blocks and approvals go through here so that the lock-out guard, the audit
log and the database stay one story whoever acts. The kernel is not touched
here: the enforcement loop in the daemon makes the kernel follow the database.
"""

import contextlib
import contextvars
import json
import logging
import secrets
import subprocess
import time
from dataclasses import asdict

from appliance import addresses
from appliance.config import THREAT_TYPES
from appliance.models import Admin
from appliance.models import ApplianceState
from appliance.models import ApprovedHost
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.models import insert_statement
from appliance.timefmt import format_duration

log = logging.getLogger(__name__)

MAX_DURATION = 30 * 86400
# where the action in hand comes from, for the audit log: the console's or the
# API's client address (set per request), the CLI's user (set once); None for
# the daemon's own decisions
acting_from = contextvars.ContextVar("acting_from", default=None)
# plain SQL for the checks made before every block (Peewee's query building
# costs more than the query): the key index finds the candidates
ACTIVE_BLOCK = (
    f"SELECT id FROM {Block._meta.table_name} WHERE key_first <= ? "
    "AND key_first >= ? AND key_last >= ? AND +lifted_at IS NULL "
    "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id LIMIT 1"
)


class Refused(Exception):
    """A block or list change that the guard or the lists do not allow."""


class AlreadyBlocked(Refused):
    """The address is already covered by an active block."""

    def __init__(self, block):
        super().__init__(f"{block.target} is already blocked")
        self.block = block


class Guard:
    """What may never be blocked: loopback, our own addresses, over-wide ranges."""

    def __init__(self, settings):
        self.widest = {4: settings.widest_v4, 6: settings.widest_v6}
        configured = [addresses.parse_network(a) for a in settings.own_addresses]
        self.own = configured + interface_addresses()

    def check(self, network):
        """Raise Refused with the reason when `network` may not be blocked."""
        shown = addresses.sender_text(network)
        if network.prefixlen < self.widest[network.version]:
            raise Refused(
                f"{shown} is wider than /{self.widest[network.version]}, "
                "the widest range a block may cover"
            )
        odd = addresses.not_a_sender(network)
        if odd:
            raise Refused(f"{shown} {odd}, not a sender")
        if addresses.is_loopback(network):
            raise Refused(f"{shown} covers loopback, which is always approved")
        for own in self.own:
            if addresses.overlaps(network, own):
                raise Refused(
                    f"{shown} covers the appliance's own address "
                    f"{addresses.sender_text(own)}"
                )
        approved = approved_overlapping(network)
        if approved is not None:
            raise Refused(f"{shown} covers approved {approved.target}")


def interface_addresses():
    """This machine's (this network namespace's) own addresses, from `ip -j addr`."""
    command = ["ip", "-j", "address", "show"]
    try:
        found = subprocess.run(command, capture_output=True, text=True, timeout=5)
        links = json.loads(found.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("own addresses not read (`%s` failed: %s)", " ".join(command), exc)
        return []
    own = []
    for link in links:
        for info in link.get("addr_info", []):
            try:
                own.append(addresses.parse_network(info["local"]))
            except (KeyError, addresses.AddressError):
                continue
    return own


_guard = None
_repeat = None
_ipv6_prefix = 64


def configure(settings):
    """Set the guard from settings; call once a process after connecting."""
    global _guard, _repeat, _ipv6_prefix
    _guard = Guard(settings)
    _repeat = (settings.repeat_period, settings.repeat_factor, settings.repeat_max)
    _ipv6_prefix = settings.ipv6_prefix


def sender_record(text):
    """What a typed block record covers: a bare IPv6 address its /ipv6_prefix.

    IPv6 senders are blocked per /64 by default (SPEC §7), so a block typed
    as one IPv6 address covers its network; an explicit CIDR (even a /128),
    an IPv4 address, a name, and addresses the guard refuses for what they
    are (loopback, link-local...) are returned as typed.
    """
    text = (text or "").strip()
    if "/" in text or ":" not in text:
        return text
    try:
        address = addresses.parse_ip(text)
    except addresses.AddressError:
        return text
    single = addresses.parse_network(text)
    if address.version != 6 or addresses.is_loopback(single):
        return text
    if addresses.not_a_sender(single):
        return text
    return addresses.sender_text(addresses.sender_of(address, _ipv6_prefix))


def repeat_offence(target, now):
    """How many blocks of `target` began within the repeat period up to `now`, +1."""
    period = _repeat[0] if _repeat else 0
    if not period:
        return 1
    earlier = db.execute_sql(
        f"SELECT COUNT(*) FROM {Block._meta.table_name} WHERE target = ? "
        "AND created_at > ? AND created_at <= ?",
        (target, now - period, now),
    )
    return earlier.fetchone()[0] + 1


def repeat_duration(duration, offence):
    """A rule's temporary block for the n-th offence: factor^(n-1) longer, capped."""
    _period, factor, longest = _repeat
    longer = duration * factor ** (offence - 1)
    return max(duration, min(round(longer), longest))


def audit(actor, action, target, detail="", keys=None):
    """Add a line to the sender filtering log, with where the action came from.

    `keys` is the target's (first, last) key range when the caller has it.
    """
    _write_audit([(actor, action, target, detail, keys)])


def _write_audit(actions):
    """Add (actor, action, target, detail, keys or None) lines to the log at once."""
    columns = ("ts", "actor", "action", "target", "detail", "source")
    columns += ("key_first", "key_last")
    now = time.time()
    source = acting_from.get()
    rows = []
    for actor, action, target, detail, keys in actions:
        if keys is None:
            try:
                keys = addresses.key_range(addresses.parse_network(target))
            except addresses.AddressError:
                keys = (None, None)
        rows.append((now, actor, action, target, detail, source, *keys))
    db.cursor().executemany(insert_statement(AuditEntry, columns), rows)


def lowest_first(network):
    """The lowest first key of a block or approval that shares an address with
    `network`: none is wider than the widest range the settings allow, so the
    key index is searched over that span only, not from the start."""
    widest = _guard.widest[network.version] if _guard is not None else 0
    outer = network.supernet(new_prefix=min(widest, network.prefixlen))
    return addresses.key_of(outer.network_address)


def approved_overlapping(network):
    """The approved entry sharing an address with `network`, if any."""
    first, last = addresses.key_range(network)
    table = ApprovedHost._meta.table_name
    row = db.execute_sql(
        f"SELECT id FROM {table} WHERE key_first <= ? AND key_first >= ? "
        "AND key_last >= ? LIMIT 1",
        (last, lowest_first(network), first),
    ).fetchone()
    return None if row is None else ApprovedHost.get_by_id(row[0])


def _write_transaction():
    """A write transaction for a check and its writes, unless one is open already.

    Inside the caller's transaction (the profiler's batch) a savepoint would
    only cost time: the checks refuse before the first write, and a failed
    write fails the caller's transaction.
    """
    if db.in_transaction():
        return contextlib.nullcontext()
    return db.atomic()


def block_network(network, *, threat_type, duration, actor, reason, now=None):
    """Block a network for `duration` seconds, or for good when None."""
    now = time.time() if now is None else now
    if duration is not None and not 0 < duration <= MAX_DURATION:
        raise Refused("a temporary block lasts from 1 second to 30 days")
    target = addresses.sender_text(network)

    first, last = addresses.key_range(network)
    # checked and written in one write transaction: concurrent commands queue
    with _write_transaction():
        _guard.check(network)
        existing = active_block(network, now)
        if existing is not None:
            raise AlreadyBlocked(existing)
        offence = repeat_offence(target, now)
        if offence > 1 and duration and actor.startswith("rule:"):
            duration = repeat_duration(duration, offence)
            reason = f"{reason}; repeat offence {offence}"
        fields = {
            "target": target,
            "key_first": first,
            "key_last": last,
            "threat_type": threat_type,
            "action": "temporary" if duration else "permanent",
            "created_at": now,
            "expires_at": now + duration if duration else None,
            "created_by": actor,
            "reason": reason,
            "changed_at": time.time(),
            "offence": offence,
        }
        # plain SQL rather than create(): blocks made by rules come in bursts
        added = db.execute_sql(
            insert_statement(Block, tuple(fields)), tuple(fields.values())
        )
        block = Block(id=added.lastrowid, **fields)
        detail = f"{format_duration(duration)}: {reason}"
        audit(actor, "block", target, detail, keys=(first, last))
        mark_entries_blocked(block)
    log.info("%s blocked %s (%s)", target, format_duration(duration), reason)
    return block


def mark_entries_blocked(block):
    """Point the covered senders' unblocked entries at a new block."""
    db.execute_sql(
        f"UPDATE {SuspiciousEntry._meta.table_name} SET status = 'blocked', "
        "block_id = ? WHERE sender_key >= ? AND sender_key <= ? "
        "AND +status IN ('suspicious', 'monitored')",
        (block.id, block.key_first, block.key_last),
    )


def block(text, *, duration, actor, reason="", threat_type="manual"):
    """Block an address or CIDR given as text (console, CLI, API).

    A bare IPv6 address is blocked as its /ipv6_prefix (see `sender_record`).
    """
    try:
        network = addresses.parse_network(sender_record(text))
    except addresses.AddressError as exc:
        raise Refused(str(exc)) from exc
    return block_network(
        network, threat_type=threat_type, duration=duration, actor=actor, reason=reason
    )


def active_block(network, now=None):
    """The block in force at `now` whose range equals or covers `network`."""
    now = time.time() if now is None else now
    first, last = addresses.key_range(network)
    row = db.execute_sql(ACTIVE_BLOCK, (first, lowest_first(network), last, now))
    row = row.fetchone()
    return None if row is None else Block.get_by_id(row[0])


def unblock(text, *, actor, reason="unblocked"):
    """Lift every active block on exactly this address or CIDR."""
    try:
        target = addresses.sender_text(addresses.parse_network(text))
    except addresses.AddressError as exc:
        raise Refused(str(exc)) from exc
    lifted = lift(Block.target == target, actor=actor, reason=reason)
    if not lifted:
        cover = active_block(addresses.parse_network(target))
        if cover is not None:
            raise Refused(
                f"{target} is covered by the block on {cover.target}; "
                f"unblock {cover.target} to lift it"
            )
        raise Refused(f"{target} is not blocked")
    return lifted


def lift(condition, *, actor, reason, now=None):
    """Lift the active blocks matching `condition`; returns their targets."""
    now = time.time() if now is None else now
    with db.atomic():
        blocks = list(Block.select().where(Block.lifted_at.is_null() & condition))
        changed_at = time.time()
        lines = []
        for lifted in blocks:
            expired = reason == "expired" and lifted.expires_at is not None
            lifted.lifted_at = min(now, lifted.expires_at) if expired else now
            detail = f"block #{lifted.id} lifted"
            keys = (lifted.key_first, lifted.key_last)
            lines.append((actor, reason, lifted.target, detail, keys))
        # one statement each for the blocks and their audit lines: an ingest
        # catching up on a week of logs may lift thousands at once
        db.cursor().executemany(
            f"UPDATE {Block._meta.table_name} SET lifted_at = ?, lift_reason = ?, "
            "changed_at = ? WHERE id = ?",
            [(b.lifted_at, reason, changed_at, b.id) for b in blocks],
        )
        _write_audit(lines)
    for lifted in blocks:
        log.info("%s unblocked (%s)", lifted.target, reason)
    return [b.target for b in blocks]


def expire_due(now=None):
    """Lift temporary blocks whose end has passed; returns their targets."""
    now = time.time() if now is None else now
    due = Block.expires_at.is_null(False) & (Block.expires_at <= now)
    return lift(due, actor="scheduler", reason="expired", now=now)


def active_blocks(now=None):
    """Blocks in force now, oldest first."""
    now = time.time() if now is None else now
    return list(
        Block.select()
        .where(
            Block.lifted_at.is_null()
            & (Block.expires_at.is_null() | (Block.expires_at > now))
        )
        .order_by(Block.id)
    )


def active_targets(now=None):
    """(id, target, expires_at) of the blocks in force now, for the enforcer."""
    now = time.time() if now is None else now
    in_force = Block.lifted_at.is_null() & (
        Block.expires_at.is_null() | (Block.expires_at > now)
    )
    query = Block.select(Block.id, Block.target, Block.expires_at).where(in_force)
    return list(query.order_by(Block.id).tuples())


def record_kernel_status(status, written, now):
    """Write Block.enforced where the kernel's answer changed; the new `written`.

    `status` maps each active block's id to whether the kernel enforces it;
    `written` is what the caller wrote before. Blocks gone from `status` that
    were enforced are written as no longer enforced. Only changed rows are
    written, in one transaction.
    """
    changed = {True: [], False: []}
    for block_id, enforced in status.items():
        if written.get(block_id) is not enforced:
            changed[enforced].append(block_id)
    changed[False] += [i for i, was in written.items() if was and i not in status]
    if not changed[True] and not changed[False]:
        return dict(status)
    with db.atomic():
        for enforced, ids in changed.items():
            for start in range(0, len(ids), 10000):
                chunk = ids[start : start + 10000]
                Block.update(enforced=enforced, enforced_checked_at=now).where(
                    Block.id.in_(chunk)
                ).execute()
    return dict(status)


def approve(text, *, actor, note=""):
    """Approve an address or CIDR; returns it and the targets of blocks lifted."""
    try:
        network = addresses.parse_network(text)
    except addresses.AddressError as exc:
        raise Refused(str(exc)) from exc
    target = addresses.sender_text(network)
    widest = _guard.widest[network.version]
    if network.prefixlen < widest:
        raise Refused(f"{target} is wider than /{widest}, the widest range to approve")
    first, last = addresses.key_range(network)
    with db.atomic():
        if ApprovedHost.get_or_none(ApprovedHost.target == target) is not None:
            raise Refused(f"{target} is already approved")
        ApprovedHost.create(
            target=target, key_first=first, key_last=last, created_by=actor, note=note
        )
        audit(actor, "approve", target, note)
    overlapping = (Block.key_first <= last) & (Block.key_last >= first)
    return target, lift(overlapping, actor=actor, reason="approved")


def approved_hosts():
    """The approved list, oldest first."""
    return list(ApprovedHost.select().order_by(ApprovedHost.id))


def unapprove(text, *, actor):
    """Take an address or CIDR off the approved list."""
    try:
        target = addresses.sender_text(addresses.parse_network(text))
    except addresses.AddressError as exc:
        raise Refused(str(exc)) from exc
    with db.atomic():
        removed = ApprovedHost.delete().where(ApprovedHost.target == target).execute()
        if removed:
            audit(actor, "unapprove", target)
    if not removed:
        raise Refused(f"{target} is not on the approved list")
    return target


def publish_state(**facts):
    """Record facts for the console (the daemon's backend, its heartbeat)."""
    now = time.time()
    rows = [{"key": k, "value": str(v), "updated_at": now} for k, v in facts.items()]
    ApplianceState.replace_many(rows).execute()


def seed_rules(settings):
    """Create any missing rule from the config's seed values."""
    for threat_type in THREAT_TYPES:
        values = asdict(settings.rule_defaults(threat_type))
        Rule.get_or_create(threat_type=threat_type, defaults=values)


def add_admin(username, password=None, actor="cli"):
    """Create an administrator; returns the password (generated when not given)."""
    if not username or not username.isidentifier():
        raise Refused("an administrator name is letters, digits and underscores")
    password = password or secrets.token_urlsafe(12)
    if Admin.get_or_none(Admin.username == username) is not None:
        raise Refused(f"administrator {username} already exists")
    # imported here: werkzeug takes longer to load than an ingest of a small log
    from werkzeug.security import generate_password_hash

    Admin.create(username=username, password_hash=generate_password_hash(password))
    audit(actor, "admin add", username)
    return password


def entries_for_block(block_id):
    """Suspicious entries that point at a block."""
    return list(SuspiciousEntry.select().where(SuspiciousEntry.block == block_id))
