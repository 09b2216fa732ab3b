"""Manual records on the blocked and approved lists, and the actions on a block.

A record is an IP, a CIDR network or a domain name. A name is resolved to its
A and AAAA addresses and each is blocked (or approved) as a row of its own
carrying the name; `reresolve` looks the names up again on a schedule. An
action on one row of a name (extend, make permanent, approve, unblock) acts
on every row of that name. Everything goes through `service`, so the guard
and the audit log apply.
"""

import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from dataclasses import field

from appliance import addresses
from appliance import service
from appliance.domains import ResolveError
from appliance.domains import domain_name
from appliance.models import ApplianceState
from appliance.models import ApprovedHost
from appliance.models import Block
from appliance.models import db
from appliance.timefmt import format_duration
from appliance.timefmt import iso

log = logging.getLogger(__name__)

SCHEDULER = "scheduler"


@dataclass
class Outcome:
    """What happened to one address of a record: done, or refused and why."""

    target: str
    refused: str | None = None
    lifted: list = field(default_factory=list)
    block: Block | None = None
    domain: str | None = None


def parse_record(text):
    """('network', network) or ('domain', name) for what an administrator typed."""
    text = (text or "").strip()
    if not text:
        raise service.Refused("give an IP address, a CIDR network or a domain name")
    try:
        return "network", addresses.parse_network(text)
    except addresses.AddressError as exc:
        looks_numeric = "/" in text or ":" in text or text.replace(".", "").isdigit()
        if looks_numeric:
            raise service.Refused(str(exc)) from None
    try:
        return "domain", domain_name(text)
    except ResolveError:
        raise service.Refused(
            f"{text[:60]!r} is not an IP address, a CIDR network or a domain name"
        ) from None


def resolve_networks(name, names):
    """A name's addresses as single-address networks; Refused when none."""
    try:
        found = names.addresses(name)
    except ResolveError as exc:
        raise service.Refused(str(exc)) from None
    return [ipaddress.ip_network(address) for address in found]


def block_record(text, *, duration, actor, names, reason=""):
    """Block an IP, CIDR or every address of a name; one Outcome per address.

    A bad record, a refused single network or a name that does not resolve
    raises Refused; for a name, each address is blocked or refused on its own.
    """
    kind, value = parse_record(text)
    if kind == "network":
        block = service.block_network(
            value, threat_type="manual", duration=duration, actor=actor, reason=reason
        )
        return [Outcome(block.target, block=block)]

    outcomes = []
    for network in resolve_networks(value, names):
        outcomes.append(
            _block_address(network, value, duration, actor, reason or f"domain {value}")
        )
    return outcomes


def _block_address(network, name, duration, actor, reason):
    """Block one address of a name and label the block with the name."""
    target = addresses.sender_text(network)
    try:
        block = service.block_network(
            network, threat_type="manual", duration=duration, actor=actor, reason=reason
        )
    except service.Refused as refusal:
        return Outcome(target, refused=str(refusal), domain=name)
    Block.update(domain=name).where(Block.id == block.id).execute()
    block.domain = name
    return Outcome(target, block=block, domain=name)


def approve_record(text, *, actor, names, note=""):
    """Approve an IP, CIDR or every address of a name; one Outcome per address."""
    kind, value = parse_record(text)
    if kind == "network":
        target, lifted = service.approve(str(value), actor=actor, note=note)
        return [Outcome(target, lifted=lifted)]

    return [
        _approve_address(network, value, actor, note or f"domain {value}")
        for network in resolve_networks(value, names)
    ]


def _approve_address(network, name, actor, note):
    """Approve one address of a name and label the entry with the name."""
    target = addresses.sender_text(network)
    try:
        target, lifted = service.approve(target, actor=actor, note=note)
    except service.Refused as refusal:
        return Outcome(target, refused=str(refusal), domain=name)
    ApprovedHost.update(domain=name).where(ApprovedHost.target == target).execute()
    return Outcome(target, lifted=lifted, domain=name)


def enforcement_backend():
    """The backend the daemon last said it enforces with ("kernel", "dry-run")."""
    state = ApplianceState.get_or_none(ApplianceState.key == "enforcement")
    return state.value if state else None


def blocks_in_force(now=None):
    """A query for the blocks in force at `now`, oldest first (not yet run)."""
    now = time.time() if now is None else now
    in_force = Block.lifted_at.is_null() & (
        Block.expires_at.is_null() | (Block.expires_at > now)
    )
    return Block.select().where(in_force).order_by(Block.id)


def block_group(block_id, now=None):
    """An active block and, when it came from a name, every active one of that name."""
    in_force = blocks_in_force(now)
    block = in_force.where(Block.id == block_id).first()
    if block is None:
        raise service.Refused(f"block #{block_id} is no longer in force")
    if block.domain is None:
        return [block]
    return list(in_force.where(Block.domain == block.domain))


def extend(block_id, duration, *, actor, now=None):
    """Push a temporary block's end `duration` seconds later; returns the blocks."""
    now = time.time() if now is None else now
    if not 0 < duration <= service.MAX_DURATION:
        raise service.Refused("an extension lasts from 1 second to 30 days")

    with db.atomic():
        whole = block_group(block_id, now)
        group = [block for block in whole if block.expires_at is not None]
        if not group:
            raise service.Refused(f"{whole[0].target} is blocked permanently already")
        for block in group:
            end = block.expires_at + duration
            if end - now > service.MAX_DURATION:
                raise service.Refused(
                    f"{block.target} would stay blocked more than 30 days from now; "
                    "block it permanently instead"
                )
            _change(block, actor, "extend", f"by {format_duration(duration)}")
            block.expires_at = end
            block.save()
    for block in group:
        log.info("%s block extended until %s", block.target, iso(block.expires_at))
    return group


def make_permanent(block_id, *, actor, now=None):
    """Turn a temporary block (or a name's blocks) permanent; returns the blocks."""
    with db.atomic():
        group = block_group(block_id, now)
        if all(block.expires_at is None for block in group):
            raise service.Refused(f"{group[0].target} is blocked permanently already")
        for block in group:
            _change(block, actor, "make permanent", "no end")
            block.expires_at = None
            block.action = "permanent"
            block.save()
    for block in group:
        log.info("%s block made permanent", block.target)
    return group


def _change(block, actor, action, detail):
    """Stamp a block as changed (the daemon re-enforces it) and audit the change."""
    block.changed_at = time.time()
    service.audit(actor, action, block.target, f"block #{block.id} {detail}")


def move_to_approved(block_id, *, actor):
    """Approve what a block (or a name's blocks) covers, which lifts the blocks."""
    group = block_group(block_id)
    outcomes = []
    for block in group:
        note = f"moved from block #{block.id}"
        if block.domain:
            network = addresses.parse_network(block.target)
            outcomes.append(_approve_address(network, block.domain, actor, note))
            continue
        try:
            target, lifted = service.approve(block.target, actor=actor, note=note)
        except service.Refused as refusal:
            outcomes.append(Outcome(block.target, refused=str(refusal)))
        else:
            outcomes.append(Outcome(target, lifted=lifted))
    return outcomes


def unblock_block(block_id, *, actor):
    """Lift a block, or every block of its name; returns the targets lifted."""
    group = block_group(block_id)
    ids = [block.id for block in group]
    return service.lift(Block.id.in_(ids), actor=actor, reason="unblocked")


def remove_approved(entry_id, *, actor):
    """Take an approved entry off the list (a name: all its addresses)."""
    entry = ApprovedHost.get_or_none(ApprovedHost.id == entry_id)
    if entry is None:
        raise service.Refused("that approved entry is no longer on the list")
    if entry.domain is None:
        return [service.unapprove(entry.target, actor=actor)]
    rows = ApprovedHost.select().where(ApprovedHost.domain == entry.domain)
    return [service.unapprove(row.target, actor=actor) for row in rows]


def reresolve(names, now=None):
    """Look every listed name up again: add new addresses, drop gone ones.

    A name that does not resolve now keeps its rows: a DNS failure must not
    lift blocks or approvals. Returns how many rows were added or removed.
    """
    now = time.time() if now is None else now
    changed = 0
    for name, blocks in _grouped(service.active_blocks(now)).items():
        found = _current_targets(name, names)
        if found is not None:
            changed += _refresh_blocks(name, blocks, found, now)
    for name, rows in _grouped(service.approved_hosts()).items():
        found = _current_targets(name, names)
        if found is not None:
            changed += _refresh_approved(name, rows, found)
    return changed


def _grouped(rows):
    """Rows that carry a domain name, by name."""
    by_name = {}
    for row in rows:
        if row.domain:
            by_name.setdefault(row.domain, []).append(row)
    return by_name


def _current_targets(name, names):
    """The targets a name resolves to now, or None (logged) when it does not."""
    try:
        return {addresses.sender_text(n) for n in resolve_networks(name, names)}
    except service.Refused as refusal:
        log.warning("%s not re-resolved (%s); its list rows stay", name, refusal)
        return None


def _refresh_blocks(name, blocks, found, now):
    """Block a name's new addresses like its others, lift the gone ones."""
    held = {block.target for block in blocks}
    model = max(
        blocks, key=lambda b: math.inf if b.expires_at is None else b.expires_at
    )
    if model.expires_at is None:
        duration = None
    else:
        duration = math.ceil(model.expires_at - now)
    changed = 0
    for target in sorted(found - held):
        network = addresses.parse_network(target)
        outcome = _block_address(network, name, duration, SCHEDULER, f"domain {name}")
        if outcome.refused:
            log.info(
                "%s (new address of %s) not blocked: %s", target, name, outcome.refused
            )
        else:
            changed += 1
    gone = held - found
    if gone:
        condition = (Block.domain == name) & Block.target.in_(sorted(gone))
        changed += len(service.lift(condition, actor=SCHEDULER, reason="not in DNS"))
    return changed


def _refresh_approved(name, rows, found):
    """Approve a name's new addresses, take the gone ones off the list."""
    held = {row.target for row in rows}
    changed = 0
    for target in sorted(found - held):
        network = addresses.parse_network(target)
        outcome = _approve_address(network, name, SCHEDULER, f"domain {name}")
        if outcome.refused:
            log.info(
                "%s (new address of %s) not approved: %s", target, name, outcome.refused
            )
        else:
            changed += 1
    for target in sorted(held - found):
        service.unapprove(target, actor=SCHEDULER)
        changed += 1
    return changed
