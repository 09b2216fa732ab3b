"""What one sync changes: the blocks the kernel holds against the ones it should.

Both backends compute their work here, so the kernel batch and the dry-run log
are driven by the same data. An entry is a sender network in the text form
`appliance.addresses.sender_text` prints (`192.0.2.7`, `198.51.100.0/24`,
`2001:db8:1:2::/64`); its timeout is the remaining seconds, or None for a
permanent block.
"""

import functools
import logging
import math
import socket
from dataclasses import dataclass
from dataclasses import field

from appliance.addresses import AddressError
from appliance.addresses import parse_network
from appliance.addresses import sender_text

log = logging.getLogger(__name__)

# the longest per-entry timeout ipset accepts, in seconds (about 24.8 days)
KERNEL_MAX_TIMEOUT = 2147483
# how far the kernel's countdown may differ from the wanted one before re-timing
TIMEOUT_SLACK = 5
# an entry capped at the kernel maximum is topped up once a day
CAPPED_SLACK = 86400


@dataclass
class Change:
    """One sync as data: entries added, removed and re-timed, with their timeouts.

    After the kernel applied it, `enforced` holds every entry the kernel
    enforces (in its set, with its family's rule in place), `repaired` says
    which sets or rules had to be put back, `errors` what could not be put
    back, and `overflow` lists the entries left out because their set was full.
    `needs_setup` says a missing rule can only be written by the privileged
    setup step (`python -m enforcement setup`): this process lacks CAP_NET_RAW.
    """

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    retimed: list[str] = field(default_factory=list)
    timeouts: dict[str, int | None] = field(default_factory=dict, repr=False)
    enforced: set[str] = field(default_factory=set, repr=False)
    repaired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)
    needs_setup: bool = False

    def __bool__(self):
        """Whether the sync changes anything at all."""
        return bool(self.added or self.removed or self.retimed)

    def lines(self):
        """The change in words, one line per entry: `add 192.0.2.7 (timeout 3600s)`."""
        for entry in self.removed:
            yield f"remove {entry}"
        for entry in self.added:
            yield f"add {entry} ({lifetime(self.timeouts[entry])})"
        for entry in self.retimed:
            yield f"retime {entry} ({lifetime(self.timeouts[entry])})"

    def summary(self):
        """Counts for one log line: `3 added, 1 removed, 0 retimed`."""
        return (
            f"{len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.retimed)} retimed"
        )


def lifetime(timeout):
    """How an entry's timeout reads in logs: `timeout 3600s` or `permanent`."""
    return "permanent" if timeout is None else f"timeout {timeout}s"


def family_of(entry):
    """4 or 6: which set an entry belongs in."""
    return 6 if ":" in entry else 4


@functools.lru_cache(maxsize=1 << 18)
def entry_text(text):
    """The canonical entry text for an address or CIDR; AddressError when bad.

    Every sync reads and writes up to 100,000 entries, so this uses the C
    address parser, remembers its answers and hands back `text` itself when it
    is already canonical; anything unusual goes through the core parser.
    """
    host, slash, prefix = text.strip().partition("/")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        packed = socket.inet_pton(family, host)
    except OSError:
        return sender_text(parse_network(text))
    width = len(packed) * 8
    if slash and not prefix.isdigit():
        raise AddressError(f"{text!r} is not an IP address or CIDR network")
    length = int(prefix) if slash else width
    host_bits = (1 << (width - min(length, width))) - 1
    if not 0 < length <= width or int.from_bytes(packed, "big") & host_bits:
        raise AddressError(f"{text!r} is not an IP address or CIDR network")
    address = socket.inet_ntop(family, packed)
    if family == socket.AF_INET6 and "." in address:
        return sender_text(parse_network(text))
    canonical = address if length == width else f"{address}/{length}"
    return text if canonical == text else canonical


def wanted_state(desired):
    """The desired blocks cleaned for the kernel: canonical keys, capped timeouts.

    Entries whose time has run out (timeout below 1 s) are left out, never sent
    as `timeout 0`, which ipset reads as permanent; unreadable entries are
    logged and left out so one bad entry cannot break a batch.
    """
    wanted = {}
    for text, timeout in desired.items():
        try:
            entry = entry_text(text)
        except AddressError as exc:
            log.error("%s not enforced: %s", text, exc)
            continue
        if timeout is not None:
            if timeout < 1:
                continue
            timeout = min(math.ceil(timeout), KERNEL_MAX_TIMEOUT)
        wanted[entry] = timeout
    return wanted


def needs_retime(held, wanted):
    """Whether an entry present on both sides carries the wrong timeout."""
    if held is None or wanted is None:
        return held != wanted
    slack = CAPPED_SLACK if wanted >= KERNEL_MAX_TIMEOUT else TIMEOUT_SLACK
    return abs(held - wanted) > slack


def plan(held, desired):
    """The Change that turns `held` (what is enforced) into `desired`."""
    return compare(held, wanted_state(desired))


def compare(held, wanted):
    """The Change between two cleaned states (see `wanted_state`)."""
    added = sorted(wanted.keys() - held.keys())
    removed = sorted(held.keys() - wanted.keys())
    retimed = sorted(
        entry
        for entry in wanted.keys() & held.keys()
        if needs_retime(held[entry], wanted[entry])
    )

    timeouts = {entry: wanted[entry] for entry in added + retimed}
    return Change(added=added, removed=removed, retimed=retimed, timeouts=timeouts)


def fit(desired, room):
    """The cleaned desired state cut to `room` entries per set: (state, left out).

    A full set takes the same entries whatever it held before and however the
    blocks arrived: permanent blocks first, then the temporary ones that end
    latest, ties by entry text. The ones left out are listed in that order.
    """
    counts = {4: 0, 6: 0}
    for text in desired:
        counts[family_of(text)] += 1
    if max(counts.values()) <= room:
        return wanted_state(desired), []

    # ranked by the exact time left: whole seconds would tie blocks ending
    # within one second, differently from one sync to the next
    ranked = dict(sorted(desired.items(), key=_precedence))
    kept, overflow = {}, []
    counts = {4: 0, 6: 0}
    for entry, timeout in wanted_state(ranked).items():
        family = family_of(entry)
        if counts[family] < room:
            counts[family] += 1
            kept[entry] = timeout
        else:
            overflow.append(entry)
    return kept, overflow


def _precedence(item):
    """Sort key of a desired (entry, seconds left or None): kept first, first."""
    entry, timeout = item
    return (timeout is not None, -(timeout or 0), entry)
